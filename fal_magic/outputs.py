"""Where a kernel's outputs go: into the calling cell in a notebook, the terminal otherwise.

The decorator and the magics hand the same sink to the kernel pool. A sink keeps a copy of the
context it was created in and writes inside it, so the outputs of a call that a worker thread
serves (``.submit``, ``.map``) still land in the cell that started it: ipykernel 7 keeps the
current cell's parent header in contextvars.
"""
from __future__ import annotations

import contextvars
import sys
import threading
from typing import Any, Callable, Protocol, TypeVar

T = TypeVar("T")


class OutputSink(Protocol):
    """Receives what the kernel produced for one request, as it arrives."""

    def stream(self, name: str, text: str) -> None: ...

    def display(self, msg_type: str, content: dict[str, Any]) -> None: ...

    def clear(self, wait: bool) -> None: ...

    def ask(self, prompt: str, password: bool) -> str:
        """What the person answers to ``prompt`` (hidden when ``password``), asked where the caller would
        ask; raises what ``input()`` raises there."""
        ...

    def can_ask(self) -> bool:
        """Whether ``ask`` can reach a person (a frontend with stdin, a terminal)."""
        ...

    def comm(self, kernel: Any, message: dict[str, Any]) -> None:
        """A comm message (a widget's) that ``kernel`` published for the request."""
        ...


def ipython_shell() -> Any:
    """The running IPython shell, or None in a plain interpreter."""
    mod = sys.modules.get("IPython")
    if mod is None:
        return None
    try:
        return mod.get_ipython()
    except Exception:
        return None


class CallerContext:
    """The caller's contextvars, for code run on the caller's behalf from any thread. Each run enters a
    copy of its own: one Context cannot be entered by two threads at once (a status line's timer
    drawing while the call finishes, a stream while a widget's message is bridged)."""

    def __init__(self) -> None:
        self._context = contextvars.copy_context()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a copy of the caller's context."""
        return self._context.copy().run(fn, *args)


class CallerOutput:
    """Writes streams to the caller's ``sys.stdout``/``sys.stderr`` and rich outputs through IPython's
    display machinery (plain text outside IPython), in the context where it was created."""

    def __init__(self) -> None:
        self._context = CallerContext()

    def stream(self, name: str, text: str) -> None:
        self._context.run(self._stream, name, text)

    def display(self, msg_type: str, content: dict[str, Any]) -> None:
        self._context.run(self._display, msg_type, content)

    def clear(self, wait: bool) -> None:
        """The kernel cleared its output (progress bars do): clear the calling cell's, in a notebook."""
        self._context.run(self._clear, wait)

    def ask(self, prompt: str, password: bool) -> str:
        """Ask as ``input()`` or ``getpass.getpass()`` would in the calling cell: its input box in a
        notebook, the terminal in IPython or a script; raises what they raise there (EOFError with stdin
        closed, StdinNotImplementedError where the frontend sends no input, as nbclient does). A call
        running in the background (``.map``, ``.submit``) cannot ask: no cell is waiting for it."""
        if threading.current_thread() is not threading.main_thread():
            from IPython.core.error import StdinNotImplementedError

            raise StdinNotImplementedError(
                "input() in an isolated call that runs in the background (.map, .submit) cannot be answered: "
                "call the function directly to use input(), getpass() or a debugger")
        return self._context.run(self._ask, prompt, password)

    @staticmethod
    def _ask(prompt: str, password: bool) -> str:
        if password:
            import getpass

            return getpass.getpass(prompt)
        return input(prompt)

    def comm(self, kernel: Any, message: dict[str, Any]) -> None:
        """A widget's comm message: bridged to the notebook's frontend (``comms.py``), in the caller's
        context, where there is a frontend; elsewhere a widget cannot be shown (its text form is)."""
        from . import comms

        self._context.run(comms.from_kernel, kernel, message, self)

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the caller's context (what it displays or sends goes to the caller's cell)."""
        return self._context.run(fn, *args)

    def can_ask(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        kernel = getattr(ipython_shell(), "kernel", None)
        return bool(getattr(kernel, "_allow_stdin", True))  # a notebook's cell says; a terminal can

    @staticmethod
    def _clear(wait: bool) -> None:
        if ipython_shell() is not None:
            from IPython.display import clear_output

            clear_output(wait=wait)  # type: ignore[no-untyped-call]

    @staticmethod
    def _stream(name: str, text: str) -> None:
        target = sys.stderr if name == "stderr" else sys.stdout
        target.write(text)
        target.flush()

    @staticmethod
    def _display(msg_type: str, content: dict[str, Any]) -> None:
        data = content.get("data", {})
        metadata = content.get("metadata", {})
        transient = content.get("transient", {}) or {}
        shell = ipython_shell()
        if shell is not None and hasattr(shell, "display_pub"):
            from IPython.display import publish_display_data

            publish_display_data(data=data, metadata=metadata, transient=transient,  # type: ignore[no-untyped-call]
                                 update=msg_type == "update_display_data")
            return
        text = data.get("text/plain")
        if text is not None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()


class CellOutput(CallerOutput):
    """The sink of an ``%%isolated`` cell: like ``CallerOutput``, but the cell's own result (its last
    expression's ``execute_result``) is kept, to become the calling cell's result (``Out[n]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.result: dict[str, Any] | None = None

    def display(self, msg_type: str, content: dict[str, Any]) -> None:
        if msg_type == "execute_result":
            self.result = content
        else:
            super().display(msg_type, content)


class RemoteValue:
    """The value of an isolated cell's last expression, or a widget an isolated function returned, as
    the kernel represented it: shown by the calling notebook as its cell's ``Out[n]`` (every
    representation the kernel sent; a widget's view is live through the comm bridge), and kept in
    ``_`` and ``Out``. The object itself stays in the isolated kernel (``--pull`` fetches a cell's)."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<a value in the isolated kernel>"))
