"""What the host and the runtime in a kernel say to each other, whatever the kind of kernel: the
bootstrap that loads the runtime, the comm that opens it, the version check, which messages are
outputs for the caller, and how a kernel on an environment is launched (shared with the server).

Imports nothing that talks to a kernel (no zmq, no websocket): the server extension uses it too."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import KernelStartError
from ..outputs import OutputSink
from . import runtime
from .contract import Hello, Message

_RUNTIME_SOURCE = Path(runtime.__file__).read_text()

_LOADER = (
    "(lambda m: (__import__('sys').modules.__setitem__(m.__name__, m), "
    "exec(compile({src}, {path!r}, 'exec'), m.__dict__), m.install(get_ipython())))"
    "(__import__('types').ModuleType({name!r}))"
)

#: Cell code that loads the runtime into a fresh kernel (the env needs no fal_magic install).
BOOTSTRAP = _LOADER.format(src=repr(_RUNTIME_SOURCE), path=runtime.__file__, name=runtime.MODULE_NAME)


def bootstrap_from(copy: Path) -> str:
    """The bootstrap for a kernel on this machine: it reads the runtime from ``copy`` (written by
    ``write_runtime``), so the cell stays small (ipykernel hashes every cell's source in pure
    Python to name it: ~20 ms for the runtime's)."""
    return _LOADER.format(src=f"open({str(copy)!r}).read()", path=runtime.__file__, name=runtime.MODULE_NAME)


def write_runtime(directory: Path) -> Path:
    """This process's runtime source (the one it runs, even if the installed file changed since) as a
    file in its owner-only ``directory``, for ``bootstrap_from``."""
    copy = directory / "fal_magic_runtime.py"
    if not copy.exists():
        tmp = directory / f".fal_magic_runtime.{os.getpid()}.tmp"
        tmp.write_text(_RUNTIME_SOURCE)
        os.replace(tmp, copy)
    return copy


#: Output message types forwarded to the caller as display outputs.
DISPLAY_TYPES = ("display_data", "update_display_data", "execute_result")

msg_counter = itertools.count().__next__

#: How often, at the longest, liveness is checked while a request runs.
LIVENESS_PERIOD = 0.2


def forward_output(kind: str, content: dict[str, Any], sink: OutputSink) -> bool:
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


def is_runtime_reply(kind: str, content: dict[str, Any]) -> bool:
    """Whether an iopub message is the runtime's reply to a comm request."""
    return kind == "comm_msg" and content.get("data", {}).get("op") == "result"


def check_hello(hello: Hello) -> None:
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


def comm_open(session: Any, comm_id: str) -> dict[str, Any]:
    """The comm_open message that connects the host to the runtime (it answers with ``hello``)."""
    msg: dict[str, Any] = session.msg("comm_open", {"comm_id": comm_id, "target_name": runtime.COMM_TARGET,
                                                    "data": {}})
    return msg


def is_hello(m: Message) -> bool:
    """Whether a message is the runtime's ``hello`` on its comm."""
    return m["msg_type"] == "comm_msg" and m["content"]["data"].get("op") == "hello"


def kernel_env(env_path: Path, path: str) -> dict[str, str]:
    """The variables a kernel on the environment at ``env_path`` runs with (``path``: the PATH to
    put its ``bin`` in front of). Bytecode writing is on: the env is fal_magic's, and the modules a
    kernel compiles on import are kept for later kernels and environments (see envs/bytecode.py)."""
    return {"VIRTUAL_ENV": str(env_path), "PATH": f"{env_path / 'bin'}{os.pathsep}{path}",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1", "PYTHONDONTWRITEBYTECODE": ""}


def kernel_argv(python: str) -> list[str]:
    """The command that starts an ipykernel on ``python`` (an env's interpreter, by absolute path)."""
    return [python, "-m", "ipykernel_launcher", "-f", "{connection_file}",
            "--HistoryManager.enabled=False", "--Application.log_level=WARN",
            "--IPKernelApp.capture_fd_output=False"]  # the runtime captures descriptors 1 and 2 itself
