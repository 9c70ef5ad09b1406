"""The one request loop: serve a request on any kind of kernel until it is done, it died, or it
never began.

A ``RequestTracker`` consumes the messages of one request and says when it is done; ``serve`` reads
them from the kernel's transport (``Kernel.next_event``), forwards outputs to the caller, checks
liveness, and turns Ctrl-C into an interrupt of the kernel, with a grace period after which the
kernel is given up.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fal_magic_inside.stdin import error_content

from ..errors import KernelDiedError
from ..outputs import OutputSink
from .contract import Kernel, NestedHandler, NotStartedError, Reply
from .protocol import COMM_TYPES, LIVENESS_PERIOD, forward_output, is_runtime_reply

#: Where the end of a request comes from: the runtime's comm reply on iopub, an execute_reply on the
#: shell channel, or a reply outside the Jupyter channels (the local fast channel); a message without
#: a reply (a frontend's message to a widget) ends when the kernel is idle again.
ReplyRoute = Literal["comm", "shell", "outside", "message"]


class Stop:
    """Asks a request served in another thread to stop, as Ctrl-C would in its own: the kernel is
    interrupted once it has begun the request (and given up after the grace period, as for Ctrl-C).
    A ``.map`` or a ``submit`` future holds one per call; ``stopping`` hands it to the serving thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


_current = threading.local()


@contextmanager
def stopping(stop: Stop) -> Iterator[None]:
    """Requests this thread serves meanwhile (nested calls included) end early once ``stop`` is set."""
    outer = getattr(_current, "stop", None)
    _current.stop = stop
    try:
        yield
    finally:
        _current.stop = outer


class RequestTracker:
    """The state of one request: whether the kernel began it, its outputs, its reply, its end.

    A request is done when the kernel is idle again for it (every output is out) and, unless the
    reply travels on iopub before that idle status, its reply has come.
    """

    def __init__(self, msg_id: str, route: ReplyRoute, sink: OutputSink, kernel: Kernel) -> None:
        self.msg_id = msg_id
        self.route = route
        self.sink = sink
        self.kernel = kernel
        self.seen = False  # a message for it came: the kernel has begun it
        self.idle = False
        self.reply: Reply | None = None

    @property
    def begun(self) -> bool:
        """Whether the kernel has begun the request: a message for it came, or, outside the Jupyter
        channels, the kernel marked it (asked only on a death or a stop: not on the hot path)."""
        return self.seen or (self.route == "outside" and self.kernel.began(self.msg_id))

    def feed(self, channel: str, message: Any) -> bool:
        """Take one event of the transport; True once the request is done."""
        if channel == "reply":
            self.seen = True
            self.reply = message
        elif message["parent_header"].get("msg_id") == self.msg_id:
            self.seen = True
            content = message["content"]
            if channel == "shell":
                self.reply = Reply(content)
            elif channel == "iopub":
                kind = message["msg_type"]
                if forward_output(kind, content, self.sink):
                    pass
                elif kind in COMM_TYPES and content.get("comm_id") != self.kernel.comm_id:  # a widget's
                    self.sink.comm(self.kernel, message)
                elif is_runtime_reply(kind, content):
                    self.reply = Reply(content["data"], message["buffers"])
                elif kind == "status" and content["execution_state"] == "idle":
                    self.idle = True
        return self.idle and (self.reply is not None or self.route in ("comm", "message"))

    def result(self) -> Reply:
        if self.reply is None and self.route == "message":
            return Reply({})
        if self.reply is None:
            raise KernelDiedError("the kernel finished the request without a reply from the fal_magic runtime")
        return self.reply


def serve(kernel: Kernel, msg_id: str, sink: OutputSink, grace: float, route: ReplyRoute,
          nested: NestedHandler | None = None) -> Reply:
    """Serve the request ``msg_id`` (already sent) on ``kernel`` to its end and return its reply.

    The lease state (idle/busy) is the pool's business alone; this only ever marks a death. A death
    before the kernel began the request raises NotStartedError (the pool may retry it elsewhere).
    """
    tracker = RequestTracker(msg_id, route, sink, kernel)
    interrupted_at: float | None = None
    stop: Stop | None = getattr(_current, "stop", None)
    last_check = time.monotonic()
    try:
        while True:
            try:
                event = kernel.next_event(LIVENESS_PERIOD, sink, nested)
                now = time.monotonic()
                if event is None or now - last_check >= LIVENESS_PERIOD:
                    last_check = now
                    _check_liveness(kernel, tracker)
                    _check_grace(kernel, interrupted_at, grace)
                if event is not None and event[0] == "stdin":
                    _answer(kernel, tracker, event[1], nested)
                elif event is not None and tracker.feed(*event):
                    return tracker.result()
                if stop is not None and stop.is_set() and interrupted_at is None and tracker.begun:
                    interrupted_at = _ctrl_c(kernel, None)  # (before it began, the kernel would ignore it)
            except KeyboardInterrupt:
                interrupted_at = _ctrl_c(kernel, interrupted_at)
    finally:
        kernel.last_used = time.time()


def _answer(kernel: Kernel, tracker: RequestTracker, message: Any, nested: NestedHandler | None) -> None:
    """The running code asks for input (``input()``, ``getpass()``, a debugger's prompt): ask the caller,
    after forwarding what the code printed before it asked, and reply with the answer, or with the
    caller's error (a cell, which ipykernel itself asks for, only knows end of input). Whatever the
    prompt says, it is a question for the person: the host answers nothing else on this channel."""
    if message["msg_type"] != "input_request" or message["parent_header"].get("msg_id") != tracker.msg_id:
        return
    for _ in range(100):  # what is already on its way: printed before the question
        event = kernel.next_event(0.01, tracker.sink, nested)
        if event is None or event[0] == "stdin":
            break
        tracker.feed(*event)
    content = message["content"]
    try:
        reply = {"value": tracker.sink.ask(str(content.get("prompt", "")), bool(content.get("password")))}
    except Exception as exc:  # (KeyboardInterrupt goes on: serve() interrupts the kernel)
        reply = {"value": "\x04"} if tracker.route == "shell" else error_content(exc)
    kernel.answer_input(reply)


def _check_liveness(kernel: Kernel, tracker: RequestTracker) -> None:
    try:
        kernel.raise_if_dead("during the call")
    except KernelDiedError as exc:
        if tracker.begun:
            raise
        raise NotStartedError(str(exc), exit_code=exc.exit_code, stderr_tail=exc.stderr_tail) from None


def _ctrl_c(kernel: Kernel, interrupted_at: float | None) -> float:
    """Ctrl-C while waiting: the first interrupts the kernel (returns when); a second one stops
    waiting at once and shuts the kernel down."""
    if interrupted_at is not None:
        kernel.shutdown(now=True)
        raise KeyboardInterrupt
    kernel.interrupt()
    return time.monotonic()


def _check_grace(kernel: Kernel, interrupted_at: float | None, grace: float) -> None:
    """An interrupted request that has not stopped within ``grace`` seconds costs its kernel."""
    if interrupted_at is not None and time.monotonic() - interrupted_at > grace:
        kernel.shutdown(now=True)
        raise KernelDiedError(
            f"the interrupted call did not stop within {grace:g}s; its kernel was shut down "
            "(the next call starts a fresh one)") from KeyboardInterrupt()
