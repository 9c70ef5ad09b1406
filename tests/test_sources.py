"""Where packages come from: a private index (configured three ways, with a password that never shows),
requirements files with constraints and index options, and the user's own packages."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import fal_magic
from fal_magic import isolated
from fal_magic.envs import spec_for
from fal_magic.envs.indexes import Indexes
from fal_magic.errors import EnvironmentBuildError, FalMagicError

from . import package_index

PACKAGE = package_index.PACKAGE
PASSWORD = package_index.PASSWORD


@pytest.fixture(scope="module")
def private_index(tmp_path_factory):
    yield from package_index.serve(tmp_path_factory.mktemp("index"), ("1.0", "2.0"))


def probe_version():
    import falmagic_private_probe

    return falmagic_private_probe.VERSION


@pytest.fixture
def no_sources(monkeypatch):
    """fal_magic's own index settings empty again after the test."""
    yield monkeypatch
    fal_magic.configure(index_url="", extra_index_urls=[], find_links=[])


def test_a_private_index_set_by_configure_builds_and_its_password_never_shows(
        private_index, no_sources, caplog, capsys, tmp_path):
    fal_magic.configure(extra_index_urls=[private_index.url])
    probe = isolated(requirements=[PACKAGE], keep_alive=30)(probe_version)
    with caplog.at_level(logging.DEBUG, logger="fal_magic"):
        assert probe() == "2.0"
    assert any(PACKAGE in p for p in private_index.served)  # fetched with the password, from this index
    key = fal_magic.kernels().records()[0].key
    meta = (Path(fal_magic.configure().home_path()) / "envs" / key / "fal_magic-env.json").read_text()
    assert "127.0.0.1" in json.dumps(json.loads(meta)["sources"])  # the metadata says where packages came from
    listing = subprocess.run([sys.executable, "-m", "fal_magic", "envs", "list"], capture_output=True,
                             text=True, check=True).stdout
    kernels = fal_magic.kernels()
    shown = [caplog.text, capsys.readouterr().out, meta, listing, repr(kernels), kernels._repr_html_()]
    assert key in listing
    assert "****" in caplog.text  # the URL is shown, masked
    for text in shown:
        assert PASSWORD not in text

    # another index is another environment; a rotated password is the same one
    rotated = spec_for([PACKAGE]).resolved(Indexes(extra_index_urls=(private_index.url.replace(PASSWORD, "new"),)))
    same = spec_for([PACKAGE]).resolved(Indexes(extra_index_urls=(private_index.url,)))
    assert rotated.key == same.key == key
    assert spec_for([PACKAGE]).resolved(Indexes(extra_index_urls=("https://other.invalid/simple",))).key != key
    fal_magic.shutdown()


def test_a_private_index_from_a_pip_conf_file(private_index, no_sources, tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = {private_index.url}\n")
    no_sources.setenv("PIP_CONFIG_FILE", str(conf))
    probe = isolated(requirements=[PACKAGE], keep_alive=0)(probe_version)
    assert probe() == "2.0"


def test_a_private_index_from_pip_index_url_with_a_failing_build_that_hides_the_password(
        private_index, no_sources, tmp_path):
    no_sources.setenv("PIP_INDEX_URL", private_index.url)
    no_sources.setenv("PIP_EXTRA_INDEX_URL", "https://pypi.org/simple")
    probe = isolated(requirements=[f"{PACKAGE}>=1"], keep_alive=0)(probe_version)
    assert probe() == "2.0"
    missing = isolated(requirements=[f"{PACKAGE}>=9"], keep_alive=0)(probe_version)
    with pytest.raises(EnvironmentBuildError) as failed:
        missing()
    assert PACKAGE in str(failed.value) and PASSWORD not in str(failed.value)


def test_a_requirements_file_with_index_options_and_constraints(private_index, no_sources, tmp_path):
    (tmp_path / "constraints.txt").write_text(f"{PACKAGE}<2\n")
    reqs = tmp_path / "requirements.txt"
    no_sources.setenv("INDEX_PASSWORD", PASSWORD)
    url = private_index.url.replace(PASSWORD, "${INDEX_PASSWORD}")  # as pip does, from the environment
    reqs.write_text(f"--extra-index-url {url}\n-c constraints.txt\n{PACKAGE}\n")
    spec = spec_for(reqs)
    assert spec.constraints == (f"{PACKAGE}<2",) and spec.indexes.extra_index_urls == (private_index.url,)
    pinned = isolated(requirements=reqs, keep_alive=0)(probe_version)
    assert pinned() == "1.0"  # the constraint held: 2.0 is on the index
    reqs.write_text(f"--extra-index-url {url}\n{PACKAGE}\n")
    assert isolated(requirements=reqs, keep_alive=0)(probe_version)() == "2.0"


def write_package(root: Path, value: int) -> Path:
    """A local package ``mylib`` (flit) whose ``VALUE`` is ``value``."""
    (root / "mylib").mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["flit_core>=3.4,<4"]\nbuild-backend = "flit_core.buildapi"\n'
        '[project]\nname = "mylib"\nversion = "0.1"\ndescription = "a local package"\n')
    (root / "mylib" / "__init__.py").write_text(f"VALUE = {value}\n")
    return root


