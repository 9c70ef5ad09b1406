"""The kernel provisioner of cluster kernels: gateway_provisioners' DistributedProvisioner, whose
kernels end when the server is done with them.

Ending a kernel through DistributedProvisioner asks its listener process on the host to stop and
then takes the listener's silence for the kernel's death, so a kernel that did not exit by itself
(it waits for that listener, a non-daemon child) lives on, and so does one the server restarted
after a death and shut down before any host connected. This provisioner ends the process (and the
listener) on the host over SSH when its kernel is cleaned up, and removes its connection file and
log there.
"""
from __future__ import annotations

import asyncio

from gateway_provisioners import response_manager
from gateway_provisioners.distributed import DistributedProvisioner

from .cluster import end_on_host

# gateway_provisioners reads the launchers' connection info by polling its response socket every
# 0.1 ms on the server's event loop, each poll a blocking accept of up to GP_SOCKET_TIMEOUT (10 ms).
# Once a cluster kernel existed the loop was blocked nearly all the time, and every call through the
# server, its own kernels' too, waited ~40 ms. On a non-blocking socket each poll awaits a connection
# instead (tornado awaits a coroutine callback before running it again).
response_manager.socket_timeout = 0.0


class HostProvisioner(DistributedProvisioner):
    """DistributedProvisioner, with the kernel's process ended on its host at cleanup."""

    async def cleanup(self, restart: bool = False) -> None:
        host, pid, kernel_id, log = self.assigned_host, self.pid, self.kernel_id, self.kernel_log
        await super().cleanup(restart)
        if host and pid and pid > 0:
            await asyncio.to_thread(end_on_host, host, pid, kernel_id, log)
