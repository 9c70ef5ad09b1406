"""The wire format both sides share: a pickled object as frames (the pickle stream, then each large
buffer out of band: pickle 5), an exception described so that the other side can rebuild it, and the
signature of messages outside the Jupyter channels."""
from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import pickle
import sys
import traceback
from typing import Any

import cloudpickle

PROTOCOL = 5

#: The directory of this package: frames of its code are the runtime's, never the user's.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class FalMagicFailure(Exception):
    """A failure of fal_magic's own inside a kernel, not of the user's code: the host raises it as a
    ``FalMagicError`` with its message, not as if the user's function had raised it."""


def dumps(obj: Any) -> list[Any]:
    """Pickle ``obj`` into frames: the pickle stream, then each large buffer out of band (pickle 5)."""
    buffers: list[Any] = []
    head = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    return [head, *(b.raw() for b in buffers)]


#: Buffers this large are made of huge pages where the system gives them on request (Linux's
#: transparent huge pages): a 50 MiB one then costs 25 page faults instead of 12,800, and receiving
#: 50 MiB into it over loopback took 24 ms instead of 42 ms (into a bytearray) on a 2-core machine.
HUGE_MIN = 4 << 20


def new_buffer(size: int) -> memoryview:
    """A zeroed, writable buffer of ``size`` bytes to receive a frame into: of huge pages when it is
    large and the system allows, else a bytearray."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if size < HUGE_MIN or advice is None or not hasattr(mmap, "MAP_ANONYMOUS"):
        return memoryview(bytearray(size))
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(advice)
    except OSError:  # (a kernel built without them: ordinary pages)
        pass
    return memoryview(memory)


def _writable(buffer: Any) -> Any:
    """The buffer itself when it is writable (a received zmq frame), else a writable copy, so that
    arrays that arrive out of band can be changed in place."""
    view = memoryview(buffer)
    if not view.readonly:
        return view
    copy = new_buffer(view.nbytes)
    copy[:] = view.cast("B")
    return copy


def loads(frames: list[Any]) -> Any:
    """Inverse of ``dumps``."""
    head, *rest = frames
    return cloudpickle.loads(head, buffers=[_writable(b) for b in rest])


def sign(key: bytes, header: bytes) -> bytes:
    """HMAC-SHA256 of a message header, with the kernel's session key (as Jupyter signs)."""
    return hmac.new(key, header, hashlib.sha256).hexdigest().encode()


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
    name: str = cls.__qualname__
    return name if mod == "builtins" else f"{mod}.{name}"


def without_runtime_frames(exc: BaseException) -> BaseException:
    """``exc`` with the leading frames of this package's code (handler, operation, unpickling the
    arguments) cut from its traceback: they are not the user's."""
    tb = exc.__traceback__
    while tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == PACKAGE_DIR:
        tb = tb.tb_next
    exc.__traceback__ = tb
    return exc


def describe_exception(exc: BaseException, plain: bool = False) -> dict[str, Any]:
    """Everything the host needs to rebuild ``exc``: its chain, each link pickled where possible,
    and the traceback text (with chain) as a fallback. ``plain``: for a host on another Python, links
    are plain pickles (a type defined here then stays a name: the host shows it as a RemoteError)."""
    chain = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        nxt: BaseException | None
        if current.__cause__ is not None:
            link, nxt = "cause", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, nxt = "context", current.__context__
        else:
            link, nxt = None, None
        try:
            pickled: bytes | None = (pickle.dumps(current, protocol=PROTOCOL) if plain
                                     else cloudpickle.dumps(current, protocol=PROTOCOL))
        except Exception:
            pickled = None
        frames = [[f.filename, f.lineno or 0, f.name, f.line or ""]
                  for f in traceback.extract_tb(current.__traceback__)]
        chain.append({"type": type_name(current), "message": str(current), "pickled": pickled, "link": link,
                      "frames": frames})
        current = nxt
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"chain": chain, "traceback": text}
