"""Large buffers for a kernel on a cluster host: it fetches a call's large arguments from the head
server's blob endpoint, and posts its large results there, over HTTP, beside the websocket (which
copies every frame several times on its way through the server).

The kernel has no server token; it signs each request with its own connection key (HMAC-SHA256 of the
method, the path and the time), which the server checks against the key of the kernel it names."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

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


def fetch(base: str, name: str, size: int, key: bytes) -> memoryview:
    """Fetch (and so remove) the blob ``name`` of ``size`` bytes from the head: a writable buffer."""
    url = f"{base}/{name}"
    out = memoryview(bytearray(size))
    request = urllib.request.Request(url, headers=_headers(key, "GET", url))
    with urllib.request.urlopen(request, timeout=600) as resp:
        got = 0
        while got < size:
            count = resp.readinto(out[got:got + READ_CHUNK])
            if not count:
                raise OSError(f"the head sent {got} of {size} bytes of blob {name}")
            got += count
    moved["fetched"] += 1
    return out


def post(base: str, buffer: Any, key: bytes) -> list[Any]:
    """Store ``buffer`` as a blob on the head: ``[name, size]``."""
    view = memoryview(buffer).cast("B")
    request = urllib.request.Request(base, data=view, method="POST", headers={
        **_headers(key, "POST", base), "Content-Type": "application/octet-stream", "Content-Length": str(view.nbytes)})
    with urllib.request.urlopen(request, timeout=600) as resp:
        name = json.load(resp)["name"]
    moved["posted"] += 1
    return [name, view.nbytes]


def results_to_head(base: str, frames: list[Any], key: bytes) -> dict[int, list[Any]]:
    """Post a call's large result frames to the head (each frame emptied); which index is which blob.
    A frame that cannot be posted (the head's quota is full) stays in the reply."""
    placed: dict[int, list[Any]] = {}
    for index in range(1, len(frames)):
        if memoryview(frames[index]).nbytes < BLOB_MIN:
            continue
        try:
            placed[index] = post(base, frames[index], key)
        except OSError:
            continue
        frames[index] = b""
    return placed
