"""Where a call's code comes from. cloudpickle ships code with the file name ``<dynamic-code>``; the host
sends each function's file name with the call, and the kernel puts it back, so that tracebacks and
debuggers name the real files. A call whose code may start a debugger brings those files' lines
along (a notebook's cells exist only in its kernel's memory); so does a post-mortem request. The
kernel never asks the host for lines: the host sends only the code it shipped."""
from __future__ import annotations

import linecache
import types
from typing import Any

#: The file name cloudpickle gives the code it ships.
DYNAMIC = "<dynamic-code>"


def _relabelled(code: types.CodeType, files: dict[str, str]) -> types.CodeType:
    consts = tuple(_relabelled(c, files) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    filename = files.get(code.co_name, code.co_filename) if code.co_filename == DYNAMIC else code.co_filename
    return code.replace(co_filename=filename, co_consts=consts)


def relabel(fn: Any, files: dict[str, str]) -> None:
    """Give ``fn``'s code, and that of the functions of its module it may call, their real file names
    (``files``: function name -> file), where cloudpickle left ``<dynamic-code>``."""
    if not files:
        return
    seen = [fn, *(v for v in getattr(fn, "__globals__", {}).values() if isinstance(v, types.FunctionType))]
    for function in seen:
        code = getattr(function, "__code__", None)
        if isinstance(code, types.CodeType) and code.co_filename == DYNAMIC and code.co_name in files:
            function.__code__ = _relabelled(code, files)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def may_debug(fn: Any, files: dict[str, str]) -> bool:
    """Whether ``fn`` (or a function of its module it may call) names a debugger's entry point: its
    lines are then fetched before the call runs, so that a debugger shows them from its first stop."""
    entry = {"breakpoint", "set_trace", "post_mortem"}
    functions = [fn, *(v for v in getattr(fn, "__globals__", {}).values()
                       if isinstance(v, types.FunctionType) and v.__code__.co_name in files)]
    codes = [f.__code__ for f in functions if isinstance(getattr(f, "__code__", None), types.CodeType)]
    return any(entry & _names(code) for code in codes)


def texts(files: dict[str, str]) -> dict[str, str]:
    """The host's side: the lines it has of ``files`` (function name -> file), by file."""
    found = {}
    for filename in set(files.values()):
        lines = linecache.getlines(filename)
        if lines:
            found[filename] = "".join(lines)
    return found


def install(texts: Any) -> None:
    """Keep the lines the host sent (``{file: text}``) where tracebacks and debuggers read them."""
    if not isinstance(texts, dict):
        return
    for filename, text in texts.items():
        if isinstance(filename, str) and isinstance(text, str):
            lines = text.splitlines(keepends=True)
            linecache.cache[filename] = (len(text), None, lines, filename)  # no mtime: never checked against a file
