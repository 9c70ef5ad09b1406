"""Environments: requirement keys, the on-disk cache of virtualenvs, and the installers.

Nothing in this package knows about kernels or IPython.
"""
from .cache import Env, EnvCache, EnvRecord
from .spec import EnvSpec, make_spec

__all__ = ["Env", "EnvCache", "EnvRecord", "EnvSpec", "make_spec"]
