"""The runtime of a fal_magic kernel: the comm target a host connects to, and the handler that runs
each request (a call, ``%%isolated --push``/``--pull``) and replies with its result or its exception.

``install(get_ipython())`` is what the host's bootstrap runs in a fresh kernel. Calls arrive as comm
messages whose binary buffers hold a cloudpickled ``(function, args, kwargs)`` (from a server's
host, with large frames as blobs beside the websocket), or on the local fast channel (large frames in
shared memory); the function runs on the kernel's main thread, so its prints are published on iopub
under the call's own message and an interrupt reaches it.
"""
from __future__ import annotations

import bdb
import faulthandler
import importlib.util
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import cloudpickle

from . import broker as _broker
from .capture import capture_stdout, drain_captured_output
from .channel import BEGUN_ENV, FAST_ENV, FastChannel
from .frames import describe_exception, dumps, loads, new_buffer, type_name, without_runtime_frames
from . import head_blobs, lifetime
from .lifetime import Lifetime
from .head import HEAD_ENV, watch_head
from .shm import SHM_ENV, Arena, results_to_blobs, results_to_shm, shm_map
from . import sources
from .sources import relabel
from .stdin import Asker, asking
from .to_source import CannotCross, dumps_to_source

COMM_TARGET = "fal_magic"


#: Whether the request running now is for a caller on another Python (``Runtime.run`` sets it).
_crossing = [False]


