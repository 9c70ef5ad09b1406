"""KernelPool: the warm kernels of this process, by requirements key, and their idle culler.

A call leases an idle kernel of its key (starting one when all are busy and the key has fewer than
``max_kernels``), runs, and gives it back with a deadline of ``max(deadline, now + keep_alive)``.
The culler thread sleeps until the next deadline and shuts down idle kernels whose deadline has
passed; a busy kernel is never culled. Every kernel is shut down at interpreter exit; a kernel
whose host is killed exits by itself (ipykernel polls its parent, JPY_PARENT_PID).
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Collection, Iterator, Mapping

from ..config import FalMagic, settings
from ..envs import EnvCache, EnvSpec, spec_for
from ..envs.indexes import own_settings, site_settings
from ..envs.lockfile import LockFile
from ..masking import mask_credentials
from ..errors import FalMagicError, KernelStartError
from ..leftovers import remove_orphaned
from ..notebook_file import lock_path
from ..outputs import OutputSink
from ..platforms import after_fork_in_child, require_local_kernels
from . import forked
from .contract import Frames, Kernel, NestedHandler, NotStartedError, Progress, Reply, slot_name
from .local import LocalKernel
from .registry import Lease, Registry, pid_alive, wait_gone
from .remote import RemoteKernel, ServerClient, check_url
from ..progress import log_progress
from .by_source import HOST_REF, dump_by_source, travelled
from .wire import describe_exception, dump_call, dumps, loads, shipped_code

log = logging.getLogger("fal_magic")

#: How deep isolated calls may nest inside each other before it is called a runaway recursion.
MAX_NESTING = 8


@dataclass(frozen=True)
class KernelInfo:
    """A snapshot of one warm kernel, for the kernel list (never a live handle)."""

    key: str
    kernel_id: str
    requirements: tuple[str, ...]
    pid: int | None
    state: str
    calls: int
    started_at: float
    last_used: float
    deadline: float
    machine_type: str | None = None
    #: The Jupyter Server the kernel runs on (None: this machine), and the cluster host it placed it on.
    host: str | None = None
    node: str | None = None
    #: The process that holds its lease (a user's pool: any process of the user's), if one does.
    holder: int | None = None

    @property
    def seconds_left(self) -> float | None:
        """Seconds until the culler may shut it down; None while it is busy or starting."""
        if self.state != "idle":
            return None
        return max(0.0, self.deadline - time.time())

    @property
    def rss_bytes(self) -> int | None:
        """The kernel process's resident memory now (Linux), or None where it cannot be read (remote)."""
        if self.pid is None or self.host is not None:
            return None
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


def _check_remote_spec(spec: EnvSpec, url: str) -> None:
    """Refuse what a Jupyter Server cannot honour: paths on this machine, and package sources or
    constraints from a requirements file (the server builds with its own pip and uv configuration)."""
    if spec.local:
        raise FalMagicError(f"local packages ({', '.join(req for req, _ in spec.local)}) are on this machine; the "
                            f"Jupyter Server at {url} cannot install them: publish them to an index it can reach")
    if not spec.same_python:
        raise FalMagicError(f"the Jupyter Server at {url} runs kernels on its own Python; python_version "
                            f"({spec.python}) is for kernels on this machine")
    if not spec.indexes.is_default or spec.constraints:
        raise FalMagicError(f"the Jupyter Server at {url} builds environments from its own package index settings; "
                            "index options and constraints (-c) of a requirements file apply to kernels on this "
                            "machine only")


