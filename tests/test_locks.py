"""A lock per environment: a notebook records what its environments got beside it, and a colleague with
an empty cache (and an index that has moved on) gets exactly that; the CLI shows and refreshes it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import fal_magic
from fal_magic import isolated
from fal_magic.envs.lockfile import LockFile
from fal_magic.errors import EnvironmentBuildError, FalMagicError

from .package_index import serve

PACKAGE = "falmagic-lock-probe"  # (its own name: other tests' indexes are not in uv's cache for it)


@pytest.fixture(scope="module")
def last_month(tmp_path_factory):
    """The index as it was when the notebook was locked: version 1.0 only."""
    yield from serve(tmp_path_factory.mktemp("last-month"), ("1.0",), PACKAGE)


@pytest.fixture(scope="module")
def today(tmp_path_factory):
    """The index now: 2.0 is out."""
    yield from serve(tmp_path_factory.mktemp("today"), ("1.0", "2.0"), PACKAGE)


def probe_version():
    import falmagic_lock_probe

    return falmagic_lock_probe.VERSION


@pytest.fixture(scope="module")
def notebook_lock(last_month, tmp_path_factory) -> tuple[Path, str]:
    """A notebook run by nbclient as Jupyter runs it (its path in JPY_SESSION_NAME), with lock="auto":
    the lock it wrote beside itself, and what its cell printed."""
    folder = tmp_path_factory.mktemp("project")
    path = folder / "analysis.ipynb"
    source = textwrap.dedent(f"""\
        import fal_magic
        from fal_magic import isolated

        fal_magic.configure(lock="auto", extra_index_urls=[{last_month.url!r}])

        @isolated(requirements=[{PACKAGE!r}])
        def version():
            import falmagic_lock_probe
            return falmagic_lock_probe.VERSION

        print("got", version())
        """)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nbformat.write(nb, path)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute(
        env={**os.environ, "JPY_SESSION_NAME": str(path)})
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    return folder / "analysis.isolated.lock", printed


def test_a_notebook_with_lock_auto_writes_what_its_environment_got_beside_it(notebook_lock, last_month):
    lock, printed = notebook_lock
    assert "got 1.0" in printed
    assert lock.exists(), sorted(p.name for p in lock.parent.iterdir())
    data = json.loads(lock.read_text())
    [entry] = data["environments"]
    assert entry["requirements"] == [PACKAGE]
    assert f"{PACKAGE}==1.0" in entry["packages"]
    assert any(p.startswith("ipykernel==") for p in entry["packages"])  # the whole set, the kernel's too
    assert entry["python"] == f"cpython-{sys.version_info[0]}.{sys.version_info[1]}"
    assert entry["packages"] == sorted(entry["packages"], key=lambda p: p.split("==")[0].replace("_", "-"))
    assert last_month.url.split("@")[0].split("//")[1] not in lock.read_text()  # no index credentials


def test_a_fresh_cache_with_the_lock_gets_the_locked_version_and_without_it_the_newest(
        notebook_lock, today, tmp_path, caplog):
    lock, _ = notebook_lock
    before = lock.read_bytes()
    fal_magic.configure(home=str(tmp_path / "colleague"), lock=str(lock), extra_index_urls=[today.url])
    probe = isolated(requirements=[PACKAGE], keep_alive=30)(probe_version)
    with caplog.at_level(logging.INFO, logger="fal_magic"):
        assert probe() == "1.0"
    assert "from the lock" in caplog.text
    assert lock.read_bytes() == before  # an entry that is used is not rewritten
    listing = subprocess.run([sys.executable, "-m", "fal_magic", "envs", "list"], capture_output=True, text=True,
                             check=True, env={**os.environ, "FAL_MAGIC_HOME": str(tmp_path / "colleague")}).stdout
    [row] = [line for line in listing.splitlines() if PACKAGE in line]
    assert " lock " in row

    fal_magic.shutdown()
    fal_magic.configure(home=str(tmp_path / "no-lock"), lock=None)
    assert probe() == "2.0"


def test_an_entry_that_cannot_be_installed_says_which_package_and_how_to_refresh_it(
        notebook_lock, today, tmp_path):
    stale = tmp_path / "stale.isolated.lock"
    shutil.copy(notebook_lock[0], stale)
    data = json.loads(stale.read_text())
    packages = data["environments"][0]["packages"]
    packages[packages.index(f"{PACKAGE}==1.0")] = f"{PACKAGE}==0.9"  # yanked since it was locked
    stale.write_text(json.dumps(data, indent=2))
    home = tmp_path / "home"
    fal_magic.configure(home=str(home), lock=str(stale), extra_index_urls=[today.url])
    probe = isolated(requirements=[PACKAGE], keep_alive=30)(probe_version)
    with pytest.raises(EnvironmentBuildError) as caught:
        probe()
    message = str(caught.value)
    assert f"{PACKAGE}==0.9" in message and f"python -m fal_magic lock refresh {stale}" in message
    assert not [p for p in (home / "envs").iterdir()]  # nothing half-built

    env = {**os.environ, "PIP_EXTRA_INDEX_URL": today.url}
    refreshed = subprocess.run([sys.executable, "-m", "fal_magic", "lock", "refresh", str(stale), PACKAGE],
                               capture_output=True, text=True, env=env)
    assert refreshed.returncode == 0, refreshed.stderr
    assert f"- {PACKAGE}==0.9" in refreshed.stdout and f"+ {PACKAGE}==2.0" in refreshed.stdout
    shown = subprocess.run([sys.executable, "-m", "fal_magic", "lock", "show", str(stale)], capture_output=True,
                           text=True, check=True).stdout
    assert f"    {PACKAGE}==2.0" in shown and PACKAGE in shown.splitlines()[2]
    assert probe() == "2.0"


@pytest.fixture
def elsewhere(tmp_path):
    """An index the lock's editor would rather have packages come from; it counts what it serves."""
    yield from serve(tmp_path / "elsewhere", ("1.0", "6.6.6"), PACKAGE, password=False)


