"""Kernels forked from a per-environment template process, behind jupyter_client's own extension point.

``TemplateProvisioner`` is a kernel provisioner (``KernelManager`` stays the way kernels start): where
the local provisioner would run ``<env python> -m ipykernel_launcher ...``, it asks the environment's
template (``forkserver.py``, started on first use) to fork that kernel, which then skips the ~0.3 s of
imports every kernel start pays. Forked kernels are the template's children: ``ForkedProcess`` gives
the provisioner and ``LocalKernel`` the Popen they expect, its exit status reported by the template.

A template lives while kernels of its environment do, and ``template_keep_alive`` seconds after the
last one ends (the culler retires it); it ends with its kernels when the host exits or is killed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from fal_magic_inside import forkserver
from jupyter_client.provisioning import LocalProvisioner

from ..platforms import after_fork_in_child


log = logging.getLogger("fal_magic")

#: What a template runs with besides the start-up variables (``forkserver.STARTUP_PREFIXES``), nothing else.
_TEMPLATE_NAMES = ("PATH", "VIRTUAL_ENV", "HOME", "TMPDIR", "USER")

#: Seconds a template may take to import what kernels need.
READY_TIMEOUT = 60.0


class TemplateError(Exception):
    """The template cannot fork this kernel (it died, or refused): the kernel is launched as usual."""


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


class ForkedProcess:
    """A forked kernel, seen as the ``subprocess.Popen`` jupyter_client and LocalKernel use."""

    stdin = stdout = stderr = None

    def __init__(self, template: "Template", pid: int) -> None:
        self.template = template
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.template.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            self.template.wait_for_exit(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Template:
    """The host's side of one template process: its socket, and what it says (forks, exits)."""

    def __init__(self, python: str, env: dict[str, str], log_path: Path) -> None:
        self.python = python
        self.log_path = log_path
        self.detached = bool(env.get(forkserver.DETACHED_ENV))
        self._lock = threading.Lock()  # one fork request at a time
        self._cond = threading.Condition()
        self._answers: list[dict[str, Any]] = []
        self._exits: dict[int, int] = {}
        self._live: set[int] = set()
        self.idle_since = time.monotonic()
        self._closed = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        with open(log_path, "ab", buffering=0) as err:
            self.proc = subprocess.Popen([python, forkserver.__file__], stdin=theirs.fileno(),
                                         stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        theirs.close()
        threading.Thread(target=self._read, name=f"fal_magic-template-{self.proc.pid}", daemon=True).start()
        ready = self._answer(READY_TIMEOUT)
        if ready.get("op") != "ready":
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            self.stop()
            raise TemplateError(f"the kernel template did not start: {ready.get('error', ready)}\n{tail}")
        self.pid = self.proc.pid
        self._sources = {path: _mtime(path) for path in ready.get("sources", [])}

    def _read(self) -> None:
        buffered = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            with self._cond:
                for line in lines:
                    message = json.loads(line)
                    if message.get("op") == "exit":
                        self._exits[message["pid"]] = message["code"]
                        self._live.discard(message["pid"])
                        if not self._live:
                            self.idle_since = time.monotonic()
                    else:
                        self._answers.append(message)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _answer(self, timeout: float) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._answers or self._closed, timeout=timeout):
                return {"op": "failed", "error": f"no answer within {timeout:.0f}s"}
            if not self._answers:
                return {"op": "failed", "error": f"it ended (see {self.log_path})"}
            return self._answers.pop(0)

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    @property
    def current(self) -> bool:
        """Whether the directories its modules came from are unchanged (no package added or removed)."""
        return all(_mtime(path) == mtime for path, mtime in self._sources.items())

    def fork(self, args: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> ForkedProcess:
        """Fork a kernel running ``ipykernel_launcher ARGS`` with this environment, directory and stdio.

        The variables travel in a memory file passed as a fourth descriptor, which only the kernel
        reads: the template never holds them (they may be secrets), so none stays in its memory."""
        request = json.dumps({"op": "fork", "args": args, "cwd": cwd}).encode()
        variables = forkserver.variables_file(env)
        try:
            with self._lock:
                if not self.alive:
                    raise TemplateError("the template has ended")
                try:
                    socket.send_fds(self.sock, [len(request).to_bytes(4, "big") + request], [*fds, variables])
                except OSError as exc:
                    raise TemplateError(f"the template cannot be reached: {exc}") from None
                answer = self._answer(10.0)
        finally:
            os.close(variables)
        if answer.get("op") != "forked":
            raise TemplateError(answer.get("error", "the template did not fork"))
        with self._cond:
            if answer["pid"] not in self._exits:  # it may have ended already
                self._live.add(answer["pid"])
        return ForkedProcess(self, answer["pid"])

    def exit_code(self, pid: int) -> int | None:
        """A forked kernel's exit code once it has ended (negative: the signal), else None."""
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            if not self._closed:
                return None
        try:  # the template is gone (its kernels end when they see that: ipykernel exits with 1)
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return 1
        except PermissionError:
            return None

    def wait_for_exit(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    @property
    def kernels(self) -> int:
        with self._cond:
            return len(self._live)

    def stop(self) -> None:
        """End the template (closing its socket: it kills its remaining kernels, or, detached, waits
        for them to end at their deadlines) and wait for it (not for a detached one with kernels)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.detached and self.kernels:
            return
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            self.log_path.unlink()
        except OSError:
            pass


_templates: dict[tuple[Any, ...], Template] = {}
_retiring: list[Template] = []  # replaced, but their kernels still run (a kernel ends with its template)
_templates_lock = threading.Lock()


def template_for(python: str, env: dict[str, str], runtime_dir: Path) -> Template:
    """The live template for kernels on ``python`` with these start-up variables, started if need be
    (one whose kernels outlive this process, where ``env`` says so: ``forkserver.DETACHED_ENV``)."""
    startup = tuple(sorted(forkserver.startup_variables(env).items()))
    detached = env.get(forkserver.DETACHED_ENV, "")
    slot = (python, startup, detached)
    with _templates_lock:
        template = _templates.get(slot)
        if template is not None and template.alive and template.current:
            return template
        if template is not None:
            _retiring.append(template)
        own_env = {k: v for k, v in env.items() if k in _TEMPLATE_NAMES}
        own_env.update(startup)
        if detached:
            own_env[forkserver.DETACHED_ENV] = detached
        template = Template(python, own_env, runtime_dir / f"template-{os.getpid()}-{next(_numbers)}.log")
        _templates[slot] = template
    retire_idle(None)
    return template


_numbers = iter(range(1 << 62))


def retire_idle(max_idle: float | None) -> None:
    """Stop replaced templates whose kernels have all ended, and (unless ``max_idle`` is None) those
    that have had no kernel for ``max_idle`` seconds; the culler calls this."""
    now = time.monotonic()
    with _templates_lock:
        stopping = [t for t in _retiring if not t.alive or t.kernels == 0]
        _retiring[:] = [t for t in _retiring if t not in stopping]
        if max_idle is not None:
            idle = [slot for slot, t in _templates.items()
                    if not t.alive or (t.kernels == 0 and now - t.idle_since >= max_idle)]
            stopping += [_templates.pop(slot) for slot in idle]
    for template in stopping:
        template.stop()


def stop_all() -> None:
    """Stop every template (their remaining kernels with them): at the host's exit."""
    with _templates_lock:
        stopping = [*_templates.values(), *_retiring]
        _templates.clear()
        _retiring.clear()
    for template in stopping:
        template.stop()


def _after_fork_in_child() -> None:
    """A forked host starts with no templates: its parent's stay the parent's."""
    global _templates_lock
    _templates.clear()
    _retiring.clear()
    _templates_lock = threading.Lock()


after_fork_in_child(_after_fork_in_child)


def _descriptor(stream: Any, default: int) -> int | None:
    """The descriptor a Popen-style stdio argument names (None: the host's own), or None if it names none."""
    if stream is None:
        return default
    if isinstance(stream, int):
        return stream if stream >= 0 else None  # PIPE, DEVNULL...: launch as usual
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


class TemplateProvisioner(LocalProvisioner):
    """The local provisioner, but kernels of ``<python> -m ipykernel_launcher`` are forked from the
    environment's template. Anything the template cannot do is launched the usual way."""

    process: Any = None  # a ForkedProcess, or the Popen of a kernel launched the usual way

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        fds = [_descriptor(kwargs.get("stdin"), -1), _descriptor(kwargs.get("stdout"), 1),
               _descriptor(kwargs.get("stderr"), 2)]
        runtime_dir = self.config_runtime_dir()
        if cmd[1:3] != ["-m", "ipykernel_launcher"] or None in fds[1:] or runtime_dir is None:
            return await super().launch_kernel(cmd, **kwargs)
        env = dict(kwargs.get("env") or os.environ)
        cwd = str(kwargs.get("cwd") or os.getcwd())
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            stdio = [null if fds[0] in (None, -1) else fds[0], fds[1], fds[2]]
            template = template_for(cmd[0], env, runtime_dir)
            self.process = template.fork(cmd[3:], env, cwd, stdio)  # type: ignore[arg-type]
        except (TemplateError, OSError) as exc:
            log.debug("kernel launched without its template: %s", exc)
            return await super().launch_kernel(cmd, **kwargs)
        finally:
            os.close(null)
        self.pid = self.pgid = self.process.pid  # its own group once it has run setsid (killpg falls back)
        self.cwd = cwd
        return self.connection_info

    def config_runtime_dir(self) -> Path | None:
        """Where templates keep their logs: the directory of the kernel's connection file (owner-only)."""
        km = self.parent
        path = getattr(km, "connection_file", "") if km is not None else ""
        return Path(path).parent if path else None
