"""Large buffers beside the kernel websocket, for kernels that run on the server's own machine.

``POST /fal_magic/api/blobs`` stores a request body as a file in a private directory (in shared
memory when there is one); the host then names it in its call, and the kernel maps the file and
removes it. A kernel writes its large results there too, and ``GET /fal_magic/api/blobs/NAME`` sends
one and removes it. The websocket carries only the names: every websocket frame and ZMQ message is
copied several times by tornado and jupyter_server, which held a 50 MiB round trip to ~0.3 GB/s.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import iostream, web

from fal_magic_inside.head_blobs import KERNEL_HEADER, SIGNATURE_HEADER, TIME_HEADER, signature
from fal_magic_inside.shm import BLOB_NAME

from ..leftovers import remove_orphaned

#: Names of blobs: made by this server (``u-``) or by a kernel for its results (``r-``).
NAME = BLOB_NAME

#: Blob directories are named ``fal_magic-blobs-<pid>-...``, after their server's process.
PREFIX = "fal_magic-blobs-"

#: Where blobs go when the machine has shared memory (a tmpfs): there a file costs no disk.
SHM_ROOT = "/dev/shm"

#: Bytes read per piece of an upload.
RECEIVE_CHUNK = 4 << 20

#: Seconds an upload may pause before it is given up.
RECEIVE_TIMEOUT = 600.0

#: Seconds a kernel's signed request stays valid (clocks of hosts differ a little).
SIGNED_FOR = 300

#: Seconds after which a blob nobody fetched (its host or kernel died meanwhile) is removed.
STALE_AFTER = 3600.0


class BlobStore:
    """The owner-only directory of this server's blobs, removed when the server stops. Together they
    may hold at most ``quota`` bytes (uploads past it are refused: the call's frames then go through
    the websocket)."""

    def __init__(self, quota: int) -> None:
        root = SHM_ROOT if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK) else tempfile.gettempdir()
        remove_orphaned(Path(root).glob(f"{PREFIX}*-*"), PREFIX)  # a killed server's
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self.quota = quota
        self.growing: dict[str, Growing] = {}  # uploads under way, by blob name

    def used(self) -> int:
        """Bytes the blobs hold now (uploads under way included)."""
        total = 0
        for path in self.dir.iterdir():
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

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


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


class TokenNeeded:
    """Says that a token is missing, where jupyter_server would answer a request without one with its
    XSRF check (``'_xsrf' argument missing``), which tells a script nothing it can act on."""

    def check_xsrf_cookie(self) -> None:
        if getattr(self, "_jupyter_current_user", "") is None:  # authenticated by nothing
            raise web.HTTPError(403, "fal_magic's API needs the server's token: send the header "
                                     "'Authorization: token <token>'")
        super().check_xsrf_cookie()  # type: ignore[misc]


class _BlobHandler(TokenNeeded, APIHandler):
    auth_resource = "kernels"  # a blob is a kernel's input or output

    @property
    def store(self) -> BlobStore:
        return self.settings["fal_magic_blobs"]

    async def _check_access(self, action: str) -> None:
        """Authentication and authorization, before any byte of a body is read (``prepare``): the
        server's token, or the signature of a kernel of this server (a kernel on a cluster host)."""
        if KERNEL_HEADER in self.request.headers:
            self._check_kernel_signature()
            return
        await super().prepare()
        if self.current_user is None:
            raise web.HTTPError(403)
        allowed = self.authorizer.is_authorized(self, self.current_user, action, self.auth_resource)
        if hasattr(allowed, "__await__"):
            allowed = await allowed
        if not allowed:
            raise web.HTTPError(403, f"not authorized to {action} kernels")

    def _check_kernel_signature(self) -> None:
        """A request signed by a kernel with its own connection key: the kernel must be this server's,
        the signature right, and its time within ``SIGNED_FOR`` seconds of now."""
        headers = self.request.headers
        kernel_id, when = headers.get(KERNEL_HEADER, ""), headers.get(TIME_HEADER, "")
        try:
            key = self.settings["kernel_manager"].get_kernel(kernel_id).session.key
            fresh = abs(time.time() - int(when)) <= SIGNED_FOR
        except (KeyError, ValueError, web.HTTPError):  # (the kernel manager says 404 for an unknown id)
            raise web.HTTPError(403, "not a kernel of this server") from None
        expected = signature(key, self.request.method or "", self.request.path, when)
        if not (key and fresh and hmac.compare_digest(headers.get(SIGNATURE_HEADER, ""), expected)):
            raise web.HTTPError(403, "the kernel's signature does not hold")


