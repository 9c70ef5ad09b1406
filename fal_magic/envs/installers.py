"""Package installers (uv, pip) behind one small interface: put requirements into a Python.

uv is the default when present: with a warm cache it links packages instead of copying them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Protocol, Sequence


class InstallFailed(Exception):
    """The installer exited non-zero; ``output`` is its own text."""

    def __init__(self, output: str) -> None:
        super().__init__(output)
        self.output = output


class Installer(Protocol):
    """Installs requirement specifiers into the environment whose interpreter is ``python``."""

    name: str

    def install(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None]) -> None: ...


def _run(cmd: list[str], on_line: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    """Run an installer, passing each output line on; kill it if the caller is interrupted."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            on_line(line.rstrip("\n"))
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        raise InstallFailed("".join(lines).strip())


class UvInstaller:
    """``uv pip install``: files linked from uv's cache. Bytecode is the cache's business (see bytecode.py)."""

    name = "uv"

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def install(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None]) -> None:
        env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
        env.pop("VIRTUAL_ENV", None)
        _run([self.binary, "pip", "install", "--python", str(python), *requirements],
             on_line, env)


class PipInstaller:
    """The host's pip, pointed at the environment's interpreter (``pip --python``), so envs need no pip."""

    name = "pip"

    def install(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None]) -> None:
        _run([sys.executable, "-m", "pip", "--python", str(python), "install",
              "--disable-pip-version-check", "--no-input", *requirements], on_line)


def find_uv() -> str | None:
    """The uv binary: the one shipped by the ``uv`` package, else one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def pick_installer(choice: str = "auto") -> Installer:
    """``"uv"``, ``"pip"`` or ``"auto"`` (uv when available, pip otherwise)."""
    if choice not in ("auto", "uv", "pip"):
        raise ValueError(f"unknown installer {choice!r}: use 'auto', 'uv' or 'pip'")
    if choice in ("auto", "uv"):
        uv = find_uv()
        if uv:
            return UvInstaller(uv)
        if choice == "uv":
            raise FileNotFoundError("installer 'uv' was asked for but no uv binary was found")
    return PipInstaller()
