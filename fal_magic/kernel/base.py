"""What a local and a remote kernel share: the runtime bootstrap, the version check, the routing of
a request's output messages into the caller, and the fields the pool and the kernel list read."""
from __future__ import annotations

import itertools
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import KernelDiedError, KernelStartError
from ..outputs import OutputSink
from . import runtime

_RUNTIME_SOURCE = Path(runtime.__file__).read_text()

#: Cell code that loads the runtime into a fresh kernel (the env needs no fal_magic install).
BOOTSTRAP = (
    "(lambda m: (__import__('sys').modules.__setitem__(m.__name__, m), "
    "exec(compile({src!r}, {path!r}, 'exec'), m.__dict__), m.install(get_ipython())))"
    "(__import__('types').ModuleType({name!r}))"
).format(src=_RUNTIME_SOURCE, path=runtime.__file__, name=runtime.MODULE_NAME)

#: Output message types forwarded to the caller as display outputs.
DISPLAY_TYPES = ("display_data", "update_display_data", "execute_result")

msg_counter = itertools.count().__next__

#: How often, at the longest, liveness is checked while a request runs.
LIVENESS_PERIOD = 0.2

#: Serves a nested isolated call: request frames and the caller's sink in, (status, frames) out.
NestedHandler = Callable[[list, OutputSink], "tuple[bytes, list]"]


class NotStarted(KernelDiedError):
    """The kernel died before it began the request, so the request did not run and may be retried."""


@dataclass
class Reply:
    """The end of one request: the comm reply (calls) or the execute_reply content (cells)."""

    content: dict[str, Any]
    buffers: list = field(default_factory=list)


def forward_output(kind: str, content: dict, sink: OutputSink) -> bool:
    """Pass one iopub message of the running request to the caller; False if it is not an output."""
    if kind == "stream":
        sink.stream(content["name"], content["text"])
    elif kind in DISPLAY_TYPES:
        sink.display(kind, content)
    elif kind == "clear_output":
        sink.clear(content.get("wait", False))
    else:
        return False
    return True


def runtime_reply(kind: str, content: dict) -> bool:
    """Whether an iopub message is the runtime's reply to a comm request."""
    return kind == "comm_msg" and content.get("data", {}).get("op") == "result"


def check_hello(hello: dict) -> None:
    """Refuse a kernel whose Python or cloudpickle differs from the host's: pickles cannot cross."""
    host = [sys.version_info.major, sys.version_info.minor]
    if hello["python"][:2] != host or hello["implementation"] != sys.implementation.name:
        raise KernelStartError(
            f"the kernel runs {hello['implementation']} {'.'.join(map(str, hello['python']))} "
            f"but the host runs {sys.implementation.name} {sys.version.split()[0]}: pickles cannot cross"
        )
    import cloudpickle

    if hello["cloudpickle"] != cloudpickle.__version__:
        raise KernelStartError(f"the kernel has cloudpickle {hello['cloudpickle']}, the host "
                               f"{cloudpickle.__version__}: they must match")


def comm_open(session: Any, comm_id: str) -> dict:
    """The comm_open message that connects the host to the runtime (it answers with ``hello``)."""
    return session.msg("comm_open", {"comm_id": comm_id, "target_name": runtime.COMM_TARGET, "data": {}})


def is_hello(m: dict) -> bool:
    return m["msg_type"] == "comm_msg" and m["content"]["data"].get("op") == "hello"


def slot_name(key: str, host: str | None) -> str:
    """The pool's name for a group of kernels: the key, and the host for remote ones."""
    return key if host is None else f"{key}@{host}"


class KernelBase:
    """The bookkeeping every kernel has; the pool and the kernel list read these fields."""

    #: Where the kernel runs: None here, else the server's URL.
    host: str | None = None

    def __init__(self, key: str, requirements: tuple[str, ...]) -> None:
        self.key = key
        self.requirements = requirements
        self.id = uuid.uuid4().hex[:12]
        self.state = "starting"  # starting | idle | busy | stopping | dead
        self.calls = 0
        self.started_at = time.time()
        self.last_used = self.started_at
        self.deadline = 0.0  # only idle kernels are culled; the pool's release() sets the real deadline
        self.pid: int | None = None
        self.machine_type: str | None = None
        self.kill_reason: str | None = None
        self.comm_id = uuid.uuid4().hex

    def shutdown(self, now: bool = False) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        raise NotImplementedError

    def _ctrl_c(self, interrupted_at: float | None) -> float:
        """Ctrl-C while waiting: the first interrupts the kernel (returns when); a second one stops
        waiting at once and shuts the kernel down."""
        if interrupted_at is not None:
            self.shutdown(now=True)
            raise KeyboardInterrupt
        self.interrupt()
        return time.monotonic()

    def _check_grace(self, interrupted_at: float | None, grace: float) -> None:
        """An interrupted request that has not stopped within ``grace`` seconds costs its kernel."""
        if interrupted_at is not None and time.monotonic() - interrupted_at > grace:
            self.shutdown(now=True)
            raise KernelDiedError(
                f"the interrupted call did not stop within {grace:g}s; its kernel was shut down "
                "(the next call starts a fresh one)") from KeyboardInterrupt()

    @property
    def slot(self) -> str:
        return slot_name(self.key, self.host)


def kernel_env(env_path: Path, path: str) -> dict[str, str]:
    """The variables a kernel on the environment at ``env_path`` runs with (``path``: the PATH to
    put its ``bin`` in front of). Bytecode writing is on: the env is fal_magic's, and the modules a
    kernel compiles on import are kept for later kernels and environments (see envs/bytecode.py)."""
    return {"VIRTUAL_ENV": str(env_path), "PATH": f"{env_path / 'bin'}{os.pathsep}{path}",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1", "PYTHONDONTWRITEBYTECODE": ""}


def kernel_argv(python: str) -> list[str]:
    """The command that starts an ipykernel on ``python`` (an env's interpreter, by absolute path)."""
    return [python, "-m", "ipykernel_launcher", "-f", "{connection_file}",
            "--HistoryManager.enabled=False", "--Application.log_level=WARN"]
