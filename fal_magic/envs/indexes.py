"""Where packages come from: package indexes and find-links, gathered from every place a user sets them.

Layers, highest first (each field is taken from the first layer that sets it): a requirements file's
own options, fal_magic's settings (``FalMagic.index_url``, ``extra_index_urls``, ``find_links``), uv's
configuration (``UV_*`` variables, then the user's and the system's ``uv.toml``), and pip's
(``PIP_*`` variables, then ``pip.conf`` files). The result goes to either installer as explicit
options, so what builds an environment is exactly what its key records.

pip considers every index for every package and takes the best version; uv, by default, takes a
package from the first index that has it (a guard against dependency confusion). Settings that come
from pip's configuration keep pip's rule (uv's ``unsafe-best-match``): a pip user's mirror that
holds an older release must not hide a newer one from the public index.
"""
from __future__ import annotations

import configparser
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ..masking import mask_credentials

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def strip_credentials(url: str) -> str:
    """``https://alice:pw@host/x`` -> ``https://host/x``: what a key may record of a URL."""
    return _USERINFO.sub("", url)


@dataclass(frozen=True)
class Indexes:
    """Package sources for one environment; ``None`` is "not set here" (a lower layer decides)."""

    index_url: Optional[str] = None
    extra_index_urls: Optional[tuple[str, ...]] = None
    find_links: Optional[tuple[str, ...]] = None
    no_index: Optional[bool] = None
    #: pip's rule for several indexes (the best version from any of them), rather than uv's first-index.
    best_match: bool = False

    def over(self, lower: Indexes) -> Indexes:
        """These settings, with the fields they leave unset taken from ``lower``."""
        chosen: dict[str, Any] = {}
        best = False
        for f in fields(self):
            if f.name == "best_match":
                continue
            mine = getattr(self, f.name)
            source = self if mine is not None else lower
            chosen[f.name] = getattr(source, f.name)
            best = best or (chosen[f.name] is not None and source.best_match)
        return Indexes(**chosen, best_match=best)

    @property
    def is_default(self) -> bool:
        """Whether nothing is set (the installer's own default, PyPI)."""
        return all(getattr(self, f.name) in (None, False, ()) for f in fields(self))

    def key_part(self) -> dict[str, Any]:
        """What the environment key records: the sources without credentials (a rotated token keeps
        its environments)."""
        return {
            "index_url": strip_credentials(self.index_url) if self.index_url else None,
            "extra_index_urls": [strip_credentials(u) for u in self.extra_index_urls or ()],
            "find_links": [strip_credentials(u) for u in self.find_links or ()],
            "no_index": bool(self.no_index),
            "best_match": self.best_match,
        }

    def describe(self) -> list[str]:
        """One line per source, credentials masked, for progress lines and the env metadata."""

        lines = []
        if self.no_index:
            lines.append("no index")
        elif self.index_url:
            lines.append(f"index {mask_credentials(self.index_url)}")
        lines += [f"extra index {mask_credentials(u)}" for u in self.extra_index_urls or ()]
        lines += [f"find-links {mask_credentials(u)}" for u in self.find_links or ()]
        return lines

    def installer_args(self, installer: str) -> list[str]:
        """The options that give these sources to ``installer`` ("uv" or "pip")."""
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        elif self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls or ():
            args += ["--extra-index-url", url]
        for link in self.find_links or ():
            args += ["--find-links", link]
        if installer == "uv" and self.best_match and (self.extra_index_urls or self.find_links):
            args += ["--index-strategy", "unsafe-best-match"]
        return args


def own_settings(index_url: str, extra_index_urls: list[str], find_links: list[str]) -> Indexes:
    """fal_magic's own settings (empty values are unset)."""
    return Indexes(index_url=index_url or None,
                   extra_index_urls=tuple(extra_index_urls) or None,
                   find_links=tuple(find_links) or None)


