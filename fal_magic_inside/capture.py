"""What is written to a file descriptor (by subprocesses, C code) reaches the call's output: a pipe
read by a thread into the kernel's stream, which a call drains at its end, so a subprocess's last
lines are part of its call and not lost after it."""
from __future__ import annotations

import os
import sys
import threading
from typing import Any


class FdCapture:
    """What is written to a file descriptor (by subprocesses, C code) goes to the kernel's stream of
    that name and to the kernel's log, read by a thread. Unlike ipykernel's own capture (turned off
    in fal_magic kernels), it can be drained: at the end of a call every byte written so far is in
    the stream, so a subprocess's last lines are part of its call and not lost after it."""

    def __init__(self, fd: int, name: str) -> None:
        import codecs

        self.name = name
        self.log = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.read_end = read_end
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, name=f"fal_magic-fd{fd}", daemon=True).start()

    def _watch(self) -> None:
        import select

        poller = select.poll()
        poller.register(self.read_end, select.POLLIN)
        while True:
            poller.poll()
            self.take()

    def take(self) -> None:
        """Move what the pipe holds into the stream (only ever under the lock: see ``drain``)."""
        with self.lock:
            try:
                data = os.read(self.read_end, 1 << 16)
            except BlockingIOError:
                return
            try:
                os.write(self.log, data)
            except OSError:
                pass
            text = self.decoder.decode(data)
            if text:
                getattr(sys, self.name).write(text)

    def drain(self) -> None:
        """Return once everything written to the descriptor so far has reached the stream."""
        import fcntl
        import termios

        pending = bytearray(4)
        while fcntl.ioctl(self.read_end, termios.FIONREAD, pending) == 0 and int.from_bytes(pending, sys.byteorder):
            self.take()
        with self.lock:  # a take() the watcher began has finished writing
            pass


_captures: list[FdCapture] = []


def drain_captured_output() -> None:
    """Everything written to descriptor 1 so far is in ``sys.stdout``."""
    for capture in _captures:
        capture.drain()


def capture_stdout(shell: Any) -> None:
    """Capture descriptor 1 into the kernel's ``sys.stdout`` (once per kernel), drained after each call
    and each cell. Descriptor 2 stays the kernel's log: what a dying process writes there must not
    wait in a pipe."""
    if hasattr(sys.stdout, "session") and not _captures:  # an ipykernel stream: the kernel's own output
        _captures.append(FdCapture(1, "stdout"))
        shell.events.register("post_execute", drain_captured_output)  # a cell's subprocesses too
