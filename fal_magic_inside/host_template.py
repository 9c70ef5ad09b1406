"""Kernels on a cluster host, forked from a template per environment instead of launched anew.

The server's launch command on a host runs ``<env python> host_template.py LAUNCHER ARGS...`` (the
launcher: gateway_provisioners' ``launch_ipykernel.py``, beside which the server puts a copy of the
modules of this package that the template needs: environments do not hold fal_magic_inside).
That client connects to the environment's template, an owner-only unix socket in
``$TMPDIR/fal_magic-templates-<uid>``, starting the template first if none listens. The template
has imported ipykernel and the launcher's modules once; it forks a kernel that runs the launcher as
``python LAUNCHER ARGS`` would, with the client's standard output and error (the kernel's log) and
its variables (passed in a memory file: the template never holds them). The client writes the
kernel's pid on descriptor 3, which the command points at the server's shell. Anything the template
cannot do is launched the usual way.

A template serves one environment for one server (its ``FAL_MAGIC_HEAD``). It ends once it has had no
kernel for ``FAL_MAGIC_TEMPLATE_KEEP_ALIVE`` seconds, or once that server has been unreachable for
``FAL_MAGIC_ORPHAN_TIMEOUT`` seconds; its kernels live on (each watches the server itself).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import runpy
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

if not __package__:  # run as a script, from the copy of this package beside the launcher
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fal_magic_inside import forkserver  # noqa: E402
from fal_magic_inside.head import HEAD_ENV, ORPHAN_ENV, reachable  # noqa: E402

#: Seconds a host template stays with no kernel (set by the server in the kernelspec's variables).
KEEP_ALIVE_ENV = "FAL_MAGIC_TEMPLATE_KEEP_ALIVE"

#: The variables a template starts with besides those read at a process's start
#: (``forkserver.STARTUP_PREFIXES``): what it needs itself. A kernel's own (its id, its group's
#: variables, secrets) reach only that kernel.
TEMPLATE_NAMES = ("PATH", "VIRTUAL_ENV", "HOME", "TMPDIR", "USER", HEAD_ENV, ORPHAN_ENV, KEEP_ALIVE_ENV)

#: Seconds a client waits for a new template to listen.
READY_TIMEOUT = 60.0


def _template_env() -> dict[str, str]:
    env = dict(os.environ)
    return {**{k: v for k, v in env.items() if k in TEMPLATE_NAMES}, **forkserver.startup_variables(env)}


def socket_path(launcher: str) -> str:
    """The template's socket for this Python, launcher and start-up variables, in an owner-only
    directory (OSError if that directory is not ours alone)."""
    directory = os.path.join(tempfile.gettempdir(), f"fal_magic-templates-{os.getuid()}")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{directory} is not a directory of this user's alone")
    try:  # a template forks into its own mount namespace (a container's files): one per namespace
        namespace = os.readlink("/proc/self/ns/mnt")
    except OSError:
        namespace = ""
    key = hashlib.sha256(json.dumps([sys.executable, launcher, namespace, sorted(_template_env().items())]).encode())
    return os.path.join(directory, key.hexdigest()[:20] + ".sock")


# -- the client: one launch -------------------------------------------------------------------------

def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def _template(path: str, launcher: str) -> socket.socket:
    """A connection to the template at ``path``, started first if none listens there."""
    sock = _connect(path)
    if sock is not None:
        return sock
    with open(os.path.join(os.path.dirname(path), "start.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start at a time; who waited finds it started
        sock = _connect(path)
        if sock is not None:
            return sock
        with open(path + ".log", "ab") as log:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", path, launcher],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    env=_template_env(), start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.005)
        raise OSError(f"the template did not start (see {path}.log)")


def fork(launcher: str, args: list[str]) -> int:
    """Have the environment's template fork a kernel running ``LAUNCHER ARGS``; its pid."""
    with _template(socket_path(launcher), launcher) as sock:
        variables = forkserver.variables_file(dict(os.environ))
        try:
            request = json.dumps({"args": args, "cwd": os.getcwd()}).encode()
            socket.send_fds(sock, [request], [0, 1, 2, variables])
        finally:
            os.close(variables)
        sock.shutdown(socket.SHUT_WR)
        answer = json.loads(b"".join(iter(lambda: sock.recv(4096), b"")) or b"{}")
    if "pid" not in answer:
        raise OSError(answer.get("error", "the template did not answer"))
    return int(answer["pid"])


