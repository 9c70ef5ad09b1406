"""Isolated code that asks: ``input()``, ``getpass.getpass()`` and ``sys.stdin`` in a call reach the
person at the caller, and so does every debugger that reads its commands through ``input()``
(``breakpoint()``, ``pdb.set_trace()``, ipdb). For the length of a call they send ipykernel's own
``input_request`` on the kernel's stdin channel, as the call's child (the host's client or a
server's websocket relays it); the host asks wherever its caller is (the calling cell's input box,
the terminal) and replies. A host that cannot ask says why in the reply, and that error is raised
here, as a local call would raise it there."""
from __future__ import annotations

import bdb
import builtins
import getpass
import io
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import sources

#: An input_reply whose value starts with this carries an error (JSON ``{"type", "message"}``), not text.
ERROR_PREFIX = "\x00fal_magic-stdin:"


def error_reply(exc: BaseException) -> str:
    """The input_reply value that makes the asking code raise (the host's side)."""
    return ERROR_PREFIX + json.dumps({"type": type(exc).__name__, "message": str(exc)})


def _error(value: str) -> BaseException:
    payload = json.loads(value[len(ERROR_PREFIX):])
    kind, message = payload.get("type", ""), payload.get("message", "")
    if kind == "EOFError":
        return EOFError(message)
    if kind == "StdinNotImplementedError":
        from IPython.core.error import StdinNotImplementedError

        return StdinNotImplementedError(message)
    return OSError(f"{kind}: {message}" if kind else message)


class Asker:
    """Asks the call's host over the kernel's stdin channel, as the call's child message."""

    def __init__(self, kernel: Any, ident: Any, parent: dict[str, Any], files: dict[str, str]) -> None:
        self.kernel = kernel
        self.ident = ident
        self.parent = parent
        self.files = files  # the call's code: function name -> file, whose lines a debugger will show
        self.interrupted = False  # a debugger's prompt was interrupted (it quit: the request was interrupted)

    def ask(self, prompt: object = "", password: bool = False) -> str:
        from .capture import drain_captured_output

        drain_captured_output()  # what the code printed before it asked comes first
        self.fetch_sources()  # the first question of the call (a debugger's, maybe): source lines first
        try:
            value: str = self.kernel._input_request(str(prompt), self.ident, self.parent, password=password)
        except KeyboardInterrupt:
            if _in_debugger():  # a debugger would only ask again: the stop button leaves it
                self.interrupted = True
                sys.settrace(None)
                raise bdb.BdbQuit from None
            raise
        if value.startswith(ERROR_PREFIX):
            raise _error(value)
        return value

    def fetch_sources(self) -> None:
        """Get the lines of the request's files that this kernel cannot read from the host (once)."""
        wanted = sources.request(self.files)
        self.files = {}
        if wanted is not None:
            sources.install(self.kernel._input_request(wanted, self.ident, self.parent, password=False))

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
    """For the length of a request: ``input``, ``getpass`` and ``sys.stdin`` ask the host. The asker
    yielded takes the request's ``files`` (its code), whose lines the host sends before the first question."""
    asker = Asker(kernel, ident, parent, {})
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
