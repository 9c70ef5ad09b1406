"""fal_magic: run Python functions and notebook cells in isolated, warm Jupyter kernels.

``@isolated(requirements=[...], keep_alive=300)`` runs a function in a kernel whose virtualenv holds
the requirements; the kernel stays warm between calls and is culled when idle.
"""
from __future__ import annotations

import logging
import sys

from .config import FalMagic, configure
from .decorator import IsolatedFunction, isolated
from .kernel.runtime import cached
from .errors import (
    AuthenticationError,
    EnvironmentBuildError,
    FalMagicError,
    KernelDiedError,
    KernelStartError,
    RemoteError,
    SerializationError,
)

from .widget import kernels

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "EnvironmentBuildError",
    "FalMagic",
    "FalMagicError",
    "IsolatedFunction",
    "KernelDiedError",
    "KernelStartError",
    "RemoteError",
    "SerializationError",
    "cached",
    "configure",
    "isolated",
    "kernels",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext fal_magic``: register ``%%isolated``, ``%isolated_kernels`` and ``%isolated_shutdown``."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext fal_magic``."""
    from .magics import unload

    unload(ipython)


def _jupyter_server_extension_points() -> list[dict]:
    """``--ServerApp.jpserver_extensions="{'fal_magic': True}"`` loads the server side (``fal_magic.server``)."""
    return [{"module": "fal_magic.server"}]


class _ProgressHandler(logging.Handler):
    """fal_magic's own progress lines, on the caller's *current* stderr and marked as ours."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"[fal_magic] {self.format(record)}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_log = logging.getLogger("fal_magic")
if not _log.handlers:
    _log.addHandler(_ProgressHandler())
    _log.setLevel(logging.INFO)
    _log.propagate = False
