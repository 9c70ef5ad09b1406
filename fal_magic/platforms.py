"""What this operating system lets fal_magic do. Kernels on this machine need a POSIX system (Linux,
tested; macOS, as far as known): file locks (``fcntl``), resource limits, unix sockets, process groups.
Elsewhere (Windows) the client still imports and drives kernels on a Jupyter Server (``host=``), and
asking for a kernel on this machine is a clear error that names that option."""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from .errors import FalMagicError

#: Whether kernels (and their environments) can run on this machine.
LOCAL_KERNELS = os.name == "posix" and hasattr(socket, "AF_UNIX") and hasattr(os, "fork")

#: Whether kernels are forked from a per-environment template by default: on Linux. (On macOS a
#: process that has loaded system frameworks must not fork without exec, so kernels start anew there.)
FORK_BY_DEFAULT = sys.platform.startswith("linux")


def require_local_kernels() -> None:
    """Raise FalMagicError where kernels cannot run on this machine, naming what can be done instead."""
    if not LOCAL_KERNELS:
        raise FalMagicError(
            f"kernels cannot run on this machine ({sys.platform}): fal_magic runs them on Linux or macOS. "
            "Run them on a Jupyter Server with the fal_magic extension instead: isolated(..., host=URL), "
            "%%isolated --host URL, or fal_magic.configure(host=URL, token=...)")


def after_fork_in_child(callback: Callable[[], None]) -> None:
    """Call ``callback`` in the child after ``os.fork`` (where the system has fork at all)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=callback)
