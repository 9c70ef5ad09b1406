"""pip requirements files as requirements: ``isolated(requirements="requirements.txt")``.

The file is read when the function is decorated (or the cell runs): its requirements, with its
``-r`` includes, become the environment's requirement list, so the key follows the parsed content
and an edited file makes a new environment. Comments, blank lines, line continuations and
environment markers are understood; options that need more than a requirement list (constraints,
package indexes, editable installs) are refused with the file and line, rather than ignored.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from ..errors import EnvironmentBuildError

_UNSUPPORTED = ("-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
                "--no-index", "-e", "--editable", "--pre", "--trusted-host", "--only-binary", "--no-binary")


def is_requirements_file(item: object) -> bool:
    """Whether ``item`` names a requirements file: a path object, or a string ending in ``.txt``."""
    return isinstance(item, os.PathLike) or (isinstance(item, str) and item.strip().endswith(".txt"))


#: What ``requirements=`` takes: requirement strings and requirements files, or one of them.
Requirements = Union[Iterable[Union[str, "os.PathLike[str]"]], str, "os.PathLike[str]"]


def expand(requirements: Requirements) -> list[str]:
    """The requirement strings of ``requirements``, with every requirements file in it read."""
    items = [requirements] if isinstance(requirements, (str, os.PathLike)) else list(requirements)
    out: list[str] = []
    for item in items:
        if is_requirements_file(item):
            out += read(Path(os.fspath(item)).expanduser())
        else:
            out.append(item)  # type: ignore[arg-type]  # make_spec names a non-string
    return out


def read(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """The requirements in the file at ``path`` and the files it includes with ``-r``."""
    path = path.resolve()
    if path in seen:
        raise EnvironmentBuildError(f"{path}: includes itself (through {' -> '.join(str(p) for p in seen)})")
    try:
        text = path.read_text()
    except OSError as exc:
        raise EnvironmentBuildError(f"cannot read requirements file {path}: {exc.strerror or exc}") from None
    out: list[str] = []
    for number, line in _logical_lines(text):
        where = f"{path}, line {number}"
        include = next((p for p in ("--requirement=", "--requirement ", "-r") if line.startswith(p)), None)
        if include is not None:
            out += read(path.parent / line[len(include):].strip(), (*seen, path))
        elif line.startswith("-"):
            option = line.split()[0].split("=")[0]
            reason = "is not supported in requirements files yet" if option in _UNSUPPORTED else "is not understood"
            raise EnvironmentBuildError(f"{where}: the option {option} {reason}")
        else:
            out.append(line)
    return out


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, content) of each requirement line: comments removed, continuations joined."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append((start, line))
    return lines
