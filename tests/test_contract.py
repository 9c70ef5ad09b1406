"""One contract, every kind of kernel: the behaviour a caller relies on, run against a kernel on this
machine and a kernel on the test Jupyter Server alike (the ``kind`` fixture). Kind-only behaviour
stays in its own file (test_isolated, test_faults, test_remote)."""
from __future__ import annotations

import os
import signal
import threading

import pytest
from IPython.utils.capture import capture_output

import fal_magic
from fal_magic import KernelDiedError, isolated

from .conftest import pid_alive, wait_until


class ContractError(Exception):
    """Raised by the functions below; defined here, so the host can rebuild it."""


@isolated(keep_alive=30)
def pid():
    import os

    return os.getpid()


@isolated(keep_alive=30)
def interrupted_before():
    """Whether an earlier call in this kernel saw a KeyboardInterrupt (see ``sleep_and_record``)."""
    import builtins

    return getattr(builtins, "fal_magic_test_interrupted", False)


@isolated(keep_alive=30)
def sleep_and_record():
    """Sleep 30 s; if interrupted, record it in the kernel (the next call reads it) and re-raise."""
    import builtins
    import time

    try:
        time.sleep(30)
    except KeyboardInterrupt:
        builtins.fal_magic_test_interrupted = True
        raise


def test_calls_run_warm_in_one_kernel_process(kind):
    first = pid()
    assert first != os.getpid() and pid_alive(first)
    assert pid() == first and pid() == first
    [info] = fal_magic.kernels()
    assert info.pid == first and info.calls == 3 and info.state == "idle"
    assert (info.host is None) == (kind in ("local", "pool"))


def test_outputs_reach_the_caller_in_order(kind, capsys):
    @isolated(keep_alive=30)
    def chatty():
        import sys

        for i in range(5):
            print(f"line {i}", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        return "done"

    assert chatty() == "done"
    out, err = capsys.readouterr()
    assert out == "".join(f"line {i}\n" for i in range(5))
    assert err.strip().endswith("to stderr") and "line" not in err


def test_outputs_of_threads_and_subprocesses_are_the_calls_own(kind, capsys):
    @isolated(keep_alive=30)
    def helpers(n):
        import subprocess
        import sys
        import threading

        thread = threading.Thread(target=print, args=(f"thread {n}",))
        thread.start()
        thread.join()
        subprocess.run([sys.executable, "-c", f"print('subprocess {n}')"], check=True)
        return n

    @isolated(keep_alive=30)
    def quiet(n):  # the same environment: the same kernel, right after the noisy call
        return n

    for n in range(3):
        assert helpers(n) == n
        out = capsys.readouterr().out
        assert f"thread {n}\n" in out and f"subprocess {n}\n" in out
        assert quiet(n) == n
        assert capsys.readouterr().out == ""
    assert len(fal_magic.kernels()) == 1


def test_exception_keeps_its_type_message_chain_and_traceback(kind):
    @isolated(keep_alive=30)
    def fails(x):
        try:
            {}["missing"]
        except KeyError as exc:
            raise ContractError(f"bad value {x}") from exc

    with pytest.raises(ContractError, match="bad value 7") as info:
        fails(7)
    assert isinstance(info.value.__cause__, KeyError)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert 'raise ContractError(f"bad value {x}") from exc' in notes and __file__ in notes


def test_death_mid_call_is_kernel_died_error_and_the_next_call_gets_a_fresh_kernel(kind):
    @isolated(keep_alive=30)
    def die():
        import os

        os._exit(3)

    before = pid()
    with pytest.raises(KernelDiedError, match="died during the call"):
        die()
    after = pid()
    assert after != before and pid_alive(after)
    assert wait_until(lambda: not pid_alive(before), timeout=10)


def test_ctrl_c_interrupts_the_kernel_which_survives(kind):
    before = pid()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sleep_and_record()
    finally:
        timer.cancel()
    # the kernel itself caught the interrupt (not just the host giving up), and it is the same kernel
    assert interrupted_before() is True
    assert pid() == before


def test_push_and_pull_through_the_cell_magic(kind):
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "fal_magic")
    try:
        ip.user_ns["rows"] = [3, 1, 4, 1, 5]
        with capture_output() as out:
            first = ip.run_cell("%%isolated --keep-alive 30 --push rows\nimport os\nbig = [r for r in rows if r > 2]")
            second = ip.run_cell("%%isolated --keep-alive 30 --pull big,where\nwhere = os.getpid()\nprint(len(big))")
        assert first.success and second.success, (first.error_in_exec, second.error_in_exec)
        assert ip.user_ns["big"] == [3, 4, 5] and out.stdout == "3\n"
        [info] = fal_magic.kernels()
        assert ip.user_ns["where"] == info.pid  # both cells ran in one kernel: the namespace persisted
    finally:
        ip.run_line_magic("unload_ext", "fal_magic")
        for name in ("rows", "big", "where"):
            ip.user_ns.pop(name, None)


def test_keep_alive_expiry_ends_the_kernel(kind):
    @isolated(keep_alive=1)
    def short():
        import os

        return os.getpid()

    kernel_pid = short()
    [info] = fal_magic.kernels()
    assert info.pid == kernel_pid and 0 < info.seconds_left <= 1
    assert wait_until(lambda: not pid_alive(kernel_pid), timeout=20)
    assert len(fal_magic.kernels()) == 0


def test_map_keeps_order_over_two_kernels_and_raises_the_failing_item(kind):
    @isolated(keep_alive=30, max_kernels=2)
    def invert(x):
        import os
        import time

        time.sleep(0.3)
        return 1 / x, os.getpid()

    out = list(invert.map([1, 2, 4, 5, 8, 10, 16, 20], chunksize=1))
    assert [v for v, _ in out] == [1.0, 0.5, 0.25, 0.2, 0.125, 0.1, 0.0625, 0.05]
    assert len({p for _, p in out}) == 2
    results = invert.map([1, 2, 0, 4])
    assert next(results)[0] == 1.0 and next(results)[0] == 0.5
    with pytest.raises(ZeroDivisionError) as info:
        next(results)
    assert "return 1 / x, os.getpid()" in "\n".join(info.value.__notes__)
