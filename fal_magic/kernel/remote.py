"""RemoteKernel: a kernel on a Jupyter Server that has the fal_magic server extension.

The server builds the environment and its kernelspec (``POST /fal_magic/api/envs``, progress streamed
back as JSON lines); the kernel starts through the standard ``/api/kernels`` API and is driven over
the standard kernel websocket, in the ``v1.kernel.websocket.jupyter.org`` framing (binary frames,
no base64, and the server passes them through without re-encoding). The same runtime comm serves
calls as on a local kernel; large frames go ahead in parts below the server's message size limit.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

import websocket
from fal_magic_inside import head_blobs
from fal_magic_inside.frames import new_buffer
from fal_magic_inside.shm import BLOB_MIN, BLOB_NAME
from jupyter_client.session import Session

from ..envs import EnvSpec
from ..errors import AuthenticationError, EnvironmentBuildError, FalMagicError, KernelDiedError, KernelStartError
from ..outputs import OutputSink
from .contract import Frames, Kernel, Message, NestedHandler, NotStartedError, Progress, Reply
from .protocol import BOOTSTRAP, LIVENESS_PERIOD, check_hello, comm_open, is_hello, msg_counter
from .request import serve

WS_PROTOCOL = "v1.kernel.websocket.jupyter.org"

#: Frames larger than this travel ahead in parts: a server refuses websocket messages over 10 MiB
#: by default (tornado's ``websocket_max_message_size``).
CHUNK = 4 * 1024 * 1024

#: How long one HTTP exchange with the server may stay silent (builds send a heartbeat line).
HTTP_TIMEOUT = 60.0
#: The same for moving a large buffer.
BLOB_TIMEOUT = 600.0

log = logging.getLogger("fal_magic")

_DEATH = "death"  # the inbox channel name of the reader's "the kernel is gone" notice


def check_url(url: str, allow_plain_http: bool = False) -> str:
    """``url`` without a trailing slash, if it may be used: https, or http to this machine (loopback)
    only, unless plain http was allowed explicitly. FalMagicError otherwise."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise FalMagicError(f"host must be a Jupyter Server URL like https://gpu-box:8888, not {url!r}")
    if parsed.scheme == "http" and not allow_plain_http and not _is_loopback(parsed.hostname):
        raise FalMagicError(
            f"refusing plain http to {parsed.hostname}: the token and every pickled call would cross the network "
            "unencrypted. Use https, or an SSH tunnel to localhost, or allow it explicitly with "
            "fal_magic.configure(allow_plain_http=True)")
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def pack_v1(channel: str, parts: Iterable[Any]) -> bytes:
    """One websocket message in the v1 kernel protocol: offsets, the channel, then the message parts."""
    chunks = [channel.encode(), *parts]
    offsets = [8 * (len(chunks) + 2)]
    for chunk in chunks:
        offsets.append(offsets[-1] + memoryview(chunk).nbytes)
    head = b"".join(n.to_bytes(8, "little") for n in (len(offsets), *offsets))
    return b"".join([head, *chunks])


def unpack_v1(data: bytes) -> tuple[str, list[memoryview]]:
    """Inverse of ``pack_v1``: the channel and the parts (views into ``data``, not copies)."""
    view = memoryview(data)
    count = int.from_bytes(view[:8], "little")
    offsets = [int.from_bytes(view[8 * (i + 1):8 * (i + 2)], "little") for i in range(count)]
    channel = bytes(view[offsets[0]:offsets[1]]).decode()
    return channel, [view[offsets[i]:offsets[i + 1]] for i in range(1, count - 1)]


class _BinaryFrame(websocket.ABNF):
    """A client's binary websocket frame, masked (RFC 6455, random key) with NumPy when it is large
    and NumPy is there: websocket-client masks in pure Python, which costs ~0.7 s for 50 MiB here.
    Small frames (every warm call's) keep the pure-Python mask and import nothing."""

    #: From this size on the NumPy mask is used.
    NUMPY_MIN = 1 << 16

    def __init__(self, data: bytes) -> None:
        super().__init__(1, 0, 0, 0, websocket.ABNF.OPCODE_BINARY, 1, data)

    def _get_masked(self, mask_key: str | bytes) -> Any:
        if len(self.data) < self.NUMPY_MIN or not isinstance(mask_key, bytes):
            return super()._get_masked(mask_key)
        try:
            import numpy as np
        except ImportError:
            return super()._get_masked(mask_key)
        data = np.frombuffer(cast(bytes, self.data), dtype=np.uint8)
        out = np.empty(4 + data.size, dtype=np.uint8)
        out[:4] = np.frombuffer(mask_key, dtype=np.uint8)
        whole = data.size // 4 * 4
        np.bitwise_xor(data[:whole].view(np.uint32), np.frombuffer(mask_key, dtype=np.uint32)[0],
                       out=out[4:4 + whole].view(np.uint32))
        out[4 + whole:] = data[whole:] ^ out[:data.size - whole]
        return out.data