class KernelPool:
    """Warm kernels by key; thread-safe. ``lease`` (and ``call``, a lease around one call) is the one
    client path to a kernel, for the decorator and the magics alike."""

    def __init__(self, config: FalMagic | None = None) -> None:
        self._config = config
        self._owner = os.getpid()  # a forked child must never touch this process's kernels
        self._kernels: dict[str, list[Kernel]] = {}  # by slot: the key, plus the host if remote
        self._caches: dict[Path, EnvCache] = {}
        self._lock_files: dict[Path, LockFile] = {}  # (each caches its entries until the file changes)
        self._cond = threading.Condition()
        self._culler: threading.Thread | None = None
        self._closed = False
        self._lost_namespaces: dict[str, str] = {}  # slots whose kernel with cell state is gone: how
        self._runtime_dir: Path | None = None
        self._shm_dir: Path | None = None
        self._registries: dict[tuple[str, str | None], Registry] = {}  # by the home's setting and variable

    @property
    def config(self) -> FalMagic:
        return self._config or settings()

    # -- plumbing ----------------------------------------------------------------------

    def _cache(self) -> EnvCache:
        home = self.config.home_path()
        cache = self._caches.get(home)
        cfg = self.config
        if cache is None or (cache.installer_choice, cache.prefer_cached) != (cfg.installer, cfg.prefer_cached):
            cache = self._caches[home] = EnvCache(home, cfg.installer, cfg.prefer_cached)
        return cache

    def _lock_file(self) -> LockFile | None:
        """The lock file environments built here follow (``FalMagic.lock``), if one is set."""
        path = lock_path(self.config.lock)
        if path is None:
            return None
        with self._cond:
            return self._lock_files.setdefault(path, LockFile(path))

    def registry(self) -> Registry | None:
        """The user's pool under the home (``kernel_scope="user"``), else None (kernels of this process)."""
        config = self.config
        if config.kernel_scope != "user":
            return None
        where = (config.home, os.environ.get("FAL_MAGIC_HOME"))
        registry = self._registries.get(where)
        if registry is None:
            registry = self._registries[where] = Registry(config.home_path())
        return registry

    def _user_dirs(self, registry: Registry) -> tuple[Path, Path | None]:
        """The user's runtime and shared-memory directories for ``registry``'s kernels."""
        return registry.runtime_dir(_runtime_root()), registry.shm_dir()

    def runtime_dir(self) -> Path:
        """This process's owner-only directory for connection files and IPC sockets (a short path,
        as unix socket paths are limited), named by pid so that leftovers of killed hosts are found.
        Its sibling in shared memory (``shm_dir``) is made at the same time."""
        with self._cond:
            if self._runtime_dir is None:
                _remove_stale_runtime_dirs()
                prefix = f"{RUNTIME_PREFIX}{os.getpid()}-"
                self._runtime_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=_runtime_root()))
                if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK):
                    self._shm_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=SHM_ROOT))
            return self._runtime_dir

    def _ensure_culler(self) -> None:
        if self._culler is None or not self._culler.is_alive():
            self._culler = threading.Thread(target=self._cull_loop, name="fal_magic-culler", daemon=True)
            self._culler.start()

    # -- leasing ----------------------------------------------------------------------

    def host_url(self, host: str | None) -> str | None:
        """Where kernels run: ``host``, else the configured host; None (or "") is this machine."""
        host = self.config.host if host is None else host
        return check_url(host, self.config.allow_plain_http) if host else None

    def acquire(self, spec: EnvSpec, max_kernels: int = 1, progress: Progress = log_progress,
                machine_type: str | None = None, host: str | None = None, *,
                env: Mapping[str, str] | None = None, waiting: Collection[str] = ()) -> Kernel:
        """Lease an idle kernel of ``spec``'s key (on ``host``, see ``host_url``) whose environment
        variables are ``env`` (over ``FalMagic.kernel_env``), starting one if all are busy and there
        is room. ``waiting``: the ids of kernels whose calls wait for this lease (a nested call's
        outer calls); when every kernel it could use is one of them, waiting would never end."""
        if max_kernels < 1:
            raise FalMagicError(f"max_kernels must be at least 1, not {max_kernels}")
        url = self.host_url(host)
        variables = {**self.config.kernel_env, **(env or {})}
        if variables and url is not None:
            raise FalMagicError(
                f"environment variables ({', '.join(sorted(variables))}) cannot be given to a kernel on the "
                f"Jupyter Server at {url}: its kernels API takes none, and writing them into a kernelspec "
                "would leave them on the server's disk; set them on the server instead")
        if url is None:
            require_local_kernels()
            cfg = self.config
            spec = spec.resolved(site_settings(own_settings(cfg.index_url, cfg.extra_index_urls, cfg.find_links)))
            lock = self._lock_file()
            if lock is not None:
                spec = self._cache().locked(spec, lock, progress)
        else:
            _check_remote_spec(spec, url)
        registry = self.registry() if url is None else None
        tag = _env_tag(variables, registry.tag_key() if registry is not None else _ENV_TAG_KEY)
        key = slot_name(spec.key, url, tag, machine_type)
        if registry is not None:
            shared, new = self._lease_shared(registry, spec, key, max_kernels, machine_type, variables, tag, waiting)
            if not new:
                return shared
            return self._start(shared, spec, progress)
        with self._cond:
            if self._closed:
                raise FalMagicError("fal_magic is shutting down")
            self._ensure_culler()
            while True:
                kernels = self._kernels.setdefault(key, [])
                for k in kernels:
                    if k.state == "idle":
                        if not k.is_alive():  # crashed while idle: replace it
                            k.state = "dead"
                            self._forget(k)
                            threading.Thread(target=k.shutdown, kwargs={"now": True}, daemon=True).start()
                            break
                        k.state = "busy"
                        return k
                else:
                    if len(kernels) >= max_kernels and all(k.id in waiting for k in kernels):
                        raise _cycle(spec, max_kernels)
                    if len(kernels) < max_kernels:
                        kernel = self._new_kernel(spec, url, variables)
                        kernel.machine_type, kernel.env_tag = machine_type, tag
                        kernel.plain = not spec.same_python  # its results cross to this Python as source
                        kernels.append(kernel)
                        break
                    self._cond.wait()
        return self._start(kernel, spec, progress)

    def _start(self, kernel: Kernel, spec: EnvSpec, progress: Progress) -> Kernel:
        """Start a kernel the pool has just added (busy for its caller); on failure, nothing is left."""
        try:
            kernel.start(spec, progress, self.config.kernel_start_timeout)
            if isinstance(kernel, LocalKernel) and kernel.registry is not None:  # now with its pid
                kernel.registry.register(kernel.entry(), deadline=time.time())
        except BaseException:
            with self._cond:
                self._forget(kernel)
            kernel.shutdown(now=True)
            raise
        with self._cond:
            kernel.state = "busy"
            stopped = self._closed or kernel.kill_reason is not None
            if stopped:
                self._forget(kernel)
        if stopped:
            kernel.shutdown(now=True)
            raise KernelStartError("the new kernel was shut down before its first call")
        return kernel

    def _lease_shared(self, registry: Registry, spec: EnvSpec, slot: str, max_kernels: int,
                      machine_type: str | None, variables: Mapping[str, str], tag: str,
                      waiting: Collection[str]) -> tuple[LocalKernel, bool]:
        """A kernel of the user's pool for ``slot``, leased: one of this process's that no process
        holds, or another process's (attached to), or a new one registered here (``True``: to start).
        ``max_kernels`` counts the slot's kernels of every process; with all of them busy, wait."""
        while True:
            with self._cond:
                if self._closed:
                    raise FalMagicError("fal_magic is shutting down")
                self._ensure_culler()
                for k in list(self._kernels.get(slot, [])):
                    if k.state != "idle" or not isinstance(k, LocalKernel) or k.lease is None:
                        continue
                    if not k.is_alive():  # ended at its deadline, or stopped from elsewhere
                        self._let_go(k)
                        continue
                    if k.lease.take():
                        k.state = "busy"
                        return k, False
                here = {k.id for ks in self._kernels.values() for k in ks}
            with registry.slot_lock(slot):
                live = []
                for entry in registry.entries():
                    if entry.slot != slot:
                        continue
                    if entry.pid and not pid_alive(entry.pid):  # it crashed: its entry is stale
                        registry.remove(entry.id)
                        continue
                    live.append(entry)
                for entry in live:
                    if entry.id in here or not entry.pid:
                        continue
                    lease = Lease(registry.lease_path(entry.id))
                    if not lease.take():
                        lease.close()
                        continue
                    try:
                        kernel = LocalKernel.attach(entry, registry, self._cache(), *self._user_dirs(registry),
                                                    timeout=self.config.kernel_start_timeout)
                    except Exception as exc:
                        log.warning("could not attach to kernel %s of the pool: %s", entry.id, exc)
                        lease.close()
                        continue
                    kernel.lease = lease
                    kernel.plain = not spec.same_python
                    with self._cond:
                        self._kernels.setdefault(slot, []).append(kernel)
                    return kernel, False
                if len(live) >= max_kernels and all(e.id in waiting for e in live):
                    raise _cycle(spec, max_kernels)
                if len(live) < max_kernels:
                    runtime_dir, shm_dir = self._user_dirs(registry)
                    kernel = LocalKernel(spec.key, spec.requirements, self._cache(), runtime_dir, shm_dir, variables,
                                         fork=self.config.fork_kernels, registry=registry)
                    kernel.machine_type, kernel.env_tag = machine_type, tag
                    kernel.plain = not spec.same_python
                    kernel.lease = Lease(registry.lease_path(kernel.id))
                    kernel.lease.take()
                    registry.register(kernel.entry(), deadline=time.time())  # (pid 0: starting; leased)
                    with self._cond:
                        self._kernels.setdefault(slot, []).append(kernel)
                    return kernel, True
            with self._cond:
                self._cond.wait(0.05)  # (another process's kernel may become free: look again)

    def _let_go(self, kernel: LocalKernel) -> None:
        """Drop a kernel of the user's pool from this process (lock held): its sockets close, the
        kernel itself is not touched (it ended, or lives on)."""
        assert kernel.registry is not None
        ended = not kernel.registry.entry_path(kernel.id).exists()  # at its deadline, or stopped: not a crash
        kernel.state = "stopping" if ended else "dead"
        self._forget(kernel)
        threading.Thread(target=kernel.detach, daemon=True).start()

    def _new_kernel(self, spec: EnvSpec, url: str | None, env: Mapping[str, str]) -> Kernel:
        """A kernel of the kind that runs where ``url`` says: this machine (None) or a Jupyter Server."""
        if url is None:
            return LocalKernel(spec.key, spec.requirements, self._cache(), self.runtime_dir(), self._shm_dir, env,
                               fork=self.config.fork_kernels)
        return RemoteKernel(spec.key, spec.requirements, ServerClient(url, self.config.resolved_token()))

    def release(self, kernel: Kernel, keep_alive: float) -> None:
        """Give a leased kernel back; it stays warm until the latest deadline any call promised it.
        (A death during the call marked it dead; one after it is found by the next ``acquire``.)"""
        with self._cond:
            if kernel.state == "dead":
                self._forget(kernel)
                shutdown = True
            else:
                kernel.deadline = max(kernel.deadline, time.time() + keep_alive)
                kernel.state = "idle"
                shutdown = False
                if isinstance(kernel, LocalKernel) and kernel.registry is not None and kernel.lease is not None:
                    kernel.deadline = max(kernel.deadline, kernel.registry.deadline(kernel.id))  # (others' promises)
                    if kernel.deadline <= time.time():  # keep_alive=0, and no one promised more: ends now
                        kernel.state = "stopping"
                        self._forget(kernel)
                        shutdown = True
                    else:
                        kernel.registry.set_deadline(kernel.id, kernel.deadline)
                        kernel.lease.give_back()  # any process of the user's may lease it now
            self._cond.notify_all()
        if shutdown:
            kernel.shutdown(now=True)

    def _forget(self, kernel: Kernel, asked: bool = False) -> None:
        """Drop a kernel from the table (lock held); release the env's lock when its key has none left.
        A kernel with cell state that goes without being asked to (culled, died) is remembered, so
        that the next cell of its key can say its variables are gone."""
        kernels = self._kernels.get(kernel.slot, [])
        if kernel in kernels:
            kernels.remove(kernel)
            for callback in kernel.on_forget:
                callback()
            if kernel.cells and not asked and kernel.kill_reason is None:
                self._lost_namespaces[kernel.slot] = "died" if kernel.state == "dead" else "was shut down"
        if not kernels and self._kernels.pop(kernel.slot, None) is not None:
            kernel.release_slot()
        self._cond.notify_all()

    def namespace_lost(self, kernel: Kernel) -> str | None:
        """What became of the earlier kernel of ``kernel``'s slot ("died", "was shut down"), if
        ``kernel`` is new and that one held cell state (said once per loss); else None."""
        with self._cond:
            if kernel.calls:
                return None
            return self._lost_namespaces.pop(kernel.slot, None)

    @contextmanager
    def lease(self, spec: EnvSpec, keep_alive: float, max_kernels: int = 1, progress: Progress = log_progress,
              machine_type: str | None = None, host: str | None = None, *,
              env: Mapping[str, str] | None = None, waiting: Collection[str] = ()) -> Iterator[Kernel]:
        """``with pool.lease(spec, keep_alive) as kernel:`` — acquire, then release (or drop if it died)."""
        kernel = self.acquire(spec, max_kernels, progress, machine_type, host, env=env, waiting=waiting)
        if isinstance(kernel, LocalKernel) and kernel.registry is not None:
            # promised from the call's start: a caller that dies mid-call leaves the kernel warm that long
            kernel.registry.set_deadline(kernel.id, max(kernel.registry.deadline(kernel.id), time.time() + keep_alive))
        try:
            yield kernel
        finally:
            self.release(kernel, keep_alive)

    # -- the client path shared by the decorator and the magics (they lease, then call/execute) --

    def call(self, spec: EnvSpec, frames: Frames, sink: OutputSink, *, keep_alive: float,
             max_kernels: int = 1, progress: Progress = log_progress, machine_type: str | None = None,
             chain: tuple[str, ...] = (), host: str | None = None, env: Mapping[str, str] | None = None) -> Reply:
        """Run a pickled call on a warm kernel of ``spec``'s key.

        A kernel found dead before it began the call (it crashed while idle) is replaced once.
        Isolated functions that the call itself calls are run by this host, each in its own
        environment (``chain`` holds the ids of the kernels whose calls it is nested in).
        """
        def once() -> Reply:
            with self.lease(spec, keep_alive, max_kernels, progress, machine_type, host, env=env,
                            waiting=chain) as kernel:
                reply = kernel.call(frames, sink, self.config.interrupt_grace, self._nested_calls((*chain, kernel.id)))
                reply.kernel_id = kernel.id
                return reply

        try:
            return once()
        except NotStartedError:
            return once()

    @contextmanager
    def lease_by_id(self, kernel_id: str) -> Iterator[Kernel | None]:
        """Lease the kernel ``kernel_id`` itself once it is idle (None if it is gone), keeping its deadline."""
        with self._cond:
            while True:
                found = next((k for ks in self._kernels.values() for k in ks if k.id == kernel_id), None)
                if found is not None and found.state == "idle" and _shared(found) and not found.is_alive():
                    self._let_go(found)  # type: ignore[arg-type]
                    found = None
                if found is None:
                    break
                if found.state == "idle" and (not _shared(found) or found.lease.take()):  # type: ignore[attr-defined]
                    break  # (a kernel of the user's pool: leased from every other process too)
                if found.state in ("dead", "stopping"):
                    found = None
                    break
                self._cond.wait(0.05 if _shared(found) else None)
            if found is not None:
                found.state = "busy"
        if found is None:
            yield None
            return
        try:
            yield found
        finally:
            self.release(found, 0.0)

    def _nested_calls(self, chain: tuple[str, ...]) -> NestedHandler:
        """Serve isolated calls made inside a call: the host brokers them, so kernels never start kernels."""

        def handle(frames: Frames, sink: OutputSink) -> tuple[bytes, Frames]:
            try:
                options, fn, args, kwargs = loads(frames)
                if fn is None:  # a proxy from a kernel on another Python: the function is ours, by reference
                    fn = travelled(options[HOST_REF]).func
                spec = spec_for(options.get("requirements", ()), options.get("indexes"), options.get("constraints", ()),
                                options.get("python_version"))
                name = getattr(fn, "__qualname__", "?")
                if len(chain) >= MAX_NESTING:
                    raise FalMagicError(f"isolated calls nested more than {MAX_NESTING} deep (at {name}())")
                keep_alive = options.get("keep_alive")
                call = (dump_call(fn, args, kwargs) if spec.same_python
                        else dump_by_source(fn, args, kwargs, shipped_code(fn)))
                reply = self.call(spec, call, sink,
                                  keep_alive=self.config.default_keep_alive if keep_alive is None else keep_alive,
                                  max_kernels=options.get("max_kernels", 1),
                                  machine_type=options.get("machine_type"), chain=chain,
                                  host=options.get("host"), env=options.get("env"))
            except BaseException as exc:
                return b"exception", dumps(describe_exception(exc))
            if reply.content.get("ok"):
                return b"ok", reply.buffers
            if reply.content.get("kind") == "serialization":
                return b"error", [reply.content.get("message", "").encode()]
            return b"exception", reply.buffers

        return handle

    # -- culling and shutdown --------------------------------------------------------------

    def _cull_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.time()
                for k in [k for ks in self._kernels.values() for k in ks if _shared(k) and k.state == "idle"]:
                    if not k.is_alive():  # a kernel of the user's pool ends itself: let go of it
                        self._let_go(k)  # type: ignore[arg-type]
                expired = [k for ks in self._kernels.values() for k in ks
                           if k.state == "idle" and k.deadline <= now and not _shared(k)]
                for k in expired:
                    k.state = "stopping"
                    self._forget(k)
                if not expired:
                    forked.retire_idle(self.config.template_keep_alive)
                    deadlines = [k.deadline for ks in self._kernels.values() for k in ks
                                 if k.state == "idle" and not _shared(k)]
                    wait = self.config.culler_interval
                    if deadlines:
                        wait = min(wait, max(0.0, min(deadlines) - now))
                    self._cond.wait(timeout=max(wait, 0.005))
                    continue
            log.debug("culling kernels %s", ", ".join(k.id for k in expired))
            _shut_down_all(expired)  # at once: kernels that expire together end together

    def shutdown(self, keys: list[str] | None = None, kernel_ids: list[str] | None = None,
                 pool: bool = True) -> list[str]:
        """Shut down kernels now, in parallel, and return their ids: those of ``keys`` (key prefixes),
        or the ones named by ``kernel_ids``, or all when both are None; with ``pool``, those of the
        user's pool that other processes hold too. A busy one's call fails."""
        with self._cond:
            victims = []
            for key, ks in list(self._kernels.items()):
                for k in ks:
                    if kernel_ids is not None:
                        if k.id in kernel_ids:
                            victims.append(k)
                    elif keys is None or any(key.startswith(p) for p in keys):
                        victims.append(k)
            idle = [k for k in victims if k.state == "idle"]
            for k in idle:
                k.state = "stopping"
                self._forget(k, asked=True)
        for k in victims:
            if k not in idle:  # busy or starting: its caller's thread owns the client; kill, and let it report
                k.kill("it was shut down while this call ran")
        _shut_down_all(idle)
        others = self._shut_down_others(keys, kernel_ids, {k.id for k in victims}) if pool else []
        return [k.id for k in victims] + others

    def _shut_down_others(self, keys: list[str] | None, kernel_ids: list[str] | None, done: set[str]) -> list[str]:
        """Stop the kernels of the user's pool that other processes started (or left): their entries
        go (the kernel ends itself on seeing that), then whatever still runs is killed."""
        registry = self.registry()
        if registry is None:
            return []
        ended = []
        for entry in registry.entries():
            unnamed = kernel_ids is not None and entry.id not in kernel_ids
            unkeyed = kernel_ids is None and keys is not None and not any(entry.key.startswith(p) for p in keys)
            if entry.id in done or unnamed or unkeyed:
                continue
            registry.remove(entry.id)
            ended.append(entry)
        for entry in ended:
            if entry.pid and not wait_gone(entry.pid, 2.0):
                try:
                    os.killpg(entry.pid, signal.SIGKILL)
                except OSError:
                    pass
                wait_gone(entry.pid, 2.0)
        return [e.id for e in ended]

    def close(self) -> None:
        """Shut every kernel down and remove the runtime directory (at interpreter exit). In a forked
        child, whose atexit inherited this call, nothing: the kernels and files are the parent's."""
        if os.getpid() != self._owner:
            return
        if self.config.kernel_scope == "user":  # the user's pool outlives this process: let go, end nothing
            with self._cond:
                shared = [k for ks in self._kernels.values() for k in ks if _shared(k)]
                for k in shared:
                    self._forget(k)
            for k in shared:
                k.detach()  # type: ignore[attr-defined]
        self.shutdown(pool=False)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            dirs = (self._runtime_dir, self._shm_dir)
            self._runtime_dir = self._shm_dir = None
        if self._culler is not None:  # it may be shutting down expired kernels (keep_alive=0): let it end
            self._culler.join(timeout=15)
        forked.stop_all()
        _close_idle_event_loop()
        for path in dirs:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    def snapshot(self) -> list[KernelInfo]:
        """The live kernels as plain records, oldest first: this process's, and every kernel of the
        user's pool (``kernel_scope="user"``), whichever process holds it."""
        with self._cond:
            infos = [
                KernelInfo(key=k.key, kernel_id=k.id, requirements=tuple(mask_credentials(r) for r in k.requirements),
                           pid=k.pid, state=k.state,
                           calls=k.calls, started_at=k.started_at, last_used=k.last_used, deadline=k.deadline,
                           machine_type=k.machine_type,
                           host=k.host, node=k.node, holder=os.getpid() if k.state == "busy" else None)
                for ks in self._kernels.values() for k in ks
                if not (_shared(k) and k.state == "idle" and not k.is_alive())  # (ended at its deadline)
            ]
        registry = self.registry()
        if registry is None:
            return infos
        known = {i.kernel_id: i for i in infos}
        holders = registry.holders()
        for entry in registry.entries():
            if entry.pid and not pid_alive(entry.pid):
                continue
            holder = holders.get(entry.id)
            state = "starting" if not entry.pid else "busy" if holder is not None else "idle"
            mine = known.get(entry.id)
            info = KernelInfo(key=entry.key, kernel_id=entry.id,
                              requirements=tuple(mask_credentials(r) for r in entry.requirements),
                              pid=entry.pid or None, state=state, calls=mine.calls if mine else 0,
                              started_at=entry.started_at, deadline=entry.deadline,
                              last_used=mine.last_used if mine else entry.started_at,
                              machine_type=entry.machine_type, holder=holder)
            if mine is not None:
                infos[infos.index(mine)] = info
            else:
                infos.append(info)
        return sorted(infos, key=lambda i: i.started_at)


