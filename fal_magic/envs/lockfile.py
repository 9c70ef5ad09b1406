"""A lock file: the exact distributions each environment got, so that a colleague (or a rebuilt cache)
gets the same ones.

One file holds many environments, each under its requirements, constraints, Python and platform (an
environment resolves differently on another of either). It is JSON, one package per line, entries
and keys in a stable order, so that a person can read it and a diff shows what changed; credentials
in URLs are masked before anything is written. Writes are atomic (a new file renamed over the old)
and serialized between processes by a flock on the file's directory, so two processes that record
at once keep both entries.
"""
from __future__ import annotations

import json
import os
import re
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import FalMagicError
from ..masking import mask_credentials

try:
    import fcntl
except ImportError:  # Windows: environments are not built there (see platforms.py)
    fcntl = None  # type: ignore[assignment]

FORMAT = 1
#: What a lock's package line may be: an exact pin, with its hashes (a lock travels with a notebook,
#: so whoever edits it must not get an installer option, a URL or a range through to the installer).
_PIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*"
                  r"(?: --hash=sha(?:256|384|512):[0-9a-f]+)*")
#: ... or a package from a local path that the entry's own requirements name (``name @ file://...``).
_LOCAL = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?) @ (?P<url>file://\S+)")
#: The name the file has beside a notebook: ``analysis.ipynb`` -> ``analysis.isolated.lock``.
SUFFIX = ".isolated.lock"


def host_platform() -> str:
    """The platform environments built here are for, e.g. ``linux-x86_64``."""
    return sysconfig.get_platform()


def package_order(package: str) -> tuple[str, str]:
    """Sort key of ``name==version``: by canonical name, then the whole line."""
    name = re.split(r"[\s=<>!~@;\[]", package.removeprefix("-e "), maxsplit=1)[0]
    return name.lower().replace("_", "-").replace(".", "-"), package


def lock_beside(notebook: Path) -> Path:
    """The lock file that goes with ``notebook``."""
    return notebook.with_name(notebook.stem + SUFFIX)


@dataclass(frozen=True)
class LockEntry:
    """One environment's locked set: what it was asked for (the identity), and what it got."""

    requirements: tuple[str, ...]
    constraints: tuple[str, ...]
    python: str
    platform: str
    installer: str = ""
    recorded: str = ""
    packages: tuple[str, ...] = ()

    @property
    def identity(self) -> tuple[Any, ...]:
        return self.requirements, self.constraints, self.python, self.platform

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("requirements", "constraints", "packages"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LockEntry:
        return cls(requirements=tuple(data["requirements"]), constraints=tuple(data.get("constraints", ())),
                   python=str(data["python"]), platform=str(data["platform"]),
                   packages=tuple(data["packages"]), installer=str(data.get("installer", "")),
                   recorded=str(data.get("recorded", "")))


def identity_of(requirements: tuple[str, ...], constraints: tuple[str, ...], python: str,
                platform: str | None = None) -> tuple[Any, ...]:
    """The identity an entry for these would have (credentials masked, as they are in the file)."""
    return (tuple(mask_credentials(r) for r in requirements), tuple(mask_credentials(c) for c in constraints),
            python, platform or host_platform())


class LockFile:
    """The lock file at ``path``; reads are cached until the file changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mutex = threading.Lock()
        self._seen: tuple[float, int] | None = None
        self._entries: dict[tuple[Any, ...], LockEntry] = {}

    def entries(self) -> list[LockEntry]:
        """Every entry, in the file's order."""
        with self._mutex:
            self._refresh()
            return list(self._entries.values())

    def find(self, identity: tuple[Any, ...]) -> LockEntry | None:
        """The entry with this identity (see ``identity_of``), if the file has one; FalMagicError,
        naming the file and the entry, if it holds anything but exact pins."""
        with self._mutex:
            self._refresh()
            entry = self._entries.get(identity)
        if entry is not None:
            for package in entry.packages:
                if not _allowed(package, entry):
                    raise FalMagicError(
                        f"the lock file {self.path} holds {package!r} for the environment of "
                        f"{', '.join(entry.requirements) or '(no requirements)'}: a lock holds only exact pins "
                        "(name==version, with hashes); nothing was installed. Rebuild the entry from the "
                        f"requirements with: python -m fal_magic lock refresh {self.path}")
        return entry

    def record(self, entry: LockEntry) -> None:
        """Add ``entry``, replacing one with the same identity; keep every other entry, also those
        another process wrote since this one last read the file."""
        masked = LockEntry(
            requirements=tuple(mask_credentials(r) for r in entry.requirements),
            constraints=tuple(mask_credentials(c) for c in entry.constraints),
            python=entry.python, platform=entry.platform,
            packages=tuple(sorted({mask_credentials(p) for p in entry.packages}, key=package_order)),
            installer=entry.installer,
            recorded=entry.recorded or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        with self._mutex, self._directory_lock():
            current = {e.identity: e for e in self._read()}
            current[masked.identity] = masked
            self._write(sorted(current.values(), key=lambda e: (e.python, e.platform, e.requirements,
                                                                e.constraints)))
            self._seen = None

    # -- the file -------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._seen, self._entries = None, {}
            return
        seen = (info.st_mtime, info.st_size)
        if seen != self._seen:
            self._entries = {e.identity: e for e in self._read()}
            self._seen = seen

    def _read(self) -> list[LockEntry]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise FalMagicError(f"cannot read the lock file {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            if data.get("fal_magic_lock") != FORMAT:
                raise ValueError(f"format {data.get('fal_magic_lock')!r}, expected {FORMAT}")
            entries = [LockEntry.from_json(e) for e in data["environments"]]
            for entry in entries:
                if not all(isinstance(x, str) for x in (*entry.requirements, *entry.constraints, *entry.packages)):
                    raise TypeError("an entry holds something other than text")
            return entries
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (UnicodeDecodeError is a ValueError)
            reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise FalMagicError(f"{self.path} is not a fal_magic lock file this version can read ({reason}); "
                                "move it away (the next build records a new one), or set FalMagic.lock to "
                                "another path") from None

    def _write(self, entries: list[LockEntry]) -> None:
        text = json.dumps({"fal_magic_lock": FORMAT, "environments": [e.to_json() for e in entries]},
                          indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _directory_lock(self) -> _Flock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FalMagicError(f"cannot write the lock file {self.path}: {exc.strerror}") from None
        return _Flock(self.path.parent)


def _allowed(package: str, entry: LockEntry) -> bool:
    """Whether a lock's package line is an exact pin, or a local package its entry's requirements name."""
    if _PIN.fullmatch(package):
        return True
    local = _LOCAL.fullmatch(package)
    if local is None:
        return False
    from urllib.parse import unquote, urlparse

    path = os.path.normpath(unquote(urlparse(local["url"]).path))
    named = {os.path.normpath(os.path.abspath(r.removeprefix("-e ").strip())) for r in entry.requirements}
    return path in named


class _Flock:
    """An exclusive flock on a directory, held for a ``with`` block (the file itself is replaced on
    every write, so its own descriptor cannot carry the lock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd = -1

    def __enter__(self) -> _Flock:
        self.fd = os.open(self.directory, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the flock
