"""Other Pythons: find an installed interpreter of a version, where uv would look for one.

Searched in order: the running interpreter (when it is that version), ``pythonX.Y`` on PATH, pyenv's
versions (``$PYENV_ROOT``, default ``~/.pyenv``), and uv-managed installs (``$UV_PYTHON_INSTALL_DIR``,
default ``~/.local/share/uv/python``). Nothing is downloaded. Each candidate is asked what it is, once.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import FalMagicError

_VERSION = re.compile(r"^(?:cpython-|python)?(3)\.(\d{1,2})$")
#: The versions a kernel can run on (fal_magic's own range; the runtime inside kernels needs 3.10).
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
_ASK = "import sys, venv; print(f'{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}')"
_found: dict[str, Path] = {}
_asked: dict[str, str | None] = {}
_guard = threading.Lock()


def python_tag(version: str) -> str:
    """``"3.12"`` (or ``"python3.12"``, ``"cpython-3.12"``) -> ``"cpython-3.12"``, the form keys use;
    FalMagicError for anything else."""
    match = _VERSION.match(version.strip()) if isinstance(version, str) else None
    if match is None:
        raise FalMagicError(f"python_version must look like '3.12', not {version!r}")
    if f"{match[1]}.{match[2]}" not in SUPPORTED:
        raise FalMagicError(f"python_version {version!r} is not supported: kernels run on Python "
                            f"{', '.join(SUPPORTED)}")
    return f"cpython-{match[1]}.{match[2]}"


def _minor(tag: str) -> str:
    return tag.removeprefix("cpython-")


def _candidates(minor: str) -> list[Path]:
    out: list[Path] = []
    on_path = shutil.which(f"python{minor}")
    if on_path:
        out.append(Path(on_path))
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    out += sorted(pyenv.glob(f"{minor}.*/bin/python{minor}"), reverse=True)
    uv_dir = Path(os.environ.get("UV_PYTHON_INSTALL_DIR") or Path.home() / ".local" / "share" / "uv" / "python")
    out += sorted(uv_dir.glob(f"cpython-{minor}.*/bin/python{minor}"), reverse=True)
    return out


def _what_is(python: Path) -> str | None:
    """``cpython-3.12`` for a working CPython interpreter that can make virtualenvs, else None."""
    key = str(python)
    if key not in _asked:
        try:
            done = subprocess.run([key, "-c", _ASK], capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL)
            _asked[key] = done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            _asked[key] = None
    return _asked[key]


def find_python(tag: str) -> Path:
    """The interpreter for ``tag`` (``cpython-3.12``); FalMagicError naming the versions there are."""
    if tag == f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}":
        return Path(sys.executable)
    with _guard:
        if tag in _found:
            return _found[tag]
        for candidate in _candidates(_minor(tag)):
            if _what_is(candidate) == tag:
                _found[tag] = candidate
                return candidate
    there = ", ".join(available()) or "none"
    raise FalMagicError(f"no Python {_minor(tag)} found on this machine (looked on PATH, in pyenv's versions and "
                        f"uv's installs); Pythons found: {there}. Install it (e.g. 'uv python install "
                        f"{_minor(tag)}' or 'pyenv install {_minor(tag)}'), or leave python_version unset to use "
                        "the notebook's own")


def available() -> list[str]:
    """The versions (``3.10``, ...) this machine has an interpreter of."""
    found = {f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for minor in range(8, 20):
        version = f"3.{minor}"
        with _guard:
            if any(_what_is(c) == f"cpython-{version}" for c in _candidates(version)):
                found.add(version)
    return sorted(found, key=lambda v: int(v.split(".")[1]))
