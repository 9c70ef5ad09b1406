"""Requirements -> normalized spec -> key.

The key names one environment: requirement specifiers normalized per PEP 508/503 (order and
duplicates ignored) plus what the kernel side must share with the host (Python version and the
exact cloudpickle version, so that pickles match), and, when there are any, the constraints, the
package sources (without credentials) and digests of local packages. The only I/O is reading local
packages for their digests.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import EnvironmentBuildError
from ..masking import mask_credentials
from .indexes import Indexes
from .interpreters import python_tag
from .local import LocalPackage, looks_local, resolve
from .lockfile import package_order

#: What every environment needs so a kernel can run there, besides the user's requirements.
KERNEL_PACKAGES = ("ipykernel",)


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
    #: Where packages come from (a requirements file's options, then what ``resolved`` adds).
    indexes: Indexes = field(default_factory=Indexes, repr=False)
    constraints: tuple[str, ...] = ()
    #: The local packages among ``requirements``: (requirement, package).
    local: tuple[tuple[str, LocalPackage], ...] = ()
    #: The exact distributions to install, from a lock file (empty: resolve ``install_list``).
    locked: tuple[str, ...] = ()
    #: The lock file ``locked`` came from, for messages (not part of the key).
    lock_file: str = field(default="", compare=False)

    @cached_property  # (computed once per spec: the pool asks on every call)
    def key(self) -> str:
        parts: dict[str, Any] = {"requirements": self.requirements, "python": self.python,
                                 "cloudpickle": self.cloudpickle}
        if not self.indexes.is_default:  # (absent when unset, so keys of plain environments never change)
            parts["indexes"] = self.indexes.key_part()
        if self.constraints:
            parts["constraints"] = self.constraints
        if self.local:
            parts["local"] = [[req, pkg.digest] for req, pkg in self.local]
        if self.locked:  # (a locked environment is the set it got: another set, another environment)
            parts["locked"] = self.locked
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def same_python(self) -> bool:
        """Whether the environment runs the host's own Python (functions then travel as bytecode)."""
        return self.python == host_python()

    def resolved(self, site: Indexes) -> EnvSpec:
        """This spec with the sources set where fal_magic runs (``site``) under its own, and its local
        packages read again (an edited package makes another key)."""
        local = tuple((req, resolve(req)[1]) for req, _ in self.local)
        return replace(self, indexes=self.indexes.over(site), local=local)

    @property
    def install_list(self) -> list[str]:
        """Everything to install: the user's requirements, the kernel, and the host's cloudpickle.

        A user's own pin of ipykernel is kept beside the bare name, so the resolver honours it.
        """
        return [*self.requirements, *KERNEL_PACKAGES, f"cloudpickle=={self.cloudpickle}"]

    def with_lock(self, packages: Iterable[str], lock_file: str) -> EnvSpec:
        """This spec built from exactly ``packages`` (recorded in ``lock_file``), without resolving."""
        own = f"cloudpickle=={self.cloudpickle}"  # (this host's, whatever the recording host had)
        exact = sorted({p for p in packages if not _is_cloudpickle(p)} | {own}, key=package_order)
        return replace(self, locked=tuple(exact), lock_file=lock_file)


def _is_cloudpickle(package: str) -> bool:
    try:
        return canonicalize_name(Requirement(package).name) == "cloudpickle"
    except InvalidRequirement:
        return False


def make_spec(requirements: Iterable[str] | str = (), *, indexes: Indexes | None = None,
              constraints: Iterable[str] = (), base: Path | None = None, python: str | None = None) -> EnvSpec:
    """Normalize ``requirements`` (a list of PEP 508 strings or local package paths, or one string)
    into an EnvSpec; relative paths are taken from ``base`` (default: the working directory).
    ``python`` (``"3.12"``) is the environment's Python version; default: the host's.

    Raises EnvironmentBuildError for an invalid specifier, a missing local package, or a cloudpickle
    pin that excludes the host's version (the two sides must unpickle each other's objects).
    """
    if isinstance(requirements, str):
        requirements = [requirements]
    local: dict[str, LocalPackage] = {}
    named: set[str] = set()
    for text in requirements:
        if isinstance(text, str) and looks_local(text):
            canonical, package = resolve(text, base)
            local[canonical] = package
        else:
            named.add(normalize_requirement(text))
    normalized = tuple(sorted(named | set(local)))
    cp = host_cloudpickle()
    for text in normalized:
        if text in local:
            continue
        req = Requirement(text)
        if canonicalize_name(req.name) == "cloudpickle" and not req.specifier.contains(cp, prereleases=True):
            raise EnvironmentBuildError(
                f"requirement {text!r} conflicts with the host's cloudpickle=={cp}: the environment needs "
                "the host's exact cloudpickle version so that functions and results can cross"
            )
    return EnvSpec(requirements=normalized, python=python_tag(python) if python else host_python(),
                   cloudpickle=cp, indexes=indexes or Indexes(),
                   constraints=tuple(sorted({normalize_requirement(c) for c in constraints})),
                   local=tuple(sorted(local.items())))
