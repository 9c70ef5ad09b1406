"""Requirements -> normalized spec -> key. Pure functions, no I/O.

The key names one environment: requirement specifiers normalized per PEP 508/503 (order and
duplicates ignored) plus what the kernel side must share with the host (Python version and the
exact cloudpickle version, so that pickles match).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import EnvironmentBuildError

#: What every environment needs so a kernel can run there, besides the user's requirements.
KERNEL_PACKAGES = ("ipykernel",)


_CREDENTIALS = re.compile(r"(?<=://)([^/@\s:]+)(:[^/@\s]*)?@")


def mask_credentials(text: str) -> str:
    """``https://alice:S3CRET@host/x`` -> ``https://alice:****@host/x`` and ``https://TOKEN@host`` ->
    ``https://****@host`` (as uv shows them): a URL's secret never reaches a progress line or an error."""
    return _CREDENTIALS.sub(lambda m: f"{m.group(1)}:****@" if m.group(2) else "****@", text)


def describe_requirements(requirements: Iterable[str], limit: int = 5) -> str:
    """Requirements for a message: credentials masked, a long list cut short."""
    items = [mask_credentials(r) for r in requirements]
    if not items:
        return "no extra requirements"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def host_python() -> str:
    """``cpython-3.11`` for the interpreter running fal_magic; environments use the same one."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


def host_cloudpickle() -> str:
    """The host's cloudpickle version, pinned exactly in every environment."""
    return metadata.version("cloudpickle")


def normalize_requirement(text: str) -> str:
    """One PEP 508 specifier in canonical form: ``Requests[Socks]>=2 `` -> ``requests[socks]>=2``."""
    if not isinstance(text, str):
        raise EnvironmentBuildError(
            f"requirement {text!r} is a {type(text).__name__}; requirements are strings like 'requests>=2'"
        )
    try:
        req = Requirement(text.strip())
    except InvalidRequirement as exc:
        raise EnvironmentBuildError(f"invalid requirement {mask_credentials(repr(text))}: "
                                    f"{mask_credentials(str(exc))}") from None
    out: str = canonicalize_name(req.name)
    if req.extras:
        out += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    if req.url:
        out += f" @ {req.url}"
    elif req.specifier:
        out += ",".join(sorted(str(s) for s in req.specifier))
    if req.marker:
        out += f" ; {req.marker}"
    return out


@dataclass(frozen=True)
class EnvSpec:
    """A normalized description of one environment; ``key`` names it on disk and in the pool."""

    requirements: tuple[str, ...]
    python: str
    cloudpickle: str

    @property
    def key(self) -> str:
        blob = json.dumps(
            {"requirements": self.requirements, "python": self.python, "cloudpickle": self.cloudpickle},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def install_list(self) -> list[str]:
        """Everything to install: the user's requirements, the kernel, and the host's cloudpickle.

        A user's own pin of ipykernel is kept beside the bare name, so the resolver honours it.
        """
        return [*self.requirements, *KERNEL_PACKAGES, f"cloudpickle=={self.cloudpickle}"]


def make_spec(requirements: Iterable[str] | str = ()) -> EnvSpec:
    """Normalize ``requirements`` (a list of PEP 508 strings, or one string) into an EnvSpec.

    Raises EnvironmentBuildError for an invalid specifier, or a cloudpickle pin that excludes the
    host's version (the two sides must unpickle each other's objects).
    """
    if isinstance(requirements, str):
        requirements = [requirements]
    normalized = tuple(sorted({normalize_requirement(r) for r in requirements}))
    cp = host_cloudpickle()
    for text in normalized:
        req = Requirement(text)
        if canonicalize_name(req.name) == "cloudpickle" and not req.specifier.contains(cp, prereleases=True):
            raise EnvironmentBuildError(
                f"requirement {text!r} conflicts with the host's cloudpickle=={cp}: the environment needs "
                "the host's exact cloudpickle version so that functions and results can cross"
            )
    return EnvSpec(requirements=normalized, python=host_python(), cloudpickle=cp)