#: Keys the tags of kernels' environment variables: a tag tells kernels apart, and since it is keyed
#: with a secret of this process, it says nothing about the values (which may be secrets).
_ENV_TAG_KEY = os.urandom(32)


def _env_tag(variables: Mapping[str, str], key: bytes) -> str:
    if not variables:
        return ""
    blob = json.dumps(sorted(variables.items())).encode()
    return hmac.new(key, blob, hashlib.sha256).hexdigest()[:12]


def _close_idle_event_loop() -> None:
    """Close the asyncio loop that jupyter_core made for this thread to drive kernels synchronously
    (its epoll instance and wake-up sockets), when the thread is done with kernels: left open, it
    holds three descriptors until it is garbage-collected, in any order at interpreter exit."""
    try:
        from jupyter_core.utils import _loop
    except ImportError:
        return
    loop = _loop.get()
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()
        _loop.set(None)


def _shut_down_in_thread(kernel: Kernel) -> None:
    """A shutdown thread's work; the event loop jupyter_core made for the thread dies with it."""
    try:
        kernel.shutdown()
    finally:
        _close_idle_event_loop()


def _shut_down_all(kernels: list[Kernel]) -> None:
    """Shut kernels down in parallel, one thread each, and wait for them (bounded)."""
    threads = []
    for index, kernel in enumerate(kernels):
        thread = threading.Thread(target=_shut_down_in_thread, args=(kernel,), name=f"fal_magic-shutdown-{kernel.id}",
                                  daemon=True)
        try:
            thread.start()
        except RuntimeError:
            # Python 3.12+ refuses new threads once the interpreter is shutting down, which is when
            # atexit runs close(): the remaining kernels are then shut down here, one after another.
            for rest in kernels[index:]:
                rest.shutdown()
            break
        threads.append(thread)
    for thread in threads:
        thread.join(timeout=10)


