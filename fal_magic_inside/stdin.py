"""Isolated code that asks: ``input()``, ``getpass.getpass()`` and ``sys.stdin`` in a call reach the
person at the caller, and so does every debugger that reads its commands through ``input()``
(``breakpoint()``, ``pdb.set_trace()``, ipdb). For the length of a call they send ipykernel's own
``input_request`` on the kernel's stdin channel, as the call's child (the host's client or a
server's websocket relays it); the host asks wherever its caller is (the calling cell's input box,
the terminal) and replies. A host that cannot ask says why in the reply, and that error is raised
here, as a local call would raise it there.

The reply's ``value`` is only ever the text the person typed: an error travels in a field of its own
(``ERROR_FIELD``), so no typed text can be taken for one; and nothing but questions travels this way
(the source lines a debugger shows come with the request itself: ``sources``)."""
from __future__ import annotations

import bdb
import builtins
import getpass
import io
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The input_reply content field that carries the host's error (``{"type", "message"}``) instead of text.
ERROR_FIELD = "fal_magic_error"


def error_content(exc: BaseException) -> dict[str, Any]:
    """The input_reply content that makes the asking code raise ``exc`` (the host's side)."""
    return {"value": "", ERROR_FIELD: {"type": type(exc).__name__, "message": str(exc)}}


def _error(payload: Any) -> BaseException:
    payload = payload if isinstance(payload, dict) else {}
    kind, message = str(payload.get("type", "")), str(payload.get("message", ""))
    if kind == "EOFError":
        return EOFError(message)
    if kind == "StdinNotImplementedError":
        from IPython.core.error import StdinNotImplementedError

        return StdinNotImplementedError(message)
    return OSError(f"{kind}: {message}" if kind else message)


def input_request(kernel: Any, prompt: str, ident: Any, parent: dict[str, Any], password: bool) -> dict[str, Any]:
    """Send an ``input_request`` on ``kernel``'s stdin channel as ``parent``'s child and wait for the
    reply; its whole content (ipykernel's own ``_input_request`` keeps only the value). Waits in short
    polls so that an interrupt gets through."""
    import zmq

    socket = kernel.stdin_socket
    while socket.poll(0):  # a stale reply (to a question interrupted before) is not this one's answer
        socket.recv_multipart()
    kernel.session.send(socket, "input_request", {"prompt": prompt, "password": password}, parent, ident=ident)
    while True:
        if not socket.poll(10, zmq.POLLIN):
            continue
        try:
            _, reply = kernel.session.recv(socket)
        except Exception:  # (unsigned or malformed: not the host's answer)
            continue
        if reply is not None and reply.get("msg_type") == "input_reply":
            content = reply.get("content")
            return content if isinstance(content, dict) else {}


class Asker:
    """Asks the call's host over the kernel's stdin channel, as the call's child message."""

    def __init__(self, kernel: Any, ident: Any, parent: dict[str, Any]) -> None:
        self.kernel = kernel
        self.ident = ident
        self.parent = parent
        self.interrupted = False  # a debugger's prompt was interrupted (it quit: the request was interrupted)

    def ask(self, prompt: object = "", password: bool = False) -> str:
        from .capture import drain_captured_output

        drain_captured_output()  # what the code printed before it asked comes first
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        try:
            content = input_request(self.kernel, str(prompt), self.ident, self.parent, password)
        except KeyboardInterrupt:
            if _in_debugger():  # a debugger would only ask again: the stop button leaves it
                self.interrupted = True
                sys.settrace(None)
                raise bdb.BdbQuit from None
            raise KeyboardInterrupt("Interrupted by user") from None
        if ERROR_FIELD in content:
            raise _error(content[ERROR_FIELD])
        value = content.get("value", "")
        return value if isinstance(value, str) else str(value)

    def input(self, prompt: object = "") -> str:
        return self.ask(prompt)

    def getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        return self.ask(prompt, password=True)


def _in_debugger() -> bool:
    """Whether the code asking is a debugger's command loop (pdb's, IPython's)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), bdb.Bdb):
            return True
        frame = frame.f_back
    return False


class _Stdin(io.TextIOBase):
    """``sys.stdin`` for a call: each line read is asked of the caller (an empty answer: an empty line)."""

    def __init__(self, asker: Asker) -> None:
        self._asker = asker

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        try:
            return self._asker.ask("") + "\n"
        except EOFError:
            return ""

    def read(self, size: int | None = -1) -> str:
        return self.readline()


@contextmanager
def asking(kernel: Any, ident: Any, parent: dict[str, Any]) -> Iterator[Asker]:
    """For the length of a request: ``input``, ``getpass`` and ``sys.stdin`` ask the host."""
    asker = Asker(kernel, ident, parent)
    saved = builtins.input, getpass.getpass, sys.stdin, sys.breakpointhook
    builtins.input = asker.input
    getpass.getpass = asker.getpass
    sys.stdin = _Stdin(asker)
    # ipykernel points breakpoint() at debugpy's hook, which does nothing without a debugging frontend:
    # Python's own (pdb, or what PYTHONBREAKPOINT names) reads its commands through input()
    sys.breakpointhook = sys.__breakpointhook__
    try:
        yield asker
    finally:
        builtins.input, getpass.getpass, sys.stdin, sys.breakpointhook = saved