def launch(launcher: str, args: list[str]) -> int:
    """Start the kernel as ``nohup python LAUNCHER ARGS &`` would: the fallback; its pid."""
    proc = subprocess.Popen([sys.executable, launcher, *args], stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    return proc.pid


def client(launcher: str, args: list[str]) -> None:
    try:
        pid = fork(launcher, args)
    except (OSError, ValueError) as exc:
        print(f"fal_magic: kernel launched without its template: {exc}", file=sys.stderr, flush=True)
        pid = launch(launcher, args)
    os.write(3, f"{pid}\n".encode())


# -- the template ----------------------------------------------------------------------------------

class _Server:
    def __init__(self, path: str, launcher: str) -> None:
        self.path, self.launcher = path, launcher
        self.children: set[int] = set()
        self.idle_since = time.monotonic()
        self.keep_alive = float(os.environ.get(KEEP_ALIVE_ENV, "300"))
        self.head = os.environ.get(HEAD_ENV, "")
        self.patience = float(os.environ.get(ORPHAN_ENV, "300"))
        self.head_lost: float | None = None
        self.head_checked = 0.0

    def preload(self) -> None:
        sys.path.insert(0, os.path.dirname(self.launcher))  # where its server_listener is
        for name in forkserver.PRELOAD:
            __import__(name)
        runpy.run_path(self.launcher, run_name="fal_magic_preload")  # its imports, not its main
        import gc

        gc.collect()
        gc.freeze()

    def listen(self) -> None:
        try:
            os.unlink(self.path)  # a template that died left it
        except FileNotFoundError:
            pass
        self.listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.umask(0o077)
        self.listening.bind(self.path)
        self.bound = os.stat(self.path).st_ino
        self.listening.listen(16)

    def serve(self) -> dict[str, Any] | None:
        """Fork kernels until it is time to end (None); in a forked child, return its request."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while not self.done():
            watched: list[Any] = [self.listening, wake_r]
            ready, _, _ = select.select(watched, [], [], 1.0)
            if wake_r in ready:
                os.read(wake_r, 4096)
                self.reap()
            if self.listening in ready:
                conn, _ = self.listening.accept()
                with conn:
                    request = self.answer(conn)
                if request is not None:
                    return request
        try:  # unless another template has taken the path since
            if os.stat(self.path).st_ino == self.bound:
                os.unlink(self.path)
                os.unlink(self.path + ".log")
        except OSError:
            pass
        return None

    def answer(self, conn: socket.socket) -> dict[str, Any] | None:
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
        if len(fds) != 4 or forkserver.threads() > 1:
            conn.sendall(json.dumps({"error": f"cannot fork: {forkserver.threads()} threads, {len(fds)} descriptors"})
                         .encode())
            for fd in fds:
                os.close(fd)
            return None
        request: dict[str, Any] = json.loads(data)
        pid = os.fork()
        if pid == 0:
            try:
                conn.detach()  # their descriptors are closed with every other
                self.listening.detach()
                forkserver.become_kernel(fds, request["cwd"])
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            for name in [name for name in sys.modules if name.partition(".")[0] == "fal_magic_inside"]:
                del sys.modules[name]  # the kernel's own copy comes with its bootstrap
            return request
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        conn.sendall(json.dumps({"pid": pid}).encode())
        return None

    def reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            self.children.discard(pid)
        if not self.children:
            self.idle_since = time.monotonic()

    def done(self) -> bool:
        now = time.monotonic()
        if not self.children and now - self.idle_since >= self.keep_alive:
            return True
        if self.head and now - self.head_checked >= 1.0:
            self.head_checked = now
            if reachable(self.head, timeout=0.5):
                self.head_lost = None
            else:
                self.head_lost = self.head_lost or now
        return self.head_lost is not None and now - self.head_lost >= self.patience


def serve(path: str, launcher: str) -> None:
    forkserver.name_process(forkserver.TEMPLATE_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = _Server(path, launcher)
    server.preload()
    server.listen()
    request = server.serve()
    if request is None:
        return
    sys.argv = [launcher, *request["args"]]
    runpy.run_path(launcher, run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        client(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
