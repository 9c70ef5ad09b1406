"""The fault suite: each fault injected for real, each outcome what a user would want."""
from __future__ import annotations

import gc
import glob
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fal_magic import EnvironmentBuildError, KernelDiedError, SerializationError, configure, isolated
from fal_magic.envs import EnvCache, make_spec
from fal_magic.envs.cache import MARKER
from fal_magic.kernel import get_pool

from .conftest import leaked_kernels, pid_alive, wait_until


@isolated(keep_alive=60)
def kernel_pid():
    import os

    return os.getpid()


def _died(fn, *args):
    """Call ``fn`` expecting the kernel to die; return the error and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(KernelDiedError) as info:
        fn(*args)
    return info.value, time.monotonic() - started


# -- the kernel dies mid-call ---------------------------------------------------------------------


def test_sigkill_from_outside_mid_call():
    @isolated(keep_alive=60)
    def sleep_long():
        import time

        time.sleep(60)

    victim = kernel_pid()
    threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
    err, took = _died(sleep_long)
    assert took < 30  # a bound on a hang, not a timing claim
    assert "killed by signal 9 (SIGKILL)" in str(err) and err.exit_code == -9
    assert kernel_pid() != victim  # the next call works, on a fresh kernel


def test_os_exit_mid_call():
    @isolated(keep_alive=60)
    def leave():
        import os

        os._exit(1)

    err, _ = _died(leave)
    assert "exited with code 1" in str(err)
    assert pid_alive(kernel_pid())


def test_segfault_mid_call_reports_the_signal_and_the_crashing_frame():
    @isolated(keep_alive=60)
    def crash():
        import ctypes

        ctypes.string_at(0)

    err, _ = _died(crash)
    assert "killed by signal 11 (SIGSEGV)" in str(err)
    assert "Segmentation fault" in err.stderr_tail and "in crash" in err.stderr_tail
    assert pid_alive(kernel_pid())


def test_memory_blowup_under_rlimit_as_is_a_memory_error_and_the_kernel_survives():
    @isolated(keep_alive=60)
    def blow_up():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, resource.RLIM_INFINITY))
        hog = []
        while True:
            hog.append(bytearray(100 * 2**20))

    before = kernel_pid()
    with pytest.raises(MemoryError):
        blow_up()
    assert kernel_pid() == before  # Python turned the failed allocation into an exception


def test_a_kernel_that_died_while_idle_is_replaced():
    first = kernel_pid()
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(first), timeout=10)
    assert kernel_pid() != first


def test_a_call_right_after_its_idle_kernel_was_killed_runs_on_a_fresh_one():
    for _ in range(30):  # the kill lands before, while and after the request goes out
        first = kernel_pid()
        os.kill(first, signal.SIGKILL)
        second = kernel_pid()  # at once: the request reached no running code, so it is not lost
        assert second != first


# -- interrupts -----------------------------------------------------------------------------------


def test_a_call_that_ignores_ctrl_c_is_stopped_after_the_grace_period():
    configure(interrupt_grace=1.0)

    @isolated(keep_alive=60)
    def stubborn():
        import time

        while True:  # swallows every KeyboardInterrupt
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                pass

    victim = kernel_pid()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KernelDiedError, match="did not stop within 1s") as info:
        stubborn()
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    assert time.monotonic() - started < 30
    assert wait_until(lambda: not pid_alive(victim), timeout=10)
    assert kernel_pid() != victim


@isolated(keep_alive=60, max_kernels=3)
def nap(seconds, marker_dir):
    """Sleep; an interrupt leaves a file named after the kernel's pid in ``marker_dir``."""
    import os
    import time

    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        open(os.path.join(marker_dir, str(os.getpid())), "w").close()
        raise
    return os.getpid()


def test_ctrl_c_stops_every_item_of_a_map_and_the_same_kernels_serve_the_next(tmp_path):
    nap.warmup().result(timeout=120)
    warm = {k.pid for k in get_pool().snapshot()}
    assert len(warm) == 3
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        list(nap.map([60] * 3, [str(tmp_path)] * 3))
    assert sorted(int(name) for name in os.listdir(tmp_path)) == sorted(warm)  # each item saw the interrupt
    started = time.monotonic()
    again = list(nap.map([0] * 3, [str(tmp_path)] * 3))
    assert time.monotonic() - started < 30  # not behind the interrupted items (each would nap 60 s)
    assert set(again) <= warm and {k.pid for k in get_pool().snapshot()} == warm  # warm, none replaced


def test_cancelling_a_started_submit_interrupts_its_call_and_the_kernel_stays(tmp_path):
    pid = nap(0, str(tmp_path))
    future = nap.submit(60, str(tmp_path))
    assert not wait_until(future.done, timeout=1.0)  # it has begun, and runs
    assert future.cancel() and future.cancelled()
    assert wait_until(lambda: os.listdir(tmp_path) == [str(pid)], timeout=20)  # the call saw the interrupt
    assert wait_until(lambda: [k.state for k in get_pool().snapshot()] == ["idle"], timeout=20)
    assert nap(0, str(tmp_path)) == pid  # and its kernel, warm, serves the next


# -- bad requirements and broken builds ------------------------------------------------------------


def test_conflicting_pins_are_a_build_error_naming_the_requirement(fal_home):
    @isolated(requirements=["humanize==4.16.0", "humanize==4.15.0"])
    def never():
        return 1

    for _ in range(2):
        with pytest.raises(EnvironmentBuildError, match="humanize") as info:
            never()
        assert "humanize==4.15.0" in str(info.value) and "humanize==4.16.0" in str(info.value)
        assert not (fal_home / "envs" / never.spec.key).exists()


