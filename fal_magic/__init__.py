"""fal_magic: run Python functions and notebook cells in isolated, warm Jupyter kernels.

``@isolated(requirements=[...], keep_alive=300)`` runs a function in a kernel whose virtualenv holds
the requirements; the kernel stays warm between calls and is culled when idle.
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from .config import FalMagic, configure
from .errors import (
    AuthenticationError,
    EnvironmentBuildError,
    FalMagicError,
    KernelDiedError,
    KernelStartError,
    RemoteError,
    SerializationError,
)

if TYPE_CHECKING:
    from .decorator import IsolatedFunction, isolated
    from fal_magic_inside.cached import cached
    from .widget import kernels

#: Names whose modules load on first use: the server extension imports this package too, and
#: needs none of the client side (kernels, widgets).
_LAZY = {"IsolatedFunction": "fal_magic.decorator", "isolated": "fal_magic.decorator",
         "cached": "fal_magic_inside.cached", "kernels": "fal_magic.widget"}

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
    "shutdown",
    "unload_ipython_extension",
]


def shutdown(keys: list[str] | None = None) -> list[str]:
    """Shut down warm kernels now, from code: those of ``keys`` (requirement keys, or unique
    prefixes of them), or every one. Returns the ids of the kernels stopped; a busy one's call fails."""
    from .kernel.pool import get_pool

    return get_pool().shutdown(keys)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext fal_magic``: register ``%%isolated``, ``%isolated_kernels`` and ``%isolated_shutdown``."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext fal_magic``."""
    from .magics import unload

    unload(ipython)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The Jupyter Server extension (``fal_magic.server``), enabled on install by the package's
    ``jupyter_server_config.d/fal_magic.json``."""
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
