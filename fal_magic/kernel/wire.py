"""Host side of the wire: pickle a call into frames, rebuild a result or a remote exception.

The frame format itself lives in ``fal_magic_inside.frames`` (the kernel runs that package too).
"""
from __future__ import annotations

import inspect
import linecache
import pickle
import re
import sys
import threading
import types
import weakref
from typing import Any, Callable, Sequence

import cloudpickle
from fal_magic_inside import sources
from fal_magic_inside.frames import FalMagicFailure, add_note, describe_exception, dumps, loads, type_name

from ..errors import FalMagicError, RemoteError, SerializationError
from ..outputs import RemoteValue
from .tracebacks import attach, render_chain

__all__ = ["dump_call", "dump_values", "load_result", "rebuild_exception", "describe_exception", "dumps", "loads"]

_by_value_lock = threading.Lock()


def _module_by_value(fn: Callable) -> types.ModuleType | None:
    """The module to pickle by value along with ``fn``: its own, unless that is __main__ (already is)."""
    mod = sys.modules.get(getattr(fn, "__module__", None) or "")
    if mod is None or mod.__name__ == "__main__":
        return None
    return mod


def dump_call(fn: Callable, args: Sequence[Any], kwargs: dict[str, Any], via: Callable | None = None) -> list:
    """Frames for ``fn(*args, **kwargs)``; the function and its module's helpers travel by value.

    With ``via`` (a runtime helper such as ``map_chunk``), the kernel runs ``via(fn, *args, **kwargs)``.
    Raises SerializationError naming the argument (or the function) that cannot be pickled.
    """
    mod = _module_by_value(fn)
    with _by_value_lock:
        registered = False
        if mod is not None:
            try:
                cloudpickle.register_pickle_by_value(mod)
                registered = True
            except ValueError:  # already registered, or not a regular module
                pass
        try:
            try:
                files, texts = shipped_code(fn)
                if via is not None:
                    return dumps((via, (fn, *args), dict(kwargs), files, texts))
                return dumps((fn, tuple(args), dict(kwargs), files, texts))
            except Exception as exc:
                raise SerializationError(_culprit(fn, args, kwargs, exc)) from exc
        finally:
            if registered:
                cloudpickle.unregister_pickle_by_value(mod)


def dump_values(values: dict[str, Any]) -> list:
    """Frames for a dict of named values (``%%isolated --push``); SerializationError names the variable."""
    try:
        return dumps(dict(values))
    except Exception as exc:
        for name, value in values.items():
            if _fails(value):
                raise SerializationError(f"variable {name!r}, of type {type_name(value)}, cannot be pickled "
                                         f"({type(exc).__name__}: {exc})") from exc
        raise SerializationError(f"the pushed variables cannot be pickled ({type(exc).__name__}: {exc})") from exc


def _fails(obj: Any) -> Exception | None:
    try:
        cloudpickle.dumps(obj, protocol=5, buffer_callback=lambda b: None)
    except Exception as exc:
        return exc
    return None


def parameter_names(fn: Callable) -> list[str]:
    """``fn``'s parameter names, to name an argument in a message (none if it has no signature)."""
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _culprit(fn: Callable, args: Sequence[Any], kwargs: dict[str, Any], exc: Exception) -> str:
    """Say which object made pickling fail: an argument, a closure variable, a global, or the function."""
    name = getattr(fn, "__qualname__", repr(fn))
    params = parameter_names(fn)
    for i, value in enumerate(args):
        if _fails(value):
            label = repr(params[i]) if i < len(params) else f"#{i + 1}"
            return (f"argument {label} of {name}(), of type {type_name(value)}, cannot be pickled "
                    f"({type(exc).__name__}: {exc})")
    for key, value in kwargs.items():
        if _fails(value):
            return (f"keyword argument {key!r} of {name}(), of type {type_name(value)}, cannot be pickled "
                    f"({type(exc).__name__}: {exc})")
    code = getattr(fn, "__code__", None)
    if code is not None:
        for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if _fails(value):
                return (f"{name}() uses {var!r} from an enclosing scope, of type {type_name(value)}, "
                        f"which cannot be pickled ({type(exc).__name__}: {exc})")
        globs = getattr(fn, "__globals__", {})
        for var in code.co_names:
            if var in globs and not isinstance(globs[var], types.ModuleType) and _fails(globs[var]):
                return (f"{name}() uses the global {var!r}, of type {type_name(globs[var])}, "
                        f"which cannot be pickled ({type(exc).__name__}: {exc})")
    return f"function {name}() cannot be pickled ({type(exc).__name__}: {exc})"


_files: weakref.WeakKeyDictionary[Callable, tuple[dict[str, str], bool]] = weakref.WeakKeyDictionary()


