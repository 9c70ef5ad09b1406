"""Calls bound for a kernel on another Python version: the function travels as its source, the rest as
plain pickles.

Bytecode never crosses minor versions, so cloudpickle's by-value functions cannot be used there.
Instead, a function of the notebook (``__main__``, or the module of the function called) travels as
the text of its ``def`` plus the globals it names: plain data by value, modules and importable
functions and classes by reference (the kernel imports them), helper functions of the notebook as
source again, other isolated functions as proxies. The kernel compiles it anew
(``fal_magic_inside.from_source``). What cannot cross (a lambda, a class defined in the notebook,
an object of one) is a SerializationError that names it and says what to do.
"""
from __future__ import annotations

import ast
import dis
import importlib
import inspect
import io
import itertools
import os
import pickle
import sys
import textwrap
import types
import weakref
from typing import Any, Callable, Sequence

from fal_magic_inside.frames import PROTOCOL, type_name
from fal_magic_inside.from_source import function_from_source

from ..errors import FalMagicError, SerializationError
from .wire import parameter_names


#: The option that names, in a proxy's call back to the host, the isolated function it stands for
#: (its function cannot come back as a pickle: the kernel's bytecode is of another Python).
HOST_REF = "host_ref"
_travelled: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_tokens = itertools.count(1)


def _refer(isolated: Any) -> str:
    token: str | None = getattr(isolated, "_host_ref", None)
    if token is None:
        token = isolated._host_ref = f"{os.getpid()}-{next(_tokens)}"
        _travelled[token] = isolated
    return token


def travelled(token: str) -> Any:
    """The isolated function a proxy of another Python stands for; FalMagicError once it is gone."""
    found = _travelled.get(token)
    if found is None:
        raise FalMagicError("the isolated function called from the kernel no longer exists in the notebook")
    return found


class _CannotCross(Exception):
    """Why an object cannot travel to another Python (raised while pickling, reported by the caller)."""


