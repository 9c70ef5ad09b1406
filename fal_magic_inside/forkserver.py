"""A kernel template: a process on an environment's Python that imports ipykernel once, then forks
each new kernel of that environment from itself, so a kernel starts without paying for its imports.

Run by the host (``kernel/forked.py``) as ``<env python> forkserver.py``, with a unix stream socket as
its standard input. Imports only the standard library before it has answered ``ready`` (then
ipykernel, IPython and what they pull in, but nothing that starts a thread or an event loop: forking
a process with threads is unsafe, so the template refuses to fork once it has more than one thread).

On the socket, one request at a time from the host: a 4-byte length, a JSON object
(``{"op": "fork", "args": [...], "cwd": "..."}``) and four descriptors: those that become the kernel's
stdin, stdout and stderr, and a memory file with its environment variables as JSON, which only the
forked kernel reads (they may be secrets: the template never holds them). Back, newline-separated
JSON: ``ready``, ``forked`` (with the pid) or ``failed``, and, whenever a kernel ends, ``exit`` with
its pid and exit code (negative: the signal), since the kernels are the template's children, not the
host's. When the host closes the socket or is gone (its parent changed), the template ends, killing
every kernel it forked; with ``DETACHED_ENV`` set (kernels of a user's pool, which outlive their
host), it waits for them to end instead, then ends.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

#: What a kernel imports anyway, imported here once, before any fork.
PRELOAD = ("ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.comm", "ipykernel.debugger",
           "IPython.core.completer", "cloudpickle", "faulthandler", "hmac", "codecs", "termios")

#: Variables read once, when a process starts (by the dynamic loader, the C library's allocator, Python,
#: the locale and time zone) or when a template imports (debugpy's): kernels that differ in them
#: cannot share a template, so a template runs with them (and few others), keyed by them.
STARTUP_PREFIXES = ("PYTHON", "LC_", "LD_", "DYLD_", "MALLOC_", "PYDEVD_", "DEBUGPY_")
STARTUP_NAMES = ("LANG", "TZ", "GLIBC_TUNABLES")


def startup_variables(env: dict[str, str]) -> dict[str, str]:
    """Those of ``env`` read when a process starts (see ``STARTUP_PREFIXES``)."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) or k in STARTUP_NAMES}


