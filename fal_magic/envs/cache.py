"""The on-disk cache of environments: one virtualenv per key, built once, shared by processes.

Layout under the cache home (all directories owner-only)::

    envs/<key>/                  the virtualenv, built in place (virtualenvs are not relocatable)
    envs/<key>/fal_magic-env.json  completion marker + metadata, written last and atomically
    locks/<key>.lock             flock: exclusive while building or removing, shared while in use

An environment counts as built only when its marker exists. A build that fails, is interrupted or
whose process is killed leaves no marker; the next build of that key deletes the remains and starts
over. The lock is held by the OS, so a killed holder never leaves a stale lock behind.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..errors import EnvironmentBuildError, FalMagicError
from .bytecode import link_bytecode
from .installers import InstallFailed, Installer, pick_installer
from .local import LocalPackage
from .interpreters import find_python
from .lockfile import LockEntry, LockFile, identity_of
from ..masking import mask_credentials
from .spec import EnvSpec, describe_requirements

try:
    import fcntl
except ImportError:  # Windows: no environments on this machine (see platforms.py)
    pass

MARKER = "fal_magic-env.json"

#: Progress lines that carry the installer's own output (downloads, resolution) start with this:
#: a live status shows them, a log keeps them at DEBUG.
INSTALLER_LINE = "installer: "
LAST_USED = ".fal_magic-last-used"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True)
class Env:
    """A built environment: where it is and which interpreter to run."""

    key: str
    path: Path
    requirements: tuple[str, ...]

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


@dataclass(frozen=True)
class EnvRecord:
    """What ``envs list`` shows about one cached environment."""

    key: str
    path: Path
    requirements: tuple[str, ...]
    size_bytes: int
    created: float
    last_used: float
    built: bool
    #: Built from a lock file's exact set (not resolved when it was built).
    locked: bool = False


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` owner-only (0700), refuse one owned by another user, and check it is writable."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FalMagicError(f"cannot create fal_magic directory {path}: {exc.strerror}") from None
    info = path.stat()
    if info.st_uid != os.getuid():
        raise FalMagicError(f"refusing to use {path}: it belongs to uid {info.st_uid}, not to you")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    if not os.access(path, os.W_OK | os.X_OK):
        raise FalMagicError(f"fal_magic directory {path} is not writable; set FAL_MAGIC_HOME to another place")
    return path


class _KeyLock:
    """One key's flock, shared by the threads of this process (flock conflicts between fds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mutex = threading.Lock()
        self.fd: int | None = None

    def hold(self, mode: int) -> int:
        """Take the flock in ``mode`` (opening the lock file first); return its descriptor."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, mode)
        return self.fd

    def drop(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class EnvCache:
    """Finds or builds the environment for a spec; lists and removes cached environments."""

    def __init__(self, home: Path, installer: str = "auto", prefer_cached: bool = True) -> None:
        self.home = Path(home)
        self.installer_choice = installer
        self.prefer_cached = prefer_cached
        self._locks: dict[str, _KeyLock] = {}
        self._locks_guard = threading.Lock()

    @property
    def envs_dir(self) -> Path:
        return self.home / "envs"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    def path_for(self, key: str) -> Path:
        return self.envs_dir / key

    def _prepare(self) -> None:
        for d in (self.home, self.envs_dir, self.locks_dir):
            ensure_private_dir(d)

    def _lock(self, key: str) -> _KeyLock:
        with self._locks_guard:
            if key not in self._locks:
                self._locks[key] = _KeyLock(self.locks_dir / f"{key}.lock")
            return self._locks[key]

    # -- getting an environment -------------------------------------------------------------

    def locked(self, spec: EnvSpec, lock: LockFile, progress: Progress = _quiet) -> EnvSpec:
        """``spec`` built from the exact set ``lock`` holds for it; with no entry yet, resolve it
        here, record the set in ``lock``, and use that."""
        identity = identity_of(spec.requirements, spec.constraints, spec.python)
        entry = lock.find(identity)
        if entry is None:
            packages = self.resolve(spec, progress)
            requirements, constraints, python, platform = identity
            lock.record(LockEntry(requirements, constraints, python, platform, installer=self.installer_name(),
                                  packages=tuple(packages)))
            progress(f"recorded {len(packages)} packages for {describe_requirements(spec.requirements)} "
                     f"in {lock.path}")
            entry = lock.find(identity)
            assert entry is not None
        return spec.with_lock(entry.packages, str(lock.path))

    def installer_name(self) -> str:
        try:
            return pick_installer(self.installer_choice, self.prefer_cached).name
        except (ValueError, FileNotFoundError):
            return self.installer_choice

    def get(self, spec: EnvSpec, progress: Progress = _quiet) -> Env:
        """Return the built environment for ``spec``, building it first if no process has.

        The caller then holds the key's shared lock (so no other process removes the environment
        while this one uses it) until it calls ``release(key)``.
        """
        self._prepare()
        key = spec.key
        path = self.path_for(key)
        lock = self._lock(key)
        if path.exists() and path.stat().st_uid != os.getuid():
            raise FalMagicError(f"refusing to use environment {path}: it belongs to uid {path.stat().st_uid}, "
                                "not to you")
        with lock.mutex:
            if lock.fd is not None and (path / MARKER).exists():
                self._touch(path)
                return Env(key, path, spec.requirements)
            lock.hold(fcntl.LOCK_SH)
            if not (path / MARKER).exists():
                lock.hold(fcntl.LOCK_EX)  # converts; waits while another process builds
                try:
                    if not (path / MARKER).exists():
                        self._build(spec, path, progress)
                except BaseException:
                    lock.drop()
                    raise
                lock.hold(fcntl.LOCK_SH)
            self._touch(path)
            return Env(key, path, spec.requirements)

    def release(self, key: str) -> None:
        """Stop holding ``key``'s shared lock (its environment may be removed again)."""
        lock = self._lock(key)
        with lock.mutex:
            lock.drop()

    def _touch(self, path: Path) -> None:
        try:
            (path / LAST_USED).touch()
        except OSError:
            pass

    def _build(self, spec: EnvSpec, path: Path, progress: Progress) -> None:
        """Build in place under the exclusive lock; on any failure remove everything built."""
        origin = f" from the lock {spec.lock_file}" if spec.locked else ""
        progress(f"building environment {spec.key} ({describe_requirements(spec.requirements)}){origin}")
        if spec.indexes.describe():
            progress("packages from: " + "; ".join(spec.indexes.describe()))
        started = time.perf_counter()
        if path.exists():
            progress("removing the remains of an unfinished build")
            shutil.rmtree(path, ignore_errors=True)
        try:
            installer = pick_installer(self.installer_choice, self.prefer_cached)
        except (ValueError, FileNotFoundError) as exc:
            raise EnvironmentBuildError(str(exc)) from None
        try:
            step = time.perf_counter()
            interpreter = find_python(spec.python)
            self._create_venv(path, interpreter)
            progress(f"created virtualenv in {time.perf_counter() - step:.2f}s")
            step = time.perf_counter()
            python = path / "bin" / "python"
            try:
                self._install(installer, python, spec, progress)
            except InstallFailed as exc:
                message = (self._locked_message if spec.locked else self._install_message)(
                    spec, exc.output, installer.name)
                raise EnvironmentBuildError(message) from None
            progress(f"installed {describe_requirements(spec.requirements)} with {installer.name} "
                     f"in {time.perf_counter() - step:.2f}s")
            step = time.perf_counter()
            linked = link_bytecode(path, self._donors(path), cache_tag(spec.python))
            if linked:
                progress(f"linked the bytecode of {linked} files from other environments "
                         f"in {time.perf_counter() - step:.2f}s")
            meta = {
                "key": spec.key,
                "requirements": [mask_credentials(r) for r in spec.requirements],
                "python": spec.python,
                "cloudpickle": spec.cloudpickle,
                "sources": spec.indexes.describe(),
                "constraints": [mask_credentials(c) for c in spec.constraints],
                "local": {req: pkg.digest for req, pkg in spec.local},
                "installer": installer.name,
                "locked": bool(spec.locked),
                "lock_file": spec.lock_file,
                "created": time.time(),
                "build_seconds": round(time.perf_counter() - started, 3),
            }
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, path / MARKER)
        except OSError as exc:  # the disk, its inodes, a permission: say so first, as fal_magic's error
            shutil.rmtree(path, ignore_errors=True)
            where = f" ({exc.filename})" if exc.filename else ""
            raise EnvironmentBuildError(f"could not build environment {spec.key}: "
                                        f"{(exc.strerror or str(exc)).lower()}{where}") from None
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        progress(f"environment {spec.key} ready in {time.perf_counter() - started:.2f}s")

    @staticmethod
    def _install(installer: Installer, python: Path, spec: EnvSpec, progress: Progress) -> None:
        """Install ``spec`` into ``python``'s environment, with its package sources as options and its
        constraints as a file; a locked spec's exact set as it is (``--no-deps``: nothing resolved)."""
        on_line = lambda line: progress(INSTALLER_LINE + line)  # noqa: E731
        if spec.locked:
            options = [*spec.indexes.installer_args(installer.name), "--no-deps"]
            installer.install(python, spec.locked, on_line, options)
            return
        with _options(installer, spec) as options:
            installer.install(python, spec.install_list, on_line, options)

    def resolve(self, spec: EnvSpec, progress: Progress = _quiet) -> list[str]:
        """The exact distributions ``spec`` gets here today (for a lock file), without building it."""
        try:
            installer = pick_installer(self.installer_choice, self.prefer_cached)
        except (ValueError, FileNotFoundError) as exc:
            raise EnvironmentBuildError(str(exc)) from None
        progress(f"resolving {describe_requirements(spec.requirements)} for the lock file")
        try:
            with _options(installer, spec) as options:
                return installer.resolve(find_python(spec.python), spec.install_list,
                                         lambda line: progress(INSTALLER_LINE + line), options)
        except InstallFailed as exc:
            raise EnvironmentBuildError(self._install_message(spec, exc.output, installer.name)) from None

    def _donors(self, path: Path, limit: int = 3) -> list[Path]:
        """Built environments to share bytecode with, most recently used first."""
        built = []
        for other in self.envs_dir.iterdir():
            if other != path and (other / MARKER).exists():
                try:
                    built.append(((other / LAST_USED).stat().st_mtime, other))
                except OSError:
                    built.append((0.0, other))
        return [p for _, p in sorted(built, reverse=True)[:limit]]

    @staticmethod
    def _create_venv(path: Path, interpreter: Path) -> None:
        from virtualenv import cli_run

        try:
            cli_run([str(path), "--no-seed", "--no-periodic-update", "--quiet", "-p", str(interpreter)],
                    setup_logging=False)
        except (Exception, SystemExit) as exc:
            raise EnvironmentBuildError(f"virtualenv could not create {path}: {exc}") from None
        os.chmod(path, 0o700)

    @staticmethod
    def _install_message(spec: EnvSpec, output: str, installer: str) -> str:
        output = "\n".join(line for line in mask_credentials(output).splitlines()
                           if not line.startswith("Using Python "))  # uv's note of where it installs
        lowered = output.lower()
        if "no space left on device" in lowered:
            return f"could not install the requirements: no space left on device ({installer} said):\n{output}"
        named = [r for r in spec.requirements if any(n in lowered for n in _names(r, dict(spec.local)))]
        culprits = named or list(spec.requirements) or spec.install_list
        return (f"could not install {describe_requirements(repr(c) for c in culprits)} "
                f"({installer} failed):\n{output}")

    @staticmethod
    def _locked_message(spec: EnvSpec, output: str, installer: str) -> str:
        output = mask_credentials(output)
        lowered = output.lower()
        named = [p for p in spec.locked if any(n and n in lowered for n in _locked_names(p))]
        which = describe_requirements(named) if named else "the locked set"
        refresh = " ".join(repr(r) for r in spec.requirements)
        return (f"could not install {which}, locked for {describe_requirements(spec.requirements)} in "
                f"{spec.lock_file} ({installer} failed): a locked version may be gone from the index (yanked) or "
                f"have no files for this platform. Refresh the entry with: python -m fal_magic lock refresh "
                f"{spec.lock_file} {refresh}\n{output}")

    # -- inspecting and pruning ---------------------------------------------------------------

    def records(self) -> list[EnvRecord]:
        """Every environment directory in the cache, built or not, newest use first."""
        if not self.envs_dir.is_dir():
            return []
        out = []
        for path in self.envs_dir.iterdir():
            if not path.is_dir():
                continue
            marker = path / MARKER
            meta: dict[str, Any] = {}
            if marker.exists():
                try:
                    meta = json.loads(marker.read_text())
                except (OSError, ValueError):
                    meta = {}
            last = path / LAST_USED
            out.append(EnvRecord(
                key=path.name,
                path=path,
                requirements=tuple(meta.get("requirements", ())),
                size_bytes=_tree_size(path),
                created=float(meta.get("created", path.stat().st_mtime)),
                last_used=last.stat().st_mtime if last.exists() else path.stat().st_mtime,
                built=bool(meta),
                locked=bool(meta.get("locked")),
            ))
        return sorted(out, key=lambda r: r.last_used, reverse=True)

    def remove(self, key: str) -> None:
        """Delete one environment, unless a process (this one included) is using it."""
        path = self.path_for(key)
        if not path.exists():
            raise FalMagicError(f"no environment with key {key!r} in {self.envs_dir}")
        self._prepare()
        lock = self._lock(key)
        with lock.mutex:
            if lock.fd is not None:
                raise FalMagicError(f"environment {key} is in use by this process; shut its kernels down first")
            fd = lock.hold(fcntl.LOCK_SH)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.drop()
                raise FalMagicError(f"environment {key} is in use by another process (a live kernel or a build)") \
                    from None
            try:
                # the marker goes first, so an interrupted removal never leaves a "built" half
                (path / MARKER).unlink(missing_ok=True)
                shutil.rmtree(path)
            finally:
                lock.drop()

    def prune(self, older_than_days: float = 0.0) -> list[str]:
        """Remove unbuilt leftovers and environments unused for ``older_than_days``; skip busy ones."""
        cutoff = time.time() - older_than_days * 86400
        removed = []
        for rec in self.records():
            if rec.built and rec.last_used > cutoff:
                continue
            try:
                self.remove(rec.key)
            except FalMagicError:
                continue
            removed.append(rec.key)
        return removed