class Growing:
    """An upload under way, which a reader may follow: the reader sends what has come while the
    rest still arrives (a call's argument reaches a cluster host's kernel while the caller uploads it).
    Thread-safe: the receiving and the sending threads meet here, not on the event loop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.written = 0
        self.ended = False
        self._changed = threading.Condition()

    def wrote(self, count: int) -> None:
        with self._changed:
            self.written += count
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_past(self, sent: int) -> int:
        """Block until more than ``sent`` bytes have come (how many), or the upload ended short."""
        with self._changed:
            while self.written <= sent and not self.ended:
                self._changed.wait()
            if self.written <= sent:
                raise OSError(f"the upload ended after {self.written} of {self.size} bytes")
            return self.written


class _Receiving(_BlobHandler):
    """Receives a request body into a new blob, piece by piece, within the quota."""

    _fd: int | None = None
    _refused: web.HTTPError | None = None  # why the rest of the body is not kept (answered at its end)
    _received = 0
    _growing: Growing | None = None

    async def _receive(self, name: str, expects: bool) -> None:
        """Get ready to store the body as blob ``name``. A client that waits for '100 Continue'
        (``expects``) is refused at once; another once its body has come (an answer while it still
        sends would reach it as a reset connection, not as a reason)."""
        quota = self.store.quota
        length = int(self.request.headers.get("Content-Length") or 0)
        refusal = None
        if length > quota:
            refusal = web.HTTPError(413, f"a blob of {_mib(length)} is larger than this server's blob quota "
                                         f"of {_mib(quota)} (FalMagicServer.blob_quota)")
        else:
            self.store.sweep()
            used = self.store.used()
            if used + length > quota:
                refusal = web.HTTPError(507, f"this server's blobs hold {_mib(used)} of its quota of {_mib(quota)} "
                                             f"(FalMagicServer.blob_quota): no room for {_mib(length)} more")
        if refusal is not None:
            if expects:
                raise refusal
            self._refused = refusal
            return
        # read the body in large pieces: tornado's defaults (64 KiB) cost a callback per piece
        connection: Any = self.request.connection
        if hasattr(connection, "params") and hasattr(connection, "stream"):
            connection.params = copy.copy(connection.params)
            connection.params.chunk_size = RECEIVE_CHUNK
            connection.stream.read_chunk_size = RECEIVE_CHUNK
        self._path = self.store.path(name)
        try:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise web.HTTPError(409, f"blob {name} exists") from None
        self._growing = self.store.growing[name] = Growing(length)

    def data_received(self, chunk: bytes) -> None:
        """Write a piece of the body; once one cannot be kept (the quota, a full disk), drop the file
        and the rest of the body, and say why when it has all come."""
        if self._refused is not None:
            return
        assert self._fd is not None and self._growing is not None
        self._received += len(chunk)
        if self._received > self.store.quota:
            self._refuse(413, f"the blob is larger than this server's blob quota of {_mib(self.store.quota)} "
                              "(FalMagicServer.blob_quota)")
            return
        try:
            _write_all(self._fd, memoryview(chunk))
        except OSError as exc:
            self._refuse(507, self._cannot_store(exc.strerror or str(exc)))
            return
        self._growing.wrote(len(chunk))

    def _refuse(self, status: int, message: str) -> None:
        self._refused = web.HTTPError(status, message)
        self._discard()

    def _cannot_store(self, why: str) -> str:
        return f"this server cannot store the blob: {why} in {self.store.dir.parent}"

    def _stored(self) -> None:
        """The body has come: answer with the blob's name and path, or with why it was not kept."""
        if self._refused is not None:
            raise self._refused
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self._ended()
        self.finish(json.dumps({"name": self._path.name, "path": str(self._path)}))

    def _ended(self) -> None:
        if self._growing is not None:
            self._growing.end()
            self.store.growing.pop(self._path.name, None)
            self._growing = None

    def on_finish(self) -> None:
        self._discard()

    def on_connection_close(self) -> None:
        self._discard()

    def _discard(self) -> None:
        """An upload that did not complete leaves nothing (a reader following it sees it end short)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._path.unlink(missing_ok=True)
            self._ended()


@web.stream_request_body
class BlobUploadHandler(_Receiving):
    """``POST /fal_magic/api/blobs``: the body becomes a blob; the answer names it and its path."""

    async def prepare(self) -> None:  # type: ignore[override]
        await self._check_access("write")
        await self._receive(f"u-{os.urandom(8).hex()}", expects=False)

    def post(self) -> None:
        self._stored()


@web.stream_request_body
class BlobHandler(_Receiving):
    """``GET /fal_magic/api/blobs/NAME`` sends a blob and removes it (following one still being
    uploaded); ``PUT`` stores one under a name its sender chose (a random one); ``DELETE`` removes."""

    async def prepare(self) -> None:  # type: ignore[override]
        await self._check_access("read" if self.request.method == "GET" else "write")
        if self.request.method == "PUT":
            if "Content-Length" not in self.request.headers:
                raise web.HTTPError(411, "a blob's size must be given (Content-Length)")
            expects = self.request.headers.get("Expect") == "100-continue"
            await self._receive(self.path_args[0], expects)
            if expects and self._fd is not None:
                await self._take_over()

    async def _take_over(self) -> None:
        """Receive the body in a thread, from the socket straight into the blob's file, on the
        connection taken from tornado: its reads copy every piece several times, on the event loop,
        and tell a reader following the upload of each piece only through the loop."""
        assert self._fd is not None and self._growing is not None
        fd, path, growing = self._fd, self._path, self._growing
        self._fd = self._growing = None  # this method's now: the handler's clean-up no longer runs
        stream = self._take_connection()
        early = bytes(stream._read_buffer[:stream._read_buffer_size])
        try:
            failure = await _in_thread(_receive_body, stream.socket, fd, growing.size, early, growing.wrote)
            if failure:
                path.unlink(missing_ok=True)
                status, answer = 507, self._cannot_store(failure)
            else:
                status, answer = 200, json.dumps({"name": path.name, "path": str(path)})
            body = answer.encode()
            stream.socket.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                                  b"Connection: close\r\n\r\n%s" % (
                                      status, b"OK" if status == 200 else b"Insufficient Storage",
                                      b"application/json" if status == 200 else b"text/plain", len(body), body))
        except OSError:  # the sender went away: nothing stays (a reader following it sees it end short)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            growing.end()
            self.store.growing.pop(path.name, None)
            stream.close()

    def _take_connection(self) -> iostream.IOStream:
        """Take the connection from tornado, for a thread to send or receive on: the event loop
        watches it no more (as tornado's own ``start_tls`` does), or it would read what the thread
        should, or close it under the thread on an early end."""
        stream = self.detach()
        if stream._state is not None:
            stream.io_loop.remove_handler(stream.socket)
            stream._state = None
        return stream

    def put(self, name: str) -> None:
        self._stored()

    async def get(self, name: str) -> None:
        """Send the blob with ``sendfile`` (the kernel copies it from the file to the socket; through
        TLS, read and sent), on the connection taken from tornado, whose writes copy every piece
        several times."""
        path = self.store.path(name)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise web.HTTPError(404, f"no blob {name}") from None
        growing = self.store.growing.get(name)
        path.unlink(missing_ok=True)  # fetched once: gone before the client has it all (the open file stays)
        with f:
            size = growing.size if growing is not None else os.fstat(f.fileno()).st_size
            stream = self._take_connection()
            try:
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size)
                await _in_thread(_send, stream.socket, head, f.fileno(), size, growing)
            except OSError:
                pass  # the client went away, or the upload broke off: the reader sees it end short
            finally:
                stream.close()

    def delete(self, name: str) -> None:
        self.store.path(name).unlink(missing_ok=True)
        self.set_status(204)
        self.finish()


def _send(sock: socket.socket, head: bytes, fd: int, size: int, growing: Growing | None) -> None:
    """Send ``head``, then ``size`` bytes of the file ``fd`` on ``sock`` (blocking): all at once, or,
    while it is being uploaded (``growing``), each part as soon as it has come."""
    sock.setblocking(True)
    sock.sendall(head)
    sent = 0
    while sent < size:
        ready = size if growing is None else min(size, growing.wait_past(sent))
        while sent < ready:
            sent += _send_part(sock, fd, sent, ready)


def _send_part(sock: socket.socket, fd: int, start: int, end: int) -> int:
    """Send some of the bytes ``start`` to ``end`` of the file ``fd`` on ``sock``: how many. With
    ``sendfile`` on a plain connection; through TLS, read and sent (``sendfile`` would put them on
    the wire unencrypted, inside the TLS stream)."""
    if isinstance(sock, ssl.SSLSocket):
        data = os.pread(fd, min(end - start, RECEIVE_CHUNK), start)
        sock.sendall(data)
        count = len(data)
    else:
        count = os.sendfile(sock.fileno(), fd, start, end - start)
    if count == 0:
        raise OSError("the blob's file ended early")
    return count


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread of its own: a transfer may wait minutes for its other end, which
    would hold one of the few threads of the event loop's shared pool."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="fal_magic-blob", daemon=True).start()
    return await done


def _write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` to the file ``fd`` (OSError when it cannot take it: a full disk)."""
    while view:
        view = view[os.write(fd, view):]


def _receive_body(sock: socket.socket, fd: int, size: int, early: bytes, wrote: Callable[[int], None]) -> str:
    """Say '100 Continue' on ``sock``, then receive ``size`` bytes from it (after ``early``, which
    tornado had read already) into the file ``fd``, saying each piece to ``wrote`` (blocking, in a
    thread). Once the file cannot take more (a full disk), the rest is read and dropped: why, or ""
    when all is stored."""
    sock.settimeout(RECEIVE_TIMEOUT)
    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    buffer = memoryview(bytearray(RECEIVE_CHUNK))
    got, failure = 0, ""
    piece = memoryview(early)[:size]
    while True:
        if piece.nbytes:
            got += piece.nbytes
            if not failure:
                try:
                    _write_all(fd, piece)
                    wrote(piece.nbytes)
                except OSError as exc:
                    failure = exc.strerror or str(exc)
        if got >= size:
            return failure
        count = sock.recv_into(buffer[:min(RECEIVE_CHUNK, size - got)])
        if not count:
            raise ConnectionError(f"the sender closed the connection after {got} of {size} bytes")
        piece = buffer[:count]


def add_handlers(web_app: Any, quota: int) -> BlobStore:
    """Register the blob endpoints on the server's web application; the store they write to."""
    store = BlobStore(quota)
    web_app.settings["fal_magic_blobs"] = store
    base = url_path_join(web_app.settings["base_url"], "fal_magic", "api", "blobs")
    web_app.add_handlers(".*$", [(base, BlobUploadHandler), (base + r"/([^/]+)", BlobHandler)])
    return store
