"""Nested isolated calls: an isolated function that travels into a kernel becomes an
``isolated_proxy``, and calling it there asks the host, over the kernel's broker socket, to run the
function in its own environment and kernel (kernels never start kernels). Called in a process that is
no fal_magic kernel, the proxy hands the call to the runner the host registered."""
from __future__ import annotations

import functools
import json
import os
import pickle
from collections.abc import Callable
from typing import Any

from .frames import FalMagicFailure, add_note, dumps, loads, sign

BROKER_ENV = "FAL_MAGIC_BROKER"

#: Set in kernels that a fal_magic server extension starts for a remote host.
REMOTE_ENV = "FAL_MAGIC_REMOTE"

#: Runs an isolated function outside any kernel: ``runner(fn, options, args, kwargs)``. The host's
#: fal_magic registers it (this package never imports the host side).
Runner = Callable[[Callable[..., Any], "dict[str, Any]", "tuple[Any, ...]", "dict[str, Any]"], Any]
_runner: Runner | None = None


def register_runner(runner: Runner) -> None:
    """Say how a proxy called outside a kernel runs its function (the host does, at import)."""
    global _runner
    _runner = runner


class NestedCallError(FalMagicFailure):
    """An isolated function called inside another failed in a way that has no type of its own here."""


class Broker:
    """The kernel's line to its hosts for nested isolated calls: a zmq socket of its own (the shell
    channel is not read while the outer call runs), connected to the broker address the running
    request names: each process of the user's pool that leases the kernel has its own."""

    #: Connections kept to hosts' brokers (the latest ones; a host that left takes none of them).
    KEEP = 4

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.address: str | None = None  # the running request's host's
        self._sockets: dict[str, Any] = {}

    def _socket(self) -> Any:
        import zmq

        assert self.address is not None
        socket = self._sockets.pop(self.address, None)
        if socket is None:
            socket = zmq.Context.instance().socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.address)
        self._sockets[self.address] = socket  # (the latest last)
        while len(self._sockets) > self.KEEP:
            self._sockets.pop(next(iter(self._sockets))).close()
        return socket

    def call(self, options: dict[str, Any], fn: Callable[..., Any] | None, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        if self.address is None:
            raise NestedCallError("isolated functions cannot be called from here (no host brokers this request)")
        socket = self._socket()
        header = json.dumps({"op": "nested", "nonce": os.urandom(8).hex()}).encode()
        socket.send_multipart([sign(self.key, header), header, *dumps((options, fn, args, kwargs))], copy=False)
        status, *frames = socket.recv_multipart(copy=False)
        status = bytes(status)
        if status == b"ok":
            return loads(frames)
        if status == b"exception":
            payload = loads(frames)
            first = payload["chain"][0]
            try:
                exc = pickle.loads(first["pickled"]) if first["pickled"] is not None else None
            except Exception:
                exc = None
            if not isinstance(exc, BaseException):
                exc = NestedCallError(f"{first['type']}: {first['message']}")
            add_note(exc, "--- traceback of the nested isolated call ---\n" + payload["traceback"].rstrip())
            raise exc
        raise NestedCallError(bytes(frames[0]).decode() if frames else "nested call failed")


#: This kernel's broker, once ``runtime.install`` made it (None: not a fal_magic kernel, or a remote one).
broker: Broker | None = None


class isolated_proxy:  # noqa: N801 - stands in for an isolated function
    """What an ``@isolated`` function becomes when it travels into a kernel: calling it asks the
    host to run the function in its own environment and kernel, and waits for the result."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if broker is not None:  # (a function from another Python goes back by the host's reference only)
            return broker.call(self.options, None if "host_ref" in self.options else self.fn, args, kwargs)
        if os.environ.get(REMOTE_ENV):
            raise NestedCallError(f"{self.fn.__qualname__}() is isolated: it cannot be called from inside a kernel "
                                  "on a remote server (nested isolated calls are brokered by a local host only)")
        if _runner is None:
            raise NestedCallError(f"{self.fn.__qualname__}() is isolated, and nothing here can run it "
                                  "(import fal_magic to run it from this process)")
        return _runner(self.fn, self.options, args, kwargs)  # not in a kernel: the host's decorator runs it
