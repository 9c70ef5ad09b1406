"""Environments: requirement keys, the on-disk cache of virtualenvs, and the installers.

Nothing in this package knows about kernels or IPython.
"""
from collections.abc import Iterable
from typing import Any

from .cache import Env, EnvCache, EnvRecord
from .indexes import Indexes
from .reqfile import Requirements, expand
from .spec import EnvSpec, make_spec

__all__ = ["Env", "EnvCache", "EnvRecord", "EnvSpec", "Indexes", "make_spec", "spec_for"]


def spec_for(requirements: Requirements, indexes: dict[str, Any] | None = None,
             constraints: Iterable[str] = (), python: str | None = None) -> EnvSpec:
    """The spec of ``requirements`` as a user gives them (strings, local paths, requirements files,
    whose constraints and index options come along), or as isolated functions carry them in plain
    data (files already read: ``indexes`` as a dict, ``constraints``); ``python``: see make_spec."""
    parsed = expand(requirements)
    sources = Indexes(**indexes).over(parsed.indexes) if indexes else parsed.indexes
    return make_spec(parsed.requirements, indexes=sources, constraints=[*parsed.constraints, *constraints],
                     python=python)