def _split(value: str) -> tuple[str, ...]:
    return tuple(v for v in re.split(r"[\s,]+", value) if v)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _existing_local(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Drop local directories that do not exist (pip skips them with a warning; uv would fail)."""
    if values is None:
        return None
    kept = tuple(v for v in values
                 if not (v.startswith("/") or v.startswith("file://")) or Path(v.removeprefix("file://")).exists())
    return kept or None


def uv_settings(environ: Mapping[str, str], home: Path) -> Indexes:
    """uv's own configuration: ``UV_*`` variables over the user's ``uv.toml`` over the system's."""
    from_env = Indexes(
        index_url=environ.get("UV_DEFAULT_INDEX") or environ.get("UV_INDEX_URL") or None,
        extra_index_urls=_split(environ.get("UV_INDEX", "") + " " + environ.get("UV_EXTRA_INDEX_URL", "")) or None,
        find_links=_split(environ.get("UV_FIND_LINKS", "")) or None,
        no_index=True if _truthy(environ.get("UV_NO_INDEX", "")) else None,
    )
    config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    system_dirs = [Path(d) for d in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if d]
    result = from_env
    for path in [config_home / "uv" / "uv.toml", *(d / "uv" / "uv.toml" for d in system_dirs),
                 Path("/etc/uv/uv.toml")]:
        result = result.over(_uv_file(path))
    return result


def _uv_file(path: Path) -> Indexes:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return Indexes()
    sections = [data.get("pip", {}), data]  # uv pip's own section first
    found = Indexes()
    for table in sections:
        if not isinstance(table, dict):
            continue
        extra = [str(u) for u in table.get("extra-index-url", [])]
        default = table.get("index-url")
        for entry in table.get("index", []):
            if isinstance(entry, dict) and "url" in entry:
                if entry.get("default"):
                    default = default or entry["url"]
                else:
                    extra.append(str(entry["url"]))
        found = found.over(Indexes(
            index_url=str(default) if default else None,
            extra_index_urls=tuple(extra) or None,
            find_links=tuple(str(u) for u in table.get("find-links", [])) or None,
            no_index=True if table.get("no-index") else None,
        ))
    return found


def pip_config_files(environ: Mapping[str, str], home: Path) -> list[Path]:
    """pip's configuration files, lowest priority first; none when ``PIP_CONFIG_FILE`` is os.devnull."""
    chosen = environ.get("PIP_CONFIG_FILE")
    if chosen == os.devnull:
        return []
    system_dirs = [Path(d) for d in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if d]
    config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    files = [*(d / "pip" / "pip.conf" for d in system_dirs), Path("/etc/pip.conf"),
             home / ".pip" / "pip.conf", config_home / "pip" / "pip.conf"]
    if sys.platform == "darwin":
        files.append(home / "Library" / "Application Support" / "pip" / "pip.conf")
    files.append(Path(sys.prefix) / "pip.conf")
    if chosen:
        files.append(Path(chosen))
    return files


def pip_settings(environ: Mapping[str, str], home: Path) -> Indexes:
    """The user's pip configuration: ``PIP_*`` variables over ``pip.conf`` files (``[install]`` over
    ``[global]``, later files over earlier ones), as pip itself reads them."""
    values: dict[str, str] = {}
    for path in pip_config_files(environ, home):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                values.update({k.replace("_", "-"): v for k, v in parser.items(section)})
    for name in ("index-url", "extra-index-url", "find-links", "no-index"):
        variable = "PIP_" + name.upper().replace("-", "_")
        if environ.get(variable):
            values[name] = environ[variable]
    return Indexes(
        index_url=values.get("index-url") or None,
        extra_index_urls=_existing_local(_split(values.get("extra-index-url", "")) or None),
        find_links=_existing_local(_split(values.get("find-links", "")) or None),
        no_index=True if _truthy(values.get("no-index", "")) else None,
        best_match=True,
    )


_VARIABLES = ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS", "UV_NO_INDEX",
              "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONFIG_FILE",
              "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS")
_memo: dict[Any, Indexes] = {}


def _stamp(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


_files_memo: dict[Any, tuple[str, ...]] = {}


def _config_files(environ: Mapping[str, str], home: Path, variables: tuple[str | None, ...]) -> tuple[str, ...]:
    """The pip and uv configuration files to watch (which depend only on ``home`` and the variables)."""
    slot = (str(home), variables)
    found = _files_memo.get(slot)
    if found is None:
        config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        dirs = (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
        files = [*pip_config_files(environ, home), config_home / "uv" / "uv.toml", Path("/etc/uv/uv.toml"),
                 *(Path(d) / "uv" / "uv.toml" for d in dirs if d)]
        _files_memo.clear()
        found = _files_memo[slot] = tuple(str(f) for f in files)
    return found


def site_settings(own: Indexes, environ: Mapping[str, str] | None = None, home: Path | None = None) -> Indexes:
    """fal_magic's settings over uv's configuration over pip's, as they are now (the files are read
    again only when one of them, or a variable, changed: at each call, a few ``stat`` calls)."""
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    variables = tuple(environ.get(v) for v in _VARIABLES)
    fingerprint = (own, str(home), variables, tuple(_stamp(f) for f in _config_files(environ, home, variables)))
    found = _memo.get(fingerprint)
    if found is None:
        _memo.clear()
        found = _memo[fingerprint] = own.over(uv_settings(environ, home)).over(pip_settings(environ, home))
    return found
