"""WarmKernel: one ipykernel on an environment's Python, driven through jupyter_client.

It starts the kernel over the IPC transport, sends the runtime in, and then serves one request at a
time: a pickled call (on the runtime's fast channel, or as a comm message with binary buffers),
a push/pull of variables (comm), or a cell (an execute_request). While it waits it forwards the
request's outputs to a sink, serves nested isolated calls, watches that the process is alive, and
turns Ctrl-C into an interrupt of the kernel.
"""
from __future__ import annotations

import hmac
import json
import os
import signal
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any, Callable

import zmq
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from ..envs import Env
from ..errors import KernelDiedError, KernelStartError
from ..outputs import OutputSink
from . import runtime
from .base import (BOOTSTRAP, LIVENESS_PERIOD, KernelBase, NestedHandler, NotStarted, Reply, check_hello,
                   comm_open, forward_output, is_hello, kernel_argv, kernel_env, msg_counter, runtime_reply)

#: One zmq context for every kernel's sockets. Its sockets do not linger: a request left unsent to a
#: kernel that died must not block closing them (a context's term() would wait for it forever).
_CONTEXT = zmq.Context()
_CONTEXT.setsockopt(zmq.LINGER, 0)


class _EnvKernelSpecs(KernelSpecManager):
    """Kernel specs made on the fly for one environment: its Python, run directly (no wrapper),
    so ipykernel's parent polling sees the host as its parent."""

    def __init__(self, python: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.python = python

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            name=kernel_name,
            display_name=f"fal_magic {kernel_name}",
            language="python",
            interrupt_mode="signal",
            argv=kernel_argv(str(self.python)),
        )


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


