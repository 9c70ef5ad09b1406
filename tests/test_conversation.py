"""Isolated code that asks: input(), getpass(), sys.stdin and a debugger's prompt reach the caller,
in this process (the caller's own input() answers, as a terminal's would) and in a real notebook
kernel through jupyter_client (the notebook's frontend answers its input_request)."""
from __future__ import annotations

import builtins
import getpass
import re

import pytest
from IPython.core.error import StdinNotImplementedError

from fal_magic import isolated

from .conftest import pid_alive, run_cell


@pytest.fixture(params=["local", "remote"])
def where(request: pytest.FixtureRequest) -> str:
    if request.param == "remote":
        request.getfixturevalue("remote")
    return request.param


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def answering(monkeypatch, *answers: str) -> list[tuple[str, str]]:
    """The caller answers in turn, as a person at a terminal would; returns what it was asked."""
    asked: list[tuple[str, str]] = []
    queue = list(answers)

    def ask(kind):
        def answer(prompt="", stream=None):
            asked.append((kind, prompt))
            value = queue.pop(0)
            if isinstance(value, BaseException):
                raise value
            return value
        return answer

    monkeypatch.setattr(builtins, "input", ask("input"))
    monkeypatch.setattr(getpass, "getpass", ask("getpass"))
    return asked


@isolated(keep_alive=60)
def greet():
    import getpass
    import sys

    print("before asking", flush=True)
    name = input("your name? ")
    secret = getpass.getpass("password: ")
    line = sys.stdin.readline()
    return f"hello {name}", len(secret), line


def test_input_getpass_and_stdin_in_a_call_ask_the_caller(where, monkeypatch, capsys):
    asked = answering(monkeypatch, "Ada", "s3cret", "a line")
    assert greet() == ("hello Ada", 6, "a line\n")
    assert asked == [("input", "your name? "), ("getpass", "password: "), ("input", "")]
    assert "before asking" in capsys.readouterr().out  # printed before the question, shown before it


def test_end_of_input_and_no_stdin_raise_what_they_raise_locally(where, monkeypatch):
    @isolated(keep_alive=60)
    def ask():
        return input("? ")

    @isolated(keep_alive=60)
    def read_all():
        import sys

        return sys.stdin.readline()

    answering(monkeypatch, EOFError(), EOFError(), StdinNotImplementedError("no stdin in this frontend"))
    with pytest.raises(EOFError):
        ask()
    assert read_all() == ""  # end of input, as a file reads it
    with pytest.raises(StdinNotImplementedError, match="no stdin in this frontend"):
        ask()


#: What a request for source lines and an error reply looked like when they travelled as input text.
SOURCES_PROMPT = "\x00fal_magic-sources:"
ERROR_ANSWER = '\x00fal_magic-stdin:{"type": "EOFError", "message": "forged"}'


def test_isolated_code_cannot_read_the_callers_files_through_its_prompts(where, monkeypatch, tmp_path):
    """Whatever a kernel asks on its stdin channel, input() or the kernel's own request, goes to the
    person as a question: the host sends no file's lines in answer, only what the person typed."""
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY of the notebook's machine\n")
    asked = answering(monkeypatch, "typed one", "typed two")

    @isolated(keep_alive=60)
    def peek(path):
        import json

        prompt = SOURCES_PROMPT + json.dumps([path])
        by_input = input(prompt)
        from IPython import get_ipython

        kernel = get_ipython().kernel  # the isolated kernel's
        raw = kernel._input_request(prompt, kernel._parent_ident["shell"], kernel.get_parent("shell"))
        return by_input, raw

    assert peek(str(secret)) == ("typed one", "typed two")
    assert [kind for kind, _ in asked] == ["input", "input"]  # both were the person's questions


def test_a_typed_answer_comes_back_as_typed_whatever_it_looks_like(where, monkeypatch):
    answering(monkeypatch, ERROR_ANSWER, "\x04", "")

    @isolated(keep_alive=60)
    def three():
        return input("a? "), input("b? "), input("c? ")

    assert three() == (ERROR_ANSWER, "\x04", "")


def test_a_call_in_the_background_cannot_ask_and_says_so(monkeypatch):
    answering(monkeypatch)  # nothing: it must not be asked

    @isolated(keep_alive=60)
    def ask():
        return input("? ")

    with pytest.raises(StdinNotImplementedError, match=r"runs in the background \(.map, .submit\)"):
        ask.submit().result(timeout=120)


def test_breakpoint_opens_a_debugger_on_the_remote_frames(where, monkeypatch, capsys):
    @isolated(keep_alive=60)
    def debugged(n):
        total = n * 10
        breakpoint()
        total += 1
        return total

    asked = answering(monkeypatch, "p total", "n", "p total", "c")
    assert debugged(4) == 41
    out = plain(capsys.readouterr().out)
    prompts = {prompt for _, prompt in asked}
    assert len(asked) == 4 and prompts <= {"ipdb> ", "(Pdb) "}, asked  # as breakpoint() in a local cell
    assert re.search(r"^40$", out, re.M) and re.search(r"^41$", out, re.M)  # p total, before and after n
    assert "total += 1" in out and "test_conversation.py" in out  # the source line, from its real file

    @isolated(keep_alive=60)
    def traced():
        import pdb

        word = "remote"
        pdb.set_trace()
        return word

    asked = answering(monkeypatch, "p word", "c")
    assert traced() == "remote"
    assert len(asked) == 2 and {prompt for _, prompt in asked} <= {"ipdb> ", "(Pdb) "}
    assert "'remote'" in plain(capsys.readouterr().out)


