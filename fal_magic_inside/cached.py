"""``@cached``: a function's results kept, per arguments, in the warm kernel it runs in (fal's
``@cached``), keyed by what the function computes with rather than by its identity."""
from __future__ import annotations

import functools
import hashlib
import sys
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from .frames import PROTOCOL

_cache: dict[tuple[str, bytes], Any] = {}
_cache_lock = threading.Lock()


def _code_digest(code: Any, h: Any) -> None:
    """Feed a code object's structure (bytecode, names, constants, nested code) into a hash."""
    h.update(code.co_code)
    h.update(repr((code.co_name, code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _code_digest(const, h)
        else:
            h.update(repr(const).encode())


def _function_key(fn: Callable[..., Any]) -> str:
    """A digest of what a function computes with: its code, and the values that make two functions
    of the same code differ (closure cells, defaults, the globals its code names). The same for every
    copy of it that arrives by value; different for two closures of one factory."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    h = hashlib.sha256()
    _code_digest(code, h)
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell
            cells.append(None)
    fn_globals = getattr(fn, "__globals__", {})
    names = sorted(_global_names(code) & fn_globals.keys())
    read = [(n, fn_globals[n]) for n in names if not isinstance(fn_globals[n], type(sys))]  # modules aside
    h.update(cloudpickle.dumps((cells, fn.__defaults__, fn.__kwdefaults__, read), protocol=PROTOCOL))
    return h.hexdigest()


def _global_names(code: Any) -> set[str]:
    """The global names a code object (and the code nested in it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _global_names(const)
    return names


class cached:  # noqa: N801 - used as a decorator, named like one
    """Keep a function's results, per arguments, in the process it runs in (a warm kernel).

    Keyed by the function's code and the values it closes over (not its identity), so that it holds
    even though the function travels anew with every isolated call, and two closures of one factory
    do not share results. An identity that cannot be computed (unpicklable closure values) means no
    caching. The results die with the kernel.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            key = (_function_key(self.fn), cloudpickle.dumps((args, sorted(kwargs.items())), protocol=PROTOCOL))
        except Exception:  # unpicklable arguments or closure values: no caching, just the call
            return self.fn(*args, **kwargs)
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        value = self.fn(*args, **kwargs)
        with _cache_lock:
            return _cache.setdefault(key, value)
