"""Compiled bytecode for a new environment: linked from built environments that hold the very same
source files, compiled only where none does.

uv links installed files from its cache, so environments that share a package share its source
files (one inode). A ``.pyc`` is valid for a source whose mtime and size it records, so a sibling
environment's ``.pyc`` of the *same file* is valid here too, and a hard link is enough. Python
writes a changed ``.pyc`` to a new file and renames it, so a linked one is never changed in place.
Without this, every environment compiles ipykernel and its dependencies anew (about 2 s here).
"""
from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path
from typing import Sequence

#: Above this many files without a donor, compile them in parallel processes rather than here.
IN_PROCESS_LIMIT = 200


def site_packages(env: Path) -> Path | None:
    """The environment's site-packages directory (POSIX layout), or None."""
    found = sorted(env.glob("lib/python*/site-packages"))
    return found[0] if found else None


def provide_bytecode(env: Path, donors: Sequence[Path]) -> tuple[int, int]:
    """Give every ``.py`` file of ``env`` a ``.pyc``: linked from the first donor environment whose
    file is the same inode, else compiled. Returns (linked, compiled)."""
    site = site_packages(env)
    if site is None:
        return 0, 0
    donor_sites = [s for s in (site_packages(d) for d in donors) if s is not None]
    suffix = f".{sys.implementation.cache_tag}.pyc"
    linked = 0
    todo: list[str] = []
    for root, dirs, files in os.walk(site):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(root, site)
        cache = os.path.join(root, "__pycache__")
        for name in files:
            if not name.endswith(".py"):
                continue
            pyc = name[:-3] + suffix
            if os.path.exists(os.path.join(cache, pyc)):
                continue
            source = os.path.join(root, name)
            if _link_from_donor(source, rel, name, pyc, cache, donor_sites):
                linked += 1
            else:
                todo.append(source)
    _compile(env, todo)
    return linked, len(todo)


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
            return True
        except OSError:
            continue
    return False


def _compile(env: Path, sources: list[str]) -> None:
    """Compile ``sources``: a few here (the host's interpreter is the env's version), many in one
    ``compileall`` process per core. Files that do not compile are left as Python would leave them."""
    if len(sources) <= IN_PROCESS_LIMIT:
        for source in sources:
            try:
                py_compile.compile(source, doraise=True)
            except (py_compile.PyCompileError, OSError, ValueError):
                pass
        return
    workers = max(1, os.cpu_count() or 1)
    procs = [subprocess.Popen([str(env / "bin" / "python"), "-m", "compileall", "-q", "-i", "-"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
             for _ in range(workers)]
    for i, proc in enumerate(procs):  # feed every worker first, then wait, so that they run side by side
        assert proc.stdin is not None
        proc.stdin.write("\n".join(sources[i::workers]))
        proc.stdin.close()
    for proc in procs:
        proc.wait()
