"""LocalKernel: one ipykernel on this machine, on an environment's Python, driven through jupyter_client.

It starts the kernel over the IPC transport and sends the runtime in. Its transport for the request
loop (``request.serve``) polls the kernel's iopub and shell sockets, the runtime's fast channel (calls
without the Jupyter shell round) and the broker socket on which the running function asks for nested
isolated calls; liveness is read from the child process.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path
from queue import Empty
from collections.abc import Callable, Mapping
from typing import Any

import zmq
from fal_magic_inside import forkserver, lifetime, shm
from fal_magic_inside.broker import BROKER_ENV
from fal_magic_inside.channel import BEGUN_ENV, BEGUN_SIZE, FAST_ENV, begun_mark
from fal_magic_inside.frames import sign
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from ..envs import EnvCache, EnvSpec
from ..errors import FalMagicError, KernelDiedError, KernelStartError
from ..outputs import OutputSink
from ..platforms import after_fork_in_child
from .contract import Frames, Kernel, Message, NestedHandler, Progress, Reply
from .protocol import (LIVENESS_PERIOD, bootstrap_from, check_hello, comm_open, is_hello, kernel_argv, kernel_env,
                       msg_counter, write_runtime)
from .registry import Entry, Lease, Registry, not_a_zombie, pid_alive, wait_gone
from .request import serve

try:
    import resource
except ImportError:  # Windows: no kernels on this machine (see platforms.py)
    pass

_context: zmq.Context | None = None
_context_pid = 0


def zmq_context() -> zmq.Context:
    """One zmq context for every kernel's sockets of this process. Its sockets do not linger: a request
    left unsent to a kernel that died must not block closing them (term() would wait forever). A
    forked child gets a context of its own: a zmq context does not survive a fork. A socket retries a
    connection to a kernel not yet listening every 10 ms (zmq's default, 100 ms, delayed every start)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.Context()
        _context.setsockopt(zmq.LINGER, 0)
        _context.setsockopt(zmq.RECONNECT_IVL, 10)
        _context_pid = os.getpid()
    return _context


#: This process's name in the kernels of the user's pool (its ``%%isolated`` namespace there); a
#: restarted notebook is a new process, with a new name and so a fresh namespace.
HOST_SESSION = uuid.uuid4().hex


def _new_host_session() -> None:
    """A forked child is another process: a namespace of its own in the pool's kernels."""
    global HOST_SESSION
    HOST_SESSION = uuid.uuid4().hex


after_fork_in_child(_new_host_session)

#: The kernel provisioner (an entry point of fal_magic's) that forks kernels from a template.
TEMPLATE_PROVISIONER = "fal-magic-template-provisioner"


class _EnvKernelSpecs(KernelSpecManager):
    """Kernel specs made on the fly for one environment: its Python, run directly (no wrapper), so
    ipykernel's parent polling sees its real parent (the host, or the environment's template when
    ``fork``: see kernel/forked.py)."""

    def __init__(self, python: Path, fork: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.python = python
        self.fork = fork

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            name=kernel_name,
            display_name=f"fal_magic {kernel_name}",
            language="python",
            interrupt_mode="signal",
            argv=kernel_argv(str(self.python)),
            metadata={"kernel_provisioner": {"provisioner_name": TEMPLATE_PROVISIONER}} if self.fork else {},
        )


#: File descriptors a local kernel costs the host (sockets, their signalling pipes, the child's), with room.
DESCRIPTORS_PER_KERNEL = 16


def ensure_descriptors(needed: int) -> None:
    """Make sure this process can open ``needed`` more file descriptors: raise the soft limit towards
    the hard one if it must, else KernelStartError saying how to raise it. (libzmq aborts the whole
    process when it runs out, so this is checked before a kernel starts, not after.)"""
    try:
        in_use = len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))
    except OSError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = in_use + needed
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return
    target = wanted * 2 if hard == resource.RLIM_INFINITY else min(hard, max(wanted * 2, 4096))
    if target >= wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            pass
    raise KernelStartError(
        f"another kernel needs about {needed} more open files, and this process has {in_use} open of its "
        f"limit of {soft} (hard limit {hard}): shut idle kernels down (fal_magic.shutdown()), or raise the "
        "limit before starting Python (e.g. 'ulimit -n 4096')")


