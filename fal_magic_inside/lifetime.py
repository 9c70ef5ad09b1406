"""A kernel of a user's pool (SPEC 13) keeps its own deadline: it outlives the process that started
it, and ends itself once its deadline has passed while no process leases it, whoever is left.

The host registers the kernel as a file whose modification time is the deadline (``ENTRY_ENV``) and a
lease file whose flock the leaseholder holds (``LEASE_ENV``; the operating system drops it with its
holder). A thread here looks every ``PERIOD`` seconds: with the lease free and the deadline past, it
removes the kernel's files and ends the process; with the lease free while a call runs, the caller
died mid-call, and the call is interrupted (the kernel then serves the next caller); with the entry
gone, someone stopped the kernel.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time

from .shm import SHM_ENV

ENTRY_ENV = "FAL_MAGIC_ENTRY"
LEASE_ENV = "FAL_MAGIC_LEASE"
#: Files of the kernel's to remove when it ends (``os.pathsep``-separated): its log, its call mark.
FILES_ENV = "FAL_MAGIC_OWN_FILES"
#: Its connection file, which names its sockets (removed with it).
CONNECTION_ENV = "FAL_MAGIC_CONNECTION_FILE"
PERIOD = 0.2


class Lifetime:
    """The watchdog thread; ``calling`` is true while a call of a host runs in the kernel."""

    def __init__(self, entry: str, lease: str, files: list[str], connection_file: str) -> None:
        self.entry = entry
        self.lease = lease
        self.files = files
        self.connection_file = connection_file
        self.calling = False
        self.interrupted = False
        self.fd = os.open(lease, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        threading.Thread(target=self._watch, name="fal_magic-lifetime", daemon=True).start()

    def _free(self) -> bool:
        """Take the lease if no one holds it (then it is ours until ``_give_back``)."""
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def _give_back(self) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _watch(self) -> None:
        while True:
            time.sleep(PERIOD)
            try:
                deadline = os.stat(self.entry).st_mtime
            except FileNotFoundError:
                self.end()  # stopped from outside: its entry is gone
                return
            if self.calling:
                if not self.interrupted and self._free():  # the caller died mid-call
                    self._give_back()
                    self.interrupted = True
                    os.kill(os.getpid(), signal.SIGINT)
                continue
            self.interrupted = False
            if time.time() < deadline or not self._free():
                continue
            try:
                if time.time() >= os.stat(self.entry).st_mtime:  # (not extended just before it was freed)
                    self.end()
                    return
            except FileNotFoundError:
                self.end()
                return
            finally:
                self._give_back()

    def end(self) -> None:
        """Remove the kernel's entry, lease, sockets and files, then end the process."""
        paths = [self.entry, self.lease, *self.files, self.connection_file]
        try:
            with open(self.connection_file) as f:
                info = json.load(f)
            if info.get("transport") == "ipc":
                paths += [f"{info['ip']}-{info[name]}" for name in
                          ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port") if name in info]
        except (OSError, ValueError, KeyError):
            pass
        shm_dir = os.environ.get(SHM_ENV, "")
        if shm_dir:  # its arena's segments (a host's mappings of them stay valid)
            prefix = f"k-{os.getpid()}-"
            try:
                paths += [os.path.join(shm_dir, n) for n in os.listdir(shm_dir) if n.startswith(prefix)]
            except OSError:
                pass
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        if shm_dir:
            remove_if_empty(shm_dir)
        os._exit(0)


def remove_if_empty(directory: str) -> None:
    """Remove the pool's shared-memory directory once nothing is left in it (it holds memory, not
    disk); a process about to put a segment there then sends that buffer inline instead."""
    try:
        os.rmdir(directory)
    except OSError:
        pass


def watch() -> Lifetime | None:
    """Start the watchdog when this kernel belongs to a user's pool (its host said so), else None."""
    entry, lease = os.environ.get(ENTRY_ENV), os.environ.get(LEASE_ENV)
    if not entry or not lease:
        return None
    files = [p for p in os.environ.get(FILES_ENV, "").split(os.pathsep) if p]
    return Lifetime(entry, lease, files, os.environ.get(CONNECTION_ENV, ""))
