"""The pool of one user on one machine (SPEC 13): every warm local kernel, registered so that any
process of that user can lease it, as Jupyter's connection files let any client attach to a kernel.

``$FAL_MAGIC_HOME/kernels/`` (0700) holds, per kernel, ``<id>.json`` (0600: its key, requirements,
Python, pid, connection file; written once) whose modification time is the kernel's deadline, and
``<id>.lease``, a file whose flock is the lease: exclusive, held by the process serving a call in
the kernel, and dropped by the operating system when that process dies. The kernel's own watchdog
(``fal_magic_inside.lifetime``) ends it once its deadline has passed while nobody holds the lease.
Sockets and connection files live in a short owner-only directory of the user's (unix socket paths
are short), named after the home. A directory or entry that others may write, or that another user
owns, is refused with a message and never used.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import FalMagicError

log = logging.getLogger("fal_magic")

#: Where the user's local sockets go (``<root>/fal_magic-u<uid>-<home digest>``); see ``short_root``.
RUNTIME_PREFIX = "fal_magic-u"
SHM_ROOT = "/dev/shm"


def _owner_only(path: Path, what: str, is_dir: bool) -> None:
    """FalMagicError unless ``path`` is this user's own (directory or regular file, not a link) and
    closed to others: anything else may have been put there by someone else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise
    kind_ok = stat.S_ISDIR(info.st_mode) if is_dir else stat.S_ISREG(info.st_mode)
    if not kind_ok or info.st_uid != os.getuid() or info.st_mode & 0o077:
        owner = "another user" if info.st_uid != os.getuid() else "you"
        raise FalMagicError(
            f"fal_magic refuses {what} {path}: it is owned by {owner} with mode {stat.filemode(info.st_mode)}, "
            f"and only a {'directory' if is_dir else 'file'} of yours that no one else may read or write is "
            f"trusted (chmod {'700' if is_dir else '600'} it if it is yours, or remove it)")


def private_dir(path: Path, what: str) -> Path:
    """``path`` as an owner-only directory: made 0700 if missing, refused if others could use it."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    _owner_only(path, what, is_dir=True)
    return path


def home_digest(home: Path) -> str:
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:10]


@dataclass
class Entry:
    """One registered kernel: what a process needs to find it, attach to it and show it."""

    id: str
    slot: str  # the pool's name for its group: key, env tag (see contract.slot_name)
    key: str
    requirements: list[str]
    python: str
    pid: int
    connection_file: str
    log_path: str
    begun_path: str
    started_at: float
    env_tag: str = ""
    machine_type: str | None = None
    deadline: float = field(default=0.0, compare=False)  # the entry file's mtime

    def to_json(self) -> str:
        data = asdict(self)
        del data["deadline"]
        return json.dumps(data, indent=1)


class Lease:
    """The flock of one kernel's lease file, held through one open descriptor of this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self.held = False

    def take(self) -> bool:
        """Take the lease if no one holds it (never waits)."""
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.held = True
        return True

    def give_back(self) -> None:
        import fcntl

        if self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        self.held = False
        os.close(self.fd)  # (closing drops the flock too)


