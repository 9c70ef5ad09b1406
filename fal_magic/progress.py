"""How fal_magic shows what it is doing while an environment builds or a kernel starts.

In a notebook: one status line in the calling cell, updated in place (a display handle), never a
block of stderr, which JupyterLab paints red and keeps in the saved notebook. It appears only once
the work has taken ``SHOW_AFTER`` seconds (a quick start leaves nothing), and when the work is done
it collapses to one quiet summary (a display stays in the saved notebook: never as a blank). On a
terminal: one line rewritten in place; elsewhere (a log file, CI) plain ``[fal_magic]`` lines.
Every step also goes to the ``fal_magic`` logger at DEBUG, for those who want all of them.
"""
from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from typing import Any

from .envs.cache import INSTALLER_LINE as INSTALLER
from .outputs import CallerContext, ipython_shell

log = logging.getLogger("fal_magic")

#: Seconds of work before a notebook's status line appears.
SHOW_AFTER = 0.3


def log_progress(text: str) -> None:
    """The default progress callback (scripts, the server): steps as log lines, installer output at DEBUG."""
    if INSTALLER in text:
        log.debug(text)
    else:
        log.info(text)


def _notebook() -> bool:
    shell = ipython_shell()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class StatusLine:
    """A progress callback for one call or cell, shown where the caller sees output (it keeps the
    caller's context, like ``CallerOutput``: a worker thread's progress lands in the right cell)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._context = CallerContext()
        self._started = time.monotonic()
        self._build_started: float | None = None
        self._build_ended: float | None = None
        self._handle: Any = None
        self._pending = ""  # the line a notebook shows once the work has taken SHOW_AFTER seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._tty_width = 0
        self._mode = "notebook" if _notebook() else ("tty" if _isatty() else "log")

    def __call__(self, text: str) -> None:
        log.debug(text)
        if text.startswith("building environment") or text.endswith(": building environment"):
            self._build_started = time.monotonic()
        elif " ready in " in text and "environment" in text:
            self._build_ended = time.monotonic()
        self._context.run(self._show, text)

    def _show(self, text: str) -> None:
        if self._mode == "log":
            log_progress(text)
            return
        if self._build_started is None and text.startswith("kernel ") and " started " in text:
            return  # a kernel on a built environment: done as soon as said, nothing to watch
        line = f"fal_magic · {self.label} · {text.replace(INSTALLER, '')} · {time.monotonic() - self._started:.1f} s"
        if self._mode == "tty":
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stderr.write("\r" + line[:width].ljust(self._tty_width))
            sys.stderr.flush()
            self._tty_width = min(len(line), width)
        else:
            with self._lock:
                if self._handle is not None:
                    self._update(line)
                    return
                self._pending = line
                if self._timer is None and not self._finished:
                    self._timer = threading.Timer(SHOW_AFTER, self._context.run, (self._show_pending,))
                    self._timer.daemon = True
                    self._timer.start()

    def _show_pending(self) -> None:
        with self._lock:
            if not self._finished:
                self._update(self._pending)

    def _update(self, line: str) -> None:
        from IPython.display import display

        bundle = {"text/plain": line}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    def finish(self, ok: bool = True) -> None:
        """The work is done: collapse the line to a summary if an environment was built, or to
        nothing (also when it failed: the error says what happened)."""
        self._context.run(self._finish, ok)

    def _finish(self, ok: bool) -> None:
        summary = ""
        if ok and self._build_started is not None:
            ended = self._build_ended or time.monotonic()
            summary = (f"fal_magic · {self.label} · environment {ended - self._build_started:.1f} s · "
                       f"kernel {time.monotonic() - ended:.1f} s")
        if self._mode == "tty" and self._tty_width:
            sys.stderr.write("\r" + summary.ljust(self._tty_width) + ("\n" if summary else "\r"))
            sys.stderr.flush()
        elif self._mode == "notebook":
            with self._lock:
                self._finished = True
                if self._timer is not None:
                    self._timer.cancel()
                if self._handle is not None:  # shown: it stays in the saved notebook, so never as a blank
                    elapsed = f"{time.monotonic() - self._started:.1f} s"
                    self._update(summary or (f"fal_magic · {self.label} · ready in {elapsed}" if ok
                                             else f"fal_magic · {self.label} · failed after {elapsed}"))


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
