"""A kernel that a server started on a cluster host ends itself once that server is gone (nobody
else would end it), and cleans up after gateway_provisioners on the host when it exits."""
from __future__ import annotations

import os
import sys
import threading

#: Set in kernels a server starts on another host: ``host:port`` of that server, and how long the
#: kernel may go without reaching it before it ends itself (the server was killed: nobody else would).
HEAD_ENV = "FAL_MAGIC_HEAD"
ORPHAN_ENV = "FAL_MAGIC_ORPHAN_TIMEOUT"
#: Set there when that server is on https: its certificates (base64 of their PEM), which the kernel
#: trusts for the server's blob endpoint beside the system's (a self-signed server's too).
HEAD_CERT_ENV = "FAL_MAGIC_HEAD_CERT"


def end_on_host() -> None:
    """At the exit of a kernel on a cluster host: stop gateway_provisioners' listener process (a
    non-daemon child that would hold the exit for ~30 s) and remove the connection file and log."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
    files = []
    if os.environ.get("KERNEL_ID"):
        files.append(os.path.join(os.environ.get("GP_KERNEL_LOG_DIR", "/tmp"), f"kernel-{os.environ['KERNEL_ID']}.log"))
    try:
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            files.append(IPKernelApp.instance().abs_connection_file)
    except Exception:
        pass
    for path in files:
        try:
            os.unlink(path)
        except OSError:
            pass


def reachable(address: str, timeout: float) -> bool:
    """Whether the server at ``address`` (``host:port``, an IPv6 host in brackets) takes a connection."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _watch_head(address: str, patience: float) -> None:
    """End this kernel once the server that started it has been unreachable for ``patience`` seconds
    (it was killed: nobody else would end the kernel)."""
    import time

    lost_since: float | None = None
    while True:
        if reachable(address, timeout=2):
            lost_since = None
        else:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= patience:
                print(f"fal_magic: the server at {address} is gone; this kernel ends", file=sys.__stderr__, flush=True)
                end_on_host()
                os._exit(0)
        time.sleep(1.0)


def watch_head() -> None:
    """In a kernel on a cluster host (``HEAD_ENV`` set): clean up at exit, and end once the server is gone."""
    import atexit

    atexit.register(end_on_host)
    threading.Thread(target=_watch_head, args=(os.environ[HEAD_ENV], float(os.environ.get(ORPHAN_ENV, "300"))),
                     name="fal_magic-head", daemon=True).start()
