"""The kernel provisioner of cluster kernels: gateway_provisioners' DistributedProvisioner, with
launches that neither block the server nor wait on fixed pauses, and kernels that end when the
server is done with them.

- **Launching** runs the launch command in a worker thread, in the host's kept shell on the server's
  shared connection to it (``ssh.run_short``): gateway_provisioners opens a new SSH connection per
  launch, on the server's event loop, so kernels started together were started one after the other,
  and every call through the server waited meanwhile; and a new SSH session alone costs ~130 ms.
- **Waiting for the kernel's connection details** awaits them as they arrive: gateway_provisioners
  looks only every ``GP_POLL_INTERVAL`` (0.5 s), which a first call on a host paid in full.
- **Ending** a kernel through DistributedProvisioner asks its listener process on the host to stop
  and then takes the listener's silence for the kernel's death, so a kernel that did not exit by
  itself (it waits for that listener, a non-daemon child) lives on, and so does one the server
  restarted after a death and shut down before any host connected. This provisioner ends the process
  (and the listener) on the host over SSH when its kernel is cleaned up, and removes its connection
  file and log there.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import socket
from typing import Any

from gateway_provisioners import response_manager
from gateway_provisioners.distributed import DistributedProvisioner
from gateway_provisioners.remote_provisioner import RemoteProvisionerBase

from .cluster import end_on_host
from .ssh import run_short

# gateway_provisioners reads the launchers' connection info by polling its response socket every
# 0.1 ms on the server's event loop, each poll a blocking accept of up to GP_SOCKET_TIMEOUT (10 ms).
# Once a cluster kernel existed the loop was blocked nearly all the time, and every call through the
# server, its own kernels' too, waited ~40 ms. On a non-blocking socket each poll awaits a connection
# instead (tornado awaits a coroutine callback before running it again).
response_manager.socket_timeout = 0.0


class HostProvisioner(DistributedProvisioner):
    """DistributedProvisioner, launching off the event loop over a shared SSH connection, noticing
    the kernel's connection details as they come, and ending the kernel's process on its host at
    cleanup."""

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        self.kernel_log = None
        self.assigned_host = self._determine_next_host(kwargs.get("env", {}))
        self.ip = self.assigned_ip = await asyncio.to_thread(socket.gethostbyname, self.assigned_host)
        options = RemoteProvisionerBase._scrub_kwargs(kwargs)
        try:
            pid = await asyncio.to_thread(self._launch_remote_process, cmd, **options)
            self.pid = int(pid)
        except Exception as exc:
            self.log_and_raise(RuntimeError(f"could not start a kernel on host {self.assigned_host}: {exc}"))
        self.log_kernel_launch(cmd)
        await self.confirm_remote_startup()
        return self.connection_info

    def _build_startup_command(self, cmd: list[str], **kwargs: Any) -> Any:
        """gateway_provisioners' command (the kernelspec's variables exported, then ``nohup LAUNCHER
        ARGS & echo $!``), with the kernel forked from the environment's template on the host
        instead (``fal_magic_inside/host_template.py``), which writes its pid on descriptor 3."""
        startup = super()._build_startup_command(cmd, **kwargs)
        launch = "nohup" + "".join(f" {arg}" for arg in cmd) + f" >> {self.kernel_log} 2>&1 & echo $!"
        if not isinstance(startup, str) or not startup.endswith(launch) or len(cmd) < 2:
            return startup  # a local launch, or a command of another form: as it is
        python, launcher, *args = cmd
        client = os.path.join(os.path.dirname(launcher), "fal_magic_inside", "host_template.py")  # see launcher.py
        forked = " ".join(shlex.quote(part) for part in [python, client, launcher, *args])
        return f"{startup[:-len(launch)]}{forked} 3>&1 >> {shlex.quote(str(self.kernel_log))} 2>&1 < /dev/null"

    def _rsh(self, host: str, command: str) -> list[str]:
        """Run the launch command on ``host`` in its kept shell (``ssh.run_short``); its output lines."""
        return run_short(host, command)

    async def confirm_remote_startup(self) -> None:
        """Wait for the launcher's connection details (each wait on them lasts a few ms), up to the
        launch timeout."""
        self.start_time = RemoteProvisionerBase.get_current_time()
        while not await self.receive_connection_info():
            if RemoteProvisionerBase.get_time_diff(self.start_time) > self.launch_timeout:
                await self.kill()
                self.log_and_raise(TimeoutError(f"kernel {self.kernel_id} on host {self.assigned_host} sent no "
                                                f"connection details within {self.launch_timeout}s"))

    async def cleanup(self, restart: bool = False) -> None:
        host, pid, kernel_id, log = self.assigned_host, self.pid, self.kernel_id, self.kernel_log
        await super().cleanup(restart)
        if host and pid and pid > 0:
            await asyncio.to_thread(end_on_host, host, pid, kernel_id, log)
