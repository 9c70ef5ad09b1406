"""The contract every kind of kernel meets (a local process, a kernel on a Jupyter Server).

The pool and the kernel list hold kernels only through ``Kernel``: they start, lease, call, interrupt,
cull and shut down any kind the same way. A kind supplies its transport (how a message is sent, how
the next one arrives, whether the process is still there); the bookkeeping of a request lives once,
in ``request.py``. The typed records below are what host and runtime exchange.
"""
from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from ..envs import EnvSpec
from ..errors import KernelDiedError
from ..outputs import OutputSink

#: A pickled object as frames: the pickle stream, then its out-of-band buffers (``wire.dumps``).
Frames = list[Any]

#: Receives progress lines while an environment builds or a kernel starts.
Progress = Callable[[str], None]

#: Serves a nested isolated call: request frames and the caller's sink in, (status, frames) out.
NestedHandler = Callable[[Frames, OutputSink], "tuple[bytes, Frames]"]

State = Literal["starting", "idle", "busy", "stopping", "dead"]


class Message(TypedDict):
    """A Jupyter message as the host reads it (dates left as strings)."""

    header: dict[str, Any]
    parent_header: dict[str, Any]
    msg_type: str
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[Any]


class Hello(TypedDict):
    """The runtime's first word on its comm: who it is, so versions are checked before any pickle."""

    op: Literal["hello"]
    pid: int
    python: list[int]
    implementation: str
    cloudpickle: str
    executable: str
    fast: bool


class NotStartedError(KernelDiedError):
    """The kernel died before it began the request, so the request did not run and may be retried."""


@dataclass
class Reply:
    """The end of one request: the runtime's reply (calls, push, pull) or the execute_reply content (cells)."""

    content: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)
    #: The kernel that served it (set by the pool): where a post-mortem debugger finds the exception.
    kernel_id: str | None = None


def slot_name(key: str, host: str | None, env_tag: str = "", machine_type: str | None = None) -> str:
    """The pool's name for a group of kernels: the key, the host and machine type for remote ones
    (a server may run each machine type on other hosts), and a tag of the kernel's environment
    variables (kernels with other values are other kernels)."""
    where = "" if host is None else f"@{host}" + (f"/{machine_type}" if machine_type is not None else "")
    return key + where + (f"+env-{env_tag}" if env_tag else "")


