"""A client without what only POSIX has (Windows: no fcntl, resource, termios, fork, unix sockets)
imports fal_magic, runs isolated code on a Jupyter Server, and is told clearly that kernels cannot run
on its own machine. Simulated here by hiding those from fal_magic's own imports."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import TOKEN

#: Run first in the child: fal_magic's modules can import none of what Windows lacks.
HIDE_POSIX = textwrap.dedent('''
    import importlib.abc, os, socket, sys

    HIDDEN = {"fcntl", "resource", "termios", "pty", "grp", "pwd"}

    class WindowsLike(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in HIDDEN:
                return None
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "") if frame is not None else ""
            if importer.startswith("fal_magic"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for name in HIDDEN:
        if name in sys.modules and name not in ("pwd", "grp"):
            sys.modules.pop(name)
    sys.meta_path.insert(0, WindowsLike())
    for attr in ("fork", "register_at_fork", "forkpty"):
        if hasattr(os, attr):
            delattr(os, attr)
    del socket.AF_UNIX
''')


def test_a_client_without_posix_runs_remote_code_and_is_told_why_local_kernels_cannot_run(remote):
    script = HIDE_POSIX + textwrap.dedent(f'''
        import fal_magic
        from fal_magic import FalMagicError, isolated

        @isolated(keep_alive=0, host={remote!r})
        def add(a, b):
            return a + b

        fal_magic.configure(token={TOKEN!r})
        print("remote:", add(2, 3))
        try:
            isolated(keep_alive=0, host="")(add.func)(1, 1)
        except FalMagicError as exc:
            print("local:", exc)
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "remote: 5" in out
    assert "local: kernels cannot run on this machine" in out and "host=URL" in out
