"""fal_magic's settings: one traitlets Configurable, readable from IPython config and set by configure().

``c.FalMagic.default_keep_alive = 60`` in an IPython profile, or ``fal_magic.configure(...)`` in code.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import platformdirs
from traitlets import Bool, Dict, Enum, Float, List, TraitError, Unicode
from traitlets.config import Configurable

from .errors import FalMagicError
from .masking import mask_credentials
from .platforms import FORK_BY_DEFAULT

HOME_ENV = "FAL_MAGIC_HOME"
TOKEN_ENV = "FAL_MAGIC_TOKEN"


class FalMagic(Configurable):
    """Defaults for isolated functions, the cell magic, the environment cache and the culler."""

    default_keep_alive = Float(
        10.0, min=0.0, config=True, help="Seconds a kernel stays warm after its last call (fal's default)."
    )
    cell_keep_alive = Float(
        600.0, min=0.0, config=True,
        help="Seconds the kernel of an %%isolated cell stays warm after the cell: long enough for "
             "interactive work, so that a cell's variables are still there for the next one.",
    )
    home = Unicode(
        "",
        config=True,
        help="Cache directory for environments. Empty: $FAL_MAGIC_HOME, else the user cache dir.",
    )
    installer = Enum(
        ["auto", "uv", "pip"], "auto", config=True, help="Package installer: uv, pip, or auto (uv if present)."
    )
    prefer_cached = Bool(
        True, config=True,
        help="Resolve new environments from uv's cache first, without asking the package index (much "
             "faster); ask the index only when the cache cannot satisfy them. An unpinned requirement then "
             "gets the newest version already cached: set False (or pin) to always ask the index.",
    )
    culler_interval = Float(
        0.25, min=0.01, config=True, help="Longest pause, in seconds, between two checks of the idle culler."
    )
    kernel_start_timeout = Float(
        60.0, min=1.0, config=True, help="Seconds to wait for a new kernel to answer."
    )
    fork_kernels = Bool(
        FORK_BY_DEFAULT, config=True,
        help="Start local kernels by forking them from a template process per environment that has "
             "already imported ipykernel (a kernel then starts in about half the time); False: start each "
             "kernel as a new Python process. Default: True on Linux, False elsewhere (macOS).",
    )
    kernel_scope = Enum(
        ["process", "user"], "process", config=True,
        help="'user': local kernels form one pool per user and machine (under the home), shared by every "
             "process of the user: a script run again, a restarted notebook or a second notebook finds the "
             "warm kernel of its key, and a kernel lives until its deadline whoever is left (SPEC 13). "
             "'process' (the default for now): kernels end with the process that started them.",
    )
    template_keep_alive = Float(
        300.0, min=0.0, config=True,
        help="Seconds an environment's kernel template stays after its last kernel ended.",
    )
    interrupt_grace = Float(
        5.0, min=0.0, config=True,
        help="Seconds an interrupted call may take to stop before its kernel is restarted.",
    )

    index_url = Unicode(
        "", config=True,
        help="Package index for environments built here (over uv's and pip's configuration); credentials in "
             "the URL are never shown and not part of the environment key.",
    )
    extra_index_urls = List(Unicode(), config=True, help="More package indexes for environments built here.")
    find_links = List(Unicode(), config=True,
                      help="Directories or pages of distribution files for environments built here.")

    python = Unicode(
        "", config=True,
        help="The Python version of environments (e.g. '3.12'), for isolated functions decorated and cells run "
             "after it is set; empty: the notebook's own. A function then travels as its source.",
    )
    lock = Unicode(
        None, allow_none=True, config=True,
        help="A lock file recording the exact packages each environment built here got, so that a colleague "
             "(or a rebuilt cache) gets the same: a path, 'auto' (<notebook>.isolated.lock beside the notebook; "
             "off outside a notebook), or None (off).",
    )

    host = Unicode(
        "", config=True,
        help="URL of a Jupyter Server with the fal_magic extension to run kernels on; empty: this machine.",
    )
    token = Unicode(
        "", config=True, help="The remote Jupyter Server's token (default: $FAL_MAGIC_TOKEN, else none)."
    )
    kernel_env = Dict(
        value_trait=Unicode(), key_trait=Unicode(), config=True,
        help="Environment variables for every isolated kernel on this machine (secrets included: never "
             "shown); a call's own env= adds to them and wins.",
    )
    allow_plain_http = Bool(
        False, config=True,
        help="Allow http:// (unencrypted) to a host other than this machine; tokens and pickles would cross "
             "the network in clear text.",
    )

    def home_path(self) -> Path:
        """The resolved cache directory: the configured one, else $FAL_MAGIC_HOME, else the user cache dir."""
        if self.home:
            return Path(self.home).expanduser()
        env = os.environ.get(HOME_ENV)
        if env:
            return Path(env).expanduser()
        return Path(platformdirs.user_cache_dir("fal_magic", appauthor=False))

    def resolved_token(self) -> str:
        """The configured token, else $FAL_MAGIC_TOKEN."""
        return self.token or os.environ.get(TOKEN_ENV, "")


_settings: FalMagic | None = None
_settings_lock = threading.Lock()


def settings() -> FalMagic:
    """The process-wide settings object (created on first use)."""
    global _settings
    with _settings_lock:
        if _settings is None:
            _settings = FalMagic()
        return _settings


def adopt(instance: FalMagic) -> None:
    """Make ``instance`` (e.g. one created with IPython's config as parent) the process-wide settings."""
    global _settings
    with _settings_lock:
        _settings = instance


def configure(**options: Any) -> FalMagic:
    """Change settings from code, e.g. ``configure(default_keep_alive=60, home="/data/envs")``."""
    current = settings()
    unknown = sorted(set(options) - set(current.trait_names(config=True)))
    if unknown:
        valid = ", ".join(sorted(current.trait_names(config=True)))
        raise FalMagicError(f"unknown setting(s) {', '.join(unknown)}; valid settings: {valid}")
    for name, value in options.items():
        try:
            setattr(current, name, value)
        except TraitError as exc:
            raise FalMagicError(f"bad value for setting {name!r}: {mask_credentials(str(exc))}") from None
    return current
