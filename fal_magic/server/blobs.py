"""Large buffers beside the kernel websocket, for kernels that run on the server's own machine.

``POST /fal_magic/api/blobs`` stores a request body as a file in a private directory (in shared
memory when there is one); the host then names it in its call, and the kernel maps the file and
removes it. A kernel writes its large results there too, and ``GET /fal_magic/api/blobs/NAME`` sends
one and removes it. The websocket carries only the names: every websocket frame and ZMQ message is
copied several times by tornado and jupyter_server, which held a 50 MiB round trip to ~0.3 GB/s.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..leftovers import remove_orphaned

#: Names of blobs: made by this server (``u-``) or by a kernel for its results (``r-``).
NAME = re.compile(r"^[ur]-[0-9a-f]+(-[0-9]+)*$")

#: Blob directories are named ``fal_magic-blobs-<pid>-...``, after their server's process.
PREFIX = "fal_magic-blobs-"

#: Where blobs go when the machine has shared memory (a tmpfs): there a file costs no disk.
SHM_ROOT = "/dev/shm"

#: Bytes read per piece of an upload.
RECEIVE_CHUNK = 4 << 20

#: Bytes sent per write when a blob goes back (each is flushed before the next is read).
SEND_CHUNK = 8 << 20

#: Seconds after which a blob nobody fetched (its host or kernel died meanwhile) is removed.
STALE_AFTER = 3600.0


class BlobStore:
    """The owner-only directory of this server's blobs, removed when the server stops."""

    def __init__(self) -> None:
        root = SHM_ROOT if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK) else tempfile.gettempdir()
        remove_orphaned(Path(root).glob(f"{PREFIX}*-*"), PREFIX)  # a killed server's
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))

    def path(self, name: str) -> Path:
        if not NAME.match(name):
            raise web.HTTPError(400, f"not a blob name: {name[:80]!r}")
        return self.dir / name

    def sweep(self) -> None:
        """Remove blobs older than ``STALE_AFTER``."""
        limit = time.time() - STALE_AFTER
        for path in self.dir.iterdir():
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
            except OSError:
                pass

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _BlobHandler(APIHandler):
    auth_resource = "kernels"  # a blob is a kernel's input or output

    @property
    def store(self) -> BlobStore:
        return self.settings["fal_magic_blobs"]

    async def _check_access(self, action: str) -> None:
        """Authentication and authorization, before any byte of a body is read (``prepare``)."""
        await super().prepare()
        if self.current_user is None:
            raise web.HTTPError(403)
        allowed = self.authorizer.is_authorized(self, self.current_user, action, self.auth_resource)
        if hasattr(allowed, "__await__"):
            allowed = await allowed
        if not allowed:
            raise web.HTTPError(403, f"not authorized to {action} kernels")


@web.stream_request_body
class BlobUploadHandler(_BlobHandler):
    """``POST /fal_magic/api/blobs``: the body becomes a blob; the answer names it and its path."""

    _fd: int | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        await self._check_access("write")
        # read the body in large pieces: tornado's defaults (64 KiB) cost a callback per piece
        connection: Any = self.request.connection
        if hasattr(connection, "params") and hasattr(connection, "stream"):
            connection.params = copy.copy(connection.params)
            connection.params.chunk_size = RECEIVE_CHUNK
            connection.stream.read_chunk_size = RECEIVE_CHUNK
        self.store.sweep()
        name = f"u-{os.urandom(8).hex()}"
        self._path = self.store.path(name)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def data_received(self, chunk: bytes) -> None:
        assert self._fd is not None
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def post(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self.finish(json.dumps({"name": self._path.name, "path": str(self._path)}))

    def on_finish(self) -> None:
        self._discard()

    def on_connection_close(self) -> None:
        self._discard()

    def _discard(self) -> None:
        """An upload that did not complete leaves nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._path.unlink(missing_ok=True)


class BlobHandler(_BlobHandler):
    """``GET /fal_magic/api/blobs/NAME`` sends a kernel's result and removes it; ``DELETE`` only removes."""

    async def prepare(self) -> None:  # type: ignore[override]
        await self._check_access("read" if self.request.method == "GET" else "write")

    async def get(self, name: str) -> None:
        path = self.store.path(name)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise web.HTTPError(404, f"no blob {name}") from None
        path.unlink(missing_ok=True)  # fetched once: gone before the client has it all (the open file stays)
        with f:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            while True:
                chunk = f.read(SEND_CHUNK)
                if not chunk:
                    break
                self.write(chunk)
                await self.flush()

    def delete(self, name: str) -> None:
        self.store.path(name).unlink(missing_ok=True)
        self.set_status(204)
        self.finish()


def add_handlers(web_app: Any) -> BlobStore:
    """Register the blob endpoints on the server's web application; the store they write to."""
    store = BlobStore()
    web_app.settings["fal_magic_blobs"] = store
    base = url_path_join(web_app.settings["base_url"], "fal_magic", "api", "blobs")
    web_app.add_handlers(".*$", [(base, BlobUploadHandler), (base + r"/([^/]+)", BlobHandler)])
    return store