def test_a_build_killed_half_way_is_rebuilt_from_scratch(tmp_path):
    home = tmp_path / "home"
    spec = make_spec(["toolz==1.0.0"])
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from fal_magic.envs import EnvCache, make_spec
        EnvCache({str(home)!r}).get(make_spec(["toolz==1.0.0"]))
    """)])
    env_dir = home / "envs" / spec.key
    try:
        assert wait_until(lambda: (env_dir / "pyvenv.cfg").exists(), timeout=60, interval=0.01)
        proc.kill()  # mid-build: the venv exists, the installs have not finished
    finally:
        proc.wait()
    assert not (env_dir / MARKER).exists()
    cache = EnvCache(home)
    env = cache.get(spec)
    assert (env.path / MARKER).exists()
    check = subprocess.run([str(env.python), "-c", "import toolz, ipykernel; print(toolz.__version__)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "1.0.0", check.stderr
    cache.release(spec.key)


# -- serialization --------------------------------------------------------------------------------


def test_an_open_socket_argument_is_named_and_nothing_starts():
    @isolated
    def use(conn):
        return conn

    with socket.socket() as s:
        with pytest.raises(SerializationError, match="argument 'conn' of .*use\\(\\), of type socket.socket"):
            use(s)
    assert get_pool().snapshot() == []


# -- host lifetime ----------------------------------------------------------------------------------


def test_no_stray_runtime_files_after_the_host_is_killed(fal_home):
    import tempfile

    script = textwrap.dedent("""
        import sys
        import fal_magic
        from fal_magic.kernel import get_pool
        from fal_magic import isolated
        fal_magic.configure(kernel_scope="process")  # (the user's pool keeps its own directories)
        @isolated(keep_alive=300)
        def pid():
            import os
            return os.getpid()
        print(pid(), get_pool().runtime_dir(), flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        kpid, runtime_dir = proc.stdout.readline().split()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: not pid_alive(int(kpid)), timeout=8)
    finally:
        proc.kill()
        proc.wait()
    assert Path(runtime_dir).exists() and Path(runtime_dir).parent == Path(tempfile.gettempdir())
    shm_dirs = glob.glob(f"/dev/shm/fal_magic-{proc.pid}-*")  # its shared-memory sibling
    assert shm_dirs or not os.path.isdir("/dev/shm")
    # the next process removes what the killed one left, and works
    out = subprocess.run([sys.executable, "-c", script], input="", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not Path(runtime_dir).exists() and not any(Path(d).exists() for d in shm_dirs)


def test_notebook_kernel_restart_and_shutdown_stop_isolated_kernels(fal_home):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        code = ("import fal_magic\nfal_magic.configure(kernel_scope='process')\n"
                "from fal_magic import isolated\n@isolated(keep_alive=300)\ndef pid():\n"
                "    import os\n    return os.getpid()\nprint(pid())")
        pids = []
        for step in ("restart", "shutdown"):
            reply = kc.execute_interactive(code, timeout=300, output_hook=lambda m: pids.append(
                int(m["content"]["text"])) if m["msg_type"] == "stream" and m["content"]["name"] == "stdout" else None)
            assert reply["content"]["status"] == "ok"
            assert pid_alive(pids[-1])
            if step == "restart":
                km.restart_kernel()
                kc.wait_for_ready(timeout=60)
            else:
                km.shutdown_kernel()
            assert wait_until(lambda: not pid_alive(pids[-1]), timeout=10), step
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


# -- load ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_threads_hundred_calls_three_keys_with_culls():
    configure(culler_interval=0.1)

    def make(reqs):
        @isolated(keep_alive=1, requirements=reqs)
        def tag(i):
            import os

            return i, os.environ["VIRTUAL_ENV"], os.getpid()

        return tag

    fns = [make([]), make(["humanize==4.16.0"]), make(["humanize==4.15.0"])]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(t):
        rnd = random.Random(t)
        out = []
        try:
            for i in range(100):
                key = (t + i) % 3
                out.append((key, fns[key](t * 1000 + i)))
                if rnd.random() < 0.02:
                    time.sleep(1.3)  # long enough for a cull now and then
        except BaseException as exc:
            errors.append(exc)
        results[t] = out

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []
    envs: dict[int, set] = {}
    pids: dict[int, set] = {}
    for t, out in results.items():
        assert [value for _, (value, _, _) in out] == [t * 1000 + i for i in range(100)]
        for key, (_, env, pid) in out:
            envs.setdefault(key, set()).add(env)
            pids.setdefault(key, set()).add(pid)
    assert all(len(v) == 1 for v in envs.values()) and len({e for v in envs.values() for e in v}) == 3
    assert any(len(p) > 1 for p in pids.values()), "no kernel was culled and replaced during the run"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_soak_two_thousand_calls_with_payloads_up_to_20_mb():
    @isolated(keep_alive=60)
    def echo(payload):
        return payload

    @isolated(keep_alive=60)
    def rss():
        import os

        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    sizes = [0, 10, 1000, 100_000, 1_000_000]
    big = 20 * 2**20
    for i in range(60):  # warm up: reach the steady state of allocator and caches
        echo(os.urandom(big if i % 20 == 0 else sizes[i % 5]))
    gc.collect()
    fds, threads, rss_start = _fds(), threading.active_count(), rss()
    for i in range(2000):
        size = big if i % 50 == 0 else sizes[i % 5]
        payload = bytes([i % 256]) * size
        assert echo(payload) == payload
    gc.collect()
    assert _fds() == fds
    assert threading.active_count() == threads
    growth = rss() - rss_start
    assert growth < 100 * 2**20, f"kernel RSS grew by {growth / 2**20:.0f} MiB"
    assert len(leaked_kernels()) == 1