class Registry:
    """The registered kernels under ``home``, and the user's runtime directories for them."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dir = home / "kernels"
        self._dir = str(self.dir)  # (os.path on the call path: pathlib costs microseconds a call)
        self._warned: set[str] = set()
        self._tag_key: bytes | None = None

    def check(self) -> Path:
        """The registry directory, made or checked (FalMagicError if others could use it)."""
        self.home.mkdir(parents=True, exist_ok=True)
        return private_dir(self.dir, "the kernel registry")

    def runtime_dir(self, root: str) -> Path:
        """The user's directory for this home's kernel sockets and connection files, under ``root``."""
        return private_dir(Path(root) / f"{RUNTIME_PREFIX}{os.getuid()}-{home_digest(self.home)}",
                           "the kernel runtime directory")

    def shm_dir(self) -> Path | None:
        """The user's shared-memory directory for this home's kernels, if the machine has one."""
        if not (os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK)):
            return None
        return private_dir(Path(SHM_ROOT) / f"{RUNTIME_PREFIX}{os.getuid()}-{home_digest(self.home)}",
                           "the kernels' shared-memory directory")

    def tag_key(self) -> bytes:
        """The secret that keys the tags of kernels' environment variables, the same for every process
        of the pool (a tag then names the same values everywhere, and says nothing of them)."""
        if self._tag_key is not None:
            return self._tag_key
        self._tag_key = self._read_tag_key()
        return self._tag_key

    def _read_tag_key(self) -> bytes:
        path = self.check() / "tag.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            _owner_only(path, "the kernel registry's key", is_dir=False)
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        return path.read_bytes()

    def holders(self) -> dict[str, int]:
        """Kernel id -> the pid of the process that holds its lease now (Linux: ``/proc/locks``)."""
        inodes = {}
        for path in self.dir.glob("*.lease"):
            try:
                inodes[os.stat(path).st_ino] = path.stem
            except OSError:
                continue
        found = {}
        try:
            with open("/proc/locks") as f:
                for line in f:
                    fields = line.split()
                    if "FLOCK" not in fields or "->" in fields:
                        continue
                    at = fields.index("FLOCK")
                    pid, where = fields[at + 3], fields[at + 4]
                    inode = int(where.rsplit(":", 1)[1])
                    if inode in inodes:
                        found[inodes[inode]] = int(pid)
        except (OSError, ValueError, IndexError):
            pass
        return found

    def entry_path(self, kernel_id: str) -> Path:
        return self.dir / f"{kernel_id}.json"

    def lease_path(self, kernel_id: str) -> Path:
        return self.dir / f"{kernel_id}.lease"

    def register(self, entry: Entry, deadline: float) -> None:
        """Write ``entry`` (atomically, 0600) with ``deadline`` as its file's modification time."""
        directory = self.check()
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.id}.", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(entry.to_json())
            os.utime(tmp, (deadline, deadline))
            os.replace(tmp, self.entry_path(entry.id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def set_deadline(self, kernel_id: str, deadline: float) -> None:
        """The kernel's new deadline (only its leaseholder sets it): the entry's modification time."""
        try:
            os.utime(os.path.join(self._dir, kernel_id + ".json"), (deadline, deadline))
        except FileNotFoundError:
            pass

    def deadline(self, kernel_id: str) -> float:
        """The kernel's deadline as registered (0 if it is not)."""
        try:
            return os.stat(os.path.join(self._dir, kernel_id + ".json")).st_mtime
        except FileNotFoundError:
            return 0.0

    def remove(self, kernel_id: str) -> None:
        for path in (self.entry_path(kernel_id), self.lease_path(kernel_id)):
            path.unlink(missing_ok=True)

    def entries(self) -> list[Entry]:
        """Every registered kernel whose entry can be trusted, oldest first; the others are reported
        (once) and left alone."""
        if not self.dir.exists():
            return []
        self.check()
        found = []
        for path in self.dir.glob("*.json"):
            try:
                _owner_only(path, "the kernel registry entry", is_dir=False)
                with open(path, "rb") as f:
                    info = os.fstat(f.fileno())
                    data = json.loads(f.read())
                entry = Entry(**{k: v for k, v in data.items() if k in Entry.__dataclass_fields__})
                entry.deadline = info.st_mtime
            except FileNotFoundError:
                continue  # (ended meanwhile)
            except FalMagicError as exc:
                if str(path) not in self._warned:
                    self._warned.add(str(path))
                    log.warning("%s", exc)
                continue
            except (ValueError, TypeError, OSError) as exc:
                if str(path) not in self._warned:
                    self._warned.add(str(path))
                    log.warning("fal_magic ignores the kernel registry entry %s: %s", path, exc)
                continue
            found.append(entry)
        return sorted(found, key=lambda e: e.started_at)

    @contextmanager
    def slot_lock(self, slot: str) -> Iterator[None]:
        """Hold the slot's flock: counting its kernels and registering a new one happen as one step
        across processes (``max_kernels`` holds for the key whatever process asks)."""
        import fcntl

        name = hashlib.sha256(slot.encode()).hexdigest()[:16]
        fd = os.open(self.check() / f"{name}.slot", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not_a_zombie(pid)


def not_a_zombie(pid: int) -> bool:
    """Whether a process that exists still runs (Linux: not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone (where /proc exists at all)
    except (OSError, IndexError):
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)
