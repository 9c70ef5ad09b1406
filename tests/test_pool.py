"""One warm pool per user and machine (SPEC 13, ``kernel_scope="user"``): real processes, real
kernels. A script run again finds the kernel the first run left warm, with its ``@cached`` values;
two processes at once never share a call; a caller killed mid-call leaves a kernel that serves the
next one; kernels end at their deadline with no process left; the registry trusts only what is the
user's alone."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fal_magic
from fal_magic import FalMagicError, isolated
from fal_magic.kernel import get_pool
from fal_magic.kernel.registry import RUNTIME_PREFIX, SHM_ROOT, home_digest

from .conftest import pid_alive, wait_until

SCRIPT = """
import json, os, sys, time
import fal_magic
from fal_magic import cached, isolated

fal_magic.configure(kernel_scope="user")

@cached
def loaded():
    return os.urandom(4).hex()  # (a model that takes long to load, once per warm kernel)

@isolated(keep_alive=float(sys.argv[1]), max_kernels=int(sys.argv[2]))
def work(seconds):
    import os, time
    print("started", flush=True)
    begun = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "cached": loaded(), "begun": begun, "ended": time.time()}

print(json.dumps(work(float(sys.argv[3]))), flush=True)
"""


@pytest.fixture
def pool(tmp_path):
    """This process in the user's pool too (its shutdown then reaches every process's kernels), and
    the script the tests run as other processes."""
    fal_magic.configure(kernel_scope="user")
    script = tmp_path / "work.py"
    script.write_text(SCRIPT)
    return script


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def run(script, keep_alive=30, max_kernels=1, seconds=0.0, timeout=300) -> dict:
    out = subprocess.run([sys.executable, str(script), str(keep_alive), str(max_kernels), str(seconds)],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def start(script, keep_alive=30, max_kernels=1, seconds=0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(keep_alive), str(max_kernels), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_script_run_again_finds_its_warm_kernel_and_cached_values_and_nothing_outlives_the_deadline(pool):
    first = run(pool, keep_alive=4)
    assert pid_alive(first["pid"])  # the first run is over; its kernel is warm
    second = run(pool, keep_alive=4)
    assert second["pid"] == first["pid"] and second["cached"] == first["cached"]
    [info] = [k for k in fal_magic.kernels() if k.pid == first["pid"]]
    assert info.state == "idle" and info.holder is None and 0 < info.seconds_left <= 4
    # nobody is left: the kernel ends at its deadline, and the template it was forked from after it
    template = parent_of(first["pid"])
    assert wait_until(lambda: not pid_alive(first["pid"]), timeout=20)
    assert wait_until(lambda: not pid_alive(template), timeout=20)
    assert not [k for k in fal_magic.kernels() if k.pid == first["pid"]]
    registry = get_pool().registry()
    assert registry is not None and not list(registry.dir.glob("*.json"))
    shm_dir = Path(SHM_ROOT) / f"{RUNTIME_PREFIX}{os.getuid()}-{home_digest(registry.home)}"
    assert not shm_dir.exists()  # shared memory is given back with the pool's last kernel


def test_two_processes_at_once_get_two_kernels_and_never_share_a_call(pool):
    both = [start(pool, max_kernels=2, seconds=2), start(pool, max_kernels=2, seconds=2)]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in both]
    assert results[0]["pid"] != results[1]["pid"]  # room for two: both ran at once, each on its own

    fal_magic.shutdown()
    one = [start(pool, max_kernels=1, seconds=1), start(pool, max_kernels=1, seconds=1)]
    results = sorted((json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in one),
                     key=lambda r: r["begun"])
    assert len({r["pid"] for r in results}) == 1  # max_kernels=1 holds across processes
    assert results[0]["ended"] <= results[1]["begun"]  # one call at a time in it


def test_a_caller_killed_mid_call_leaves_a_kernel_that_serves_the_next_caller(pool):
    victim = start(pool, seconds=120)
    assert victim.stdout is not None
    assert "started" in victim.stdout.readline()  # the call runs in the kernel
    [busy] = [k for k in fal_magic.kernels() if k.state == "busy"]
    assert busy.holder == victim.pid  # the list says which process holds it
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    after = run(pool, timeout=60)  # the kernel interrupted the orphaned call: it serves now, not in 120 s
    assert after["pid"] == busy.pid


def test_this_process_leases_a_kernel_another_started_and_stops_every_kernel_of_the_pool(pool):
    other = run(pool)

    @isolated(keep_alive=30)
    def work(seconds):  # the same function, and so the same key, as the script's
        import os

        return {"pid": os.getpid()}

    assert work(0)["pid"] == other["pid"]
    stopped = fal_magic.shutdown()
    assert stopped and wait_until(lambda: not pid_alive(other["pid"]), timeout=20)
    assert not fal_magic.kernels()


def test_a_registry_open_to_others_or_an_entry_it_cannot_trust_is_refused(pool, caplog):
    registry = get_pool().registry()
    assert registry is not None
    registry.check()
    forged = registry.dir / "f0f0f0f0f0f0.json"
    forged.write_text(json.dumps({"id": "f0f0f0f0f0f0", "slot": "x", "key": "x", "requirements": [],
                                  "python": "cpython-3.11", "pid": os.getpid(), "connection_file": "/tmp/x.json",
                                  "log_path": "/tmp/x", "begun_path": "/tmp/y", "started_at": time.time()}))
    os.chmod(forged, 0o644)  # readable by others: not the user's alone
    with caplog.at_level(logging.WARNING, logger="fal_magic"):
        assert not [k for k in fal_magic.kernels() if k.kernel_id == "f0f0f0f0f0f0"]
    assert any(str(forged) in r.getMessage() and "refuses" in r.getMessage() for r in caplog.records)
    forged.unlink()

    os.chmod(registry.dir, 0o777)
    try:
        @isolated(keep_alive=5)
        def nothing():
            return None

        with pytest.raises(FalMagicError, match=r"refuses the kernel registry .* mode drwxrwxrwx"):
            nothing()
    finally:
        os.chmod(registry.dir, 0o700)


def test_without_the_pool_a_script_leaves_nothing_running(tmp_path):
    script = tmp_path / "alone.py"
    script.write_text(textwrap.dedent(SCRIPT).replace('fal_magic.configure(kernel_scope="user")', ""))
    result = run(script)
    assert wait_until(lambda: not pid_alive(result["pid"]), timeout=15)  # ended with its process


def test_the_command_line_lists_the_pool_with_who_holds_each_kernel_and_stops_them(pool):
    busy = start(pool, seconds=120)
    assert busy.stdout is not None and "started" in busy.stdout.readline()
    try:
        listed = subprocess.run([sys.executable, "-m", "fal_magic", "kernels"], capture_output=True, text=True,
                                timeout=60, check=True).stdout
        [kernel] = [k for k in fal_magic.kernels() if k.state == "busy"]
        assert f"busy (process {busy.pid})" in listed and str(kernel.pid) in listed
        stopped = subprocess.run([sys.executable, "-m", "fal_magic", "kernels", "stop", "--all"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
        assert stopped.startswith("stopped 1 kernel") and kernel.kernel_id in stopped
        assert wait_until(lambda: not pid_alive(kernel.pid), timeout=20)
        assert busy.wait(timeout=60) != 0  # its caller's call failed: the kernel was stopped under it
    finally:
        busy.kill()
        busy.wait()


NOTEBOOK = [
    """\
    %load_ext fal_magic
    import fal_magic
    from fal_magic import cached, isolated

    fal_magic.configure(kernel_scope="user")

    @cached
    def model():
        import os
        return os.urandom(4).hex()

    @isolated(keep_alive=60)
    def loaded():
        import os
        return os.getpid(), model()

    print("loaded", *loaded())
    """,
    """\
    %%isolated --keep-alive 60
    print("before", "mine" in globals())
    mine = 42
    """,
]


def test_a_restarted_notebook_finds_the_warm_kernel_with_a_fresh_namespace_and_the_cached_values(pool):
    """Run by nbclient twice, as "Restart Kernel and Run All" does: the second run's kernel process is
    new, its isolated kernel is the same warm one, and its cell variables start empty."""
    import nbformat
    from nbclient import NotebookClient

    def run_notebook() -> list[str]:
        cells = [nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in NOTEBOOK]
        nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                            "display_name": "Python 3"}})
        NotebookClient(nb, timeout=300, kernel_name="python3").execute()
        return ["".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout") for cell in nb.cells]

    first, second = run_notebook(), run_notebook()
    assert first[0] == second[0]  # the same kernel pid, and @cached kept its value
    assert first[1] == second[1] == "before False\n"  # each session's namespace is its own