def _broken_env_hint(key: str) -> str:
    return (f"If the environment is broken (a package or its Python removed), remove it with "
            f"'python -m fal_magic envs rm {key}' and call again to rebuild it.")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


class LocalKernel(Kernel):
    """One kernel process on this machine and its client: a child of the host, or, in a user's pool
    (``registry``), a kernel any process of the user may lease, which this one started or attached to."""

    def __init__(self, key: str, requirements: tuple[str, ...], cache: EnvCache, runtime_dir: Path,
                 shm_dir: Path | None = None, env: Mapping[str, str] | None = None, fork: bool = True,
                 registry: Registry | None = None) -> None:
        super().__init__(key, requirements)
        self.registry = registry
        self.lease: Lease | None = None  # (a user's pool) held while this process serves a call in it
        self.attached = False  # (a user's pool) started by another process: no KernelManager here
        self.cache = cache
        self.python: str | None = None  # the environment's (cpython-3.12), once started
        self.fork = fork  # forked from the environment's template (else launched as a new process)
        self.env = dict(env or {})  # the caller's variables for this kernel (never shown)
        self.runtime_dir = runtime_dir
        self.shm_dir = shm_dir
        self.log_path = runtime_dir / f"kernel-{self.id}.log"
        self.begun_path = runtime_dir / f"kernel-{self.id}-begun"  # the fast channel's mark of a call begun
        self.broker: Any = None
        self.fast: Any = None
        self.arena: shm.Arena | None = None
        self._results: dict[str, Any] = {}  # the kernel's segments that results here are built on
        self._returned: dict[str, Any] = {}  # ours, come back as results (an argument returned)
        self.km: KernelManager | None = None
        self.kc: Any = None
        self._poller: zmq.Poller | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self, spec: EnvSpec, progress: Progress, timeout: float) -> None:
        """Get the environment from the cache (building it once), launch the kernel on it over IPC,
        and wait until the runtime answers."""
        env = self.cache.get(spec, progress)
        self.python = spec.python
        ensure_descriptors(DESCRIPTORS_PER_KERNEL)
        started = time.perf_counter()
        km = KernelManager(
            kernel_name=f"env-{env.key}",
            kernel_spec_manager=_EnvKernelSpecs(env.python, self.fork),
            transport="ipc",
            connection_file=str(self.runtime_dir / f"kernel-{self.id}.json"),
            context=zmq_context(),
        )
        km.shutdown_wait_time = 2.0
        self.km = km
        self._bind_broker()
        fast_address = f"ipc://{self.runtime_dir / f'kernel-{self.id}-fast'}"
        self.begun_path.write_bytes(bytes(BEGUN_SIZE))
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        child_env.update(self.env)
        child_env.update(
            kernel_env(env.path, os.environ.get("PATH", "")),
            FAL_MAGIC_KERNEL_LOG=str(self.log_path),
            **{BROKER_ENV: "host", FAST_ENV: fast_address, BEGUN_ENV: str(self.begun_path)},
            **({shm.SHM_ENV: str(self.shm_dir)} if self.shm_dir is not None else {}),
            **(self._pool_variables() if self.registry is not None else {}),
        )
        log = open(self.log_path, "ab", buffering=0)
        try:  # (in a user's pool, independent: no parent polling, the kernel keeps its own deadline)
            km.start_kernel(env=child_env, stdout=log, stderr=log, independent=self.registry is not None)
        except Exception as exc:
            raise KernelStartError(f"could not launch a kernel on {env.python}: {exc}. "
                                   + _broken_env_hint(env.key)) from None
        finally:
            log.close()
        self.pid = getattr(km.provisioner, "pid", None)
        if self.registry is not None:
            os.link(km.connection_file, self.pool_connection_file)
        try:
            self.kc = km.client(context=zmq_context())
            # shell, iopub and stdin (code that asks for input): no heartbeat (liveness
            # is read from the process), no control (interrupts are signals): fewer descriptors
            self.kc.start_channels(shell=True, iopub=True, stdin=True, hb=False, control=False)
            self._bootstrap(timeout, fast_address)
        except BaseException as exc:
            tail = _tail(self.log_path)
            self.shutdown(now=True)
            if isinstance(exc, KernelStartError) or not isinstance(exc, Exception):
                raise
            lines = tail.splitlines()[-15:]
            raise KernelStartError(
                f"the kernel on environment {env.key} did not become ready: {exc}"
                + ("\nlast lines of its log:\n" + "\n".join(lines) if lines else "")
                + "\n" + _broken_env_hint(env.key)) from None
        progress(f"kernel {self.id} started on environment {spec.key} in {time.perf_counter() - started:.2f}s")

    def _pool_variables(self) -> dict[str, str]:
        """What a kernel of a user's pool needs to keep its own deadline (``fal_magic_inside.lifetime``)."""
        assert self.registry is not None
        return {lifetime.ENTRY_ENV: str(self.registry.entry_path(self.id)),
                lifetime.LEASE_ENV: str(self.registry.lease_path(self.id)),
                lifetime.FILES_ENV: os.pathsep.join(str(p) for p in (
                    self.log_path, self.begun_path, self.runtime_dir / f"kernel-{self.id}-fast",
                    self.runtime_dir / f"kernel-{self.id}.json")),
                lifetime.CONNECTION_ENV: str(self.pool_connection_file),
                forkserver.DETACHED_ENV: "1"}

    @property
    def pool_connection_file(self) -> Path:
        """The connection file other processes of the pool attach with: a link to the one the
        KernelManager wrote, which it removes when it is collected (the kernel removes this one)."""
        return self.runtime_dir / f"kernel-{self.id}-pool.json"

    def entry(self) -> Entry:
        """This kernel as the user's pool registers it."""
        return Entry(id=self.id, slot=self.slot, key=self.key, requirements=list(self.requirements),
                     python=self.python or "", pid=self.pid or 0,
                     connection_file=str(self.pool_connection_file), log_path=str(self.log_path),
                     begun_path=str(self.begun_path), started_at=self.started_at, env_tag=self.env_tag,
                     machine_type=self.machine_type)

    def _bind_broker(self) -> None:
        """This process's end of the kernel's nested calls: each host that serves calls in the kernel
        has its own, named in every request (``broker_address``)."""
        self.broker = zmq_context().socket(zmq.ROUTER)
        self.broker.bind(self.broker_address)

    @property
    def broker_address(self) -> str:
        return f"ipc://{self.runtime_dir / f'kernel-{self.id}-b{os.getpid()}'}"

    @classmethod
    def attach(cls, entry: Entry, registry: Registry, cache: EnvCache, runtime_dir: Path, shm_dir: Path | None,
               timeout: float) -> LocalKernel:
        """A client of a kernel of the user's pool that another process started (its lease already
        taken by the caller): connect to its sockets and open a comm to its runtime."""
        from jupyter_client.blocking import BlockingKernelClient

        kernel = cls(entry.key, tuple(entry.requirements), cache, runtime_dir, shm_dir, registry=registry)
        kernel.id, kernel.pid, kernel.python = entry.id, entry.pid, entry.python
        kernel.started_at, kernel.env_tag, kernel.machine_type = entry.started_at, entry.env_tag, entry.machine_type
        kernel.log_path, kernel.begun_path = Path(entry.log_path), Path(entry.begun_path)
        kernel.attached = True
        kernel.deadline = entry.deadline
        kc = BlockingKernelClient(connection_file=entry.connection_file, context=zmq_context())
        kc.load_connection_file()
        kernel.kc = kc
        try:
            kc.start_channels(shell=True, iopub=True, stdin=True, hb=False, control=False)
            kernel._bind_broker()
            kernel._await_iopub(timeout)
            kc.shell_channel.send(comm_open(kc.session, kernel.comm_id))
            hello = kernel._wait(kc.iopub_channel, timeout, "while attaching", is_hello)["content"]["data"]
            check_hello(hello, kernel.python)
            if hello.get("fast"):
                kernel.fast = zmq_context().socket(zmq.DEALER)
                kernel.fast.connect(f"ipc://{runtime_dir / f'kernel-{entry.id}-fast'}")
        except BaseException:
            kernel.detach()
            raise
        kernel.state = "busy"
        return kernel

    def _close_client(self) -> None:
        """Close this process's channels and sockets to the kernel."""
        if self.kc is not None:
            try:
                self.kc.stop_channels()
            except Exception:
                pass
        for sock in (self.broker, self.fast):
            if sock is not None:
                sock.close()
        self.broker = self.fast = None

    def detach(self) -> None:
        """Let go of the kernel without ending it (a user's pool: it ends at its deadline)."""
        self.state = "dead"
        self._close_client()
        Path(self.broker_address[len("ipc://"):]).unlink(missing_ok=True)
        if self.arena is not None:
            self.arena.close()
        if self.shm_dir is not None and not (self.pid and pid_alive(self.pid)):
            lifetime.remove_if_empty(str(self.shm_dir))
        if self.lease is not None:
            self.lease.close()
            self.lease = None

    def release_slot(self) -> None:
        """The pool holds no kernel of this key any more: the environment may be removed again."""
        self.cache.release(self.key)

    def _bootstrap(self, timeout: float, fast_address: str) -> None:
        """Send the runtime in, open its comm, and check the kernel's Python against the host's.

        Sent at once, not after ``wait_for_ready``: zmq holds the request until the kernel has bound its
        sockets, and ``wait_for_ready`` spent ~0.25 s of a kernel start in its fixed pauses."""
        kc = self.kc
        msg_id = kc.execute(bootstrap_from(write_runtime(self.runtime_dir)), silent=True, store_history=False)
        reply = self._shell_reply(msg_id, timeout)
        self._await_iopub(timeout)
        if reply["content"]["status"] != "ok":
            c = reply["content"]
            raise KernelStartError(f"the fal_magic runtime failed to load in the kernel: {c.get('ename')}: "
                                   f"{c.get('evalue')}. " + _broken_env_hint(self.key))
        kc.shell_channel.send(comm_open(kc.session, self.comm_id))
        try:
            hello = self._wait(kc.iopub_channel, timeout, "while starting", is_hello)["content"]["data"]
        except TimeoutError:
            raise KernelStartError("the fal_magic runtime in the kernel did not answer") from None
        check_hello(hello, self.python)
        self.pid = hello["pid"]
        if hello.get("fast"):  # the runtime has bound its fast channel
            self.fast = zmq_context().socket(zmq.DEALER)
            self.fast.connect(fast_address)

    def _await_iopub(self, timeout: float) -> None:
        """Return once iopub delivers (the kernel's welcome to a new subscriber, or a status), so no
        output of a call can be published before the host listens; ask for kernel info meanwhile
        (its status messages arrive on iopub as soon as the subscription holds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.kc.iopub_channel.get_msg(timeout=0.1)
                return
            except Empty:
                self.raise_if_dead("while starting")
                self.kc.kernel_info()
        raise KernelStartError("the kernel's iopub channel did not connect")

    def _shell_reply(self, msg_id: str, timeout: float) -> Message:
        return self._wait(self.kc.shell_channel, timeout, "while waiting for a reply",
                          lambda m: m["parent_header"].get("msg_id") == msg_id)

    def _wait(self, channel: Any, timeout: float, when: str, wanted: Callable[[Message], bool]) -> Message:
        """The first message on ``channel`` that is ``wanted``, watching the kernel's liveness."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from the kernel")
            try:
                m = channel.get_msg(timeout=min(remaining, LIVENESS_PERIOD))
            except Empty:
                self.raise_if_dead(when)
                continue
            if wanted(m):
                return m

    def _serve_nested(self, sink: OutputSink, nested: NestedHandler | None) -> None:
        """Answer one nested-call request from the running function (only if correctly signed)."""
        ident, signature, header, *frames = self.broker.recv_multipart(copy=False)
        key = self.kc.session.key
        if not hmac.compare_digest(sign(key, bytes(header)), bytes(signature)):
            return  # not from our kernel: dropped, as Jupyter drops badly signed messages
        if nested is None:
            self.broker.send_multipart([ident, b"error", b"isolated functions cannot be called from here"])
            return
        status, out = nested(list(frames), sink)
        self.broker.send_multipart([ident, status, *out], copy=False)

    def _process(self) -> Any:
        """The kernel's Popen when it was launched locally, else None."""
        return getattr(self.km.provisioner, "process", None) if self.km and self.km.provisioner else None

    def is_alive(self) -> bool:
        """Whether the kernel process still runs: a cheap poll of the child, and on Linux its state
        (a killed process can linger as a zombie leader, unreaped, while its threads wind down)."""
        if self.attached:
            return self.pid is not None and pid_alive(self.pid)
        if self.km is None or self.km.provisioner is None:
            return False
        proc = self._process()
        if proc is None:
            return bool(self.km.is_alive())
        if proc.poll() is not None:
            return False
        return not_a_zombie(proc.pid)

    def exit_code(self, wait: float = 3.0) -> int | None:
        """The exit code of a dead kernel (negative: the signal), waiting a little for it to be reaped."""
        proc = self._process()
        if proc is None:
            return None
        try:
            return proc.wait(timeout=wait)
        except Exception:
            return proc.returncode

    def raise_if_dead(self, when: str) -> None:
        if self.is_alive():
            return
        self.state = "dead"
        code = self.exit_code()
        if code is not None and code < 0:
            try:
                cause = f"killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                cause = f"killed by signal {-code}"
        else:
            cause = f"exited with code {code}"
        tail = _tail(self.log_path, 3000)
        lines = tail.splitlines()[-25:]
        message = f"the kernel (pid {self.pid}) died {when}: {cause}"
        if self.kill_reason:
            message += f": {self.kill_reason}"
        elif code == -signal.SIGKILL:
            message += " (out of memory, or killed from outside)"
        if lines:
            message += "\nlast lines of the kernel's stderr:\n" + "\n".join(lines)
        raise KernelDiedError(message, exit_code=code, stderr_tail="\n".join(lines))

    def kill(self, reason: str) -> None:
        """SIGKILL the process from any thread; the thread serving a request then reports ``reason``."""
        self.kill_reason = reason
        if self.attached:
            self._signal(signal.SIGKILL)
            return
        proc = self._process()
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _signal(self, signum: int) -> None:
        """A signal to an attached kernel's process group (it is its own session's leader)."""
        if self.pid:
            try:
                os.killpg(self.pid, signum)
            except OSError:
                pass

    def interrupt(self) -> None:
        """SIGINT to the kernel (its own process group): raises KeyboardInterrupt in the running code."""
        if self.attached:
            self._signal(signal.SIGINT)
        elif self.km is not None and self.is_alive():
            self.km.interrupt_kernel()

    def shutdown(self, now: bool = False) -> None:
        """Stop the kernel (politely unless ``now``) and remove its files."""
        self.state = "dead"
        self._close_client()
        if self.registry is not None:  # gone from the user's pool first: no process leases it any more
            self.registry.remove(self.id)
        if self.attached:  # another process's child: ended by signals, its files removed here
            self._end_attached(now)
        if self.km is not None:
            try:
                if self.km.has_kernel:
                    self.km.shutdown_kernel(now=now or not self.is_alive())
            except Exception:
                pass
            try:
                self.km.cleanup_resources()
            except Exception:
                pass
        if self.lease is not None:
            self.lease.close()
            self.lease = None
        if self.shm_dir is not None and self.pid is not None:  # the kernel's arena (mapped results stay valid)
            for path in self.shm_dir.glob(f"k-{self.pid}-*"):
                path.unlink(missing_ok=True)
        if self.arena is not None:
            self.arena.close()
        if self.registry is not None and self.shm_dir is not None:
            lifetime.remove_if_empty(str(self.shm_dir))
        for path in (self.log_path, Path(self.broker_address[len("ipc://"):]),
                     self.runtime_dir / f"kernel-{self.id}-fast", self.begun_path, self.pool_connection_file):
            try:
                path.unlink()
            except OSError:
                pass

    def _end_attached(self, now: bool) -> None:
        """End a kernel this process attached to: SIGTERM (unless ``now``), then SIGKILL; then its
        connection file and sockets, which its own process would have removed."""
        if not now:
            self._signal(signal.SIGTERM)
        if now or not wait_gone(self.pid or 0, 2.0):
            self._signal(signal.SIGKILL)
            wait_gone(self.pid or 0, 2.0)
        connection = self.pool_connection_file
        (self.runtime_dir / f"kernel-{self.id}.json").unlink(missing_ok=True)
        try:
            info = json.loads(connection.read_text())
            for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
                if info.get("transport") == "ipc" and name in info:
                    Path(f"{info['ip']}-{info[name]}").unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
        connection.unlink(missing_ok=True)

    # -- requests --------------------------------------------------------------------------

    def call(self, frames: Frames, sink: OutputSink, grace: float, nested: NestedHandler | None = None) -> Reply:
        """A call on the runtime's fast channel when it has one (large buffers through shared memory
        both ways: see ``shm.Arena``), else as a comm request."""
        if self.fast is None:
            return super().call(frames, sink, grace, nested)
        self.calls += 1
        frames = list(frames)
        sent: dict[int, list] = {}
        arena = self._arena()
        done = False
        try:
            free: list[str] = []
            if arena is not None:
                arena.give_back(shm.unmapped(self._returned))  # ours, back from the caller's objects
                free = shm.unmapped(self._results)  # the kernel's, no longer used here
                for index in range(1, len(frames)):
                    if memoryview(frames[index]).nbytes >= shm.SHM_MIN:
                        written = arena.put(frames[index])
                        if written is not None:  # else shared memory is full: the frame goes inline
                            sent[index] = written
                            frames[index] = b""
            msg_id = uuid.uuid4().hex
            header = json.dumps({"msg_id": msg_id, "id": msg_counter(), "session": self.kc.session.session,
                                 "shm": sent, "free": free, "broker": self.broker_address,
                                 **self._crossing()}).encode()
            self.fast.send_multipart([sign(self.kc.session.key, header), header, *frames], copy=False)
            reply = serve(self, msg_id, sink, grace, "outside", nested)
            placed = reply.content.pop("shm", None) or {}
            if arena is not None:
                arena.give_back(reply.content.pop("free", []))
            if placed:
                assert arena is not None
                reply.buffers = list(reply.buffers)
                self._map_results(arena.directory, placed, reply.buffers)
            done = True
            return reply
        finally:
            if not done and arena is not None:  # the kernel may still map them: never written again
                for name, _ in sent.values():
                    arena.forget(name)

    def _map_results(self, directory: str, placed: dict[str, list[Any]], buffers: list[Any]) -> None:
        """Build the result's buffers on the segments the reply names: one mapping per segment, however
        many buffers lie in it (two views of one argument), so that the segment is handed back only
        once no object built on any of them is left. Kept: "new" segments (the kernel's arena),
        "ref" ones (ours, an argument come back)."""
        needed: dict[str, int] = {}
        lent = self.arena.lent if self.arena is not None else {}
        for kind, name, offset, size in placed.values():
            # the reply is the kernel's word: it may name only its own arena's segments, or ours it had
            if not (kind == "new" and re.fullmatch(r"k-\d+-\d+", str(name))) and not (kind == "ref" and name in lent):
                raise FalMagicError(f"the kernel's reply names a shared-memory segment it may not ({name!r})")
            needed[name] = max(needed.get(name, 0), offset + size)
        maps: dict[str, Any] = {}
        for index, (kind, name, offset, size) in placed.items():
            if name not in maps:
                table = self._results if kind == "new" else self._returned
                maps[name] = table[name] = shm.shm_map(directory, name, needed[name])
            buffers[int(index)] = memoryview(maps[name])[offset:offset + size]

    def _arena(self) -> shm.Arena | None:
        """This kernel's shared-memory segments on the host's side (None: no shared memory here)."""
        if self.arena is None and self.shm_dir is not None:
            self.arena = shm.Arena(str(self.shm_dir), f"h-{self.id}")
        return self.arena

    def _runtime_request(self, op: str, frames: Frames, sink: OutputSink, grace: float,
                         nested: NestedHandler | None = None, **fields: Any) -> Reply:
        if self.registry is not None:
            fields["namespace"] = HOST_SESSION
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": {
            "op": op, "id": msg_counter(), "broker": self.broker_address, **fields}})
        self.kc.session.send(self.kc.shell_channel.socket, msg, buffers=frames)
        return serve(self, msg["header"]["msg_id"], sink, grace, "comm", nested)

    def execute(self, code: str, sink: OutputSink, grace: float) -> Reply:
        self.calls += 1
        self.cells += 1
        if self.registry is not None:  # a kernel of the user's pool: this process's own cell namespace
            self._runtime_request("namespace", [], sink, grace)
        msg_id = self.kc.execute(code, silent=False, store_history=True, allow_stdin=sink.can_ask())
        return serve(self, msg_id, sink, grace, "shell")

    def comm_message(self, kind: str, comm_id: str, data: dict[str, Any], buffers: list[Any], sink: OutputSink,
                     grace: float) -> None:
        msg = self.kc.session.msg(kind, {"comm_id": comm_id, "data": data})
        self.kc.session.send(self.kc.shell_channel.socket, msg, buffers=buffers)
        serve(self, msg["header"]["msg_id"], sink, grace, "message")

    def began(self, msg_id: str) -> bool:
        """Whether the runtime marked the fast-channel call ``msg_id`` as begun (read on a death or a stop only)."""
        try:
            with open(self.begun_path, "rb") as f:
                return f.read(BEGUN_SIZE) == begun_mark(msg_id)
        except OSError:
            return False

    def answer_input(self, content: dict[str, Any]) -> None:
        self.kc.stdin_channel.send(self.kc.session.msg("input_reply", content))

    # -- the transport of the request loop ----------------------------------------------------

    def _recv(self, socket: zmq.Socket) -> Message | None:
        """The next message on a kernel socket, if it is signed with the session key, parsed without
        the date conversion of ``Session.deserialize`` (every call ends with an iopub message: a hot path)."""
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        session = self.kc.session
        _, parts = session.feed_identities(frames, copy=False)
        if len(parts) < 5:
            return None
        head = [part.bytes for part in parts[1:5]]
        if session.auth is not None and not hmac.compare_digest(session.sign(head), parts[0].bytes):
            return None  # not signed with our key: dropped, as Session.deserialize would refuse it
        header, parent, metadata, content = (json.loads(b) for b in head)
        return {"header": header, "parent_header": parent, "msg_type": header.get("msg_type", ""),
                "metadata": metadata, "content": content, "buffers": parts[5:]}

    def next_event(self, timeout: float, sink: OutputSink,
                   nested: NestedHandler | None) -> tuple[str, Any] | None:
        iopub, shell, stdin = self.kc.iopub_channel.socket, self.kc.shell_channel.socket, self.kc.stdin_channel.socket
        if self._poller is None:  # the sockets stay the same for the kernel's life
            self._poller = zmq.Poller()
            for sock in (iopub, shell, stdin, self.broker, self.fast):
                if sock is not None:
                    self._poller.register(sock, zmq.POLLIN)
        ready = dict(self._poller.poll(int(timeout * 1000)))
        if self.broker in ready:
            self._serve_nested(sink, nested)
        if self.fast is not None and self.fast in ready:
            head, *buffers = self.fast.recv_multipart(copy=False)
            return "reply", Reply(json.loads(head.bytes), buffers)
        for channel, sock in (("iopub", iopub), ("shell", shell), ("stdin", stdin)):
            if sock in ready:
                m = self._recv(sock)
                if m is not None:
                    return channel, m
        return None
