"""Package installers (uv, pip) behind one small interface: put requirements into a Python.

uv is the default when present: with a warm cache it links packages instead of copying them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol


class InstallFailed(Exception):
    """The installer exited non-zero; ``output`` is its own text."""

    def __init__(self, output: str) -> None:
        super().__init__(output)
        self.output = output


class Installer(Protocol):
    """Installs requirement specifiers into the environment whose interpreter is ``python``."""

    name: str

    def install(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None],
                options: Sequence[str] = ()) -> None: ...

    def resolve(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None],
                options: Sequence[str] = ()) -> list[str]:
        """The exact distributions installing ``requirements`` into ``python`` would give, as
        ``name==version`` (or ``name @ URL`` for one from a URL or a path), without installing."""
        ...


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a function for ``preexec_fn`` that has the kernel SIGKILL the installer when the
    process that started it dies (a killed host must not leave an installer writing into an
    environment that the next host rebuilds). None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    return set_death_signal


_PREEXEC = _die_with_parent()

#: A requirement list longer than this goes to the installer as a file, not as arguments
#: (the OS limits a command line's length).
_MAX_ARGS_LENGTH = 16_000


@contextmanager
def requirement_args(requirements: Sequence[str]) -> Iterator[list[str]]:
    """The installer arguments that name ``requirements``: the strings themselves, or ``-r FILE``
    for a long list (the file is removed afterwards)."""
    if sum(len(r) + 1 for r in requirements) <= _MAX_ARGS_LENGTH:
        yield [arg for r in requirements for arg in (r.split(" ", 1) if r.startswith("-e ") else [r])]
        return
    fd, path = tempfile.mkstemp(prefix="fal_magic-requirements-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(requirements) + "\n")
        yield ["-r", path]
    finally:
        os.unlink(path)


def _run(cmd: list[str], on_line: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    """Run an installer, passing each output line on; kill it if the caller is interrupted, and
    (on Linux) when this process dies."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, env=env, preexec_fn=_PREEXEC,
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
    """``uv pip install``: files linked from uv's cache. Bytecode is the cache's business (see bytecode.py).

    With ``prefer_cached``, uv first resolves from its cache alone (``--offline``: no round trip to
    the index, ~0.1 s instead of ~0.5 s here); only when the cache cannot satisfy the requirements
    does it ask the indexes. An unpinned requirement then gets the newest version uv has cached.
    """

    name = "uv"

    def __init__(self, binary: str, prefer_cached: bool = True) -> None:
        self.binary = binary
        self.prefer_cached = prefer_cached

    def install(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None],
                options: Sequence[str] = ()) -> None:
        with requirement_args(requirements) as args:
            self._cached_first([self.binary, "pip", "install", "--color", "never", "--python", str(python),
                                *options, *args], on_line)

    def resolve(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None],
                options: Sequence[str] = ()) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="fal_magic-resolve-") as work:
            wanted, out = Path(work) / "requirements.in", Path(work) / "resolved.txt"
            wanted.write_text("\n".join(requirements) + "\n")
            self._cached_first([self.binary, "pip", "compile", "--color", "never", "--python", str(python),
                                "--no-header", "--no-annotate", "--quiet", *options, str(wanted),
                                "--output-file", str(out)], on_line)
            lines = out.read_text().splitlines()
        lines = [line.strip() for line in lines]
        return [line for line in lines if line and (line.startswith("-e ") or not line.startswith(("#", "-")))]

    def _cached_first(self, command: list[str], on_line: Callable[[str], None]) -> None:
        """Run a uv command against its cache alone first (with ``prefer_cached``), then with the indexes."""
        env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
        env.pop("VIRTUAL_ENV", None)
        if self.prefer_cached:
            said: list[str] = []
            try:
                _run([*command, "--offline"], said.append, env)
            except InstallFailed as exc:
                if "no space left on device" in exc.output.lower():
                    raise  # (asking the index would only fail again, less clearly)
                on_line("not all of it is in uv's cache: asking the package index")
            else:
                for line in said:
                    on_line(line)
                return
        _run(command, on_line, env)


class PipInstaller:
    """The host's pip, pointed at the environment's interpreter (``pip --python``), so envs need no pip."""

    name = "pip"

    def install(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None],
                options: Sequence[str] = ()) -> None:
        with requirement_args(requirements) as args:
            _run([sys.executable, "-m", "pip", "--python", str(python), "install",
                  "--disable-pip-version-check", "--no-input", "--no-color", *options, *args], on_line)

    def resolve(self, python: Path, requirements: Sequence[str], on_line: Callable[[str], None],
                options: Sequence[str] = ()) -> list[str]:
        """pip's installation report of a dry run (``python`` must be the host's version: pip resolves
        for the interpreter it runs on)."""
        with requirement_args(requirements) as args, tempfile.TemporaryDirectory(prefix="fal_magic-resolve-") as work:
            report = Path(work) / "report.json"
            _run([str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                  "--report", str(report), "--disable-pip-version-check", "--no-input", "--no-color",
                  *options, *args], on_line)
            installs = json.loads(report.read_text()).get("install", [])
        out = []
        for item in installs:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            url = item.get("download_info", {}).get("url", "")
            out.append(f"{name} @ {url}" if item.get("is_direct") and url else f"{name}=={version}")
        return out


def find_uv() -> str | None:
    """The uv binary: the one shipped by the ``uv`` package, else one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def pick_installer(choice: str = "auto", prefer_cached: bool = True) -> Installer:
    """``"uv"``, ``"pip"`` or ``"auto"`` (uv when available, pip otherwise); ``prefer_cached``: see UvInstaller."""
    if choice not in ("auto", "uv", "pip"):
        raise ValueError(f"unknown installer {choice!r}: use 'auto', 'uv' or 'pip'")
    if choice in ("auto", "uv"):
        uv = find_uv()
        if uv:
            return UvInstaller(uv, prefer_cached)
        if choice == "uv":
            raise FileNotFoundError("installer 'uv' was asked for but no uv binary was found")
    return PipInstaller()