def shipped_code(fn: Callable) -> tuple[dict[str, str], dict[str, str]]:
    """What a call of ``fn`` carries about its code: function name -> file (the kernel puts the real
    file names back, ``sources.relabel``), and, when the code may start a debugger, those files'
    lines (the kernel never asks the host for any). Which files and whether, once per function."""
    try:
        files, debug = _files[fn]
    except (KeyError, TypeError):
        files = code_files(fn)
        debug = sources.may_debug(inspect.unwrap(fn), files)
        try:
            _files[fn] = files, debug
        except TypeError:  # not weakly referenceable
            pass
    return files, (sources.texts(files) if debug else {})


_DYNAMIC_FRAME = re.compile(r'^(\s*)File "<dynamic-code>", line (\d+), in (\S+)$', re.M)


def code_files(fn: Callable) -> dict[str, str]:
    """Function name -> source file for ``fn``, its nested functions and the functions of its module.

    cloudpickle ships code without its file name, so remote tracebacks say ``<dynamic-code>``;
    this map lets the host put the file name and source line back.
    """
    found: dict[str, str] = {}

    def walk(code: types.CodeType) -> None:
        found.setdefault(code.co_name, code.co_filename)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    fn = inspect.unwrap(fn)
    if hasattr(fn, "__code__"):
        walk(fn.__code__)
        for value in list(getattr(fn, "__globals__", {}).values()):
            if callable(value) and hasattr(value, "__wrapped__"):  # e.g. another isolated function
                value = inspect.unwrap(value)
            inner = getattr(value, "__code__", None)
            if isinstance(inner, types.CodeType) and getattr(value, "__module__", None) == fn.__module__:
                walk(inner)
    return found


def restore_frames(text: str, files: dict[str, str]) -> str:
    """Replace ``<dynamic-code>`` in a remote traceback by the real file and its source line."""
    def fix(match: re.Match) -> str:
        indent, line, name = match.group(1), int(match.group(2)), match.group(3)
        filename = files.get(name)
        if filename is None:
            return match.group(0)
        source = linecache.getline(filename, line).strip()
        out = f'{indent}File "{filename}", line {line}, in {name}'
        return out + (f"\n{indent}  {source}" if source else "")

    return _DYNAMIC_FRAME.sub(fix, text)


def load_result(reply: dict, frames: list, requirements: Sequence[str] = (), fn: Callable | None = None) -> Any:
    """The call's return value, or raise what the kernel raised (rebuilt), or SerializationError.

    ``fn`` is the function that ran, whose source files name the frames of a remote traceback.
    """
    __tracebackhide__ = True  # IPython hides this frame: the remote traceback is what matters
    if reply.get("ok"):
        if reply.get("view") is not None:  # a widget: its model stays in the kernel, live through the bridge
            return RemoteValue(reply["view"])
        try:
            return loads(frames)
        except Exception as exc:
            raise SerializationError(
                f"the result, of type {reply.get('type', '?')}, cannot be unpickled here "
                f"({type(exc).__name__}: {exc}); return a type that exists in the calling "
                "environment too (e.g. convert it to builtins)"
            ) from None
    if reply.get("kind") == "serialization":
        raise SerializationError(reply.get("message", "the result cannot be pickled"))
    raise rebuild_exception(loads(frames), requirements, fn)


def rebuild_exception(payload: dict, requirements: Sequence[str] = (), fn: Callable | None = None) -> BaseException:
    """Rebuild the remote exception with its chain and remote traceback text; RemoteError if the type
    cannot be rebuilt here. With ``fn``, the traceback gets its file names and source lines back."""
    links = payload["chain"]
    files = code_files(fn) if fn is not None else {}
    text = restore_frames(payload["traceback"], files) if files else payload["traceback"]
    rebuilt: list[BaseException] = []
    for item in links:
        exc = None
        if item["pickled"] is not None:
            try:
                exc = pickle.loads(item["pickled"])
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(item["type"], item["message"])
        elif isinstance(exc, FalMagicFailure):  # the kernel's stand-in for fal_magic's own errors
            exc = FalMagicError(str(exc))
        rebuilt.append(exc)
    for exc, item, nxt in zip(rebuilt, links, rebuilt[1:] + [None]):
        if item["link"] == "cause":
            exc.__cause__ = nxt
        elif item["link"] == "context":
            exc.__context__ = nxt
    top = rebuilt[0]
    hint: list[str] = []
    if isinstance(top, RemoteError):
        top.traceback_text = text
    else:
        add_note(top, "\n--- traceback in the isolated kernel ---\n" + text.rstrip())  # plain Python shows it
    attach(top, lambda: render_chain(links, files) + hint)  # IPython shows this instead, once
    if links[0]["type"] == "ModuleNotFoundError":
        missing = getattr(top, "name", None) or links[0]["message"]
        have = ", ".join(requirements) if requirements else "none"
        top_note = (f"hint: {missing!r} is not installed in the isolated environment "
                    f"(requirements: {have}); add it to requirements=[...]")
        hint.append(top_note)
        if isinstance(top, RemoteError):
            top.traceback_text = text.rstrip() + "\n" + top_note
        else:
            add_note(top, top_note)
    return top