def variables_file(env: dict[str, str]) -> int:
    """A memory file holding ``env`` as JSON, at its start: how a kernel's variables reach the kernel
    forked for it without the template reading them (the caller closes it)."""
    fd = os.memfd_create("fal_magic-env", os.MFD_CLOEXEC)
    try:
        data = memoryview(json.dumps(env).encode())
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: Set in a template whose kernels outlive its host (a user's pool: SPEC 13).
DETACHED_ENV = "FAL_MAGIC_DETACHED"

#: How often the template checks that its host still lives, in seconds.
HOST_CHECK = 0.2


#: Process names (``ps -o comm``, ``top``) of a template and of the kernels it forks, whose command
#: lines stay the template's.
TEMPLATE_NAME = "fal-template"
KERNEL_NAME = "fal-kernel"


def name_process(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:  # no /proc (macOS): ps shows the command line only
        pass


def threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


class _Template:
    def __init__(self, host: socket.socket) -> None:
        self.host = host
        self.parent = os.getppid()
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up descriptor does the work
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the kernels' business

    def send(self, **message: object) -> None:
        self.host.sendall(json.dumps(message).encode() + b"\n")

    def serve(self) -> dict[str, Any] | None:
        """Answer the host until it is gone (None), or return a fork request in the forked child."""
        pending = b""
        fds: list[int] = []
        while True:
            watched: list[Any] = [self.host, self.wake_r]
            ready, _, _ = select.select(watched, [], [], HOST_CHECK)
            if os.getppid() != self.parent:
                return None
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
                self.reap()
            if self.host in ready:
                data, new_fds, _, _ = socket.recv_fds(self.host, 1 << 16, 4)
                if not data:
                    return None
                pending += data
                fds += new_fds
                while len(pending) >= 4 and len(pending) >= 4 + int.from_bytes(pending[:4], "big"):
                    size = int.from_bytes(pending[:4], "big")
                    request: dict[str, Any] = json.loads(pending[4:4 + size])
                    pending = pending[4 + size:]
                    taken, fds = fds[:4], fds[4:]
                    if self.fork(request, taken) == 0:
                        return request

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(op="exit", pid=pid, code=os.waitstatus_to_exitcode(status))

    def fork(self, request: dict[str, Any], fds: list[int]) -> int:
        """Fork a kernel; in the child, set it up as jupyter_client's launcher would and return 0."""
        running = threads()
        if running > 1 or len(fds) != 4:
            self.send(op="failed", error=f"cannot fork: {running} threads, {len(fds)} descriptors")
            for fd in fds:
                os.close(fd)
            return -1
        pid = os.fork()
        if pid == 0:
            try:
                self.become_child(request, fds)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            return 0
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        self.send(op="forked", pid=pid)
        return pid

    def become_child(self, request: dict[str, Any], fds: list[int]) -> None:
        self.host.detach()  # its descriptor is closed with the others
        become_kernel(fds, request["cwd"])
        os.environ["JPY_PARENT_PID"] = str(os.getppid())


def become_kernel(fds: list[int], cwd: str) -> None:
    """In a child just forked from a template: a kernel process of its own, as jupyter_client's
    launcher would start it. ``fds``: its stdin, stdout, stderr, and a memory file of its variables
    (read here only, never by the template: they may be secrets); every other descriptor is closed."""
    name_process(KERNEL_NAME)
    os.setsid()  # its own session and process group, as jupyter_client starts kernels
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter has it
    *stdio, variables = fds
    with os.fdopen(variables, "rb") as f:
        env = json.loads(f.read())
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)


def outlive_host(children: set[int]) -> None:
    """The host is gone, and the kernels live on (each ends at its deadline): reap them, then end."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while children:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        children.discard(pid)


def end_kernels(children: set[int]) -> None:
    """The host is gone: end every kernel this template forked, with what each kernel started."""
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def run_kernel(request: dict[str, Any]) -> None:
    """In a forked child: run ipykernel as ``python -m ipykernel_launcher ARGS`` would."""
    import ipykernel_launcher
    from ipykernel.kernelapp import IPKernelApp

    sys.argv = [ipykernel_launcher.__file__, *request["args"]]
    # its default was read from the template's environment at import: the parent to watch is the template
    IPKernelApp.launch_instance(argv=[*request["args"], f"--IPKernelApp.parent_handle={os.getppid()}"])


def main() -> None:
    del sys.path[0]  # this file's directory (fal_magic's kernel package) is not the kernel's
    name_process(TEMPLATE_NAME)
    host = socket.socket(fileno=0)
    template = _Template(host)
    try:
        for name in PRELOAD:
            __import__(name)
    except BaseException as exc:
        template.send(op="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    # where the preloaded modules came from: the host starts a new template once one of these changes
    # (a package added or removed: the modules held here would no longer be the environment's)
    sources = sorted({os.path.dirname(os.path.dirname(sys.modules[name.partition(".")[0]].__file__ or ""))
                      for name in PRELOAD if getattr(sys.modules.get(name.partition(".")[0]), "__file__", None)})
    # what was imported stays shared with the kernels: the collector of a kernel never visits it (a
    # collection would otherwise write to, and so copy, nearly every page of it in each kernel)
    gc.collect()
    gc.freeze()
    template.send(op="ready", pid=os.getpid(), threads=threads(), sources=sources)
    request = template.serve()
    if request is None:
        if os.environ.get(DETACHED_ENV):
            outlive_host(template.children)
        else:
            end_kernels(template.children)
        return
    del template
    run_kernel(request)


if __name__ == "__main__":
    main()