@pytest.mark.parametrize("tampered", ["option", "option after a pin", "range", "url", "bytes"])
def test_a_lock_that_holds_anything_but_pins_is_refused_before_anything_is_fetched(
        notebook_lock, elsewhere, today, tmp_path, tampered):
    """A lock travels with the notebook: what it says is untrusted input, never an installer's argument."""
    lock = tmp_path / "shared.isolated.lock"
    if tampered == "bytes":
        lock.write_bytes(os.urandom(256) + b"\xff\xfe")
    else:
        data = json.loads(notebook_lock[0].read_text())
        packages = data["environments"][0]["packages"]
        pin = packages.index(f"{PACKAGE}==1.0")
        packages[pin] = {
            "option": f"--extra-index-url={elsewhere.url}",
            "option after a pin": f"{PACKAGE}==1.0 --index-url {elsewhere.url}",
            "range": f"{PACKAGE}>=1.0",
            "url": f"{PACKAGE} @ {elsewhere.url}../files/falmagic_lock_probe-6.6.6-py3-none-any.whl",
        }[tampered]
        lock.write_text(json.dumps(data, indent=2))
    home = tmp_path / "home"
    fal_magic.configure(home=str(home), lock=str(lock), extra_index_urls=[today.url])
    probe = isolated(requirements=[PACKAGE], keep_alive=30)(probe_version)
    with pytest.raises(FalMagicError) as caught:
        probe()
    message = str(caught.value)
    assert str(lock) in message and "Traceback" not in message
    assert ("not UTF-8 text" in message) if tampered == "bytes" else (
        "exact pins" in message and PACKAGE in message and "lock refresh" in message)
    assert elsewhere.served == []  # nothing fetched from where the lock pointed
    assert not (home / "envs").exists() or not list((home / "envs").iterdir())  # nothing half-built


RECORDER = """
import sys
from pathlib import Path
from fal_magic.envs.lockfile import LockEntry, LockFile

lock, who = LockFile(Path(sys.argv[1])), sys.argv[2]
for i in range(30):
    lock.record(LockEntry((f"{who}-{i}",), (), "cpython-3.11", "linux-x86_64", packages=(f"{who}-{i}==1.0",)))
"""


def test_two_processes_recording_into_one_lock_keep_every_entry(tmp_path):
    path = tmp_path / "shared.isolated.lock"
    writers = [subprocess.Popen([sys.executable, "-c", RECORDER, str(path), who]) for who in ("alice", "bob")]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    names = {e.requirements[0] for e in LockFile(path).entries()}
    assert names == {f"{who}-{i}" for who in ("alice", "bob") for i in range(30)}
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary files left beside it


def test_pip_resolves_a_lock_entry_too(tmp_path):
    from fal_magic.envs import EnvCache, spec_for
    from fal_magic.envs.spec import host_cloudpickle

    packages = EnvCache(tmp_path, installer="pip").resolve(spec_for(["humanize==4.16.0"]))
    assert {"humanize==4.16.0", f"cloudpickle=={host_cloudpickle()}"} <= set(packages)
    assert any(p.startswith("ipykernel==") for p in packages) and all("==" in p for p in packages)
