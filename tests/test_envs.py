"""The environment cache: built once, shared across processes, never half-built."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fal_magic import EnvironmentBuildError, isolated
from fal_magic.envs import EnvCache, make_spec
from fal_magic.envs.cache import MARKER


def _built_dirs(home):
    envs = home / "envs"
    return sorted(p.name for p in envs.iterdir()) if envs.exists() else []


def test_missing_package_is_a_build_error_and_leaves_nothing(fal_home):
    bad = "fal-magic-no-such-package-xyz==1.0"

    @isolated(requirements=[bad, "humanize==4.16.0"])
    def never():
        return 1

    for _ in range(2):  # a retry behaves the same
        with pytest.raises(EnvironmentBuildError) as info:
            never()
        message = str(info.value)
        assert "fal-magic-no-such-package-xyz" in message.split("\n")[0]
        assert "humanize" not in message.split("\n")[0]
        assert "not found" in message or "No matching distribution" in message  # the installer's own text
        assert never.spec.key not in _built_dirs(fal_home)


def test_environment_is_reused_without_reinstall(fal_home):
    cache = EnvCache(fal_home)
    spec = make_spec(["humanize==4.16.0"])
    lines = []
    env = cache.get(spec, lines.append)  # built by the seed test or now
    marker = (env.path / MARKER).stat().st_mtime
    lines.clear()
    again = EnvCache(fal_home).get(spec, lines.append)
    assert again.path == env.path and lines == []
    assert (env.path / MARKER).stat().st_mtime == marker
    cache.release(spec.key)


def test_remains_of_a_killed_build_are_rebuilt(fal_home, tmp_path):
    cache = EnvCache(tmp_path / "home")
    spec = make_spec([])
    half = cache.path_for(spec.key)
    (half / "bin").mkdir(parents=True)  # what a build killed half-way leaves: no marker
    (half / "junk").write_text("x")
    env = cache.get(spec)
    assert (env.path / MARKER).exists() and not (env.path / "junk").exists()
    assert env.python.exists()
    cache.release(spec.key)


def test_two_and_four_processes_build_one_new_key_once(tmp_path):
    home = tmp_path / "home"
    script = textwrap.dedent("""
        import sys
        from fal_magic.envs import EnvCache, make_spec
        lines = []
        env = EnvCache(sys.argv[1]).get(make_spec(["text-unidecode==1.3"]), lines.append)
        print(env.path, any("building" in l for l in lines))
    """)
    for n in (2, 4):
        procs = [subprocess.Popen([sys.executable, "-c", script, str(home / str(n))], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(n)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        paths = {o[0].split()[0] for o in outs}
        builders = [o[0].split()[1] for o in outs].count("True")
        assert len(paths) == 1 and builders == 1
        assert _built_dirs(home / str(n)) == [make_spec(["text-unidecode==1.3"]).key]


def test_cache_directories_are_owner_only(fal_home):
    import stat

    for d in (fal_home, fal_home / "envs", fal_home / "locks"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_unwritable_cache_is_a_clear_error(tmp_path):
    import os

    from fal_magic import FalMagicError

    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores modes: make the path unusable another way
        locked.rmdir()
        locked.write_text("a file, not a directory")
    with pytest.raises(FalMagicError, match=str(locked)):
        EnvCache(locked / "home").get(make_spec([]))


def test_a_new_env_links_the_bytecode_its_kernel_needs_from_an_env_already_used(tmp_path):
    import os
    import struct

    from fal_magic import configure
    from fal_magic.envs.bytecode import site_packages

    configure(home=str(tmp_path))  # a cache of this test's own

    @isolated(keep_alive=0)
    def first():
        return 1

    @isolated(keep_alive=0, requirements=["text-unidecode==1.3"])
    def second():
        import text_unidecode

        return text_unidecode.unidecode("ça")

    assert first() == 1  # its kernel compiles what it imports, and keeps it
    assert second() == "ca"
    tag = sys.implementation.cache_tag

    def pyc(func, module_file):
        src = site_packages(tmp_path / "envs" / func.spec.key) / module_file
        return src, src.parent / "__pycache__" / f"{src.stem}.{tag}.pyc"

    src, linked = pyc(second, "ipykernel/kernelbase.py")
    donor_src, donor = pyc(first, "ipykernel/kernelbase.py")
    if not os.path.samestat(src.stat(), donor_src.stat()):
        pytest.skip("uv copied the files instead of linking them (its cache is on another filesystem)")
    assert os.path.samestat(linked.stat(), donor.stat())  # linked at build, not compiled again
    own_src, own = pyc(second, "text_unidecode/__init__.py")  # not in the first env: compiled on import
    for source, compiled in ((src, linked), (own_src, own)):
        magic, flags, mtime, size = struct.unpack("<4sLLL", compiled.read_bytes()[:16])
        st = source.stat()
        assert flags == 0 and mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size  # valid for Python


def test_a_requirements_file_with_comments_and_an_include_is_read_and_edits_change_the_key(tmp_path):
    from fal_magic.envs.reqfile import expand

    (tmp_path / "base.txt").write_text("# shared pins\nhumanize==4.16.0  # formatting\n")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("-r base.txt\n\ntext-unidecode==1.3 ; python_version >= '3' \\\n    \n")
    assert expand(str(reqs)).requirements == ["humanize==4.16.0", "text-unidecode==1.3 ; python_version >= '3'"]
    assert expand([reqs, "pyjokes"]).requirements == [*expand(reqs).requirements, "pyjokes"]

    @isolated(keep_alive=0, requirements=str(reqs))
    def both(n):
        import humanize
        import text_unidecode

        return humanize.intcomma(n), text_unidecode.unidecode("Ærø")

    assert both(1000) == ("1,000", "AEro")
    first_key = both.spec.key
    reqs.write_text("-r base.txt\n")
    assert isolated(requirements=reqs)(lambda: 1).spec.key != first_key  # the key follows the content

    reqs.write_text("humanize==4.16.0\n--pre\n")
    with pytest.raises(EnvironmentBuildError, match=r"requirements.txt, line 2: the option --pre is not "
                                                    r"supported in requirements files"):
        isolated(requirements=reqs)
    reqs.write_text("humanize==4.16.0\nnot a requirement!!\n")
    with pytest.raises(EnvironmentBuildError, match="invalid requirement"):
        isolated(requirements=reqs)
    with pytest.raises(EnvironmentBuildError, match="cannot read requirements file .*missing.txt"):
        isolated(requirements=str(tmp_path / "missing.txt"))
    reqs.write_text("humanize==4.16.0\n-r gone.txt\n")
    with pytest.raises(EnvironmentBuildError, match=r"requirements.txt, line 2: cannot read requirements file "
                                                    r".*gone.txt"):  # where it was included from
        isolated(requirements=reqs)


def test_the_cell_magic_reads_a_requirements_file(tmp_path):
    from IPython.testing.globalipapp import get_ipython
    from IPython.utils.capture import capture_output

    (tmp_path / "requirements.txt").write_text("humanize==4.16.0\n")
    ip = get_ipython()
    ip.run_line_magic("load_ext", "fal_magic")
    try:
        with capture_output() as out:
            result = ip.run_cell(f"%%isolated --requirements-file {tmp_path / 'requirements.txt'}\n"
                                 "import humanize\nprint(humanize.intcomma(10**6))")
        assert result.success, result.error_in_exec
        assert "1,000,000" in out.stdout
    finally:
        ip.run_line_magic("unload_ext", "fal_magic")
