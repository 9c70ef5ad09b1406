"""The server's SSH to its cluster hosts: one connection per host, shared by every command and
kernel launch, and on it one kept shell per host for short commands.

A new SSH session costs ~130 ms on a host (sshd forks, sets up and tears down a session for each,
measured on this project's sshd harness); a line written to a shell that is already open costs
~0.3 ms. Checking for a built environment, launching a kernel (``nohup ... &``) and ending one
return at once, so they go through the kept shell, one at a time per host; an environment build,
which runs for minutes and streams its progress, has a session of its own (``run_on``).
"""
from __future__ import annotations

import getpass
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import EnvironmentBuildError

#: Seconds a short command may take on a host before its shell is given up.
SHORT_TIMEOUT = 60.0


class HostUnreachable(EnvironmentBuildError):
    """No SSH connection to a host could be made (it is down, or refuses the key)."""


_connections: dict[str, Any] = {}
_connections_lock = threading.Lock()
_shells: dict[str, "HostShell"] = {}
_shell_locks: dict[str, threading.Lock] = {}  # one command at a time in each host's shell


def connection(host: str) -> Any:
    """The server's SSH connection to ``host``, made once and shared by every command and kernel launch
    (a handshake costs ~0.1 s; paramiko runs many sessions over one transport)."""
    with _connections_lock:
        client = _connections.get(host)
        if client is not None and _alive(client):
            return client
    fresh = ssh_client(host)
    fresh.get_transport().set_keepalive(30)
    with _connections_lock:
        current = _connections.get(host)
        if current is not None and current is not client and _alive(current):
            fresh.close()  # another thread connected meanwhile
            return current
        if current is not None:
            current.close()
        _connections[host] = fresh
        return fresh


def _alive(client: Any) -> bool:
    transport = client.get_transport()
    return transport is not None and transport.is_active()


def close_connections() -> None:
    """Close the SSH connections to every host, and their shells (the server is stopping)."""
    with _connections_lock:
        clients = list(_connections.values())
        _connections.clear()
        shells = list(_shells.values())
        _shells.clear()
    for shell in shells:
        shell.close()
    for client in clients:
        client.close()


def ssh_client(host: str) -> Any:
    """An SSH connection to ``host`` as gateway_provisioners makes it: the user's key, known hosts
    only (``GP_REMOTE_USER`` names another user), on port ``GP_SSH_PORT`` (read now, where
    gateway_provisioners reads it once at import)."""
    import paramiko

    ssh_port = int(os.environ.get("GP_SSH_PORT") or 22)
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(socket.gethostbyname(host), port=ssh_port,
                       username=os.environ.get("GP_REMOTE_USER") or getpass.getuser(), timeout=30)
    except Exception as exc:
        client.close()
        raise HostUnreachable(f"cannot reach host {host} over SSH: {type(exc).__name__}: {exc}") from None
    return client


def run_on(host: str, command: str) -> Iterator[str]:
    """Run ``command`` on ``host`` over the shared connection; its output lines (stderr merged in), as
    they come."""
    import paramiko

    try:
        channel = connection(host).get_transport().open_session()
    except paramiko.SSHException:  # the connection broke since it was last used: once more, anew
        with _connections_lock:
            broken = _connections.pop(host, None)
        if broken is not None:
            broken.close()
        channel = connection(host).get_transport().open_session()
    try:
        channel.set_combine_stderr(True)
        channel.exec_command(command)
        for line in channel.makefile("r"):
            yield line.rstrip("\n")
    finally:
        channel.close()


class HostShell:
    """A shell kept open on a host over its shared connection, running one short command at a time."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.marker = f"fal-magic-done-{os.urandom(8).hex()}"
        self.channel = connection(host).get_transport().open_session()
        self.channel.settimeout(SHORT_TIMEOUT)
        self.channel.exec_command("exec /bin/sh")
        self.output = self.channel.makefile("r")

    def send(self, command: str) -> None:
        """Start ``command`` in a subshell (its exports stay there), reading nothing of this shell's
        input; then mark the end of its output."""
        self.channel.sendall(f"( {command}\n) </dev/null 2>&1; echo; echo {self.marker}\n".encode())

    def read(self) -> list[str]:
        """The command's output lines, without empty ones, up to the end mark."""
        lines: list[str] = []
        for line in self.output:
            line = line.rstrip("\n")
            if line == self.marker:
                return [kept for kept in lines if kept]
            lines.append(line)
        raise OSError(f"the shell on host {self.host} ended")

    def close(self) -> None:
        self.channel.close()


def run_short(host: str, command: str) -> list[str]:
    """Run a command that returns at once on ``host``, through its kept shell; its non-empty output
    lines (stderr merged in). A shell found dead before the command was sent is replaced; one that
    breaks while the command runs is dropped and the error raised (the command may have run)."""
    import paramiko

    with _connections_lock:
        lock = _shell_locks.setdefault(host, threading.Lock())
    with lock:
        shell = _shells.get(host)
        if shell is not None:
            try:
                shell.send(command)
            except (OSError, paramiko.SSHException):  # gone since its last command: nothing was run
                shell.close()
                shell = None
        if shell is None:
            shell = _shells[host] = HostShell(host)
            shell.send(command)
        try:
            return shell.read()
        except BaseException:
            _shells.pop(host, None)
            shell.close()
            raise
