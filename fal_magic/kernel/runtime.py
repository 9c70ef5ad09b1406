"""The code that runs inside a warm kernel, and the frame format both sides share.

The host sends this file's source into a fresh kernel once (so environments need no fal_magic
install); there it registers the ``fal_magic`` comm target. Each call arrives as a comm message whose
binary buffers hold a cloudpickled ``(function, args, kwargs)``; the function runs in the kernel's
shell handler, so its prints are published on iopub under the call's own message. The reply is a
comm message with the pickled result, or a description of the exception.

Imports: the standard library and cloudpickle only. The host imports the helpers below too.
"""
from __future__ import annotations

import faulthandler
import functools
import hashlib
import hmac
import json
import pickle
import signal
import os
import sys
import threading
import traceback
from typing import Any, Callable

import cloudpickle

COMM_TARGET = "fal_magic"
PROTOCOL = 5

#: The name this module has in every process, host and kernel alike, so that objects of its classes
#: (``cached`` functions) pickle by reference and unpickle on either side.
MODULE_NAME = "fal_magic_runtime"
sys.modules.setdefault(MODULE_NAME, sys.modules[__name__])


def dumps(obj: Any) -> list:
    """Pickle ``obj`` into frames: the pickle stream, then each large buffer out of band (pickle 5)."""
    buffers: list = []
    head = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    return [head, *(b.raw() for b in buffers)]


def _writable(buffer: Any) -> Any:
    """The buffer itself when it is writable (a received zmq frame), else a writable copy, so that
    arrays that arrive out of band can be changed in place."""
    view = memoryview(buffer)
    return view if not view.readonly else bytearray(view)


def loads(frames: list) -> Any:
    """Inverse of ``dumps``."""
    head, *rest = frames
    return cloudpickle.loads(head, buffers=[_writable(b) for b in rest])


#: The file this module's code says it comes from (in a kernel too): its frames are not the user's.
_OWN_FILE = loads.__code__.co_filename


#: Buffers from this size on cross between host and kernel as files in a shared-memory directory
#: (tmpfs) instead of through a socket: written once, mapped by the reader without a copy.
SHM_MIN = 8 << 20
SHM_ENV = "FAL_MAGIC_SHM"
_shm_counter = iter(range(1 << 62))


#: Free segments an arena keeps for reuse, in bytes (more is given back to the system).
ARENA_LIMIT = 1 << 30