RUNTIME_PREFIX = "fal_magic-"

#: Where large buffers cross between host and kernel (tmpfs); without it they go through sockets.
SHM_ROOT = "/dev/shm"


#: The longest socket name a runtime directory holds (``kernel-<id>-broker``, with its slash), and the
#: longest unix socket path there is (sun_path: 108 bytes on Linux, 104 on macOS, with its NUL).
_SOCKET_NAME = len("/kernel-0123456789ab-broker")
_MAX_SOCKET_PATH = 103
_FALLBACK_ROOT = "/tmp"


def _runtime_root() -> str:
    """Where runtime directories go: the temporary directory, unless its path is too long for the
    sockets inside (a long ``$TMPDIR``; macOS's is ~50 characters), then /tmp."""
    longest_dir = len(RUNTIME_PREFIX) + len(str(2**22)) + 1 + 8  # mkdtemp: prefix, pid, '-', 8 random
    for root in dict.fromkeys((tempfile.gettempdir(), _FALLBACK_ROOT)):
        fits = len(root) + 1 + longest_dir + _SOCKET_NAME <= _MAX_SOCKET_PATH
        if fits and os.path.isdir(root) and os.access(root, os.W_OK | os.X_OK):
            return root
    raise KernelStartError(
        f"the temporary directory {tempfile.gettempdir()!r} is too long for the kernels' unix sockets "
        f"(at most {_MAX_SOCKET_PATH} characters each) and {_FALLBACK_ROOT} cannot be used: set TMPDIR "
        "to a short directory")


