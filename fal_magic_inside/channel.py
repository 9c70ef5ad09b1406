"""The kernel's own socket for calls from a host on the same machine (the fast channel), read by the
kernel's event loop: no shell dispatch, no busy/idle round of the Jupyter protocol. Messages carry a
header signed with the kernel's session key. The kernel marks each call it begins in a small file the
host reads only if the kernel dies (sending a message instead cost every call ~0.3 ms: a wake-up of
the host while the call runs), then replies."""
from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from .frames import sign

FAST_ENV = "FAL_MAGIC_FAST"
#: The file in which the kernel marks the call it has begun: the call's message id (32 characters).
BEGUN_ENV = "FAL_MAGIC_BEGUN"
BEGUN_SIZE = 32


def begun_mark(msg_id: str) -> bytes:
    """What the file holds once the call ``msg_id`` has begun."""
    return msg_id.encode()[:BEGUN_SIZE].ljust(BEGUN_SIZE)


#: Serves one call: how to answer its caller (with the reply's frames), the call's header and frames.
Serve = Callable[[Callable[["list[Any]"], None], "dict[str, Any]", "list[Any]"], None]


class FastChannel:
    """A zmq ROUTER socket bound at ``address`` and read on the kernel's asyncio loop: any process
    of the user's pool that leases the kernel connects to it, and each reply goes to its caller."""

    def __init__(self, serve: Serve, address: str, key: bytes, begun_path: str) -> None:
        import asyncio
        import mmap
        import os

        import zmq

        self.zmq = zmq
        self.serve = serve
        self.key = key
        self.socket: Any = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        fd = os.open(begun_path, os.O_RDWR)
        try:
            self.mark = mmap.mmap(fd, BEGUN_SIZE)
        finally:
            os.close(fd)
        asyncio.get_running_loop().add_reader(self.socket.getsockopt(zmq.FD), self.on_readable)

    def on_readable(self) -> None:
        zmq = self.zmq
        try:  # an interrupt that lands here must not reach (and stop) the kernel's event loop
            while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    ident, signature, header, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except (zmq.Again, ValueError):
                    break
                if not hmac.compare_digest(sign(self.key, header.bytes), signature.bytes):
                    continue  # not signed with our key: dropped
                socket = self.socket

                def answer(parts: list[Any], ident: Any = ident) -> None:
                    socket.send_multipart([ident, *parts], copy=False)

                self.serve(answer, json.loads(header.bytes), frames)
        except KeyboardInterrupt:
            pass

    def begun(self, msg_id: str) -> None:
        """Mark the call ``msg_id`` as begun (a write into memory the host's file shares)."""
        self.mark[:BEGUN_SIZE] = begun_mark(msg_id)
