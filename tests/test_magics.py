"""The cell magic and line magics in a real InteractiveShell, against real kernels."""
from __future__ import annotations

import os
import re
import signal
import threading

import pytest
from IPython.utils.capture import capture_output

from fal_magic import RemoteError
from fal_magic.kernel import get_pool

from .conftest import pid_alive
from .conftest import run_cell as run


def test_cell_runs_with_requirements_and_prints_here(ip):
    result, out = run(ip, "%%isolated --keep-alive 30 --requirements humanize==4.16.0\n"
                          "import humanize\nprint(humanize.intcomma(10**6))")
    assert result.success, result.error_in_exec
    assert out.stdout == "1,000,000\n"
    assert "humanize" not in ip.user_ns  # the import happened in the isolated kernel


def test_a_subprocess_prints_into_the_cell(ip):
    for n in range(3):  # each time, the last line is part of its own cell
        result, out = run(ip, "%%isolated --keep-alive 30\nimport subprocess, sys\n"
                              f"subprocess.run([sys.executable, '-c', 'print({n})'], check=True)\nNone")
        assert result.success, result.error_in_exec
        assert out.stdout == f"{n}\n"


def test_namespace_persists_between_cells_of_one_key(ip):
    assert run(ip, "%%isolated --keep-alive 30\ncounter = 1")[0].success
    result, out = run(ip, "%%isolated --keep-alive 30\ncounter += 1\nprint(counter)")
    assert result.success and out.stdout == "2\n"
    assert "counter" not in ip.user_ns


def test_push_and_pull_a_numpy_array_and_a_notebook_class(ip):
    np = pytest.importorskip("numpy")
    ip.user_ns["arr"] = np.arange(10.0)
    # a class defined in a notebook cell, as users do: it lives in __main__ only
    assert ip.run_cell("class Measure:\n    def __init__(self, value, unit):\n"
                       "        self.value, self.unit = value, unit\nm = Measure(3, 'm')").success
    result, out = run(ip, "%%isolated --keep-alive 30 --requirements numpy --push arr,m --pull doubled,longer\n"
                          "doubled = arr * 2\nlonger = type(m)(m.value * 10, m.unit)\nprint(type(arr).__name__)")
    assert result.success, result.error_in_exec
    assert out.stdout == "ndarray\n"
    assert (ip.user_ns["doubled"] == np.arange(10.0) * 2).all()
    longer = ip.user_ns["longer"]
    assert type(longer).__name__ == "Measure" and (longer.value, longer.unit) == (30, "m")


def test_rich_outputs_reach_the_cell(ip):
    result, out = run(ip, "%%isolated --keep-alive 30\nfrom IPython.display import HTML, display\n"
                          "display(HTML('<b>bold</b>'))\n6 * 7")
    assert result.success
    data = [o.data for o in out.outputs]
    assert {"text/html": "<b>bold</b>", "text/plain": "<IPython.core.display.HTML object>"} in data
    assert repr(result.result) == "42" and repr(ip.user_ns["_"]) == "42"  # the cell's result: Out[n]
    assert not any(d.get("text/plain") == "42" for d in data)  # not a display output without a prompt


def test_error_in_the_cell_fails_it_with_the_remote_traceback(ip):
    result, out = run(ip, "%%isolated --keep-alive 30\ndef check(x):\n    raise ValueError(f'bad {x}')\ncheck(7)")
    assert not result.success
    err = result.error_in_exec
    assert isinstance(err, RemoteError) and err.type_name == "ValueError" and err.remote_message == "bad 7"
    assert str(err) == "bad 7"  # the message, as a local error's; the traceback beside it
    text = re.sub(r"\x1b\[[0-9;]*m", "", err.traceback_text)
    assert "check(7)" in text and "raise ValueError" in text


def test_pull_of_a_name_the_cell_did_not_define(ip):
    result, _ = run(ip, "%%isolated --keep-alive 30 --pull nothing_here\nx = 1")
    assert isinstance(result.error_in_exec, NameError)
    assert "nothing_here" in str(result.error_in_exec)


@pytest.mark.parametrize("line, message", [
    ("--bogus", "unrecognized arguments: --bogus"),
    ("--keep-alive soon", "invalid float value: 'soon'"),
    ("--keep-alive -1", "--keep-alive must be >= 0"),
    ("--requirements 'numpy>>1'", "invalid requirement 'numpy>>1'"),
    ("--push not_defined_anywhere", "not defined in the notebook: not_defined_anywhere"),
    ("--push 'a-b'", "not a variable name: a-b"),
])
def test_bad_arguments_are_usage_errors(ip, line, message):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=message):
        ip.run_cell_magic("isolated", line, "1")
    assert get_pool().snapshot() == []  # nothing started


def test_help_is_available(ip):
    doc = ip.find_cell_magic("isolated").__doc__
    assert "--keep-alive SECONDS" in doc and "--requirements REQ [REQ ...]" in doc


