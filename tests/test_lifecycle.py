"""Keep-alive, culling and cleanup: kernels live exactly as long as promised, and never longer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from fal_magic import isolated
from fal_magic.kernel import get_pool

from .conftest import leaked_kernels, leaked_templates, pid_alive, wait_until


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _pid_fn(keep_alive):
    @isolated(keep_alive=keep_alive)
    def pid():
        import os

        return os.getpid()

    return pid


def test_idle_kernel_is_culled_after_its_keep_alive():
    pid = _pid_fn(1.0)
    kernel_pid = pid()
    [info] = get_pool().snapshot()
    assert 0 < info.seconds_left <= 1.0
    assert pid_alive(kernel_pid)
    assert wait_until(lambda: not pid_alive(kernel_pid), timeout=10)
    assert get_pool().snapshot() == []


def test_keep_alive_zero_shuts_down_right_after_the_call():
    pid = _pid_fn(0)
    kernel_pid = pid()
    assert wait_until(lambda: not pid_alive(kernel_pid), timeout=10)
    assert get_pool().snapshot() == []


def test_each_call_restarts_the_timer():
    pid = _pid_fn(4)
    first = pid()
    [info] = get_pool().snapshot()
    first_deadline = info.deadline
    assert 0 <= first_deadline - info.last_used - 4 < 0.5  # call end + keep_alive
    time.sleep(1.0)
    assert pid() == first
    [info] = get_pool().snapshot()
    assert info.deadline > first_deadline  # the second call restarted the timer
    wait_until(lambda: time.time() > first_deadline + 0.5, timeout=10)  # past the first call's deadline
    assert pid() == first  # still warm: kept by the second call's deadline
    assert wait_until(lambda: not pid_alive(first), timeout=20)


def test_a_short_keep_alive_never_cuts_short_a_longer_promise():
    long = _pid_fn(30)
    short = long.on(keep_alive=0)
    first = long()
    [info] = get_pool().snapshot()
    promised = info.deadline
    assert short() == first  # same key, same kernel
    [info] = get_pool().snapshot()
    assert info.deadline >= promised and info.seconds_left > 20 and pid_alive(first)


def _script(body: str) -> str:
    """A host whose kernels are its own (``kernel_scope="process"``, the opt-out of the user's pool)."""
    return textwrap.dedent("""
        import os, sys
        import fal_magic
        from fal_magic import isolated

        fal_magic.configure(kernel_scope="process")

        @isolated(keep_alive=300)
        def pid():
            import os
            return os.getpid()
    """) + textwrap.dedent(body)


def test_kernels_stop_when_the_host_exits_normally(fal_home):
    body = """
        print(pid(), pid.on(requirements=["humanize==4.16.0"])(), flush=True)
    """
    templates_before = set(leaked_templates())  # this process's own
    out = subprocess.run([sys.executable, "-c", _script(body)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    kernel_pids = [int(p) for p in out.stdout.split()]
    # shut down by the host's exit cleanup, before it exited: not left to notice their parent is gone
    assert not any(pid_alive(p) for p in kernel_pids)
    assert set(leaked_templates()) <= templates_before  # the templates they were forked from too


def test_kernels_exit_when_the_host_is_killed(fal_home):
    body = """
        from fal_magic.envs import make_spec
        from fal_magic.kernel import get_pool
        pool = get_pool()
        leased = [pool.acquire(make_spec([]), max_kernels=3) for _ in range(3)]
        for k in leased:
            pool.release(k, 300)
        print(" ".join(str(k.pid) for k in leased), flush=True)
        sys.stdin.read()
    """
    proc = subprocess.Popen([sys.executable, "-c", _script(body)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        templates = {_parent(p) for p in pids} - {proc.pid}  # forked kernels' parent: their template
        assert templates and templates <= set(leaked_templates())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=8), "orphan kernels"
        assert wait_until(lambda: not any(pid_alive(p) for p in templates), timeout=8), "orphan templates"
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not leaked_kernels(), timeout=5)


def test_a_busy_kernel_is_never_culled_even_past_its_deadline():
    @isolated(keep_alive=1)
    def quick():
        import os

        return os.getpid()

    @isolated(keep_alive=1)
    def long_call(seconds):
        import os
        import time

        time.sleep(seconds)
        return os.getpid()

    first = quick()
    assert long_call(3) == first  # the deadline of the first call passed while this one ran
