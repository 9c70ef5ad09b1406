"""Directories named after the process that made them (``<prefix><pid>-<random>``): those whose
process is gone were left by a process that was killed before it could remove them."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def remove_orphaned(paths: Iterable[Path], prefix: str) -> None:
    """Delete each of ``paths`` (named ``prefix`` + pid + ``-...``) that is ours and whose process is gone."""
    for path in paths:
        try:
            pid = int(path.name[len(prefix):].split("-", 1)[0])
            if path.stat().st_uid != os.getuid() or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):
            continue