def test_interrupt_stops_the_cell_and_the_kernel_survives(ip):
    assert run(ip, "%%isolated --keep-alive 30\nimport os\nkept = os.getpid()\ninterrupted = False")[0].success
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    result, _ = run(ip, "%%isolated --keep-alive 30\nimport time\ntry:\n    time.sleep(30)\n"
                        "except KeyboardInterrupt:\n    interrupted = True\n    raise")
    timer.join()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(result.error_in_exec._render_traceback_()))
    assert "time.sleep(30)" in shown and "fal_magic" not in shown  # where the cell stopped, nothing of ours
    # the kernel itself was interrupted (not only the host's wait), and it is the same kernel
    result, out = run(ip, "%%isolated --keep-alive 30\nprint(kept == os.getpid(), interrupted)")
    assert out.stdout == "True True\n"


def test_isolated_shutdown(ip):
    from IPython.core.error import UsageError

    assert run(ip, "%%isolated --keep-alive 30\nimport os\nprint(os.getpid())")[0].success
    [info] = get_pool().snapshot()
    with pytest.raises(UsageError):
        ip.run_line_magic("isolated_shutdown", "")
    with capture_output() as out:
        ip.run_line_magic("isolated_shutdown", info.key[:6])
    assert out.stdout == "shut down 1 kernel(s)\n"
    assert get_pool().snapshot() == [] and not pid_alive(info.pid)
    assert run(ip, "%%isolated --keep-alive 30\nx = 1")[0].success
    ip.run_line_magic("isolated_shutdown", "--all")
    assert get_pool().snapshot() == []


def test_isolated_kernels_lists_the_warm_kernels(ip):
    assert run(ip, "%%isolated --keep-alive 30 --requirements humanize==4.16.0\nx = 1")[0].success
    table = ip.run_line_magic("isolated_kernels", "")
    [record] = list(table)
    assert record.requirements == ("humanize==4.16.0",)
    text = repr(table)
    assert str(record.pid) in text and "humanize==4.16.0" in text and "idle" in text


def test_config_is_read_from_the_shell_and_shown_by_percent_config(ip):
    import time

    ip.run_line_magic("unload_ext", "fal_magic")
    saved = ip.config.get("FalMagic")
    ip.config.FalMagic.cell_keep_alive = 420.0
    try:
        ip.run_line_magic("load_ext", "fal_magic")  # reads the shell's config
        assert run(ip, "%%isolated\nx = 1")[0].success
        [info] = get_pool().snapshot()
        assert 400 < info.deadline - time.time() <= 420  # the kernel got the shell's keep-alive
        _, out = run(ip, "%config FalMagic")
        assert "FalMagic.cell_keep_alive" in out.stdout and "420.0" in out.stdout
        run(ip, "%config FalMagic.cell_keep_alive = 77")
        from fal_magic.config import settings

        assert settings().cell_keep_alive == 77.0
    finally:
        if saved is None:
            del ip.config["FalMagic"]
        else:
            ip.config.FalMagic = saved


def test_cells_keep_their_namespace_for_interactive_work_and_say_when_it_is_gone(ip):
    from .conftest import wait_until

    assert run(ip, "%%isolated\nx = 41")[0].success
    [info] = get_pool().snapshot()
    assert info.seconds_left > 500  # the cell magic's own keep-alive (10 min), not fal's 10 s
    get_pool().shutdown()
    assert "[fal_magic]" not in run(ip, "%%isolated --keep-alive 1\nx = 41")[1].stdout  # shut down when asked
    assert wait_until(lambda: not get_pool().snapshot(), timeout=20)  # culled
    result, out = run(ip, "%%isolated\n'x' in dir()")
    assert repr(result.result) == "False"
    assert out.stdout.startswith(
        "[fal_magic] the previous kernel of this environment was shut down: its variables are gone\n")
    result, out = run(ip, "%%isolated\nx = 1\nx + 1")
    assert repr(result.result) == "2" and "[fal_magic]" not in out.stdout  # said once
    os.kill(get_pool().snapshot()[0].pid, signal.SIGKILL)  # a kernel that dies is not said to be shut down
    result, out = run(ip, "%%isolated\n'x' in dir()")
    assert repr(result.result) == "False"
    assert "the previous kernel of this environment died: its variables are gone" in out.stdout


def test_env_passes_named_variables_to_the_cell_kernel(ip, monkeypatch):
    monkeypatch.setenv("FAL_TEST_FROM_NOTEBOOK", "nb-value")
    result, out = run(ip, "%%isolated --env FAL_TEST_FROM_NOTEBOOK --env FAL_TEST_SET=direct\n"
                          "import os\nprint(os.environ['FAL_TEST_FROM_NOTEBOOK'], os.environ['FAL_TEST_SET'])")
    assert result.success, result.error_in_exec
    assert out.stdout.startswith("nb-value direct")
    result, _ = run(ip, "%%isolated --env FAL_TEST_NOT_SET_ANYWHERE\n1")
    assert "the notebook has no variable FAL_TEST_NOT_SET_ANYWHERE" in str(result.error_in_exec)
    result, out = run(ip, "%%isolated --env =sk-live-secret-4242\n1")  # a value without its name
    assert "needs a name" in str(result.error_in_exec)
    assert "sk-live-secret-4242" not in str(result.error_in_exec) + out.stdout + out.stderr