def mylib_value():
    import mylib

    return mylib.VALUE


def test_a_local_package_is_installed_from_its_sources_and_an_edit_makes_a_new_environment(tmp_path, monkeypatch):
    write_package(tmp_path / "src" / "mylib", 1)
    (tmp_path / "src" / "mylib" / ".git").mkdir()
    monkeypatch.chdir(tmp_path / "src")
    value = isolated(requirements=["./mylib"], keep_alive=30)(mylib_value)
    assert value() == 1
    first = fal_magic.kernels().records()[0].key
    (tmp_path / "src" / "mylib" / ".git" / "index").write_text("not a source")
    assert spec_for(["./mylib"]).key == spec_for([str(tmp_path / "src" / "mylib")]).key  # .git is not a source
    (tmp_path / "src" / "mylib" / "mylib" / "__init__.py").write_text("VALUE = 2\n")
    assert value() == 2  # the same function: the edit is seen at the call, not only at decoration
    assert {k.key for k in fal_magic.kernels()} >= {first}
    assert len({k.key for k in fal_magic.kernels()}) == 2
    fal_magic.shutdown()


def test_a_file_reference_written_without_spaces_is_a_local_package_whose_edits_are_seen(tmp_path):
    root = write_package(tmp_path / "mylib", 1)
    value = isolated(requirements=[f"mylib@{root.as_uri()}"], keep_alive=30)(mylib_value)  # PEP 508 allows it
    assert value() == 1
    (root / "mylib" / "__init__.py").write_text("VALUE = 20\n")
    assert value() == 20  # the edit reached the environment: its sources are part of the key
    fal_magic.shutdown()


def test_an_editable_package_keeps_its_key_and_new_kernels_see_edits(tmp_path):
    root = write_package(tmp_path / "editable", 1)
    value = isolated(requirements=[f"-e {root}"], keep_alive=30)(mylib_value)
    assert value() == 1
    key = value.spec.key
    # another size: Python trusts a .pyc whose source has the same size and modification second, and
    # this edit may fall in the second the first kernel compiled the file in
    (root / "mylib" / "__init__.py").write_text("VALUE = 30\n")
    assert spec_for([f"-e {root}"]).key == key
    fal_magic.shutdown()
    assert value() == 30


def test_bad_local_packages_and_remote_hosts_get_clear_errors(tmp_path, remote):
    with pytest.raises(EnvironmentBuildError, match="local package .*nowhere does not exist"):
        isolated(requirements=[str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnvironmentBuildError, match="not a Python package"):
        isolated(requirements=["-e " + str(tmp_path / "empty")])
    root = write_package(tmp_path / "pkg", 1)
    far = isolated(requirements=[str(root)], host=remote)(mylib_value)
    with pytest.raises(FalMagicError, match="cannot install them"):
        far()


def test_a_new_environment_is_resolved_from_uv_s_cache_without_asking_the_index(private_index, no_sources):
    fal_magic.configure(extra_index_urls=[private_index.url])
    assert isolated(requirements=[PACKAGE], keep_alive=0)(probe_version)() == "2.0"  # in uv's cache now
    asked = len(private_index.served)
    # a marker that always holds makes another environment of the same package
    cached = isolated(requirements=[f'{PACKAGE} ; python_version >= "3.1"'], keep_alive=0)(probe_version)
    assert cached() == "2.0"
    assert len(private_index.served) == asked  # resolved from uv's cache alone
    fal_magic.configure(prefer_cached=False)
    asking = isolated(requirements=[f'{PACKAGE} ; python_version >= "3.2"'], keep_alive=0)(probe_version)
    assert asking() == "2.0"
    assert len(private_index.served) > asked