def test_ctrl_c_at_a_prompt_leaves_the_debugger_and_the_kernel_stays(monkeypatch):
    @isolated(keep_alive=60)
    def stuck():
        import os

        pdb_pid = os.getpid()
        breakpoint()
        return pdb_pid

    @isolated(keep_alive=60)
    def pid():
        import os

        return os.getpid()

    answering(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        stuck()
    first = pid()
    assert pid_alive(first) and pid() == first


def test_a_notebook_cell_asks_its_frontend(tmp_path):
    """Through jupyter_client: a notebook kernel runs an isolated function and an isolated cell that
    ask; its frontend (this test) gets the input_request, password hidden, and answers it."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    requests: list[dict] = []

    def frontend(msg):
        requests.append(msg["content"])
        kc.input("Ada" if not msg["content"]["password"] else "s3cret")

    out: list[str] = []

    def output(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    try:
        code = ("from fal_magic import isolated\n"
                "@isolated(keep_alive=60)\ndef greet():\n    import getpass\n"
                "    return input('name? ') + ':' + str(len(getpass.getpass('pw: ')))\n"
                "print(greet())")
        reply = kc.execute_interactive(code, timeout=300, allow_stdin=True, stdin_hook=frontend, output_hook=output)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "Ada:6" in "".join(out)
        assert [(r["prompt"], r["password"]) for r in requests] == [("name? ", False), ("pw: ", True)]

        cell = ("%load_ext fal_magic\n"
                "get_ipython().run_cell_magic('isolated', '', 'print(\"cell got\", input(\"who? \"))')")
        reply = kc.execute_interactive(cell, timeout=300, allow_stdin=True, stdin_hook=frontend, output_hook=output)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "cell got Ada" in "".join(out) and requests[-1]["prompt"] == "who? "

        # a frontend without stdin (as nbclient): the error a local input() gets there
        local = kc.execute_interactive("input('x')", timeout=60, allow_stdin=False)["content"]
        remote = kc.execute_interactive("greet()", timeout=300, allow_stdin=False)["content"]
        assert local["ename"] == remote["ename"] == "StdinNotImplementedError"
    finally:
        kc.execute_interactive("import fal_magic; fal_magic.shutdown()", timeout=60)
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def shell(ip):
    yield ip
    ip.run_line_magic("pdb", "off")


def cell(ip, source):
    result, captured = run_cell(ip, source)
    return result, captured.stdout


FAILING = """
from fal_magic import isolated

def inner(x):
    d = {"a": 1}
    return d[x]

@isolated(keep_alive=60)
def outer(n):
    return inner(str(n))

outer(5)
"""


def test_debug_after_an_isolated_error_opens_in_its_kernel_at_the_users_frame(shell, monkeypatch):
    result, _ = cell(shell, FAILING)
    assert isinstance(result.error_in_exec, KeyError)
    asked = answering(monkeypatch, "p d", "p x", "up", "p n", "where", "q")
    _, out = cell(shell, "%debug")
    out = plain(out)
    assert [prompt for _, prompt in asked][0].strip().endswith(">")  # a debugger's prompt, in this cell
    assert "{'a': 1}" in out and "'5'" in out and "\n5\n" in out  # the remote frames' locals
    assert "inner" in out and "outer" in out  # where: the user's frames
    assert "fal_magic_inside" not in out and "/fal_magic/" not in out  # and none of fal_magic's


def test_debug_when_the_kernel_is_gone_says_so_in_one_line(shell, monkeypatch):
    cell(shell, FAILING)
    from fal_magic import shutdown

    shutdown()
    answering(monkeypatch)  # never asked
    _, out = cell(shell, "%debug")
    assert out.strip().splitlines() == [
        "fal_magic: the kernel where this exception was raised is gone (culled or shut down): nothing is left to debug"]


def test_pdb_on_debugs_an_isolated_error_and_an_isolated_cell_at_once(shell, monkeypatch):
    """One error, one post-mortem: a second debugger would ask again (the spare answers)."""
    shell.run_line_magic("pdb", "on")
    asked = answering(monkeypatch, "p x", "q", "q", "q")
    _, out = cell(shell, FAILING)
    assert "'5'" in plain(out) and len(asked) == 2, asked
    asked = answering(monkeypatch, "p total", "q", "q", "q")
    _, out = cell(shell, "%%isolated\ntotal = 6 * 7\nraise ValueError(total)")
    assert "\n42\n" in plain(out) and len(asked) == 2, asked
    asked = answering(monkeypatch, "p total * 2", "q", "q")
    _, out = cell(shell, "%debug")  # asked for, in a later cell: debugged again
    assert "\n84\n" in plain(out) and len(asked) == 2, asked
