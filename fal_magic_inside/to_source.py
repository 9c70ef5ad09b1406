"""Pickles that cross Python versions: plain pickle (protocol 5), with the sender's own functions as
the text of their ``def`` plus the globals they use, modules by name, and a clear refusal for what
exists only on the sending side (a lambda, a class defined there, an object of one).

Both directions use it: a host sends a call to a kernel on another Python this way
(``fal_magic.kernel.by_source`` adds isolated functions as proxies), and such a kernel sends its
results back this way; the receiver compiles each function again (``from_source``). Bytecode is tied
to one minor version: unpickling another version's code objects fails, or crashes the interpreter.
"""
from __future__ import annotations

import ast
import dis
import importlib
import inspect
import io
import pickle
import sys
import textwrap
import types
from typing import Any

from .frames import PROTOCOL
from .from_source import function_from_source


class CannotCross(Exception):
    """Why an object cannot travel to another Python (raised while pickling, reported by the sender)."""


_GLOBAL_OPS = {"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"}


def _names(code: types.CodeType) -> list[str]:
    """Every global name ``code`` and the code nested in it may load (not attribute names)."""
    names = [str(i.argval) for i in dis.get_instructions(code) if i.opname in _GLOBAL_OPS]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _names(const)
    return names


def _source(fn: types.FunctionType) -> tuple[str, int]:
    """The dedented text of ``fn``'s ``def`` (with its decorators) and the line it starts at."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        raise CannotCross(
            f"the source of {fn.__qualname__}() is not available (defined in an interactive console, or by "
            "exec?); define it in a notebook cell or a file") from None
    text = textwrap.dedent("".join(lines))
    try:
        tree = ast.parse(text)
    except SyntaxError:
        raise CannotCross(f"the source of {fn.__qualname__}() could not be read back") from None
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn.__name__ for n in tree.body):
        raise CannotCross(f"the source of {fn.__qualname__}() is not a def of its own")
    return text, max(start, 1)


class SourcePickler(pickle.Pickler):
    """A plain pickler (protocol 5, buffers out of band) that sends the functions of ``home`` (and of
    ``__main__``, and of modules the receiver may lack) as source, modules by name, and refuses
    classes of those modules and their objects. ``where`` names the sending side in messages."""

    def __init__(self, file: io.BytesIO, home: str, buffers: list[Any], where: str = "the notebook") -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffers.append)
        self.home = home
        self.where = where
        self.namespaces: dict[int, dict[str, Any]] = {}  # one per module's globals, shared by its functions

    def local(self, module: str | None) -> bool:
        """Whether what ``module`` defines exists only on this side (it then travels as source, or not)."""
        return module in ("__main__", self.home) or module not in sys.modules

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType):
            if not self.local(obj.__module__):
                return NotImplemented  # importable: by reference
            return self.function(obj)
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, type):
            if self.local(obj.__module__):
                raise CannotCross(f"class {obj.__qualname__} is defined in {self.where}, and classes cannot "
                                  "travel to another Python: define it in a module both sides can import")
            return NotImplemented
        if self.local(type(obj).__module__):
            raise CannotCross(f"an object of class {type(obj).__qualname__}, which is defined in {self.where}, "
                              "cannot travel to another Python: use plain data (or define the class in a "
                              "module both sides can import)")
        return NotImplemented

    def function(self, fn: types.FunctionType) -> Any:
        """The reduction of a function of this side: its ``def``, the globals it uses, its closure."""
        if fn.__name__ == "<lambda>":
            raise CannotCross(f"a lambda ({fn.__qualname__}) has no source of its own to travel to another "
                              "Python: define it with def")
        source, first_line = _source(fn)
        namespace = self.namespaces.get(id(fn.__globals__))
        if namespace is None or not self._complete(namespace, fn):
            namespace = self.gather(fn, {})
        closure = []
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                closure.append(cell.cell_contents)
            except ValueError:
                raise CannotCross(f"{fn.__qualname__}() uses {var!r} from an enclosing scope before it is "
                                  "assigned") from None
        return function_from_source, (fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__, source,
                                      fn.__code__.co_filename, first_line, namespace, fn.__defaults__,
                                      fn.__kwdefaults__, fn.__code__.co_freevars, tuple(closure))

    def _needed(self, fn: types.FunctionType) -> dict[str, Any]:
        globs = fn.__globals__
        return {n: globs[n] for n in _names(fn.__code__) if n in globs}

    def _complete(self, namespace: dict[str, Any], fn: types.FunctionType) -> bool:
        return all(name in namespace for name in self._needed(fn))

    def gather(self, fn: types.FunctionType, namespace: dict[str, Any]) -> dict[str, Any]:
        """Fill one namespace with what ``fn`` and the functions of its module that it calls need, before
        any of it is pickled (a namespace must not grow while the pickler walks it)."""
        namespace.setdefault("__name__", fn.__module__)
        self.namespaces.setdefault(id(fn.__globals__), namespace)
        for name, value in self._needed(fn).items():
            if name in namespace:
                continue
            namespace[name] = value
            if (isinstance(value, types.FunctionType) and value.__globals__ is fn.__globals__
                    and self.local(value.__module__)):
                self.gather(value, namespace)
        return namespace


def dumps_to_source(obj: Any, home: str = "__main__", where: str = "the isolated kernel") -> list[Any]:
    """Frames (as ``frames.dumps`` makes them) of ``obj`` for a receiver on another Python; raises
    CannotCross saying what cannot cross and why."""
    buffers: list[Any] = []
    out = io.BytesIO()
    SourcePickler(out, home, buffers, where).dump(obj)
    return [out.getvalue(), *(b.raw() for b in buffers)]
