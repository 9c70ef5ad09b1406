"""The fal_magic Jupyter Server extension: lets hosts elsewhere run isolated kernels on this server.

Enabled on install (``jupyter_server_config.d/fal_magic.json``): ``jupyter server`` adds one authenticated
endpoint, ``POST /fal_magic/api/envs``, which builds the environment for a requirements key with the
same cache code a local host uses and writes a kernelspec for it (progress streamed back as JSON
lines). Kernels then start and run through the server's standard kernels API and websocket. A
culler here shuts down fal_magic kernels that no host has been connected to for a while: the safety
net for hosts that vanish without shutting their kernels down.
"""
from __future__ import annotations

from typing import Any


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .extension import load

    load(serverapp)
