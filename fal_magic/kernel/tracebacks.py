"""Remote tracebacks that read like local ones.

An exception from an isolated call arrives with its frames (file, line, function, source line) for
each link of its chain. The host renders them once, as IPython shows a local error: ``Cell In[n]``
for code defined in the calling notebook's cells (the function's code came from there, so the host
knows those cells), the source line of each frame, each link of a chain once, and no frame of
fal_magic. IPython uses the result through the exception's ``_render_traceback_`` hook.
"""
from __future__ import annotations

import linecache
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

_GREEN, _RED, _CYAN, _RESET = "\x1b[0;32m", "\x1b[0;31m", "\x1b[0;36m", "\x1b[0m"
_RULE = "-" * 75
_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"
_CELL = re.compile(r"(Cell(?:\x1b\[[0-9;]*m| )*In\[)(\d+)(\])")  # colours may stand between the words


def _cell_numbers() -> dict[str, int]:
    """File name -> cell number of the calling notebook's cells (empty outside IPython)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    numbers = getattr(getattr(shell, "compile", None), "_filename_map", None)
    return dict(numbers) if isinstance(numbers, dict) else {}


def _location(filename: str, line: int, name: str, cells: dict[str, int]) -> str:
    if filename in cells:
        where = f"Cell {_GREEN}In[{cells[filename]}]{_RESET}, line {line}"
    else:
        where = f"File {_GREEN}{filename}:{line}{_RESET}"
    return f"{where}, in {_CYAN}{name}{_RESET}"


def render_chain(links: Sequence[dict[str, Any]], files: dict[str, str]) -> list[str]:
    """Lines for a remote exception chain (outermost first, as ``describe_exception`` lists it),
    printed oldest first like Python does. ``files`` maps function names to the host's source files
    (cloudpickle ships code without them)."""
    cells = _cell_numbers()
    out: list[str] = []
    for index, item in enumerate(reversed(links)):
        if index:
            out += ["", _CAUSE if item["link"] == "cause" else _CONTEXT, ""]  # how it relates to the one above
        name = item["type"].rsplit(".", 1)[-1]
        out += [_RULE, f"{_RED}{name.ljust(42)}{_RESET}Traceback (most recent call last)"]
        for filename, line, function, source in item.get("frames", []):
            if filename == "<dynamic-code>" and function in files:
                filename = files[function]
            text = linecache.getline(filename, line).strip() if filename in files.values() else ""
            out.append(_location(filename, line, function, cells))
            if text or source:
                out.append(f"{_GREEN}----> {line}{_RESET} {text or source}")
            out.append("")
        message, full = item["message"], item["type"].removeprefix("__main__.")  # as Python names it
        out.append(f"{_RED}{full}{_RESET}" + (f": {message}" if message else ""))
    return out


def attach(exc: BaseException, render: Callable[[], list[str]]) -> None:
    """Give ``exc`` (an instance) IPython's ``_render_traceback_`` hook, unless its class has a fixed one."""
    try:
        exc._render_traceback_ = render  # type: ignore[attr-defined]
    except AttributeError:  # fal_magic's own errors render as a message already
        pass


def renumber_cells(lines: Sequence[str], numbers: dict[int, int]) -> list[str]:
    """A traceback formatted by the isolated kernel's IPython, with its cell numbers replaced by those
    of the calling notebook's cells that ran them (``numbers``: isolated -> calling)."""
    return [_CELL.sub(lambda m: f"{m.group(1)}{numbers.get(int(m.group(2)), '?')}{m.group(3)}", line)
            for line in lines]