def _remove_stale_runtime_dirs() -> None:
    """Delete runtime (and shared-memory) directories of ours whose process is gone (a killed host)."""
    found = [path for root in dict.fromkeys((tempfile.gettempdir(), _FALLBACK_ROOT)) if os.path.isdir(root)
             for path in Path(root).glob(f"{RUNTIME_PREFIX}*-*")]
    if os.path.isdir(SHM_ROOT):
        found += Path(SHM_ROOT).glob(f"{RUNTIME_PREFIX}*-*")
    remove_orphaned(found, RUNTIME_PREFIX)


_pool: KernelPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> KernelPool:
    """The process-wide pool, created on first use and closed at interpreter exit."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._closed:
            _pool = KernelPool()
            atexit.register(_pool.close)
        return _pool


def _after_fork_in_child() -> None:
    """A forked child (``os.fork``, a ``fork`` multiprocessing pool) starts with no pool: its parent's
    kernels, sockets and runtime directory stay the parent's; an isolated call in the child starts
    kernels of its own. The lock is new too: another thread may have held it at the fork."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


after_fork_in_child(_after_fork_in_child)


def _shared(kernel: Kernel) -> bool:
    """Whether ``kernel`` belongs to the user's pool (it keeps its own deadline), not to this process."""
    return isinstance(kernel, LocalKernel) and kernel.registry is not None


def _cycle(spec: EnvSpec, max_kernels: int) -> FalMagicError:
    """The error of a nested call that would wait for ever: every kernel it could use waits for it."""
    return FalMagicError(f"a nested isolated call would wait for environment {spec.key}, whose every kernel "
                         f"(max_kernels={max_kernels}) is busy with a call that waits for it (a cycle); "
                         "a larger max_kernels lets it start another")
