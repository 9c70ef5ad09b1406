"""Compiled bytecode for a new environment, linked from built environments that hold the very same
source files.

uv links installed files from its cache, so environments that share a package share its source
files (one inode). A ``.pyc`` is valid for a source whose mtime and size it records, so a sibling
environment's ``.pyc`` of the *same file* is valid here too, and a hard link is enough. Python
writes a changed ``.pyc`` to a new file and renames it, so a linked one is never changed in place.
Nothing is compiled ahead: kernels run with bytecode writing on, so the modules they import are
compiled once, kept, and then shared with every later environment (compiling all of ipykernel's
dependencies ahead took ~2 s per environment; a kernel imports about a quarter of those files).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence


def site_packages(env: Path) -> Path | None:
    """The environment's site-packages directory (POSIX layout), or None."""
    found = sorted(env.glob("lib/python*/site-packages"))
    return found[0] if found else None


def link_bytecode(env: Path, donors: Sequence[Path], tag: str = sys.implementation.cache_tag) -> int:
    """Give ``env``'s ``.py`` files the ``.pyc`` (of Python ``tag``, e.g. ``cpython-312``) of the first
    donor environment whose file is the same inode (hard links). Returns how many were linked."""
    site = site_packages(env)
    if site is None:
        return 0
    donor_sites = [s for s in (site_packages(d) for d in donors) if s is not None]
    if not donor_sites:
        return 0
    suffix = f".{tag}.pyc"
    linked = 0
    for root, dirs, files in os.walk(site):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(root, site)
        cache = os.path.join(root, "__pycache__")
        for name in files:
            if name.endswith(".py") and _link_from_donor(os.path.join(root, name), rel, name,
                                                         name[:-3] + suffix, cache, donor_sites):
                linked += 1
    return linked


def _link_from_donor(source: str, rel: str, name: str, pyc: str, cache: str, donor_sites: list[Path]) -> bool:
    try:
        own = os.stat(source)
    except OSError:
        return False
    for donor in donor_sites:
        donor_dir = os.path.join(donor, rel)
        try:
            if not os.path.samestat(own, os.stat(os.path.join(donor_dir, name))):
                continue
            os.makedirs(cache, exist_ok=True)
            os.link(os.path.join(donor_dir, "__pycache__", pyc), os.path.join(cache, pyc))
            return True
        except FileExistsError:
            return False  # already there (pip compiles at install)
        except OSError:
            continue  # this donor has no .pyc of it (no kernel imported it there)
    return False
