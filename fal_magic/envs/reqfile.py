"""pip requirements files as requirements: ``isolated(requirements="requirements.txt")``.

The file is read when the function is decorated (or the cell runs): its requirements, with its
``-r`` includes, become the environment's requirement list, its ``-c`` files its constraints and its
index options its package sources, so the key follows the parsed content and an edited file makes a
new environment. Comments, blank lines, line continuations, environment markers and local package
paths (relative to the file) are understood; other options are refused with the file and line,
rather than ignored.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from ..errors import EnvironmentBuildError
from .indexes import Indexes
from .local import looks_local, resolve

_UNSUPPORTED = ("--pre", "--trusted-host", "--only-binary", "--no-binary", "--prefer-binary", "--hash",
                "--use-feature", "--config-settings", "--global-option")


def is_requirements_file(item: object) -> bool:
    """Whether ``item`` names a requirements file: a path object, or a string ending in ``.txt``."""
    return isinstance(item, os.PathLike) or (isinstance(item, str) and item.strip().endswith(".txt"))


#: What ``requirements=`` takes: requirement strings and requirements files, or one of them.
Requirements = Union[Iterable[Union[str, "os.PathLike[str]"]], str, "os.PathLike[str]"]


@dataclass
class Parsed:
    """What requirements files (and plain requirement strings) say: requirements, constraints, sources."""

    requirements: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    no_index: bool = False

    @property
    def indexes(self) -> Indexes:
        """The sources the files named (unset fields left to fal_magic's and the installers' settings)."""
        return Indexes(index_url=self.index_url, extra_index_urls=tuple(self.extra_index_urls) or None,
                       find_links=tuple(self.find_links) or None, no_index=True if self.no_index else None)


def expand(requirements: Requirements) -> Parsed:
    """The requirement strings of ``requirements``, with every requirements file in it read."""
    items = [requirements] if isinstance(requirements, (str, os.PathLike)) else list(requirements)
    out = Parsed()
    for item in items:
        if is_requirements_file(item):
            read(Path(os.fspath(item)).expanduser(), out)
        else:
            out.requirements.append(item)  # type: ignore[arg-type]  # make_spec names a non-string
    return out


_OPTIONS = {"-r": "requirement", "--requirement": "requirement", "-c": "constraint", "--constraint": "constraint",
            "-i": "index", "--index-url": "index", "--extra-index-url": "extra", "-f": "links",
            "--find-links": "links", "--no-index": "no-index", "-e": "editable", "--editable": "editable"}


def _split_option(line: str) -> tuple[str, str]:
    """``--index-url=X`` / ``--index-url X`` / ``-iX`` -> (option, value)."""
    head, _, rest = line.partition(" ")
    if "=" in head and head.startswith("--"):
        head, _, value = head.partition("=")
        return head, (value + " " + rest).strip()
    if not head.startswith("--") and len(head) > 2:  # -rfile, -ihttps://...
        return head[:2], (head[2:] + " " + rest).strip()
    return head, rest.strip()


def read(path: Path, out: Parsed, seen: tuple[Path, ...] = (), constraints: bool = False,
         included_at: str = "") -> Parsed:
    """Add what the file at ``path`` (and the files it includes) says to ``out``; a file read as
    constraints (``-c``) adds its requirement lines to the constraints. ``included_at`` names the
    file and line that included it, for an error."""
    path = path.resolve()
    if path in seen:
        raise EnvironmentBuildError(f"{path}: includes itself (through {' -> '.join(str(p) for p in seen)})")
    try:
        text = path.read_text()
    except OSError as exc:
        raise EnvironmentBuildError((f"{included_at}: " if included_at else "")
                                    + f"cannot read requirements file {path}: {exc.strerror or exc}") from None
    for number, line in _logical_lines(text):
        where = f"{path}, line {number}"
        if line.startswith("-"):
            option, value = _split_option(line)
            kind = _OPTIONS.get(option)
            if kind is None:
                reason = "is not supported in requirements files" if option in _UNSUPPORTED else "is not understood"
                raise EnvironmentBuildError(f"{where}: the option {option} {reason}")
            if not value and kind != "no-index":
                raise EnvironmentBuildError(f"{where}: the option {option} needs a value")
            if kind in ("requirement", "constraint"):
                read(path.parent / value, out, (*seen, path), constraints or kind == "constraint", where)
            elif kind == "index":
                out.index_url = out.index_url or value
            elif kind == "extra":
                out.extra_index_urls.append(value)
            elif kind == "links":
                out.find_links.append(value if "://" in value else str((path.parent / value).resolve()))
            elif kind == "no-index":
                out.no_index = True
            else:
                (out.constraints if constraints else out.requirements).append(
                    _local(f"-e {value}", path.parent, where))
        else:
            if looks_local(line):
                line = _local(line, path.parent, where)
            (out.constraints if constraints else out.requirements).append(line)
    return out


def _local(text: str, base: Path, where: str) -> str:
    """A local package line made absolute (relative paths are the file's)."""
    try:
        return resolve(text, base)[0]
    except EnvironmentBuildError as exc:
        raise EnvironmentBuildError(f"{where}: {exc}") from None


_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)\}")


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
        if line:  # ${NAME} from the environment, as pip does (a token for an index URL stays out of the file)
            lines.append((start, _VARIABLE.sub(lambda m: os.environ.get(m.group(1), m.group(0)), line)))
    return lines