class ServerError(FalMagicError):
    """The server answered a request with an error status (other than an authentication failure)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServerClient:
    """The REST side of one Jupyter Server: environments, kernels, interrupts; errors made clear."""

    def __init__(self, url: str, token: str = "") -> None:
        self.url = url
        self.token = token

    def headers(self) -> dict[str, str]:
        """The credentials of a request to the server (its token)."""
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def request(self, method: str, path: str, body: Any = None, timeout: float = HTTP_TIMEOUT,
                raw: Any = None) -> Any:
        """An open HTTP response for ``method path`` (a JSON ``body``, or ``raw`` bytes); FalMagicError
        subclasses on failure."""
        if raw is not None:
            data, kind = raw, "application/octet-stream"
        else:
            data, kind = (None if body is None else json.dumps(body).encode()), "application/json"
        headers = {**self.headers(), **({"Content-Type": kind} if data is not None else {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            detail = _server_message(exc)
            if exc.code in (401, 403):
                raise AuthenticationError(
                    f"the Jupyter Server at {self.url} refused the request ({exc.code} {exc.reason}): "
                    + ("its token is not the one configured" if self.token else "it needs a token")
                    + "; set it with fal_magic.configure(token=...) or $FAL_MAGIC_TOKEN") from None
            if exc.code == 404 and path.startswith("/fal_magic/"):
                raise FalMagicError(
                    f"the Jupyter Server at {self.url} has no fal_magic extension: install fal_magic[server] "
                    "in its environment (which enables it), or check 'jupyter server extension list' there") from None
            raise ServerError(f"the Jupyter Server at {self.url} answered {method} {path} with "
                              f"{exc.code} {exc.reason}" + (f": {detail}" if detail else ""), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KernelStartError(f"cannot reach the Jupyter Server at {self.url}: {reason}") from None

    def build_env(self, spec: EnvSpec, progress: Callable[[str], None],
                  machine_type: str | None = None) -> tuple[str, str | None, str | None]:
        """Have the server build (or find) ``spec``'s environment (on a host of ``machine_type``'s group,
        when the server has groups); return the kernelspec name for it, that host (None: the server's
        own machine), and the server's blob directory when the kernel will run there."""
        body = {"requirements": list(spec.requirements), "python": spec.python, "cloudpickle": spec.cloudpickle,
                "machine_type": machine_type}
        with self.request("POST", "/fal_magic/api/envs", body) as resp:
            for line in resp:
                if not line.strip():
                    continue  # a heartbeat while the build is silent
                event = json.loads(line)
                if "progress" in event:
                    progress(f"{self.url}: {event['progress']}")
                elif "error" in event:
                    kind = EnvironmentBuildError if event.get("type") == "EnvironmentBuildError" else FalMagicError
                    raise kind(f"on {self.url}: {event['error']}")
                elif "kernel_name" in event:
                    return event["kernel_name"], event.get("host"), event.get("blobs") or event.get("head_blobs")
        raise FalMagicError(f"the Jupyter Server at {self.url} ended the environment build without an answer")

    def upload(self, data: Any) -> dict[str, str]:
        """Store ``data`` (bytes-like) as a blob on the server; its ``name``, and its ``path`` there."""
        with self.request("POST", "/fal_magic/api/blobs", raw=memoryview(data).cast("B"),
                          timeout=BLOB_TIMEOUT) as resp:
            return dict(json.load(resp))

    def download(self, name: str, size: int) -> memoryview:
        """Fetch (and so remove) a kernel's result blob from the server, into a buffer of huge pages
        where the system gives them (see ``new_buffer``)."""
        if not isinstance(name, str) or not BLOB_NAME.match(name):  # the kernel's word: no other URL is asked for
            raise FalMagicError(f"the kernel's reply names a result blob that cannot be one ({name!r})")
        view = new_buffer(size)
        with self.request("GET", f"/fal_magic/api/blobs/{name}", timeout=BLOB_TIMEOUT) as resp:
            got = 0
            while got < size:
                count = resp.readinto(view[got:])
                if not count:
                    raise FalMagicError(f"the Jupyter Server at {self.url} sent {got} of {size} bytes of a result")
                got += count
        return view

    def start_kernel(self, kernel_name: str) -> str:
        with self.request("POST", "/api/kernels", {"name": kernel_name}) as resp:
            return json.load(resp)["id"]

    def delete_kernel(self, kernel_id: str, patience: float = 10.0) -> None:
        """Shut a kernel down. A kernel the server is restarting (after a death) refuses with a 500
        until the restart is done, so that is retried for up to ``patience`` seconds."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.request("DELETE", f"/api/kernels/{kernel_id}").close()
                return
            except ServerError as exc:
                if exc.status == 404:  # already gone
                    return
                if exc.status != 500 or time.monotonic() > deadline:
                    raise
            time.sleep(0.25)

    def interrupt_kernel(self, kernel_id: str) -> None:
        self.request("POST", f"/api/kernels/{kernel_id}/interrupt").close()

    def connect(self, kernel_id: str, timeout: float) -> websocket.WebSocket:
        """The kernel's channels websocket, in the v1 framing (jupyter_server 2 or newer)."""
        url = self.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        headers = [f"{k}: {v}" for k, v in self.headers().items()]
        try:
            ws = websocket.create_connection(url, header=headers, subprotocols=[WS_PROTOCOL], timeout=timeout,
                                             enable_multithread=True)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (401, 403):
                raise AuthenticationError(f"the Jupyter Server at {self.url} refused the kernel websocket "
                                          f"({exc.status_code})") from None
            raise KernelStartError(f"cannot open the kernel websocket at {self.url}: {exc}") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise KernelStartError(f"cannot open the kernel websocket at {self.url}: {exc}") from None
        if ws.getsubprotocol() != WS_PROTOCOL:
            ws.close()
            raise KernelStartError(f"the Jupyter Server at {self.url} does not speak the {WS_PROTOCOL} kernel "
                                   "websocket protocol (jupyter_server 2 or newer is needed)")
        ws.settimeout(None)
        return ws


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read() or b"{}").get("message", "")
    except (ValueError, OSError, AttributeError):
        return ""


