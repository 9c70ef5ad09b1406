"""Live widgets from isolated kernels: their comms, bridged through the notebook's kernel.

A widget made in an isolated kernel (ipywidgets, ``tqdm.auto``) is a comm there. When its
``comm_open`` arrives with a call's (or a cell's) outputs, the bridge opens a comm of the same id in
the notebook's kernel, in the calling cell's context, so the frontend builds the widget's model and
renders its view. The kernel's later messages on that comm (state updates) go to the frontend. The
frontend's messages (a slider moved) are passed to the isolated kernel as a request on that kernel,
leased like a call: the callback runs there, its prints reach the cell that made the widget, and a
long callback keeps the kernel busy (never culled). When the kernel ends, its widgets are closed and
the cell says so.
"""
from __future__ import annotations

import threading
from typing import Any

from .outputs import CallerOutput, ipython_shell


class _Proxy:
    """The notebook kernel's end of one isolated comm."""

    def __init__(self, comm: Any, kernel_id: str, sink: CallerOutput) -> None:
        self.comm = comm
        self.kernel_id = kernel_id
        self.sink = sink


_proxies: dict[str, _Proxy] = {}
_lock = threading.Lock()
_watched: set[str] = set()  # kernels whose end closes their widgets


def can_bridge() -> bool:
    """Whether there is a frontend to bridge to: this process is a notebook's kernel."""
    return getattr(ipython_shell(), "kernel", None) is not None


def from_kernel(kernel: Any, message: dict[str, Any], sink: CallerOutput) -> None:
    """A comm message the isolated ``kernel`` published while serving a request of ``sink``'s caller
    (called in the caller's context). Without a frontend (no notebook kernel) there is nothing to do."""
    if not can_bridge():
        return
    kind, content, metadata = message["msg_type"], message["content"], message.get("metadata") or {}
    comm_id = content.get("comm_id", "")
    data = content.get("data", {})
    copies = [bytes(memoryview(b)) for b in message["buffers"]]
    if kind == "comm_open":
        if _taken(comm_id):  # a comm of this notebook's kernel (or of another isolated kernel) keeps its id
            return
        problem = _version_problem(content, metadata)
        if problem is not None:
            sink.stream("stderr", problem + "\n")
            return
        from comm import create_comm

        comm = create_comm(comm_id=comm_id, target_name=content.get("target_name", "comm"), data=data,
                           metadata=metadata, buffers=copies,
                           target_module=content.get("target_module"))
        proxy = _Proxy(comm, kernel.id, sink)
        comm.on_msg(lambda msg: _to_kernel(proxy, "comm_msg", msg))
        comm.on_close(lambda msg: _to_kernel(proxy, "comm_close", msg))
        with _lock:
            _proxies[comm_id] = proxy
            watch = kernel.id not in _watched
            _watched.add(kernel.id)
        if watch:
            kernel.on_forget.append(lambda: threading.Thread(target=_kernel_ended, args=(kernel.id,),
                                                             name="fal_magic-widgets", daemon=True).start())
        return
    with _lock:
        found = _proxies.get(comm_id)
        if found is None or found.kernel_id != kernel.id:  # only the kernel that opened a comm speaks on it
            return
        if kind != "comm_msg":
            del _proxies[comm_id]
    if kind == "comm_msg":
        found.comm.send(data=data, metadata=metadata, buffers=copies)
    else:
        found.comm.close(data=data)


def _taken(comm_id: str) -> bool:
    """Whether the notebook's kernel already has a comm of this id (its own, or a bridged one)."""
    with _lock:
        if comm_id in _proxies:
            return True
    from comm import get_comm_manager

    return comm_id in getattr(get_comm_manager(), "comms", {})


def _to_kernel(proxy: _Proxy, kind: str, msg: dict[str, Any]) -> None:
    """The frontend spoke on a bridged comm (in the notebook kernel's shell handler): pass it to the
    isolated kernel and serve it there until that kernel is idle again."""
    from .kernel import get_pool

    comm_id = proxy.comm.comm_id
    if kind == "comm_close":
        with _lock:
            if _proxies.pop(comm_id, None) is None:
                return  # closed from the kernel's side: nothing to pass on
    pool = get_pool()
    with pool.lease_by_id(proxy.kernel_id) as kernel:
        if kernel is None:
            _close_all([proxy])
            return
        kernel.comm_message(kind, comm_id, msg["content"].get("data", {}), list(msg.get("buffers") or []),
                            proxy.sink, pool.config.interrupt_grace)


def _kernel_ended(kernel_id: str) -> None:
    with _lock:
        gone = [p for p in _proxies.values() if p.kernel_id == kernel_id]
        for proxy in gone:
            _proxies.pop(proxy.comm.comm_id, None)
        _watched.discard(kernel_id)
    _close_all(gone)


def _close_all(proxies: list[_Proxy]) -> None:
    """Close widgets whose kernel is gone, and say so in the cells that made them (once per cell)."""
    told: set[int] = set()
    for proxy in proxies:
        proxy.sink.run(proxy.comm.close)
        if id(proxy.sink) not in told:
            told.add(id(proxy.sink))
            proxy.sink.stream("stderr", "[fal_magic] the isolated kernel of the widgets above has ended "
                                        "(culled or shut down): they no longer respond\n")


def _version_problem(content: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    """A message when an isolated widget speaks another major version of the widget protocol than
    the notebook's frontend (each ipywidgets major version is one), else None."""
    if content.get("target_name") != "jupyter.widget":
        return None
    theirs = str(metadata.get("version", ""))
    try:
        from ipywidgets._version import __protocol_version__ as ours
    except ImportError:
        return "[fal_magic] a widget from the isolated kernel cannot be shown: this notebook has no ipywidgets"
    if theirs and theirs.split(".")[0] != ours.split(".")[0]:
        import ipywidgets

        return (f"[fal_magic] a widget from the isolated kernel speaks widget protocol {theirs}, and this "
                f"notebook's frontend {ours}: add 'ipywidgets=={ipywidgets.__version__}' to the environment's "
                "requirements")
    return None