def map_chunk(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> list[tuple[bool, Any]]:
    """Run ``fn`` over a chunk of argument tuples in one request (``.map``): each item's result, or
    its exception described, so that one failing item does not hide the others."""
    out: list[tuple[bool, Any]] = []
    for args in items:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            if exc.__traceback__ is not None:
                exc.__traceback__ = exc.__traceback__.tb_next
            out.append((False, describe_exception(exc, plain=_crossing[0])))
    return out


def widget_view(obj: Any) -> dict[str, Any] | None:
    """The display bundle of a widget (an ipywidgets view: the caller shows it, live, as a local
    widget is shown), else None. A widget cannot be pickled, and need not be: its model lives here."""
    widgets = sys.modules.get("ipywidgets")
    if widgets is None or not isinstance(obj, widgets.Widget):
        return None
    bundle = obj._repr_mimebundle_()
    return bundle if isinstance(bundle, dict) else None


class Runtime:
    """Serves the requests of one kernel's host."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.fast: FastChannel | None = None
        self._parts: dict[int, memoryview] = {}
        self.shm_dir = os.environ.get(SHM_ENV, "")
        self.arena: Arena | None = None  # this kernel's segments for large results
        self.arena_host = ""  # the session of the host the arena's lent segments went to
        self.namespace_owner = ""  # the host session whose variables the shell's namespace holds
        self.namespaces: dict[str, dict[str, Any]] = {}  # those of the other sessions
        self.held: dict[str, Any] = {}  # the host's segments this kernel still maps (its objects use them)
        self.asker: Asker | None = None  # the running request's line to the host's stdin
        self.lifetime: Lifetime | None = None  # a kernel of a user's pool keeps its own deadline

    def open(self, comm: Any, msg: dict[str, Any]) -> None:
        """A host connected: tell it who we are so it can check versions before any pickle crosses."""
        comm.on_msg(lambda m: self.handle(comm, m))
        comm.send({
            "op": "hello",
            "pid": os.getpid(),
            "python": list(sys.version_info[:3]),
            "implementation": sys.implementation.name,
            "cloudpickle": cloudpickle.__version__,
            "executable": sys.executable,
            "fast": self.fast is not None,
        })

    def handle(self, comm: Any, msg: dict[str, Any]) -> None:
        """Serve one request that came as a comm message; reply on the comm.

        A large frame may come ahead in ``part`` messages (a remote host chunks what it sends through
        a server's websocket); the request then names the frames to take from them.
        """
        data, buffers = msg["content"]["data"], list(msg["buffers"])
        if data.get("op") == "part":
            if data["offset"] == 0:
                self._parts[data["index"]] = new_buffer(data["size"])
            chunk = memoryview(buffers[0]).cast("B")
            self._parts[data["index"]][data["offset"]:data["offset"] + len(chunk)] = chunk
            return
        for index in data.get("parts", ()):
            buffers[index] = self._parts.pop(index)
        uploaded: dict[str, Any] = {}
        head = data.get("head_blobs")  # a kernel on a cluster host: its large frames wait on the head
        key = self.shell.kernel.session.key

        def take_large_frames() -> None:
            """Map or fetch the large frames, within the request: one that cannot be had is the
            request's error (an exception here would leave the host without a reply)."""
            for index, path in data.get("blobs", {}).items():  # uploaded to the server beside the websocket
                directory, name = os.path.split(path)
                uploaded[name] = shm_map(directory, name, os.stat(path).st_size)
                buffers[int(index)] = memoryview(uploaded[name])
            for index, (name, size) in data.get("fetch", {}).items():
                buffers[int(index)] = head_blobs.fetch(head, name, size, key)

        kernel = self.shell.kernel
        reply, frames = self.run(data, buffers, begin=take_large_frames,
                                 stdin=(kernel._parent_ident["shell"], kernel.get_parent("shell")))
        buffers.clear()  # (the arguments are not held while the results go)
        if data.get("blob_dir"):  # large results wait on the server for the host to fetch them
            reply["blobs"] = results_to_blobs(data["blob_dir"], frames, uploaded)
        elif head:  # (sent while the host already reads them; the reply does not wait for them)
            reply["blobs"] = head_blobs.results_to_head(head, frames, key)
        comm.send(reply, buffers=frames)

    def run(self, data: dict[str, Any], buffers: list[Any], begin: Callable[[], Any] | None = None,
            stdin: tuple[Any, dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[Any]]:
        """Run one request; return the reply and the pickled value or the exception described.
        ``begin`` is called first, where an interrupt already counts as the request's own; with
        ``stdin`` (the host's identity and the request's message), the code may ask the host for input."""
        reply: dict[str, Any] = {"op": "result", "id": data.get("id")}
        frames: list[Any] = []
        _crossing[0] = bool(data.get("plain"))
        try:
            try:
                if begin is not None:
                    begin()
                if data.get("namespace"):  # (a kernel of a user's pool: each host session has its own)
                    self.use_namespace(str(data["namespace"]))
                operation = getattr(self, "op_" + str(data.get("op")), None)
                if operation is None:
                    raise ValueError(f"fal_magic runtime: unknown operation {data.get('op')!r}")
                if _broker.broker is not None:  # nested calls go to this request's host
                    _broker.broker.address = data.get("broker")
                if self.lifetime is not None:
                    self.lifetime.calling = True
                with asking(self.shell.kernel, *stdin) if stdin is not None else nullcontext() as asker:
                    self.asker = asker
                    result = operation(data, buffers)
            except BaseException as exc:  # the user's error, KeyboardInterrupt included
                if isinstance(exc, bdb.BdbQuit) and self.asker is not None and self.asker.interrupted:
                    exc = KeyboardInterrupt("interrupted in the debugger")  # what the stop button meant
                reply.update(ok=False, kind="exception")
                frames = dumps(describe_exception(without_runtime_frames(exc), plain=bool(data.get("plain"))))
                if data.get("op") == "call":  # kept for a post-mortem debugger, as a cell's error is kept
                    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
            else:
                view = widget_view(result)
                try:
                    if view is not None:  # the widget stays here; its view goes (its comm is bridged)
                        reply.update(ok=True, type=type_name(result), view=view)
                    else:
                        frames = dumps_to_source(result) if data.get("plain") else dumps(result)
                        reply.update(ok=True, type=type_name(result))
                except CannotCross as exc:
                    reply.update(ok=False, kind="serialization",
                                 message=f"the result, of type {type_name(result)}, cannot cross to the caller's "
                                         f"Python from Python {sys.version_info[0]}.{sys.version_info[1]}: {exc}")
                    frames = []
                except BaseException as exc:
                    reply.update(ok=False, kind="serialization",
                                 message=f"the result, of type {type_name(result)}, cannot be pickled: "
                                         f"{type(exc).__name__}: {exc}")
                    frames = []
                del result
        except BaseException as exc:  # e.g. an interrupt that lands between the steps above
            reply.update(ok=False, kind="exception")
            frames = dumps(describe_exception(exc, plain=bool(data.get("plain"))))
        finally:
            if self.lifetime is not None:
                self.lifetime.calling = False
            drain_captured_output()
            for stream in (sys.stdout, sys.stderr):
                # ipykernel's streams keep what was written in ``_buffers``; when that is empty a
                # flush would only wait for a round trip through its IO thread
                if not getattr(stream, "_buffers", True):
                    continue
                try:
                    stream.flush()
                except Exception:
                    pass
        return reply, frames

    def serve_fast(self, answer: Callable[[list[Any]], None], header: dict[str, Any], frames: list[Any]) -> None:
        """Serve a call from the fast channel: outputs go to iopub under the call's own id, then an
        ``idle`` status marks that they are all out, then the reply goes back on the channel."""
        parent = {"header": {"msg_id": header["msg_id"], "msg_type": "fal_magic_call", "session": header["session"],
                             "username": "", "date": "", "version": "5.3"}}
        kernel = self.shell.kernel
        fast = self.fast
        assert fast is not None  # (it serves this call)
        for target in (sys.stdout, sys.stderr, self.shell.display_pub):
            if hasattr(target, "set_parent"):
                target.set_parent(parent)
        kernel.set_parent([header["session"].encode()], parent, "shell")  # comms (widgets) publish under it
        if self.shm_dir and self.arena is None:
            self.arena = Arena(self.shm_dir, "k")
        if self.arena is not None:
            if header["session"] != self.arena_host:  # another process leases the kernel now: what the last
                self.arena_host = header["session"]  # one may still map is never written again (unlinked)
                for name in list(self.arena.lent):
                    self.arena.forget(name)
            self.arena.give_back(header.get("free", []))  # segments of ours the host no longer maps
        segments = {}
        frames = list(frames)
        for index, (name, size) in header.get("shm", {}).items():
            segments[name] = shm_map(self.shm_dir, name, size)
            frames[int(index)] = memoryview(segments[name])
        # ipykernel ignores SIGINT between requests; during a call it must raise KeyboardInterrupt. The
        # call is marked begun once an interrupt would reach it: a kernel that dies before that point
        # did not run the call, which may then run elsewhere.
        saved = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            request = {"op": "call", "id": header["id"], "plain": header.get("plain"), "broker": header.get("broker")}
            reply, out = self.run(request, frames, lambda: fast.begun(header["msg_id"]),
                                  stdin=([header["session"].encode()], parent))
        finally:
            signal.signal(signal.SIGINT, saved)
        del frames
        if self.arena is not None:  # (without it, no segments either)
            reply["shm"], reply["free"] = results_to_shm(self.arena, self.held, out, segments)
        kernel.session.send(kernel.iopub_socket, "status", {"execution_state": "idle"}, parent=parent,
                            ident=b"status")
        answer([json.dumps(reply).encode(), *out])

    def op_call(self, data: dict[str, Any], buffers: list[Any]) -> Any:
        """Run a pickled ``(function, args, kwargs)``; the last exception kept for a debugger goes."""
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        fn, args, kwargs, files, texts = loads(buffers)
        user_fn = args[0] if fn is map_chunk else fn
        relabel(user_fn, files)  # tracebacks and debuggers name the real files
        sources.install(texts)  # (a call that may debug: the lines its debugger shows)
        return fn(*args, **kwargs)

    def op_post_mortem(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """A post-mortem debugger (IPython's, as ``%debug`` opens) on the last exception of this kernel's
        last call or cell, at its innermost frame; its commands are asked of the host."""
        tb = getattr(sys, "last_traceback", None)
        if tb is None:
            print("fal_magic: this kernel has no exception to debug (its last call or cell succeeded)")
            return
        from IPython.core.debugger import Pdb

        sources.install(data.get("sources"))
        debugger: Any = Pdb()
        debugger.reset()
        debugger.interaction(None, tb)

    #: Namespaces kept for host sessions that are not the current one (the oldest go first).
    KEPT_NAMESPACES = 8

    def use_namespace(self, session: str) -> None:
        """Give the shell's namespace (``%%isolated`` cells' variables) to ``session``'s host: the
        variables of the session that had it are put aside, and ``session``'s own come back (none
        for a new session). Imported modules and ``@cached`` values stay the kernel's, for everyone."""
        if session == self.namespace_owner:
            return
        ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        own = {name: value for name, value in ns.items()
               if name not in hidden or value is not hidden[name]}
        for name in own:
            del ns[name]
        if self.namespace_owner:
            self.namespaces[self.namespace_owner] = own
            while len(self.namespaces) > self.KEPT_NAMESPACES:
                self.namespaces.pop(next(iter(self.namespaces)))
        ns.update(self.namespaces.pop(session, {}))
        self.namespace_owner = session

    def op_namespace(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """Nothing but the namespace switch ``run`` made (before a cell of another host session)."""

    def op_push(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """Set variables in the kernel's namespace (``%%isolated --push``)."""
        self.shell.user_ns.update(loads(buffers))

    def op_pull(self, data: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:
        """Fetch variables from the kernel's namespace (``%%isolated --pull``)."""
        missing = [n for n in data["names"] if n not in self.shell.user_ns]
        if missing:
            raise NameError(f"not defined in the isolated kernel: {', '.join(missing)}")
        return {n: self.shell.user_ns[n] for n in data["names"]}


_fault_log: Any = None


def install(shell: Any) -> None:
    """Register the comm target in this kernel, and dump tracebacks on fatal signals (a segfault)
    into the kernel's log file, whose tail the host reports when the kernel dies."""
    global _fault_log
    if os.environ.get(_broker.BROKER_ENV):  # a host on this machine brokers nested calls
        _broker.broker = _broker.Broker(shell.kernel.session.key)
    log_path = os.environ.get("FAL_MAGIC_KERNEL_LOG")
    _fault_log = open(log_path, "a") if log_path else sys.__stderr__
    faulthandler.enable(file=_fault_log, all_threads=False)  # the crashing thread: the tail stays short
    capture_stdout(shell)
    if importlib.util.find_spec("ipywidgets") is None:  # tqdm.auto then prints a text bar: without a warning
        warnings.filterwarnings("ignore", message="IProgress not found")  # that advises the notebook's ipywidgets
    if os.environ.get(HEAD_ENV):  # a kernel on a cluster host
        watch_head()
    runtime = Runtime(shell)
    runtime.lifetime = lifetime.watch()
    shell.kernel.comm_manager.register_target(COMM_TARGET, runtime.open)
    if os.environ.get(FAST_ENV):
        runtime.fast = FastChannel(runtime.serve_fast, os.environ[FAST_ENV], shell.kernel.session.key,
                                   os.environ[BEGUN_ENV])