@contextmanager
def _options(installer: Installer, spec: EnvSpec) -> Iterator[list[str]]:
    """The installer options for ``spec``: its package sources, and its constraints as a file."""
    with tempfile.TemporaryDirectory(prefix="fal_magic-build-") as work:
        options = spec.indexes.installer_args(installer.name)
        if spec.constraints:
            constraints = Path(work) / "constraints.txt"
            constraints.write_text("\n".join(spec.constraints) + "\n")
            options += ["-c", str(constraints)]
        yield options


def cache_tag(python: str) -> str:
    """``cpython-3.12`` -> ``cpython-312``, the tag of that Python's ``.pyc`` files."""
    name, _, version = python.partition("-")
    return f"{name}-{version.replace('.', '')}"


def _locked_names(package: str) -> tuple[str, ...]:
    """The names an installer's message may use for a locked ``name==version`` (lowercase)."""
    try:
        return _names(package, {})
    except ValueError:  # an editable path
        return ()


def _names(requirement: str, local: dict[str, LocalPackage]) -> tuple[str, ...]:
    """The names an installer's message may use for ``requirement`` (lowercase)."""
    if requirement in local:
        return (local[requirement].path.name.lower(),)
    name = Requirement(requirement).name
    return canonicalize_name(name), name.lower()


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