def _source(fn: types.FunctionType) -> tuple[str, int]:
    """The dedented text of ``fn``'s ``def`` (with its decorators) and the line it starts at."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        raise _CannotCross(
            f"the source of {fn.__qualname__}() is not available (defined in an interactive console, or by "
            "exec?); define it in a notebook cell or a file") from None
    text = textwrap.dedent("".join(lines))
    try:
        tree = ast.parse(text)
    except SyntaxError:
        raise _CannotCross(f"the source of {fn.__qualname__}() could not be read back") from None
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn.__name__ for n in tree.body):
        raise _CannotCross(f"the source of {fn.__qualname__}() is not a def of its own")
    return text, max(start, 1)


def _names(code: types.CodeType) -> list[str]:
    """Every global name ``code`` and the code nested in it may load (not attribute names)."""
    names = [i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_OPS]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _names(const)
    return names


_GLOBAL_OPS = {"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"}


class _Pickler(pickle.Pickler):
    """A plain pickler (protocol 5, buffers out of band) that sends the caller's functions as source,
    modules by name, and refuses what only exists on this side."""

    def __init__(self, file: io.BytesIO, home: str, buffers: list[Any]) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffers.append)
        self.home = home  # the module whose functions travel as source (besides __main__)
        self.namespaces: dict[int, dict[str, Any]] = {}  # one per module's globals, shared by its functions

    def _local(self, module: str | None) -> bool:
        return module in ("__main__", self.home) or module not in sys.modules

    def reducer_override(self, obj: Any) -> Any:
        from ..decorator import IsolatedFunction  # (a cycle at import time)

        if isinstance(obj, types.FunctionType):
            if not self._local(obj.__module__):
                return NotImplemented  # importable: by reference
            return self._function(obj)
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, IsolatedFunction):  # a proxy; called there, it names this one by reference
            proxy, (fn, options) = obj.__reduce__()
            return proxy, (fn, {**options, HOST_REF: _refer(obj)})
        if isinstance(obj, type):
            if self._local(obj.__module__):
                raise _CannotCross(f"class {obj.__qualname__} is defined in the notebook, and classes cannot "
                                   "travel to another Python: define it in a module the environment can import")
            return NotImplemented
        if self._local(type(obj).__module__):
            raise _CannotCross(f"an object of class {type(obj).__qualname__}, which is defined in the notebook, "
                               "cannot travel to another Python: pass plain data (or define the class in a "
                               "module the environment can import)")
        return NotImplemented

    def _function(self, fn: types.FunctionType) -> Any:
        if fn.__name__ == "<lambda>":
            raise _CannotCross(f"a lambda ({fn.__qualname__}) has no source of its own to travel to another "
                               "Python: define it with def")
        source, first_line = _source(fn)
        namespace = self.namespaces.get(id(fn.__globals__))
        if namespace is None or not self._complete(namespace, fn):
            namespace = self._gather(fn, {})
        closure = []
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                closure.append(cell.cell_contents)
            except ValueError:
                raise _CannotCross(f"{fn.__qualname__}() uses {var!r} from an enclosing scope before it is "
                                   "assigned") from None
        return function_from_source, (fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__, source,
                                      fn.__code__.co_filename, first_line, namespace, fn.__defaults__,
                                      fn.__kwdefaults__, fn.__code__.co_freevars, tuple(closure))

    def _needed(self, fn: types.FunctionType) -> dict[str, Any]:
        globs = fn.__globals__
        return {n: globs[n] for n in _names(fn.__code__) if n in globs}

    def _complete(self, namespace: dict[str, Any], fn: types.FunctionType) -> bool:
        return all(name in namespace for name in self._needed(fn))

    def _gather(self, fn: types.FunctionType, namespace: dict[str, Any]) -> dict[str, Any]:
        """Fill one namespace with what ``fn`` and the functions of its module that it calls need, before
        any of it is pickled (a namespace must not grow while the pickler walks it)."""
        namespace.setdefault("__name__", fn.__module__)
        self.namespaces.setdefault(id(fn.__globals__), namespace)
        for name, value in self._needed(fn).items():
            if name in namespace:
                continue
            namespace[name] = value
            if (isinstance(value, types.FunctionType) and value.__globals__ is fn.__globals__
                    and self._local(value.__module__)):
                self._gather(value, namespace)
        return namespace


def dump_by_source(fn: Callable, args: Sequence[Any], kwargs: dict[str, Any],
                   code: tuple[dict[str, str], dict[str, str]], via: Callable | None = None) -> list[Any]:
    """Frames (as ``frames.dumps`` makes them) for a call on another Python; ``code`` is what
    ``wire.shipped_code`` says of ``fn``. SerializationError names what cannot cross."""
    home = getattr(fn, "__module__", None) or "__main__"
    files, texts = code
    call = ((via, (fn, *args), dict(kwargs), files, texts) if via is not None
            else (fn, tuple(args), dict(kwargs), files, texts))
    buffers: list[Any] = []
    out = io.BytesIO()
    pickler = _Pickler(out, home, buffers)
    if isinstance(fn, types.FunctionType) and pickler._local(fn.__module__):
        pickler._gather(fn, {})
    try:
        pickler.dump(call)
    except _CannotCross as exc:
        raise SerializationError(f"{_what(fn, args, kwargs, home)}: {exc}") from None
    except Exception as exc:
        raise SerializationError(f"{_what(fn, args, kwargs, home)} cannot be pickled for another Python "
                                 f"({type(exc).__name__}: {exc})") from None
    return [out.getvalue(), *(b.raw() for b in buffers)]


def dump_values_by_source(values: dict[str, Any]) -> list[Any]:
    """Frames for named values (``%%isolated --push``) bound for another Python."""
    for name, value in values.items():
        try:
            _probe(value, "__main__")
        except _CannotCross as exc:
            raise SerializationError(f"variable {name!r}: {exc}") from None
    buffers: list[Any] = []
    out = io.BytesIO()
    _Pickler(out, "__main__", buffers).dump(dict(values))
    return [out.getvalue(), *(b.raw() for b in buffers)]


def _probe(value: Any, home: str) -> None:
    _Pickler(io.BytesIO(), home, []).dump(value)


def _what(fn: Callable, args: Sequence[Any], kwargs: dict[str, Any], home: str) -> str:
    """Which part of a call cannot cross: an argument (by its parameter name) or the function."""
    name = getattr(fn, "__qualname__", repr(fn))
    params = parameter_names(fn)
    for i, value in enumerate(args):
        try:
            _probe(value, home)
        except Exception:
            label = repr(params[i]) if i < len(params) else f"#{i + 1}"
            return f"argument {label} of {name}(), of type {type_name(value)}"
    for key, value in kwargs.items():
        try:
            _probe(value, home)
        except Exception:
            return f"keyword argument {key!r} of {name}(), of type {type_name(value)}"
    return f"function {name}()"
