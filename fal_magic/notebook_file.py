"""Which notebook file this process runs, as far as the frontend says, for settings that live beside it.

Jupyter Server gives a notebook's kernel its path in ``JPY_SESSION_NAME`` (IPython copies it into
``__session__``); VS Code sets ``__vsc_ipynb_file__``. A relative path is taken from the kernel's working
directory, which Jupyter sets to the notebook's own.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .envs.lockfile import lock_beside


def notebook_file() -> Path | None:
    """The ``.ipynb`` file this process is the kernel of, or None (a script, a console, a terminal)."""
    candidates = []
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        candidates += [shell.user_ns.get("__vsc_ipynb_file__"), shell.user_ns.get("__session__")]
    candidates.append(os.environ.get("JPY_SESSION_NAME"))
    for value in candidates:
        if isinstance(value, str) and value.endswith(".ipynb"):
            path = Path(value)
            return path if path.is_absolute() else Path.cwd() / path.name
    return None


def lock_path(setting: str | None) -> Path | None:
    """The lock file ``FalMagic.lock`` names: a path, the one beside this notebook for 'auto' (None
    outside a notebook), or None when it is off."""
    if not setting:
        return None
    if setting == "auto":
        notebook = notebook_file()
        return lock_beside(notebook) if notebook is not None else None
    return Path(setting).expanduser().absolute()
