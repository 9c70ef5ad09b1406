"""Host groups: kernels of a machine type run on other hosts, started by gateway_provisioners'
``DistributedProvisioner`` over SSH.

The server picks the next host of the group (round-robin), has the environment built there by
fal_magic itself (``python -m fal_magic envs build`` over SSH, at the same path as on every host, its
progress streamed back), and writes a kernelspec that pins the provisioner to that host. The kernel's
environment has ``pycryptodomex`` besides the user's requirements: gateway_provisioners' launcher
encrypts the connection details it sends back to the server with it.
"""
from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import re
import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..envs import EnvSpec, make_spec
from ..errors import EnvironmentBuildError, FalMagicError
from .ssh import run_on, run_short

#: What the launcher of gateway_provisioners needs in the kernel's environment.
LAUNCHER_PACKAGES = ("pycryptodomex",)


def check_groups(groups: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``machine_types`` as ``{name: {"hosts": [...], "env": {...}}}``; FalMagicError for anything else."""
    checked = {}
    for name, group in groups.items():
        hosts = group.get("hosts") if isinstance(group, Mapping) else None
        env = group.get("env", {}) if isinstance(group, Mapping) else None
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise FalMagicError(f"machine type {name!r}: 'hosts' must be a non-empty list of host names")
        if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise FalMagicError(f"machine type {name!r}: 'env' must map variable names to strings")
        checked[name] = {"hosts": list(hosts), "env": dict(env)}
    return checked


def cluster_spec(spec: EnvSpec) -> EnvSpec:
    """The spec of ``spec``'s environment on a host: the launcher's packages added (another key)."""
    return EnvSpec(requirements=make_spec([*spec.requirements, *LAUNCHER_PACKAGES]).requirements,
                   python=spec.python, cloudpickle=spec.cloudpickle)


def head_host(ip: str) -> str:
    """Where a host's kernels reach this server, from the ip it listens on: that ip, except where it
    listens on every interface (a host would reach itself at 0.0.0.0): then the address
    gateway_provisioners gives hosts for their kernels' connection details (``GP_RESPONSE_IP``)."""
    if ip in ("", "0.0.0.0", "::", "*"):
        from gateway_provisioners import response_manager

        ip = response_manager.response_ip or response_manager.local_ip
    return f"[{ip}]" if ":" in ip else ip


def loopback_only(ip: str) -> bool:
    """Whether a server listening on ``ip`` is out of other machines' reach (localhost, 127.x, ::1)."""
    try:
        return ip == "localhost" or ipaddress.ip_address(ip.strip("[]")).is_loopback
    except ValueError:
        return False


def head_certificates(certfile: str) -> str:
    """The certificates of this server's ``certfile`` (never a private key that file may also hold),
    as one base64 line: a host's kernels trust them for the server's blob endpoint."""
    text = Path(certfile).read_text()
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    return base64.b64encode("\n".join(blocks).encode()).decode() if blocks else ""


def slug(text: str) -> str:
    """A kernelspec-name-safe form of a group or host name."""
    return re.sub(r"[^a-zA-Z0-9._-]", "_", text)


class HostGroups:
    """The configured groups, the round-robin position in each, and the builds on hosts."""

    def __init__(self, groups: Mapping[str, Any], python: str, home: Path) -> None:
        self.groups = check_groups(groups)
        self.python = python
        self.home = home
        self._turns = {name: itertools.cycle(g["hosts"]) for name, g in self.groups.items()}
        self._lock = threading.Lock()
        self._built: dict[tuple[str, str], tuple[str, str]] = {}  # (host, key) -> its Python and launcher

    def group(self, machine_type: str) -> dict[str, Any]:
        if machine_type not in self.groups:
            raise FalMagicError(f"unknown machine_type {machine_type!r}; this server has: "
                                f"{', '.join(sorted(self.groups))}")
        return self.groups[machine_type]

    def next_host(self, machine_type: str) -> str:
        """The group's next host, in turn (gateway_provisioners' least-connection mode is broken)."""
        self.group(machine_type)
        with self._lock:
            return next(self._turns[machine_type])

    def build_on(self, host: str, spec: EnvSpec, progress: Callable[[str], None]) -> tuple[str, str]:
        """Build (or find) ``spec``'s environment on ``host``; return its Python and launcher paths.

        An environment this server built there before is only checked for (its two files, over the
        host's kept shell: under a ms, where running the build command to find it costs ~0.3 s)."""
        known = self._built.get((host, spec.key))
        if known is not None:
            python, launcher = known
            if "ok" in run_short(host, f"test -x {shlex.quote(python)} && test -f {shlex.quote(launcher)} && echo ok"):
                return known
            self._built.pop((host, spec.key), None)  # removed on the host since: build it again
        command = " ".join(shlex.quote(part) for part in [
            "env", f"FAL_MAGIC_HOME={self.home}", self.python, "-m", "fal_magic", "envs", "build",
            "--python", spec.python, "--cloudpickle", spec.cloudpickle, "--", *spec.requirements])
        result: dict[str, Any] = {}
        error: dict[str, Any] = {}
        output: list[str] = []
        for line in run_on(host, command):
            try:
                event = json.loads(line)
            except ValueError:
                output.append(line)
                continue
            if "progress" in event:
                progress(f"{host}: {event['progress']}")
            elif "error" in event:
                error = event
            else:
                result = event
        if error:
            raise EnvironmentBuildError(f"on host {host}: {error['error']}")
        if "python" not in result:
            raise EnvironmentBuildError(f"on host {host}: could not build the environment for "
                                        f"{', '.join(spec.requirements) or 'no requirements'}: "
                                        + ("\n".join(output[-20:]) or "the build command said nothing"))
        self._built[(host, spec.key)] = result["python"], result["launcher"]
        return result["python"], result["launcher"]


def end_on_host(host: str, pid: int, kernel_id: str, log: str | None) -> None:
    """End a kernel's process and its children on ``host``, and remove its connection file and log."""
    files = f"${{TMPDIR:-/tmp}}/kernel-{shlex.quote(kernel_id)}_*.json" + (f" {shlex.quote(log)}" if log else "")
    run_short(host, f"pkill -KILL -P {int(pid)}; kill -KILL {int(pid)}; rm -f {files}; true")
