"""Shared fixtures: one environment cache for the whole run, a clean pool per test, and the
suite-level check that no kernel outlives the tests."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

# Environments are shared by every test of a run (and by the processes the tests start):
# FAL_MAGIC_TEST_HOME keeps them across runs on a developer's machine.
_HOME = os.environ.get("FAL_MAGIC_TEST_HOME")


def kernel_pids(home: Path) -> list[int]:
    """Pids of live kernel processes whose Python lives in ``home`` (kernels the tests started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if b"ipykernel_launcher" in cmd and cmd[0].decode(errors="replace").startswith(str(home)):
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    """True while any thread of the process runs (a zombie leader may still have live threads)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        tasks = len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return False
    return state != "Z" or tasks > 1


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; bounds waits without timing claims."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def assert_ctrl_c_interrupts_and_the_kernel_survives(within: float) -> None:
    """Ctrl-C one second into a 30 s isolated call (on the configured host) raises KeyboardInterrupt
    within ``within`` seconds, and the same kernel process serves the next call."""
    from fal_magic import isolated

    @isolated(keep_alive=30)
    def pid():
        import os

        return os.getpid()

    @isolated(keep_alive=30)
    def slow():
        import time

        time.sleep(30)

    before = pid()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        slow()
    assert time.monotonic() - started < within
    assert pid() == before


@pytest.fixture(scope="session")
def fal_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = Path(_HOME) if _HOME else tmp_path_factory.mktemp("fal_home")
    return home


@pytest.fixture(scope="session", autouse=True)
def _session_home(fal_home: Path):
    """Point fal_magic (and every process a test starts) at the shared cache; check for orphans at the end."""
    os.environ["FAL_MAGIC_HOME"] = str(fal_home)
    yield
    from fal_magic.kernel import get_pool

    get_pool().close()
    assert wait_until(lambda: not kernel_pids(fal_home), timeout=15), (
        f"kernels outlived the test suite: {kernel_pids(fal_home)}")


@pytest.fixture(autouse=True)
def _fresh_pool():
    """Each test starts with no warm kernels and leaves none behind."""
    from fal_magic import config
    from fal_magic.kernel import get_pool

    yield
    get_pool().shutdown()
    config.adopt(config.FalMagic())