class RemoteKernel(Kernel):
    """One kernel on a Jupyter Server, driven over its websocket. Leased to one caller at a time; a
    reader thread moves incoming messages to an inbox, so waiting on it stays interruptible."""

    def __init__(self, key: str, requirements: tuple[str, ...], server: ServerClient) -> None:
        super().__init__(key, requirements)
        self.server = server
        self.host = server.url
        self.remote_id: str | None = None
        self.ws: websocket.WebSocket | None = None
        # messages on the websocket carry no signature (the server signs what it forwards to the kernel):
        # the key is never used, and keeps Session from warning that signing is off
        self.session = Session(key=os.urandom(32), username="fal_magic")
        self._inbox: queue.Queue = queue.Queue()
        self._death: str | None = None
        #: Where large frames go beside the websocket: the server's blob directory (a kernel on its
        #: machine maps them), or its blob URL (a kernel on a cluster host fetches them), or None
        self.blob_dir: str | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self, spec: EnvSpec, progress: Progress, timeout: float) -> None:
        """Build the env on the server, start a kernel there, connect, and load the runtime."""
        kernel_name, self.node, self.blob_dir = self.server.build_env(spec, progress, self.machine_type)
        started = time.perf_counter()
        self.remote_id = self.server.start_kernel(kernel_name)
        try:
            self.ws = self.server.connect(self.remote_id, timeout)
            threading.Thread(target=self._read, args=(self.ws,), name=f"fal_magic-ws-{self.id}",
                             daemon=True).start()
            msg_id = self._send("shell", self._execute_request(BOOTSTRAP, silent=True))
            reply = self._wait(timeout, lambda ch, m: ch == "shell" and m["parent_header"].get("msg_id") == msg_id)
            if reply["content"]["status"] != "ok":
                c = reply["content"]
                raise KernelStartError(f"fal_magic runtime failed to load in the remote kernel: {c.get('ename')}: "
                                       f"{c.get('evalue')}")
            self._send("shell", comm_open(self.session, self.comm_id))
            hello = self._wait(timeout, lambda ch, m: ch == "iopub" and is_hello(m))["content"]["data"]
            check_hello(hello)
            self.pid = hello["pid"]
        except BaseException as exc:
            self.shutdown(now=True)
            if isinstance(exc, FalMagicError) or not isinstance(exc, Exception):
                raise
            raise KernelStartError(f"the kernel on {self.host} did not become ready: {exc}") from None
        progress(f"kernel {self.id} started on environment {spec.key} at {self.host} "
                 f"in {time.perf_counter() - started:.2f}s")

    def _read(self, ws: websocket.WebSocket) -> None:
        """Reader thread: decode each websocket message into the inbox; note a death or a closed line."""
        reason = "the connection to the server closed"
        while True:
            try:
                data = ws.recv()
            except Exception:
                break
            if not isinstance(data, bytes) or not data:
                continue
            channel, parts = unpack_v1(data)
            header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[:4])
            m: Message = {"header": header, "parent_header": parent, "msg_type": header.get("msg_type", ""),
                          "metadata": metadata, "content": content, "buffers": list(parts[4:])}
            if channel == "iopub" and m["msg_type"] == "status" and \
                    content.get("execution_state") in ("restarting", "dead"):
                reason = f"the server reports the kernel {content['execution_state']} (its process ended)"
                break
            self._inbox.put((channel, m))
        self._death = reason
        self._inbox.put((_DEATH, reason))

    def _send(self, channel: str, msg: dict[str, Any], buffers: Iterable[Any] = ()) -> str:
        if self.ws is None:
            raise NotStartedError(f"the kernel on {self.host} is not connected")
        pack = self.session.pack
        parts = [pack(msg["header"]), pack(msg["parent_header"]), pack(msg["metadata"]), pack(msg["content"]),
                 *buffers]
        try:
            self.ws.send_frame(_BinaryFrame(pack_v1(channel, parts)))
        except (OSError, websocket.WebSocketException) as exc:
            raise NotStartedError(f"the connection to the kernel on {self.host} is gone: {exc}") from None
        return msg["header"]["msg_id"]

    def _wait(self, timeout: float, wanted: Callable[[str, Message], bool]) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KernelStartError(f"the kernel on {self.host} did not answer within {timeout:g}s")
            try:
                channel, m = self._inbox.get(timeout=min(remaining, LIVENESS_PERIOD))
            except queue.Empty:
                continue
            if channel == _DEATH:
                raise KernelStartError(f"the kernel on {self.host} died while starting: {m}")
            if wanted(channel, m):
                return m

    def is_alive(self) -> bool:
        """Whether the kernel is still there as far as its websocket tells (no network round trip)."""
        return self.ws is not None and self._death is None

    def _delete(self) -> None:
        if self.remote_id is None:
            return
        try:
            self.server.delete_kernel(self.remote_id)
        except FalMagicError:
            pass  # the server's orphan culler stops it once no host is connected

    def kill(self, reason: str) -> None:
        """Stop the kernel on the server from any thread; the thread serving a request reports ``reason``."""
        self.kill_reason = reason
        if self.remote_id is not None:
            self._delete()

    def interrupt(self) -> None:
        """Ask the server to interrupt the kernel (SIGINT there): KeyboardInterrupt in the running code."""
        if self.remote_id is not None and self.is_alive():
            try:
                self.server.interrupt_kernel(self.remote_id)
            except FalMagicError:
                pass

    def shutdown(self, now: bool = False) -> None:
        """Shut the kernel down on the server and close the websocket. After a death the server may
        be restarting the kernel; that deletion waits in the background rather than in the caller."""
        self.state = "dead"
        if self.remote_id is not None:
            if self._death is None:
                self._delete()
            else:
                threading.Thread(target=self._delete, name=f"fal_magic-delete-{self.id}", daemon=True).start()
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:
                pass

    # -- requests --------------------------------------------------------------------------

    def _runtime_request(self, op: str, frames: Frames, sink: OutputSink, grace: float,
                         nested: NestedHandler | None = None, **fields: Any) -> Reply:
        """Large frames travel beside the websocket as blobs (results too): uploaded before the request
        when the kernel runs on the server's machine (it maps them), sent while the kernel already
        reads them when it runs on a cluster host (see ``fal_magic_inside.head_blobs``). Frames over
        ``CHUNK`` that are no blob go ahead in parts. Nested isolated calls are not brokered for a
        remote kernel (the runtime refuses them with a clear error)."""
        frames = list(frames)
        parts = []
        blobs: dict[int, Any] = {}
        sending: list[head_blobs.Sending] = []
        for index, frame in enumerate(frames):
            view = memoryview(frame).cast("B")
            if self.blob_dir is not None and index > 0 and view.nbytes >= BLOB_MIN:
                try:
                    if self.node is None:
                        blobs[index] = self.server.upload(view)["path"]
                    else:
                        sending.append(head_blobs.start_put(self.blob_dir, view, lambda url: self.server.headers(),
                                                            prefix="u", timeout=BLOB_TIMEOUT))
                        blobs[index] = [sending[-1].name, view.nbytes]
                    frames[index] = b""
                    continue
                except (FalMagicError, OSError) as exc:  # e.g. the server's quota is full: the websocket then
                    log.debug("a large frame goes through the websocket: %s", exc)
            if view.nbytes > CHUNK:
                for offset in range(0, view.nbytes, CHUNK):
                    part = {"op": "part", "index": index, "offset": offset, "size": view.nbytes}
                    self._send("shell", self._comm_msg(part), [view[offset:offset + CHUNK]])
                frames[index] = b""
                parts.append(index)
        if self.blob_dir is not None and self.node is None:
            fields.update(blobs=blobs, blob_dir=self.blob_dir)
        elif self.blob_dir is not None:
            fields.update(fetch=blobs, head_blobs=self.blob_dir)
        msg_id = self._send("shell", self._comm_msg({"op": op, "id": msg_counter(), "parts": parts, **fields}),
                            frames)
        try:
            reply = serve(self, msg_id, sink, grace, "comm")
        finally:
            for put in sending:  # (done by now: the kernel has read them; a broken one broke the call)
                try:
                    put.wait(timeout=BLOB_TIMEOUT)
                except OSError as exc:
                    log.debug("a blob upload broke off: %s", exc)
        placed = reply.content.pop("blobs", None)
        if placed:
            reply.buffers = list(reply.buffers)
            fetched: dict[str, memoryview] = {}  # two views of one buffer come as one blob, fetched once
            for index, (name, size) in placed.items():
                if name not in fetched:
                    fetched[name] = self.server.download(name, size)
                reply.buffers[int(index)] = fetched[name]
        return reply

    def _execute_request(self, code: str, silent: bool, allow_stdin: bool = False) -> dict[str, Any]:
        """An execute_request as ``KernelClient.execute`` makes it (a silent one stays out of history)."""
        return self.session.msg("execute_request", {
            "code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
            "allow_stdin": allow_stdin, "stop_on_error": True})

    def _comm_msg(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})

    def execute(self, code: str, sink: OutputSink, grace: float) -> Reply:
        self.calls += 1
        self.cells += 1
        msg_id = self._send("shell", self._execute_request(code, silent=False, allow_stdin=sink.can_ask()))
        return serve(self, msg_id, sink, grace, "shell")

    def comm_message(self, kind: str, comm_id: str, data: dict[str, Any], buffers: list[Any], sink: OutputSink,
                     grace: float) -> None:
        msg_id = self._send("shell", self.session.msg(kind, {"comm_id": comm_id, "data": data}), buffers)
        serve(self, msg_id, sink, grace, "message")

    def answer_input(self, content: dict[str, Any]) -> None:
        self._send("stdin", self.session.msg("input_reply", content))

    # -- the transport of the request loop ----------------------------------------------------

    def next_event(self, timeout: float, sink: OutputSink,
                   nested: NestedHandler | None) -> tuple[str, Any] | None:
        try:
            channel, m = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if channel == _DEATH else (channel, m)

    def raise_if_dead(self, when: str) -> None:
        if self._death is not None:
            self.state = "dead"
            raise KernelDiedError(f"the kernel {self.remote_id} on {self.host} died {when}: "
                                  f"{self.kill_reason or self._death}")
