"""Every exception fal_magic raises on purpose (SPEC section 8).

This module imports nothing from the rest of the package, so any layer may use it.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RED, _RESET = "\x1b[0;31m", "\x1b[0m"


def _verbose_tracebacks() -> bool:
    """Whether the IPython shell (if any) shows tracebacks in full (``%xmode Verbose``)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(getattr(shell, "InteractiveTB", None), "mode", "") == "Verbose"


class FalMagicError(Exception):
    """Base class of all fal_magic errors.

    In IPython one of them reads as a message (its type and text), not as a crash through fal_magic's
    frames; ``%xmode Verbose`` shows the whole traceback again.
    """

    @property
    def _render_traceback_(self) -> Callable[[], list[str]]:
        # IPython looks the hook up with hasattr(): raising AttributeError means "no hook here"
        if _verbose_tracebacks():
            raise AttributeError("_render_traceback_")
        return self._message_lines

    def _message_lines(self) -> list[str]:
        name = type(self).__name__
        first, *rest = (str(self) or name).splitlines() or [""]
        return [f"{_RED}{name}{_RESET}: {first}", *rest]


class EnvironmentBuildError(FalMagicError):
    """An environment could not be built; the message names the requirement and the installer's text."""


class KernelStartError(FalMagicError):
    """A kernel could not be started or did not become ready."""


class KernelDiedError(FalMagicError):
    """The kernel process died while a call ran in it (segfault, os._exit, out of memory, kill)."""

    def __init__(self, message: str, *, exit_code: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class AuthenticationError(FalMagicError):
    """A remote Jupyter Server refused this host's token (or the token is missing)."""


class SerializationError(FalMagicError):
    """A function, argument or result could not be pickled or unpickled; the message names it."""


class RemoteError(FalMagicError):
    """An exception raised in the kernel whose type cannot be rebuilt in the caller.

    Carries the remote type name, message and traceback text; IPython shows the remote
    traceback through ``_render_traceback_``.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.remote_message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[Callable[..., RemoteError], tuple[str, str, str]]:
        """Keep the three fields when the error itself is pickled."""
        return (type(self), (self.type_name, self.remote_message, self.traceback_text))

    def __str__(self) -> str:
        head = f"{self.type_name}: {self.remote_message}" if self.remote_message else self.type_name
        if self.traceback_text:
            return f"{head}\n\nRemote traceback:\n{_ANSI.sub('', self.traceback_text).rstrip()}"
        return head

    def _render_traceback_(self) -> list[str]:
        """IPython hook: show the remote traceback instead of fal_magic's local frames."""
        return (self.traceback_text or f"{self.type_name}: {self.remote_message}").rstrip().splitlines()


class RemoteCellError(RemoteError):
    """An error in an ``%%isolated`` cell. Made through ``remote_cell_error``, as a subclass named like
    the remote type, so that what reads a notebook's error output (``ename``, ``evalue``: nbclient,
    papermill) sees the user's type and message, as for a local cell."""

    def __str__(self) -> str:
        return self.remote_message

    def __reduce__(self) -> tuple[Callable[..., RemoteError], tuple[str, str, str]]:
        return (remote_cell_error, (self.type_name, self.remote_message, self.traceback_text))


_cell_error_types: dict[str, type[RemoteCellError]] = {}


def remote_cell_error(type_name: str, message: str, traceback_text: str = "") -> RemoteError:
    """The error of an isolated cell whose code raised ``type_name``: a RemoteError (a FalMagicError)
    whose type is named like the remote one."""
    name = type_name.rpartition(".")[2] if type_name.rpartition(".")[2].isidentifier() else "RemoteError"
    cls = _cell_error_types.get(name)
    if cls is None:
        cls = _cell_error_types[name] = type(name, (RemoteCellError,), {"__module__": "fal_magic.remote"})
    return cls(type_name, message, traceback_text)