class WarmKernel(KernelBase):
    """One kernel process on this machine and its client. Not thread-safe: the pool leases it to one
    caller at a time."""

    def __init__(self, key: str, requirements: tuple[str, ...], runtime_dir: Path,
                 shm_dir: Path | None = None) -> None:
        super().__init__(key, requirements)
        self.runtime_dir = runtime_dir
        self.shm_dir = shm_dir
        self.log_path = runtime_dir / f"kernel-{self.id}.log"
        self.broker: Any = None
        self.fast: Any = None
        self.km: KernelManager | None = None
        self.kc: Any = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self, env: Env, timeout: float) -> None:
        """Launch the kernel on ``env`` and wait until the runtime answers; KernelStartError otherwise."""
        km = KernelManager(
            kernel_name=f"env-{env.key}",
            kernel_spec_manager=_EnvKernelSpecs(env.python),
            transport="ipc",
            connection_file=str(self.runtime_dir / f"kernel-{self.id}.json"),
            context=_CONTEXT,
        )
        km.shutdown_wait_time = 2.0
        self.km = km
        self.broker = _CONTEXT.socket(zmq.ROUTER)
        broker_address = f"ipc://{self.runtime_dir / f'kernel-{self.id}-broker'}"
        self.broker.bind(broker_address)
        fast_address = f"ipc://{self.runtime_dir / f'kernel-{self.id}-fast'}"
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        child_env.update(
            kernel_env(env.path, os.environ.get("PATH", "")),
            FAL_MAGIC_KERNEL_LOG=str(self.log_path),
            FAL_MAGIC_BROKER=broker_address,
            FAL_MAGIC_FAST=fast_address,
            **({runtime.SHM_ENV: str(self.shm_dir)} if self.shm_dir is not None else {}),
        )
        log = open(self.log_path, "ab", buffering=0)
        try:
            km.start_kernel(env=child_env, stdout=log, stderr=log)
        except Exception as exc:
            raise KernelStartError(f"could not launch a kernel on {env.python}: {exc}") from None
        finally:
            log.close()
        self.pid = km.provisioner.pid if km.provisioner is not None else None
        try:
            self.kc = km.client(context=_CONTEXT)
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=timeout)
            self._bootstrap(timeout, fast_address)
        except BaseException as exc:
            tail = _tail(self.log_path)
            self.shutdown(now=True)
            if isinstance(exc, KernelStartError) or not isinstance(exc, Exception):
                raise
            raise KernelStartError(
                f"kernel on {env.python} did not become ready: {exc}" + (f"\nkernel log:\n{tail}" if tail else "")
            ) from None

    def _bootstrap(self, timeout: float, fast_address: str) -> None:
        """Send the runtime in, open its comm, and check the kernel's Python against the host's."""
        kc = self.kc
        msg_id = kc.execute(BOOTSTRAP, silent=True, store_history=False)
        reply = self._shell_reply(msg_id, timeout)
        if reply["content"]["status"] != "ok":
            c = reply["content"]
            raise KernelStartError(f"fal_magic runtime failed to load in the kernel: {c.get('ename')}: "
                                   f"{c.get('evalue')}\n" + "\n".join(c.get("traceback", [])))
        kc.shell_channel.send(comm_open(kc.session, self.comm_id))
        try:
            hello = self._wait(kc.iopub_channel, timeout, "while starting", is_hello)["content"]["data"]
        except TimeoutError:
            raise KernelStartError("the fal_magic runtime in the kernel did not answer") from None
        check_hello(hello)
        self.pid = hello["pid"]
        if hello.get("fast"):  # the runtime has bound its fast channel
            self.fast = _CONTEXT.socket(zmq.PAIR)
            self.fast.connect(fast_address)

    def _shell_reply(self, msg_id: str, timeout: float) -> dict:
        return self._wait(self.kc.shell_channel, timeout, "while waiting for a reply",
                          lambda m: m["parent_header"].get("msg_id") == msg_id)

    def _wait(self, channel: Any, timeout: float, when: str, wanted: Callable[[dict], bool]) -> dict:
        """The first message on ``channel`` that is ``wanted``, watching the kernel's liveness."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from the kernel")
            try:
                m = channel.get_msg(timeout=min(remaining, LIVENESS_PERIOD))
            except Empty:
                self._check_alive(when)
                continue
            if wanted(m):
                return m

    def _serve_nested(self, sink: OutputSink, nested: NestedHandler | None) -> None:
        """Answer one nested-call request from the running function (only if correctly signed)."""
        ident, signature, header, *frames = self.broker.recv_multipart(copy=False)
        key = self.kc.session.key
        if not hmac.compare_digest(runtime.sign(key, bytes(header)), bytes(signature)):
            return  # not from our kernel: dropped, as Jupyter drops badly signed messages
        if nested is None:
            self.broker.send_multipart([ident, b"error", b"isolated functions cannot be called from here"])
            return
        status, out = nested(list(frames), sink)
        self.broker.send_multipart([ident, status, *out], copy=False)

    def _process(self) -> Any:
        """The kernel's Popen when it was launched locally, else None."""
        return getattr(self.km.provisioner, "process", None) if self.km and self.km.provisioner else None

    def alive(self) -> bool:
        """Whether the kernel process still runs: a cheap poll of the child, and on Linux its state
        (a killed process can linger as a zombie leader, unreaped, while its threads wind down)."""
        if self.km is None or self.km.provisioner is None:
            return False
        proc = self._process()
        if proc is None:
            return bool(self.km.is_alive())
        if proc.poll() is not None:
            return False
        try:
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
        except (OSError, IndexError):
            return True

    def exit_code(self, wait: float = 3.0) -> int | None:
        """The exit code of a dead kernel (negative: the signal), waiting a little for it to be reaped."""
        proc = self._process()
        if proc is None:
            return None
        try:
            return proc.wait(timeout=wait)
        except Exception:
            return proc.returncode

    def _check_alive(self, when: str) -> None:
        if self.alive():
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
        proc = self._process()
        if proc is not None and proc.poll() is None:
            proc.kill()

    def interrupt(self) -> None:
        """SIGINT to the kernel (its own process group): raises KeyboardInterrupt in the running code."""
        if self.km is not None and self.alive():
            self.km.interrupt_kernel()

    def shutdown(self, now: bool = False) -> None:
        """Stop the kernel (politely unless ``now``) and remove its files."""
        self.state = "dead"
        if self.kc is not None:
            try:
                self.kc.stop_channels()
            except Exception:
                pass
        if self.km is not None:
            try:
                if self.km.has_kernel:
                    self.km.shutdown_kernel(now=now or not self.alive())
            except Exception:
                pass
            try:
                self.km.cleanup_resources()
            except Exception:
                pass
        for sock in (self.broker, self.fast):
            if sock is not None:
                sock.close()
        self.broker = self.fast = None
        if self.shm_dir is not None and self.pid is not None:  # results a dead kernel never handed over
            for path in self.shm_dir.glob(f"k-{self.pid}-*"):
                path.unlink(missing_ok=True)
        for path in (self.log_path, self.runtime_dir / f"kernel-{self.id}-broker",
                     self.runtime_dir / f"kernel-{self.id}-fast"):
            try:
                path.unlink()
            except OSError:
                pass

    # -- requests --------------------------------------------------------------------------

    def call(self, frames: list, sink: OutputSink, interrupt_grace: float, op: str = "call",
             nested: NestedHandler | None = None, **fields: Any) -> Reply:
        """Send a runtime request: ``call`` (frames from ``wire.dump_call``), ``push`` (a pickled dict of
        variables) or ``pull`` (``names=[...]``); return the comm reply with its frames.

        ``nested`` serves the isolated calls the function makes while it runs (``None``: refused).
        """
        if op == "call":
            self.calls += 1
            if self.fast is not None:
                return self._call_fast(frames, sink, interrupt_grace, nested)
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id,
                                               "data": {"op": op, "id": msg_counter(), **fields}})
        self.kc.session.send(self.kc.shell_channel.socket, msg, buffers=frames)
        return self._serve(msg["header"]["msg_id"], sink, interrupt_grace, expect_shell_reply=False, nested=nested)

    def _call_fast(self, frames: list, sink: OutputSink, grace: float, nested: NestedHandler | None) -> Reply:
        """A call on the runtime's fast channel; large buffers go through shared memory both ways."""
        frames = list(frames)
        sent: dict[int, list] = {}
        directory = str(self.shm_dir) if self.shm_dir is not None else ""
        try:
            if directory:
                for index in range(1, len(frames)):
                    if memoryview(frames[index]).nbytes >= runtime.SHM_MIN:
                        written = runtime.shm_put(directory, "h", frames[index])
                        if written is not None:  # else shared memory is full: the frame goes inline
                            sent[index] = written
                            frames[index] = b""
            msg_id = uuid.uuid4().hex
            header = json.dumps({"msg_id": msg_id, "id": msg_counter(), "session": self.kc.session.session,
                                 "shm": sent}).encode()
            self.fast.send_multipart([runtime.sign(self.kc.session.key, header), header, *frames], copy=False)
            reply = self._serve(msg_id, sink, grace, expect_shell_reply=False, nested=nested, fast=True)
            placed = reply.content.pop("shm", None) or {}
            if placed:
                reply.buffers = list(reply.buffers)
                sizes = {name: size for name, size in sent.values()}
                for index, (kind, name, offset, size) in placed.items():
                    mm = runtime.shm_map(directory, name, sizes[name] if kind == "ref" else size)
                    if kind == "new":
                        os.unlink(os.path.join(directory, name))  # mapped: the memory lives while it is used
                    reply.buffers[int(index)] = memoryview(mm)[offset:offset + size]
            return reply
        finally:
            for name, _ in sent.values():
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass

    def execute(self, code: str, sink: OutputSink, interrupt_grace: float) -> Reply:
        """Run cell source in the kernel's namespace; return the execute_reply content."""
        self.calls += 1
        msg_id = self.kc.execute(code, silent=False, store_history=True, allow_stdin=False)
        return self._serve(msg_id, sink, interrupt_grace, expect_shell_reply=True)

    def _recv_iopub(self) -> dict | None:
        """The next iopub message, if it is signed with the session key, parsed without the date
        conversion of ``Session.deserialize`` (every call ends with an iopub message: a hot path)."""
        try:
            frames = self.kc.iopub_channel.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        session = self.kc.session
        _, parts = session.feed_identities(frames, copy=False)
        if len(parts) < 5:
            return None
        head = [part.bytes for part in parts[1:5]]
        if session.auth is not None and not hmac.compare_digest(session.sign(head), parts[0].bytes):
            return None  # not signed with our key: dropped, as Session.deserialize would refuse it
        header, parent, _, content = (json.loads(b) for b in head)
        return {"header": header, "parent_header": parent, "msg_type": header.get("msg_type"),
                "content": content, "buffers": parts[5:]}

    def _serve(self, msg_id: str, sink: OutputSink, grace: float, expect_shell_reply: bool,
               nested: NestedHandler | None = None, fast: bool = False) -> Reply:
        """Forward outputs until the kernel is idle again for ``msg_id``; Ctrl-C interrupts the kernel.

        The lease state (idle/busy) is the pool's business alone; this only ever marks a death.
        """
        interrupted_at: float | None = None
        # whether the kernel may have started the request: the comm path knows (its busy status comes
        # first); a fast call may have started as soon as it is sent, so it is never retried
        begun = fast
        idle = False
        result: Reply | None = None
        last_check = time.monotonic()
        iopub = self.kc.iopub_channel
        poller = zmq.Poller()
        poller.register(iopub.socket, zmq.POLLIN)
        poller.register(self.broker, zmq.POLLIN)
        if fast:
            poller.register(self.fast, zmq.POLLIN)
        try:
            while True:
                try:
                    ready = dict(poller.poll(LIVENESS_PERIOD * 1000))
                    if self.broker in ready:
                        self._serve_nested(sink, nested)
                    if fast and self.fast in ready:
                        head, *buffers = self.fast.recv_multipart(copy=False)
                        result = Reply(json.loads(head.bytes), buffers)
                        if idle:
                            break
                    m = self._recv_iopub() if iopub.socket in ready else None
                    now = time.monotonic()
                    if not ready or now - last_check >= LIVENESS_PERIOD:
                        last_check = now
                        try:
                            self._check_alive("during the call")
                        except KernelDiedError as exc:
                            if begun:
                                raise
                            raise NotStarted(str(exc), exit_code=exc.exit_code, stderr_tail=exc.stderr_tail) from None
                        self._check_grace(interrupted_at, grace)
                    if m is None or m["parent_header"].get("msg_id") != msg_id:
                        continue
                    begun = True
                    kind = m["msg_type"]
                    content = m["content"]
                    if forward_output(kind, content, sink):
                        pass
                    elif runtime_reply(kind, content):
                        result = Reply(content["data"], m.get("buffers", []))
                    elif kind == "status" and content["execution_state"] == "idle":
                        idle = True  # every output of the request is out
                        if result is not None or not fast:
                            break
                except KeyboardInterrupt:
                    interrupted_at = self._ctrl_c(interrupted_at)
            if expect_shell_reply:
                result = Reply(self._shell_reply(msg_id, 10.0)["content"])
            if result is None:
                raise KernelDiedError("the kernel finished the request without a reply from the fal_magic runtime")
            return result
        finally:
            self.last_used = time.time()
