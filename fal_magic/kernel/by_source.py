"""Calls bound for a kernel on another Python version: the function travels as its source, the rest as
plain pickles.

Bytecode never crosses minor versions, so cloudpickle's by-value functions cannot be used there.
Instead, a function of the notebook (``__main__``, or the module of the function called) travels as
the text of its ``def`` plus the globals it names: plain data by value, modules and importable
functions and classes by reference (the kernel imports them), helper functions of the notebook as
source again, other isolated functions as proxies (the pickler is ``fal_magic_inside.to_source``'s,
which such a kernel also uses for its results). The kernel compiles it anew
(``fal_magic_inside.from_source``). What cannot cross (a lambda, a class defined in the notebook,
an object of one) is a SerializationError that names it and says what to do.
"""
from __future__ import annotations

import io
import itertools
import os
import types
import weakref
from typing import Any, Callable, Sequence

from fal_magic_inside.frames import type_name
from fal_magic_inside.to_source import CannotCross, SourcePickler

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


class _Pickler(SourcePickler):
    """The source pickler, with the notebook's isolated functions as proxies: called in the kernel,
    one names this side's function by reference and the host runs it."""

    def reducer_override(self, obj: Any) -> Any:
        from ..decorator import IsolatedFunction  # (a cycle at import time)

        if isinstance(obj, IsolatedFunction):  # a proxy; called there, it names this one by reference
            proxy, (fn, options) = obj.__reduce__()
            return proxy, (fn, {**options, HOST_REF: _refer(obj)})
        return super().reducer_override(obj)


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
    if isinstance(fn, types.FunctionType) and pickler.local(fn.__module__):
        pickler.gather(fn, {})
    try:
        pickler.dump(call)
    except CannotCross as exc:
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
        except CannotCross as exc:
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
