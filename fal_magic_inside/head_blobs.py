"""Large buffers for a kernel on a cluster host: it fetches a call's large arguments from the head
server's blob endpoint, and puts its large results there, over HTTP, beside the websocket (which
copies every frame several times on its way through the server).

Each blob is sent while it is being read: the sender chooses a random name, waits for the head's
'100 Continue' (or its refusal: the buffer then goes in the websocket message instead), names the
blob in its message, and sends the bytes in a thread; the head passes them on to a reader that asks
for the blob meanwhile. So an argument reaches the kernel while the caller still uploads it, and a
result reaches the caller while the kernel still sends it.

The kernel has no server token; it signs each request with its own connection key (HMAC-SHA256 of the
method, the path and the time), which the server checks against the key of the kernel it names."""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import socket
import ssl
import threading
import time
import urllib.request
from typing import Any, Callable
from urllib.parse import urlsplit

from .frames import FalMagicFailure, new_buffer
from .head import HEAD_CERT_ENV
from .shm import BLOB_MIN

#: Headers of a request signed by a kernel: its id, the time, the signature.
KERNEL_HEADER, TIME_HEADER, SIGNATURE_HEADER = "X-Fal-Magic-Kernel", "X-Fal-Magic-Time", "X-Fal-Magic-Signature"

#: Bytes read per piece of a fetched blob.
READ_CHUNK = 8 << 20

#: How many blobs this kernel fetched and posted (what a test, or a curious user, can look at).
moved = {"fetched": 0, "posted": 0}


def signature(key: bytes, method: str, path: str, when: str) -> str:
    """What a kernel signs for one request (and what the server checks)."""
    return hmac.new(key, f"{method} {path} {when}".encode(), hashlib.sha256).hexdigest()


def _headers(key: bytes, method: str, url: str) -> dict[str, str]:
    when = str(int(time.time()))
    return {KERNEL_HEADER: os.environ.get("KERNEL_ID", ""), TIME_HEADER: when,
            SIGNATURE_HEADER: signature(key, method, urlsplit(url).path, when)}


def tls_context() -> ssl.SSLContext:
    """How the head's certificate is checked: against the system's authorities (``SSL_CERT_FILE``,
    ``SSL_CERT_DIR`` as they are now), and in a host's kernel also against the head's own
    certificates, which the server passes it (a self-signed one, or one from an authority the host
    does not know)."""
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"), os.environ.get(HEAD_CERT_ENV))


@functools.lru_cache(maxsize=4)
def _tls_context(cert_file: str | None, cert_dir: str | None, head_certificates: str | None) -> ssl.SSLContext:
    """One context per set of trust settings (``create_default_context`` reads the first two itself)."""
    context = ssl.create_default_context()
    if head_certificates:
        context.load_verify_locations(cadata=base64.b64decode(head_certificates).decode("ascii"))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the head's own certificate is enough
    return context


def fetch(base: str, name: str, size: int, key: bytes) -> memoryview:
    """Fetch (and so remove) the blob ``name`` of ``size`` bytes from the head: a writable buffer."""
    url = f"{base}/{name}"
    out = new_buffer(size)
    request = urllib.request.Request(url, headers=_headers(key, "GET", url))
    try:
        with urllib.request.urlopen(request, timeout=600, context=tls_context()) as resp:
            got = 0
            while got < size:
                count = resp.readinto(out[got:got + READ_CHUNK])
                if not count:
                    raise OSError(f"it sent {got} of {size} bytes")
                got += count
    except OSError as exc:
        raise FalMagicFailure(f"fal_magic could not fetch a large argument ({size} bytes) from the server at "
                              f"{base}: {exc}") from None
    moved["fetched"] += 1
    return out


class Refused(OSError):
    """The head would not take a blob (its quota, a full disk): ``status`` and its reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


class Sending:
    """A blob's bytes on their way to the head, in a thread; ``wait()`` raises what went wrong."""

    def __init__(self, sock: socket.socket, view: memoryview, name: str) -> None:
        self.name = name
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._send, args=(sock, view), name="fal_magic-blob", daemon=True)
        self.thread.start()

    def _send(self, sock: socket.socket, view: memoryview) -> None:
        try:
            with sock:
                sock.sendall(view)
                status, reason = _answer(sock)
                if status != 200:
                    raise Refused(status, reason)
        except BaseException as exc:
            self.error = exc

    def wait(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error


def start_put(base: str, buffer: Any, headers_for: Callable[[str], dict[str, str]], prefix: str = "r",
              timeout: float = 600) -> Sending:
    """Put ``buffer`` on the head as a new blob of a random name (``prefix-<hex>``), the bytes sent in a
    thread once the head accepted it (``Sending.name`` names it at once); Refused if the head will not
    take it. ``headers_for(url)`` gives the request's credentials."""
    name = f"{prefix}-{os.urandom(8).hex()}"
    url = urlsplit(f"{base}/{name}")
    headers = headers_for(f"{base}/{name}")
    view = memoryview(buffer).cast("B")
    port = url.port or (443 if url.scheme == "https" else 80)
    sock = socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout)
    try:
        if url.scheme == "https":
            sock = tls_context().wrap_socket(sock, server_hostname=url.hostname)
        lines = [f"PUT {url.path} HTTP/1.1", f"Host: {url.netloc.rpartition('@')[2]}",
                 f"Content-Length: {view.nbytes}", "Content-Type: application/octet-stream",
                 "Expect: 100-continue", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, reason = _answer(sock)
        if status != 100:
            raise Refused(status, reason)
    except BaseException:
        sock.close()
        raise
    return Sending(sock, view, name)


def _answer(sock: socket.socket) -> tuple[int, str]:
    """Read one HTTP answer's status (and, for a final one, its body: the reason)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise OSError("the head closed the connection")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    if status == 100:
        return status, ""
    length = next((int(h.split(":", 1)[1]) for h in header_lines if h.lower().startswith("content-length:")), 0)
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return status, body.decode(errors="replace")


def results_to_head(base: str, frames: list[Any], key: bytes) -> dict[int, list[Any]]:
    """Start putting a call's large result frames on the head (each frame emptied once the head took
    it: its thread holds it until sent); which index is which blob. A frame the head refuses stays
    (a broken send shows the host a blob that ends short)."""
    placed: dict[int, list[Any]] = {}
    for index in range(1, len(frames)):
        size = memoryview(frames[index]).nbytes
        if size < BLOB_MIN:
            continue
        try:
            put = start_put(base, frames[index], lambda url: _headers(key, "PUT", url))
        except OSError:
            continue
        moved["posted"] += 1
        placed[index] = [put.name, size]
        frames[index] = b""
    return placed
