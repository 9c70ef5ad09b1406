"""Functions that cross Python versions as their source. Bytecode is tied to one minor version, so a
function bound for a kernel on another Python travels as the text of its ``def`` with the globals it
uses; this module compiles it again here, in the kernel's own Python, with its original file name and
line numbers (tracebacks and debuggers then point at the notebook cell it came from)."""
from __future__ import annotations

import ast
import linecache
from typing import Any

#: The name of the function that wraps a ``def`` whose free variables are given as arguments.
CLOSURE = "__fal_magic_closure__"


def _definition(source: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The ``def`` of ``name`` in ``source``, without its decorators, default values and annotations:
    those were evaluated where it was defined, and come along as values (defaults) or not at all."""
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            break
    else:
        raise SyntaxError(f"no definition of {name}() in the source that came with it")
    node.decorator_list = []
    args = node.args
    args.defaults = [ast.copy_location(ast.Constant(None), d) for d in args.defaults]
    args.kw_defaults = [None if d is None else ast.copy_location(ast.Constant(None), d) for d in args.kw_defaults]
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if arg is not None:
            arg.annotation = None
    node.returns = None
    return node


def function_from_source(name: str, qualname: str, module: str, doc: str | None, source: str, filename: str,
                         first_line: int, namespace: dict[str, Any], defaults: tuple[Any, ...] | None,
                         kwdefaults: dict[str, Any] | None, freevars: tuple[str, ...],
                         closure: tuple[Any, ...]) -> Any:
    """Compile ``source`` (a ``def`` that starts at line ``first_line`` of ``filename``) into a function
    whose globals are ``namespace``, with the defaults and closure values it had where it came from."""
    node = _definition(source, name)
    if not linecache.getlines(filename):  # (a notebook's cell): the functions defined in it have a source here
        lines = ["\n"] * (first_line - 1) + source.splitlines(keepends=True)
        linecache.cache[filename] = (len(source), None, lines, filename)
    if freevars:  # the def inside a function that takes the free variables: they become its closure
        outer = ast.parse(f"def {CLOSURE}({', '.join(freevars)}):\n    return {name}\n").body[0]
        assert isinstance(outer, ast.FunctionDef)
        ast.copy_location(outer, node)
        outer.body.insert(0, node)
        tree = ast.Module(body=[outer], type_ignores=[])
    else:
        tree = ast.Module(body=[node], type_ignores=[])
    ast.increment_lineno(tree, first_line - 1)
    ast.fix_missing_locations(tree)
    scope: dict[str, Any] = {}
    exec(compile(tree, filename, "exec"), namespace, scope)
    fn = scope[CLOSURE](*closure) if freevars else scope[name]
    fn.__defaults__, fn.__kwdefaults__ = defaults, kwdefaults
    fn.__qualname__, fn.__module__, fn.__doc__ = qualname, module, doc
    return fn