class Kernel(abc.ABC):
    """One kernel and its client. Leased by the pool to one caller at a time: not thread-safe, except
    ``kill``, ``is_alive`` and the fields, which any thread may use."""

    #: Where the kernel runs: None for this machine, else the server's URL.
    host: str | None = None

    def __init__(self, key: str, requirements: tuple[str, ...]) -> None:
        self.key = key
        self.requirements = requirements
        self.id = uuid.uuid4().hex[:12]
        self.state: State = "starting"
        self.calls = 0
        self.cells = 0  # cells run in its namespace (state a user would miss when the kernel goes)
        self.started_at = time.time()
        self.last_used = self.started_at
        self.deadline = 0.0  # only idle kernels are culled; the pool's release() sets the real deadline
        self.pid: int | None = None
        self.machine_type: str | None = None
        #: The cluster host a server started the kernel on (None: the server's own machine, or local).
        self.node: str | None = None
        self.kill_reason: str | None = None
        self.comm_id = uuid.uuid4().hex
        self.env_tag = ""  # a keyed digest of its environment variables (set by the pool; never the values)
        #: On another Python than the caller's: results and exceptions come back as plain pickles,
        #: functions as their source (bytecode does not cross versions). Set by the pool.
        self.plain = False
        #: Called once the pool lets go of the kernel (culled, shut down, died): its widgets close.
        self.on_forget: list[Callable[[], None]] = []

    @property
    def slot(self) -> str:
        return slot_name(self.key, self.host, self.env_tag, self.machine_type)

    # -- life cycle ----------------------------------------------------------------------

    @abc.abstractmethod
    def start(self, spec: EnvSpec, progress: Progress, timeout: float) -> None:
        """Get ``spec``'s environment, launch the kernel on it and load the runtime; the kernel is
        then ready for requests. KernelStartError (or EnvironmentBuildError) otherwise, with nothing
        left running."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """Whether the kernel process still runs, as far as can be told without a round trip."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """SIGINT to the kernel: KeyboardInterrupt in the running code; the kernel stays."""

    @abc.abstractmethod
    def kill(self, reason: str) -> None:
        """End the kernel now, from any thread; the thread serving a request reports ``reason``."""

    @abc.abstractmethod
    def shutdown(self, now: bool = False) -> None:
        """Stop the kernel (politely unless ``now``) and remove what it left; safe to call twice."""

    def release_slot(self) -> None:
        """Called once the pool holds no kernel of this one's slot any more: let go of what the
        slot kept (a local environment's shared lock). Nothing, by default."""

    # -- requests ------------------------------------------------------------------------

    def call(self, frames: Frames, sink: OutputSink, grace: float, nested: NestedHandler | None = None) -> Reply:
        """Run a pickled call (frames from ``wire.dump_call``); the runtime's reply with its frames.
        ``nested`` serves the isolated calls the function makes while it runs (None: refused)."""
        self.calls += 1
        return self._runtime_request("call", frames, sink, grace, nested, **self._crossing())

    def push(self, frames: Frames, sink: OutputSink, grace: float) -> Reply:
        """Set variables in the kernel's namespace from a pickled dict (``%%isolated --push``)."""
        return self._runtime_request("push", frames, sink, grace)

    def post_mortem(self, sink: OutputSink, grace: float, texts: dict[str, str]) -> Reply:
        """Debug the last exception of the kernel's last call or cell, in the kernel, with the person
        at ``sink`` (a debugger session that reads its commands through the stdin bridge); ``texts``
        are the lines of the code that raised, by file, that the debugger shows."""
        return self._runtime_request("post_mortem", [], sink, grace, sources=texts)

    def pull(self, names: list[str], sink: OutputSink, grace: float) -> Reply:
        """Fetch variables from the kernel's namespace (``%%isolated --pull``), pickled as a dict."""
        return self._runtime_request("pull", [], sink, grace, names=names, **self._crossing())

    def _crossing(self) -> dict[str, Any]:
        """The request field that asks for results another Python can read, when it is one."""
        return {"plain": True} if self.plain else {}

    @abc.abstractmethod
    def comm_message(self, kind: str, comm_id: str, data: dict[str, Any], buffers: list[Any], sink: OutputSink,
                     grace: float) -> None:
        """Pass a frontend's ``comm_msg`` or ``comm_close`` to a comm in the kernel (a widget's), and serve
        it until the kernel is idle again: what it prints or sends goes to ``sink``."""

    @abc.abstractmethod
    def answer_input(self, content: dict[str, Any]) -> None:
        """Reply to the running code's ``input_request`` (on the kernel's stdin channel) with ``content``
        (the person's ``value``, or the host's error in a field of its own)."""

    @abc.abstractmethod
    def execute(self, code: str, sink: OutputSink, grace: float) -> Reply:
        """Run cell source in the kernel's namespace; the execute_reply content. The cell may ask for
        input when ``sink.can_ask()``, as a local cell may when its frontend allows stdin."""

    @abc.abstractmethod
    def _runtime_request(self, op: str, frames: Frames, sink: OutputSink, grace: float,
                         nested: NestedHandler | None = None, **fields: Any) -> Reply:
        """Send one request to the runtime's comm and serve it to its end (``request.serve``)."""

    # -- the transport the request loop reads ----------------------------------------------

    @abc.abstractmethod
    def next_event(self, timeout: float, sink: OutputSink,
                   nested: NestedHandler | None) -> tuple[str, Any] | None:
        """The next message for a running request, as ``(channel, Message)``, or, outside the Jupyter
        channels, ``("reply", Reply)`` for its reply; None when nothing came within ``timeout``
        (or the line to the kernel broke: ``raise_if_dead`` then says so). Serves nested calls."""

    def began(self, msg_id: str) -> bool:
        """Whether the kernel has begun the request ``msg_id`` sent outside the Jupyter channels (whose
        own messages say so otherwise). None are, by default."""
        return False

    @abc.abstractmethod
    def raise_if_dead(self, when: str) -> None:
        """Mark the kernel dead and raise KernelDiedError (saying ``when`` and what is known) if its
        process is gone."""
