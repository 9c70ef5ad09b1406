"""IPython magics: ``%%isolated`` runs a cell in a warm kernel; ``%isolated_kernels``, ``%isolated_shutdown``.

A thin layer over the same pool lease and kernel requests that ``@isolated`` uses.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from . import debugging
from .config import FalMagic, settings
from .envs import spec_for
from .envs.spec import describe_requirements
from .errors import FalMagicError, remote_cell_error
from .kernel import get_pool
from .kernel.contract import NotStartedError
from .kernel.tracebacks import attach, renumber_cells
from .kernel.by_source import dump_values_by_source
from .kernel.wire import dump_values, load_result
from .outputs import CellOutput, RemoteValue
from .progress import StatusLine
from .widget import kernels


def _parse(magic: Any, line: str) -> Any:
    """Parse a magic's line like a shell would (quotes removed: ``"numpy<3"``); bad input is a UsageError."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse arguments: {exc}") from None
    return magic.parser.parse_args(words)


def _names(groups: list[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``; each must be a Python identifier."""
    names = [n.strip() for group in groups for n in group.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not a variable name: {', '.join(bad)}")
    return names


def _calling_cell_number(shell: Any) -> int:
    """The number of the notebook cell running now (IPython 9 has already counted it in
    ``execution_count``, IPython 8 has not; the running cell's result knows it either way)."""
    running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    number = getattr(running, "execution_count", None)
    return number if isinstance(number, int) else int(shell.execution_count)


def _variables(items: list[str]) -> dict[str, str]:
    """``["TOKEN", "MODE=fast"]`` -> variables for the kernel; ``TOKEN`` alone is the notebook's value."""
    variables = {}
    for item in items:
        name, has_value, value = item.partition("=")  # (no message below may show a value: it may be a secret)
        if not name:
            raise UsageError("--env takes NAME or NAME=VALUE: a variable needs a name before '='")
        if "\0" in item:
            raise UsageError(f"--env {name!r}: a variable's name and value cannot hold a NUL character")
        if not has_value:
            if name not in os.environ:
                raise UsageError(f"--env {name}: the notebook has no variable {name} to pass on")
            value = os.environ[name]
        variables[name] = value
    return variables


@magics_class
class IsolatedMagics(Magics):
    """The fal_magic magics."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        # per isolated kernel: its cell numbers -> the numbers of this notebook's cells that ran them
        self._cell_numbers: dict[str, dict[int, int]] = {}

    @magic_arguments()
    @argument("--keep-alive", type=float, default=None, metavar="SECONDS",
              help="seconds the kernel stays warm after the cell (default: FalMagic.cell_keep_alive, 10 min)")
    @argument("--requirements", nargs="+", default=[], metavar="REQ",
              help="PEP 508 requirement specifiers for the cell's environment")
    @argument("--requirements-file", action="append", default=[], metavar="PATH",
              help="a pip requirements file (comments and -r includes) for the cell's environment")
    @argument("--python", default=None, metavar="VERSION",
              help="the Python version of the cell's environment, e.g. 3.12 (default: FalMagic.python, else "
                   "the notebook's own)")
    @argument("--host", default=None, metavar="URL",
              help="a Jupyter Server with the fal_magic extension to run the cell on (default: FalMagic.host)")
    @argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
              help="an environment variable for the kernel; NAME alone takes the notebook's own value")
    @argument("--push", action="append", default=[], metavar="NAME[,NAME...]",
              help="notebook variables to send into the kernel before the cell runs")
    @argument("--pull", action="append", default=[], metavar="NAME[,NAME...]",
              help="kernel variables to copy back into the notebook after the cell runs")
    @cell_magic
    def isolated(self, line: str, cell: str) -> RemoteValue | None:
        """Run this cell in the warm isolated kernel of its requirements; outputs appear here.

        The kernel's namespace persists between cells with the same requirements while it is warm,
        and the cell's last expression is this cell's result (Out[n]).
        """
        __tracebackhide__ = True
        shell = self.shell
        assert shell is not None, "registered magics have a shell"
        args = _parse(self.isolated, line)
        if args.keep_alive is not None and args.keep_alive < 0:
            raise UsageError(f"--keep-alive must be >= 0, not {args.keep_alive:g}")
        try:
            spec = spec_for([*args.requirements, *(Path(p) for p in args.requirements_file)],
                            python=args.python or settings().python or None)
        except FalMagicError as exc:
            raise UsageError(str(exc)) from None
        push, pull = _names(args.push), _names(args.pull)
        env = _variables(args.env)
        missing = [n for n in push if n not in shell.user_ns]
        if missing:
            raise UsageError(f"--push: not defined in the notebook: {', '.join(missing)}")
        dump = dump_values if spec.same_python else dump_values_by_source
        push_frames = dump({n: shell.user_ns[n] for n in push}) if push else None
        keep_alive = settings().cell_keep_alive if args.keep_alive is None else args.keep_alive

        pool = get_pool()
        try:
            pool.host_url(args.host)
        except FalMagicError as exc:
            raise UsageError(f"--host: {exc}") from None
        sink = CellOutput()
        grace = pool.config.interrupt_grace
        pulled: dict[str, Any] = {}
        status = StatusLine(describe_requirements(spec.requirements))
        for attempt in (1, 2):  # a kernel found dead before it began the cell is replaced once
            try:
                kernel = pool.acquire(spec, progress=status, host=args.host, env=env)
            except BaseException:
                status.finish(ok=False)
                raise
            status.finish()
            ran = False
            try:
                lost = pool.namespace_lost(kernel)
                if lost:
                    print(f"[fal_magic] the previous kernel of this environment {lost}: its variables are gone")
                if push_frames is not None:
                    pushed = kernel.push(push_frames, sink, grace)
                    load_result(pushed.content, pushed.buffers, spec.requirements)
                reply = kernel.execute(cell, sink, grace).content
                ran = True
                numbers = self._cell_numbers.setdefault(kernel.id, {})
                numbers[reply.get("execution_count", 0)] = _calling_cell_number(shell)
                if reply["status"] == "ok" and pull:
                    pull_reply = kernel.pull(pull, sink, grace)
                    pulled = load_result(pull_reply.content, pull_reply.buffers, spec.requirements)
            except NotStartedError:
                if ran or attempt == 2:
                    raise
                continue
            finally:
                pool.release(kernel, keep_alive)
            break
        if reply["status"] != "ok":  # shown as the kernel formatted it, with this notebook's cell numbers
            lines = renumber_cells(reply.get("traceback", []), numbers)
            if reply.get("ename") == "KeyboardInterrupt":
                interrupted = KeyboardInterrupt("the isolated cell was interrupted")
                attach(interrupted, lambda: lines)  # where the cell's code stopped, not fal_magic's frames
                raise interrupted
            error = remote_cell_error(reply.get("ename", "Error"), reply.get("evalue", ""), "\n".join(lines))
            debugging.tag(error, kernel.id)
            raise error
        shell.user_ns.update(pulled)
        if sink.result is not None:
            return RemoteValue(sink.result.get("data", {}), sink.result.get("metadata", {}))
        return None

    @line_magic
    def isolated_kernels(self, line: str) -> Any:
        """Show the warm kernels (a live table in a notebook)."""
        if line.strip():
            raise UsageError("%isolated_kernels takes no arguments")
        return kernels()

    @magic_arguments()
    @argument("keys", nargs="*", metavar="KEY", help="requirement keys (or unique prefixes) to shut down")
    @argument("--all", action="store_true", help="shut down every warm kernel")
    @line_magic
    def isolated_shutdown(self, line: str) -> None:
        """Shut down warm kernels now: ``%isolated_shutdown KEY ...`` or ``%isolated_shutdown --all``."""
        args = _parse(self.isolated_shutdown, line)
        if bool(args.keys) == args.all:
            raise UsageError("give one or more KEYs, or --all")
        stopped = get_pool().shutdown(None if args.all else args.keys)
        print(f"shut down {len(stopped)} kernel(s)")


def load(ipython: Any) -> None:
    """Register the magics, read ``c.FalMagic`` options from the shell's config, and list the settings
    among the shell's configurables (``%config FalMagic`` shows them, ``%config FalMagic.x = v`` sets them)."""
    current = settings()
    current.update_config(ipython.config)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, FalMagic)] + [current]
    ipython.register_magics(IsolatedMagics)


def unload(ipython: Any) -> None:
    """Remove the magics again (warm kernels stay; ``%isolated_shutdown --all`` stops them)."""
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, FalMagic)]
    magics = ipython.magics_manager.magics
    magics["cell"].pop("isolated", None)
    for name in ("isolated_kernels", "isolated_shutdown"):
        magics["line"].pop(name, None)
