"""Large buffers beside the sockets: shared-memory segments between a host and its local kernel (an
arena on each side, a segment lent for one transfer), and blobs on a server's machine for a kernel
there. A segment or blob is a file in an owner-only directory; the reader maps it without a copy."""
from __future__ import annotations

import os
import re
from typing import Any

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

    def put(self, buffer: Any) -> list[Any] | None:
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

    def _new(self, size: int) -> tuple[str, Any]:
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

    def give_back(self, names: list[str]) -> None:
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

    def _remove(self, name: str, table: dict[str, Any]) -> None:
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


def unmapped(mappings: dict[str, Any]) -> list[str]:
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
#: Names of blobs: made by a server (``u-``) or by a kernel for its results (``r-``); nothing else
#: is a blob (a name from a kernel's reply is checked against it before the host asks for it).
BLOB_NAME = re.compile(r"^[ur]-[0-9a-f]+(-[0-9]+)*$")


def blob_put(directory: str, buffer: Any) -> list[Any] | None:
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


def shm_locate(buffer: Any, segments: dict[str, Any]) -> tuple[str, int] | None:
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


def results_to_blobs(directory: str, frames: list[Any], uploaded: dict[str, Any]) -> dict[int, list[Any]]:
    """In a kernel on a server's machine: move a remote call's large result frames into blobs in the
    server's ``directory`` (the frames are emptied) and remove the uploaded ones. A frame that is a whole
    uploaded blob (an argument returned) goes back as that blob if nothing here holds it any more,
    instead of being written again."""
    placed: dict[int, list[Any]] = {}
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


def results_to_shm(arena: Arena, held: dict[str, Any], out: list[Any],
                   segments: dict[str, Any]) -> tuple[dict[int, list[Any]], list[str]]:
    """In a kernel: move a call's large result buffers to shared memory (the frames are emptied; the map
    returned says where each went), and say which of the host's segments this kernel no longer maps.

    A buffer that lies in an argument's segment goes back as a reference to it, but only if nothing
    here holds on to that segment any more; otherwise host and kernel would share live memory, so it
    is copied into ``arena`` like any other buffer. Segments the kernel's objects still hold stay in
    ``held``, mapped, and are reported free at the end of a later call, once they are let go."""
    placed: dict[int, list[Any]] = {}
    refs: dict[int, tuple[str, int, int]] = {}
    for index in range(1, len(out)):
        if memoryview(out[index]).nbytes < SHM_MIN:
            continue
        found = shm_locate(out[index], segments)
        if found is not None:
            refs[index] = (found[0], found[1], memoryview(out[index]).nbytes)
            out[index] = b""
        else:
            written = arena.put(out[index])
            if written is not None:  # else it stays an inline frame
                placed[index] = ["new", written[0], 0, written[1]]
                out[index] = b""
    held.update(segments)
    closed = unmapped(held)
    for index, (name, offset, size) in refs.items():
        if name in closed:
            placed[index] = ["ref", name, offset, size]
            continue
        piece = memoryview(held[name])[offset:offset + size]
        written = arena.put(piece)
        if written is not None:
            placed[index] = ["new", written[0], 0, size]
        else:
            out[index] = bytes(piece)
    returned = {where[1] for where in placed.values() if where[0] == "ref"}
    return placed, [name for name in closed if name not in returned]
