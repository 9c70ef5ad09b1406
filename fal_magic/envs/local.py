"""The user's own packages as requirements: ``"./mylib"``, ``"dist/mylib-1.0-py3-none-any.whl"``,
``"mylib @ file:///src/mylib"`` and ``"-e ./mylib"``.

A local package is installed from its path, and the environment key records a digest of its sources
(read again at each call), so that an edited package makes a new environment. ``-e`` installs the directory itself
(editable): the key records only its path, and kernels started after an edit import the edited code.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.requirements import InvalidRequirement, Requirement

from ..errors import EnvironmentBuildError

#: Directories and files that are not a package's sources: version control, caches, build outputs.
IGNORED = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache",
                     ".tox", ".nox", "node_modules", ".ipynb_checkpoints"})
#: Skipped at the package's top level only (a subpackage may be called ``build``).
IGNORED_AT_TOP = frozenset({"build", "dist", ".venv", "venv"})
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".egg-info")

EDITABLE = "-e "


@dataclass(frozen=True)
class LocalPackage:
    """A package on this machine: its path, whether it is installed editable, and a digest of it."""

    path: Path
    editable: bool
    digest: str


_EDITABLE_PREFIXES = ("--editable=", "--editable ", "-e ")
_ARCHIVES = (".whl", ".tar.gz", ".zip")


def _split_editable(text: str) -> tuple[bool, str]:
    text = text.strip()
    for prefix in _EDITABLE_PREFIXES:
        if text.startswith(prefix):
            return True, text[len(prefix):].strip()
    return False, text


def _direct_reference(text: str) -> Requirement | None:
    """``text`` parsed as a PEP 508 requirement, or None when it is not one (a path, a bare URL)."""
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None


def looks_local(text: str) -> bool:
    """Whether a requirement string names a path rather than a package on an index (or at a URL).

    Parsed as PEP 508 (``name@file:///src`` and ``name @ file:///src`` alike), not matched as text: a
    ``file:`` reference is a path on the machine that reads it, whatever its spacing."""
    editable, text = _split_editable(text)
    if editable:
        return True
    req = _direct_reference(text)
    if req is not None:
        if req.url is not None:
            return urlparse(req.url).scheme == "file"
        return text.endswith(_ARCHIVES)  # "mylib.whl" is a valid name, and a file to pip
    if "://" in text:
        return urlparse(text).scheme == "file"
    return text.startswith((".", "/", "~")) or text.endswith(_ARCHIVES) or text.startswith("file:")


def _ignored(name: str, top: bool = False) -> bool:
    return name in IGNORED or name.endswith(_IGNORED_SUFFIXES) or (top and name in IGNORED_AT_TOP)


def source_files(root: Path) -> list[Path]:
    """A package directory's source files, sorted (version control, caches and build outputs skipped)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _ignored(d, top=folder == str(root)))
        found += [Path(folder) / f for f in files if not _ignored(f)]
    return sorted(found)


_digests: dict[Path, tuple[tuple[tuple[str, int, int], ...], str]] = {}


def digest(path: Path) -> str:
    """A digest of a wheel or sdist file's bytes, or of a directory's source files (names and
    contents); the files are read again only when one's size or modification time changed."""
    try:
        files = [path] if path.is_file() else source_files(path)
        signature = tuple((str(f), (st := f.stat()).st_mtime_ns, st.st_size) for f in files)
    except OSError as exc:
        raise EnvironmentBuildError(f"cannot read local package {path}: {exc.strerror or exc}") from None
    known = _digests.get(path)
    if known is not None and known[0] == signature:
        return known[1]
    value = _read_digest(path)
    _digests[path] = (signature, value)
    return value


def _read_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()[:16]
        for file in source_files(path):
            h.update(str(file.relative_to(path)).encode() + b"\0")
            h.update(file.read_bytes())
            h.update(b"\0")
    except OSError as exc:
        raise EnvironmentBuildError(f"cannot read local package {path}: {exc.strerror or exc}") from None
    return h.hexdigest()[:16]


def resolve(text: str, base: Path | None = None) -> tuple[str, LocalPackage]:
    """(canonical requirement string, package) for a local requirement; paths relative to ``base``
    (the requirements file's directory, else the working directory)."""
    editable, text = _split_editable(text)
    name = ""
    req = _direct_reference(text)
    if req is not None and req.url is not None:
        name = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
        text = req.url
    if text.startswith("file:"):
        text = unquote(urlparse(text).path)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    path = path.resolve()
    if not path.exists():
        raise EnvironmentBuildError(f"local package {path} does not exist")
    if path.is_dir() and not any((path / f).exists() for f in ("pyproject.toml", "setup.py", "setup.cfg")):
        raise EnvironmentBuildError(f"{path} is not a Python package: it has no pyproject.toml or setup.py")
    if editable and not path.is_dir():
        raise EnvironmentBuildError(f"-e needs a package directory, and {path} is a file")
    package = LocalPackage(path, editable, "" if editable else digest(path))
    canonical = str(path)
    if name:
        canonical = f"{name} @ {path.as_uri()}"
    return (EDITABLE + canonical if editable else canonical), package
