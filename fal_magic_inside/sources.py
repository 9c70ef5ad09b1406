"""Where a call's code comes from. cloudpickle ships code with the file name ``<dynamic-code>``; the host
sends each function's file name with the call, and the kernel puts it back, so that tracebacks and
debuggers name the real files. A debugger that starts (and so asks the host for its commands) first
gets those files' lines from the host, which has them (a notebook's cells exist only in its
kernel's memory)."""
from __future__ import annotations

import json
import linecache
import types
from typing import Any

#: The file name cloudpickle gives the code it ships.
DYNAMIC = "<dynamic-code>"

#: An input_request whose prompt starts with this asks the host for source lines, not the person.
SOURCES_PREFIX = "\x00fal_magic-sources:"


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


def request(files: dict[str, str]) -> str | None:
    """The prompt that asks the host for the lines of ``files`` this kernel cannot read; None if none."""
    wanted = sorted({f for f in files.values() if not linecache.getlines(f)})
    return SOURCES_PREFIX + json.dumps(wanted) if wanted else None


def install(answer: str) -> None:
    """Keep the lines the host sent (``{file: text}``) where tracebacks and debuggers read them."""
    for filename, text in json.loads(answer or "{}").items():
        lines = text.splitlines(keepends=True)
        linecache.cache[filename] = (len(text), None, lines, filename)  # no mtime: never checked against a file


def answer(prompt: str) -> str:
    """The host's side: the lines it has of the files the kernel asks for, as the input_reply value."""
    wanted = json.loads(prompt[len(SOURCES_PREFIX):])
    return json.dumps({f: "".join(linecache.getlines(f)) for f in wanted if linecache.getlines(f)})