class Arena:
    """Shared-memory files that one side (the host for a kernel, or a kernel) owns and reuses.

    The owner writes a buffer through a mapping it keeps, into pages that are already there: writing
    fresh pages costs several times a copy on these machines (first touch). A segment is lent to the
    other side for one transfer and comes back once that side has unmapped it (its objects no longer
    use it), so the two sides never share live memory. Segments are files in an owner-only directory,
    allocated in full before use (a full /dev/shm is an error here, not a SIGBUS later)."""

    def __init__(self, directory: str, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self.free: dict[str, Any] = {}  # name -> the owner's mapping
        self.lent: dict[str, Any] = {}

    def put(self, buffer: Any) -> "list | None":
        """Copy ``buffer`` into a free segment large enough, or a new one; return ``[name, size]`` (the
        segment is lent from now on), or None when shared memory cannot take it (it then goes inline)."""
        view = memoryview(buffer).cast("B")
        size = view.nbytes
        fitting = [name for name, mm in self.free.items() if size <= len(mm) <= 2 * size]
        if fitting:
            name = min(fitting, key=lambda n: len(self.free[n]))
            mm = self.free.pop(name)
        else:
            name, mm = self._new(size)
            if mm is None:
                return None
        mm[:size] = view
        self.lent[name] = mm
        return [name, size]

    def _new(self, size: int) -> "tuple[str, Any]":
        import mmap

        name = f"{self.prefix}-{os.getpid()}-{next(_shm_counter)}"
        path = os.path.join(self.directory, name)
        capacity = -(-size // (1 << 20)) << 20  # whole MiB: a slightly larger buffer fits next time
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, capacity)
                return name, mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        except (OSError, ValueError):
            try:
                os.unlink(path)
            except OSError:
                pass
            return name, None

    def give_back(self, names: "list[str]") -> None:
        """The other side no longer maps these segments: they may be written again."""
        for name in names:
            mm = self.lent.pop(name, None)
            if mm is not None:
                self.free[name] = mm
        while sum(len(mm) for mm in self.free.values()) > ARENA_LIMIT:
            self._remove(max(self.free, key=lambda n: len(self.free[n])), self.free)

    def forget(self, name: str) -> None:
        """The other side keeps this segment for good (it holds the objects built on it): unlink it,
        so that its memory lives exactly as long as they do."""
        if name in self.lent:
            self._remove(name, self.lent)

    def _remove(self, name: str, table: dict) -> None:
        table.pop(name).close()
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass

    def close(self) -> None:
        """Remove every segment (the other side's mappings stay valid until it drops them)."""
        for table in (self.free, self.lent):
            for name in list(table):
                self._remove(name, table)


def unmapped(mappings: dict) -> "list[str]":
    """Close the mappings (by segment name) that no object uses any more; return their names. The
    others stay open, and in ``mappings``, while something holds them."""
    closed = []
    for name, mm in list(mappings.items()):
        try:
            mm.close()
        except BufferError:
            continue
        del mappings[name]
        closed.append(name)
    return closed


#: From this size on, a remote call's frames travel beside the websocket, as blobs on the server.
BLOB_MIN = 1 << 20


def blob_put(directory: str, buffer: Any) -> "list | None":
    """Write a result buffer as a new blob file in the server's ``directory``: ``[name, size]``, or
    None if it cannot be written (it then goes back through the websocket)."""
    view = memoryview(buffer).cast("B")
    name = f"r-{os.urandom(6).hex()}-{os.getpid()}"
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while view:
                view = view[os.write(fd, view[:64 << 20]):]
        finally:
            os.close(fd)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return [name, memoryview(buffer).nbytes]


def shm_map(directory: str, name: str, size: int) -> Any:
    """Map the first ``size`` bytes of a file the other side wrote (a segment of its arena, or an
    uploaded blob): shared and writable, so arrays built on it can change in place."""
    import mmap

    fd = os.open(os.path.join(directory, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


def shm_locate(buffer: Any, segments: dict) -> "tuple[str, int] | None":
    """``(name, offset)`` if ``buffer`` lies inside one of the mapped ``segments`` (by name), else None:
    a result that is (a view of) an argument goes back as a reference instead of a copy."""
    import ctypes

    view = memoryview(buffer)
    if view.readonly or not view.contiguous or view.nbytes == 0:
        return None
    start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    for name, mm in segments.items():
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        if base <= start and start + view.nbytes <= base + len(mm):
            return name, start - base
    return None


def add_note(exc: BaseException, note: str) -> None:
    """Attach a PEP 678 note to ``exc``."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # Python 3.10 has no add_note; the same __notes__ list is shown by IPython's tracebacks
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def type_name(obj_or_type: Any) -> str:
    """``module.Qualname`` of a type (or of an object's type); builtins without the module."""
    cls = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
    mod = getattr(cls, "__module__", "") or ""
    return cls.__qualname__ if mod == "builtins" else f"{mod}.{cls.__qualname__}"


def describe_exception(exc: BaseException) -> dict:
    """Everything the host needs to rebuild ``exc``: its chain, each link pickled where possible,
    and the traceback text (with chain) as a fallback."""
    chain = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            link, nxt = "cause", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, nxt = "context", current.__context__
        else:
            link, nxt = None, None
        try:
            pickled = cloudpickle.dumps(current, protocol=PROTOCOL)
        except Exception:
            pickled = None
        frames = [[f.filename, f.lineno or 0, f.name, f.line or ""]
                  for f in traceback.extract_tb(current.__traceback__)]
        chain.append({"type": type_name(current), "message": str(current), "pickled": pickled, "link": link,
                      "frames": frames})
        current = nxt
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"chain": chain, "traceback": text}


_cache: dict[tuple[str, bytes], Any] = {}
_cache_lock = threading.Lock()


def _code_digest(code: Any, h: Any) -> None:
    """Feed a code object's structure (bytecode, names, constants, nested code) into a hash."""
    h.update(code.co_code)
    h.update(repr((code.co_name, code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _code_digest(const, h)
        else:
            h.update(repr(const).encode())


def _function_key(fn: Callable) -> str:
    """A digest of what a function computes with: its code, and the values that make two functions
    of the same code differ (closure cells, defaults, the globals its code names). The same for every
    copy of it that arrives by value; different for two closures of one factory."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    h = hashlib.sha256()
    _code_digest(code, h)
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell
            cells.append(None)
    fn_globals = getattr(fn, "__globals__", {})
    names = sorted(_global_names(code) & fn_globals.keys())
    read = [(n, fn_globals[n]) for n in names if not isinstance(fn_globals[n], type(sys))]  # modules aside
    h.update(cloudpickle.dumps((cells, fn.__defaults__, fn.__kwdefaults__, read), protocol=PROTOCOL))
    return h.hexdigest()


def _global_names(code: Any) -> set:
    """The global names a code object (and the code nested in it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _global_names(const)
    return names


class cached:  # noqa: N801 - used as a decorator, named like one
    """Keep a function's results, per arguments, in the process it runs in (a warm kernel).

    Keyed by the function's code and the values it closes over (not its identity), so that it holds
    even though the function travels anew with every isolated call, and two closures of one factory
    do not share results. An identity that cannot be computed (unpicklable closure values) means no
    caching. The results die with the kernel.
    """

    __module__ = MODULE_NAME

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            key = (_function_key(self.fn), cloudpickle.dumps((args, sorted(kwargs.items())), protocol=PROTOCOL))
        except Exception:  # unpicklable arguments or closure values: no caching, just the call
            return self.fn(*args, **kwargs)
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        value = self.fn(*args, **kwargs)
        with _cache_lock:
            return _cache.setdefault(key, value)


def map_chunk(fn: Callable, items: list) -> list:
    """Run ``fn`` over a chunk of argument tuples in one request (``.map``): each item's result, or
    its exception described, so that one failing item does not hide the others."""
    out = []
    for args in items:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            if exc.__traceback__ is not None:
                exc.__traceback__ = exc.__traceback__.tb_next
            out.append((False, describe_exception(exc)))
    return out


map_chunk.__module__ = MODULE_NAME  # pickled by reference: the kernel has this module under that name


BROKER_ENV = "FAL_MAGIC_BROKER"


def sign(key: bytes, header: bytes) -> bytes:
    """HMAC-SHA256 of a broker message header, with the kernel's session key (as Jupyter signs)."""
    return hmac.new(key, header, hashlib.sha256).hexdigest().encode()


class NestedCallError(Exception):
    """An isolated function called inside another failed in a way that has no type of its own here."""

    __module__ = MODULE_NAME


class _Broker:
    """The kernel's line to its host for nested isolated calls: a zmq socket of its own, because the
    shell channel is not read while the outer call runs."""

    def __init__(self, address: str, key: bytes) -> None:
        import zmq

        self.key = key
        self.socket: Any = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def call(self, options: dict, fn: Callable, args: tuple, kwargs: dict) -> Any:
        header = json.dumps({"op": "nested", "nonce": os.urandom(8).hex()}).encode()
        self.socket.send_multipart([sign(self.key, header), header, *dumps((options, fn, args, kwargs))],
                                   copy=False)
        status, *frames = self.socket.recv_multipart(copy=False)
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


_broker: _Broker | None = None


class _FdCapture:
    """What is written to a file descriptor (by subprocesses, C code) goes to the kernel's stream of
    that name and to the kernel's log, read by a thread. Unlike ipykernel's own capture (turned off
    in fal_magic kernels), it can be drained: at the end of a call every byte written so far is in
    the stream, so a subprocess's last lines are part of its call and not lost after it."""

    def __init__(self, fd: int, name: str) -> None:
        import codecs

        self.name = name
        self.log = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.read_end = read_end
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, name=f"fal_magic-fd{fd}", daemon=True).start()

    def _watch(self) -> None:
        import select

        poller = select.poll()
        poller.register(self.read_end, select.POLLIN)
        while True:
            poller.poll()
            self.take()

    def take(self) -> None:
        """Move what the pipe holds into the stream (only ever under the lock: see ``drain``)."""
        with self.lock:
            try:
                data = os.read(self.read_end, 1 << 16)
            except BlockingIOError:
                return
            try:
                os.write(self.log, data)
            except OSError:
                pass
            text = self.decoder.decode(data)
            if text:
                getattr(sys, self.name).write(text)

    def drain(self) -> None:
        """Return once everything written to the descriptor so far has reached the stream."""
        import fcntl
        import termios

        pending = bytearray(4)
        while fcntl.ioctl(self.read_end, termios.FIONREAD, pending) == 0 and int.from_bytes(pending, sys.byteorder):
            self.take()
        with self.lock:  # a take() the watcher began has finished writing
            pass


_captures: list[_FdCapture] = []


def drain_captured_output() -> None:
    """Everything written to descriptor 1 so far is in ``sys.stdout``."""
    for capture in _captures:
        capture.drain()


FAST_ENV = "FAL_MAGIC_FAST"
#: The fast channel's word that a call has begun (every other message there is a JSON reply).
BEGUN = b"begun"

#: Set in kernels that a fal_magic server extension starts for a remote host.
REMOTE_ENV = "FAL_MAGIC_REMOTE"
#: Set in kernels a server starts on another host: ``host:port`` of that server, and how long the
#: kernel may go without reaching it before it ends itself (the server was killed: nobody else would).
HEAD_ENV = "FAL_MAGIC_HEAD"
ORPHAN_ENV = "FAL_MAGIC_ORPHAN_TIMEOUT"


def _end_on_host() -> None:
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


def _watch_head(address: str, patience: float) -> None:
    """End this kernel once the server that started it has been unreachable for ``patience`` seconds
    (it was killed: nobody else would end the kernel)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    lost_since: float | None = None
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            lost_since = None
        except OSError:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= patience:
                print(f"fal_magic: the server at {address} is gone; this kernel ends", file=sys.__stderr__, flush=True)
                _end_on_host()
                os._exit(0)
        time.sleep(1.0)


class _FastChannel:
    """The kernel's own socket for calls, read by the kernel's event loop: no shell dispatch, no
    busy/idle round of the Jupyter protocol. Messages carry a header signed with the session key."""

    def __init__(self, runtime: "Runtime", address: str, key: bytes) -> None:
        import asyncio

        import zmq

        self.zmq = zmq
        self.runtime = runtime
        self.key = key
        self.socket: Any = zmq.Context.instance().socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        asyncio.get_running_loop().add_reader(self.socket.getsockopt(zmq.FD), self.on_readable)

    def on_readable(self) -> None:
        zmq = self.zmq
        try:  # an interrupt that lands here must not reach (and stop) the kernel's event loop
            while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    signature, header, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if not hmac.compare_digest(sign(self.key, header.bytes), signature.bytes):
                    continue  # not signed with our key: dropped
                self.runtime.serve_fast(self.socket, json.loads(header.bytes), frames)
        except KeyboardInterrupt:
            pass


class isolated_proxy:  # noqa: N801 - stands in for an isolated function
    """What an ``@isolated`` function becomes when it travels into a kernel: calling it asks the
    host to run the function in its own environment and kernel, and waits for the result."""

    __module__ = MODULE_NAME

    def __init__(self, fn: Callable, options: dict) -> None:
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _broker is None and os.environ.get(REMOTE_ENV):
            raise NestedCallError(f"{self.fn.__qualname__}() is isolated: it cannot be called from inside a kernel "
                                  "on a remote server (nested isolated calls are brokered by a local host only)")
        if _broker is None:  # not inside a fal_magic kernel: the host's own decorator does the work
            from fal_magic.decorator import IsolatedFunction

            return IsolatedFunction(self.fn, **self.options)(*args, **kwargs)
        return _broker.call(self.options, self.fn, args, kwargs)


class Runtime:
    """Serves calls on one comm; one per kernel."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.fast: _FastChannel | None = None
        self._parts: dict[int, bytearray] = {}
        self.shm_dir = os.environ.get(SHM_ENV, "")
        self.arena: Arena | None = None  # this kernel's segments for large results
        self.held: dict = {}  # the host's segments this kernel still maps (its objects use them), by name

    def open(self, comm: Any, msg: dict) -> None:
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

    def handle(self, comm: Any, msg: dict) -> None:
        """Serve one request that came as a comm message; reply on the comm.

        A large frame may come ahead in ``part`` messages (a remote host chunks what it sends through
        a server's websocket); the request then names the frames to take from them.
        """
        data, buffers = msg["content"]["data"], list(msg["buffers"])
        if data.get("op") == "part":
            if data["offset"] == 0:
                self._parts[data["index"]] = bytearray(data["size"])
            chunk = memoryview(buffers[0]).cast("B")
            self._parts[data["index"]][data["offset"]:data["offset"] + len(chunk)] = chunk
            return
        for index in data.get("parts", ()):
            buffers[index] = self._parts.pop(index)
        uploaded = {}
        for index, path in data.get("blobs", {}).items():  # uploaded to the server beside the websocket
            directory, name = os.path.split(path)
            uploaded[name] = shm_map(directory, name, os.stat(path).st_size)
            buffers[int(index)] = memoryview(uploaded[name])
        reply, frames = self.run(data, buffers)
        del buffers
        if data.get("blob_dir"):  # large results wait on the server for the host to fetch them
            reply["blobs"] = self._results_to_blobs(data["blob_dir"], frames, uploaded)
        comm.send(reply, buffers=frames)

    @staticmethod
    def _results_to_blobs(directory: str, frames: list, uploaded: dict) -> dict:
        """Move a remote call's large result frames into blobs on the server (the frames are emptied)
        and remove the uploaded ones. A frame that is a whole uploaded blob (an argument returned)
        goes back as that blob if nothing here holds it any more, instead of being written again."""
        placed: dict[int, list] = {}
        whole: dict[int, str] = {}
        for index in range(1, len(frames)):
            size = memoryview(frames[index]).nbytes
            if size < BLOB_MIN:
                continue
            found = shm_locate(frames[index], uploaded)
            if found is not None and found[1] == 0 and size == len(uploaded[found[0]]):
                whole[index] = found[0]
                frames[index] = b""
                continue
            written = blob_put(directory, frames[index])
            if written is not None:
                placed[index] = written
                frames[index] = b""
        closed = unmapped(uploaded)
        for index, name in whole.items():
            if name in closed:
                placed[index] = [name, os.stat(os.path.join(directory, name)).st_size]
                continue
            written = blob_put(directory, uploaded[name])  # still used here: the host gets a copy
            if written is not None:
                placed[index] = written
            else:
                frames[index] = bytes(uploaded[name])
        kept = {name for name, _ in placed.values()}
        for name in set(closed) | set(uploaded):
            if name not in kept:
                try:
                    os.unlink(os.path.join(directory, name))  # mapped or not: its memory lives while used
                except OSError:
                    pass
        return placed

    def run(self, data: dict, buffers: list, begin: Callable[[], None] | None = None) -> tuple[dict, list]:
        """Run one request; return the reply and the pickled value or the exception described.
        ``begin`` is called first, where an interrupt already counts as the request's own."""
        reply: dict = {"op": "result", "id": data.get("id")}
        frames: list = []
        try:
            try:
                if begin is not None:
                    begin()
                operation = getattr(self, "op_" + str(data.get("op")), None)
                if operation is None:
                    raise ValueError(f"fal_magic runtime: unknown operation {data.get('op')!r}")
                result = operation(data, buffers)
            except BaseException as exc:  # the user's error, KeyboardInterrupt included
                tb = exc.__traceback__
                while tb is not None and tb.tb_frame.f_code.co_filename == _OWN_FILE:  # the runtime's frames
                    tb = tb.tb_next  # (handler, operation, unpickling the arguments) are not the user's
                exc.__traceback__ = tb
                reply.update(ok=False, kind="exception")
                frames = dumps(describe_exception(exc))
            else:
                try:
                    frames = dumps(result)
                    reply.update(ok=True, type=type_name(result))
                except BaseException as exc:
                    reply.update(ok=False, kind="serialization",
                                 message=f"the result, of type {type_name(result)}, cannot be pickled: "
                                         f"{type(exc).__name__}: {exc}")
                    frames = []
                del result
        except BaseException as exc:  # e.g. an interrupt that lands between the steps above
            reply.update(ok=False, kind="exception")
            frames = dumps(describe_exception(exc))
        finally:
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

    def serve_fast(self, sock: Any, header: dict, frames: list) -> None:
        """Serve a call from the fast channel: outputs go to iopub under the call's own id, then an
        ``idle`` status marks that they are all out, then the reply goes back on the channel."""
        parent = {"header": {"msg_id": header["msg_id"], "msg_type": "fal_magic_call", "session": header["session"],
                             "username": "", "date": "", "version": "5.3"}}
        kernel = self.shell.kernel
        for target in (sys.stdout, sys.stderr, self.shell.display_pub):
            if hasattr(target, "set_parent"):
                target.set_parent(parent)
        if self.shm_dir and self.arena is None:
            self.arena = Arena(self.shm_dir, "k")
        if self.arena is not None:
            self.arena.give_back(header.get("free", []))  # segments of ours the host no longer maps
        segments = {}
        frames = list(frames)
        for index, (name, size) in header.get("shm", {}).items():
            segments[name] = shm_map(self.shm_dir, name, size)
            frames[int(index)] = memoryview(segments[name])
        # ipykernel ignores SIGINT between requests; during a call it must raise KeyboardInterrupt. The
        # host hears that the call has begun once an interrupt would reach it: a kernel that dies before
        # that point did not run the call, which may then run elsewhere.
        saved = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            reply, out = self.run({"op": "call", "id": header["id"]}, frames, lambda: sock.send(BEGUN))
        finally:
            signal.signal(signal.SIGINT, saved)
        del frames
        if self.arena is not None:  # (without it, no segments either)
            reply["shm"], reply["free"] = self._result_to_shm(out, segments)
        kernel.session.send(kernel.iopub_socket, "status", {"execution_state": "idle"}, parent=parent,
                            ident=b"status")
        sock.send_multipart([json.dumps(reply).encode(), *out], copy=False)

    def _result_to_shm(self, out: list, segments: dict) -> "tuple[dict, list]":
        """Move the result's large buffers to shared memory (the frames are emptied; the map returned
        says where each went), and say which of the host's segments this kernel no longer maps.

        A buffer that lies in an argument's segment goes back as a reference to it, but only if nothing
        here holds on to that segment any more; otherwise host and kernel would share live memory, so it
        is copied into this kernel's arena like any other buffer. Segments the kernel's objects still
        hold stay mapped, and are reported free at the end of a later call, once they are let go."""
        assert self.arena is not None
        placed: dict[int, list] = {}
        refs: dict[int, tuple] = {}
        for index in range(1, len(out)):
            if memoryview(out[index]).nbytes < SHM_MIN:
                continue
            found = shm_locate(out[index], segments)
            if found is not None:
                refs[index] = (found[0], found[1], memoryview(out[index]).nbytes)
                out[index] = b""
            else:
                written = self.arena.put(out[index])
                if written is not None:  # else it stays an inline frame
                    placed[index] = ["new", written[0], 0, written[1]]
                    out[index] = b""
        self.held.update(segments)
        closed = unmapped(self.held)
        for index, (name, offset, size) in refs.items():
            if name in closed:
                placed[index] = ["ref", name, offset, size]
                continue
            piece = memoryview(self.held[name])[offset:offset + size]
            written = self.arena.put(piece)
            if written is not None:
                placed[index] = ["new", written[0], 0, size]
            else:
                out[index] = bytes(piece)
        returned = {where[1] for where in placed.values() if where[0] == "ref"}
        return placed, [name for name in closed if name not in returned]

    def op_call(self, data: dict, buffers: list) -> Any:
        """Run a pickled ``(function, args, kwargs)``."""
        fn, args, kwargs = loads(buffers)
        return fn(*args, **kwargs)

    def op_push(self, data: dict, buffers: list) -> None:
        """Set variables in the kernel's namespace (``%%isolated --push``)."""
        self.shell.user_ns.update(loads(buffers))

    def op_pull(self, data: dict, buffers: list) -> dict:
        """Fetch variables from the kernel's namespace (``%%isolated --pull``)."""
        missing = [n for n in data["names"] if n not in self.shell.user_ns]
        if missing:
            raise NameError(f"not defined in the isolated kernel: {', '.join(missing)}")
        return {n: self.shell.user_ns[n] for n in data["names"]}


_fault_log: Any = None


def install(shell: Any) -> None:
    """Register the comm target in this kernel, and dump tracebacks on fatal signals (a segfault)
    into the kernel's log file, whose tail the host reports when the kernel dies."""
    global _fault_log, _broker
    if os.environ.get(BROKER_ENV):
        _broker = _Broker(os.environ[BROKER_ENV], shell.kernel.session.key)
    log_path = os.environ.get("FAL_MAGIC_KERNEL_LOG")
    _fault_log = open(log_path, "a") if log_path else sys.__stderr__
    faulthandler.enable(file=_fault_log, all_threads=False)  # the crashing thread: the tail stays short
    if hasattr(sys.stdout, "session") and not _captures:  # an ipykernel stream: the kernel's own output
        # descriptor 2 stays the kernel's log: what a dying process writes there must not wait in a pipe
        _captures.append(_FdCapture(1, "stdout"))
        shell.events.register("post_execute", drain_captured_output)  # a cell's subprocesses too
    if os.environ.get(HEAD_ENV):  # a kernel on a cluster host
        import atexit

        atexit.register(_end_on_host)
        threading.Thread(target=_watch_head, args=(os.environ[HEAD_ENV], float(os.environ.get(ORPHAN_ENV, "300"))),
                         name="fal_magic-head", daemon=True).start()
    manager = shell.kernel.comm_manager
    runtime = Runtime(shell)
    manager.register_target(COMM_TARGET, runtime.open)
    if os.environ.get(FAST_ENV):
        runtime.fast = _FastChannel(runtime, os.environ[FAST_ENV], shell.kernel.session.key)
