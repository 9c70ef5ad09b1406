"""Running kernels, from the host's side: the contract every kind meets, the request loop, the local,
forked and remote kinds, the host's half of the wire format, and the pool of warm kernels. (What runs
inside a kernel is the package ``fal_magic_inside``.)

The pool and its names load on first use, so that importing a light piece (``protocol``, as the
server extension does) brings in no client machinery (zmq sockets, websocket client).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import KernelInfo, KernelPool, get_pool

__all__ = ["KernelInfo", "KernelPool", "get_pool"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
