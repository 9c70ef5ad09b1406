"""gateway_provisioners' Python kernel launcher, assembled into an environment.

The launcher (``launch_ipykernel.py``) starts the kernel on a host and sends its connection details
back to the server; it imports ``server_listener``, which gateway_provisioners ships apart from it
(its kernelspec installer puts the two together). fal_magic does the same, in the environment's own
directory, so that the kernelspec can name the same path on every host; beside them go the scripts
that fork the launcher's kernels from a template (``fal_magic_inside/host_template.py``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import FalMagicError
from ..kernel.protocol import INSIDE_DIR

LAUNCHER_DIR = "fal_magic-launcher"

#: The modules of fal_magic_inside a host runs to fork kernels from a template (they import only these).
TEMPLATE_MODULES = ("__init__.py", "host_template.py", "forkserver.py", "head.py")


def assemble_launcher(env_path: Path) -> Path:
    """Copy the launcher and its listener into ``env_path``; return the launcher script's path."""
    try:
        import gateway_provisioners
    except ImportError:
        raise FalMagicError("this host has no gateway_provisioners: install fal_magic[cluster] on every host, "
                            "at the same path as on the server") from None
    scripts = Path(gateway_provisioners.__file__).parent / "kernel-launchers"
    target = env_path / LAUNCHER_DIR
    target.mkdir(mode=0o700, exist_ok=True)
    for source in (scripts / "python" / "scripts" / "launch_ipykernel.py",
                   scripts / "shared" / "scripts" / "server_listener.py"):
        shutil.copyfile(source, target / source.name)
    inside = target / INSIDE_DIR.name
    inside.mkdir(mode=0o700, exist_ok=True)
    for name in TEMPLATE_MODULES:
        shutil.copyfile(INSIDE_DIR / name, inside / name)
    return target / "launch_ipykernel.py"
