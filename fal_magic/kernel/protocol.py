"""What the host and the runtime in a kernel say to each other, whatever the kind of kernel: the
bootstrap that loads the runtime, the comm that opens it, the version check, which messages are
outputs for the caller, and how a kernel on an environment is launched (shared with the server).

Imports nothing that talks to a kernel (no zmq, no websocket): the server extension uses it too."""
from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import fal_magic_inside
from fal_magic_inside.runtime import COMM_TARGET

from ..errors import KernelStartError
from ..outputs import OutputSink
from .contract import Hello, Message

#: The package that runs inside kernels: its directory, and its modules' sources (a template's fork
#: server aside: it runs beside the host's copy).
INSIDE_DIR = Path(fal_magic_inside.__file__).parent
_SOURCES = {path.name: path.read_text() for path in sorted(INSIDE_DIR.glob("*.py")) if path.name != "forkserver.py"}

#: Cell code that loads the runtime from a copy of the package (``write_runtime``), then installs it.
_FROM_COPY = ("(lambda sys: (sys.path.insert(0, {root!r}), __import__('fal_magic_inside.runtime'), "
              "sys.modules['fal_magic_inside.runtime'].install(get_ipython())))(__import__('sys'))")

#: Cell code that loads the runtime from its sources, carried in the cell, without writing a file: a
#: finder serves the package's modules (with the host's file names, which its tracebacks show).
_FROM_SOURCES = """\
def _fal_magic_load(sources, directory):
    import importlib.abc, importlib.util, os, sys

    class Sources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            package, _, module = name.partition(".")
            file = module + ".py" if module else "__init__.py"
            if package != "fal_magic_inside" or file not in sources:
                return None
            spec = importlib.util.spec_from_loader(name, self, origin=os.path.join(directory, file),
                                                   is_package=not module)
            spec.has_location = True
            return spec

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            code = compile(sources[os.path.basename(module.__spec__.origin)], module.__spec__.origin, "exec")
            exec(code, module.__dict__)

    sys.meta_path.insert(0, Sources())
    __import__("fal_magic_inside.runtime")
    sys.modules["fal_magic_inside.runtime"].install(get_ipython())


_fal_magic_load({sources!r}, {directory!r})
del _fal_magic_load
"""

#: Cell code that loads the runtime into a kernel on another machine (its environment needs no
#: fal_magic install, and the host's runtime is the one that runs).
BOOTSTRAP = _FROM_SOURCES.format(sources=_SOURCES, directory=str(INSIDE_DIR))


def bootstrap_from(root: Path) -> str:
    """The bootstrap for a kernel on this machine: it imports the package from its copy under ``root``
    (written by ``write_runtime``), so the cell stays small (ipykernel hashes every cell's source in
    pure Python to name it: ~20 ms for the runtime's)."""
    return _FROM_COPY.format(root=str(root))


def write_runtime(directory: Path) -> Path:
    """This process's copy of the package (the one it runs, even if the installed files changed
    since), written once under the owner-only ``directory``; the directory to put on ``sys.path``."""
    root = directory / "inside"
    if not (root / "fal_magic_inside" / "runtime.py").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".inside-", dir=directory))
        (tmp / "fal_magic_inside").mkdir()
        for name, text in _SOURCES.items():
            (tmp / "fal_magic_inside" / name).write_text(text)
        try:
            os.rename(tmp, root)
        except OSError:  # another thread of this process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


#: Comm messages (a widget's) that a kernel publishes, bridged to the caller's frontend.
COMM_TYPES = ("comm_open", "comm_msg", "comm_close")

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


def check_hello(hello: Hello, python: str | None = None) -> None:
    """Refuse a kernel whose Python is not ``python`` (``cpython-3.12``; default: the host's), or
    whose cloudpickle differs from the host's: pickles cannot cross."""
    wanted = python or f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"
    running = f"{hello['implementation']}-{hello['python'][0]}.{hello['python'][1]}"
    if running != wanted:
        raise KernelStartError(
            f"the kernel runs {hello['implementation']} {'.'.join(map(str, hello['python']))} "
            f"but {wanted.replace('-', ' ')} was expected (the host runs {sys.implementation.name} "
            f"{sys.version.split()[0]}): pickles cannot cross"
        )
    import cloudpickle

    if hello["cloudpickle"] != cloudpickle.__version__:
        raise KernelStartError(f"the kernel has cloudpickle {hello['cloudpickle']}, the host "
                               f"{cloudpickle.__version__}: they must match")


def comm_open(session: Any, comm_id: str) -> dict[str, Any]:
    """The comm_open message that connects the host to the runtime (it answers with ``hello``)."""
    msg: dict[str, Any] = session.msg("comm_open", {"comm_id": comm_id, "target_name": COMM_TARGET,
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
