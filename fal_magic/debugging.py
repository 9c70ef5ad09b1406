"""``%debug`` and ``%pdb on`` after an exception from an isolated function or cell: the post-mortem
debugger opens in the kernel where the exception was raised, at the user's innermost frame, with its
locals; its prompts appear in the calling cell (the stdin bridge), as a local ``%debug``'s do. The
kernel keeps its last exception until its next call. Installed into the IPython shell the first time
an isolated call or cell fails there."""
from __future__ import annotations

import sys
from typing import Any

from .outputs import CallerOutput, ipython_shell

#: The attribute that tags an exception with the id of the kernel that raised it.
KERNEL_ATTR = "_fal_magic_kernel"

_installed: set[int] = set()


def tag(exc: BaseException, kernel_id: str | None) -> None:
    """Remember which kernel raised ``exc`` (and install the debugger hooks in this IPython shell)."""
    if kernel_id is None:
        return
    try:
        setattr(exc, KERNEL_ATTR, kernel_id)
    except AttributeError:  # (an exception type that takes no attributes)
        return
    shell = ipython_shell()
    if shell is not None and id(shell) not in _installed:
        install(shell)


def post_mortem(exc: BaseException | None) -> bool:
    """Open the post-mortem debugger in the kernel that raised ``exc``; False if no kernel did."""
    kernel_id = getattr(exc, KERNEL_ATTR, None)
    if kernel_id is None:
        return False
    from .kernel import get_pool

    pool = get_pool()
    with pool.lease_by_id(kernel_id) as kernel:
        if kernel is None:
            print("fal_magic: the kernel where this exception was raised is gone (culled or shut down): "
                  "nothing is left to debug")
            return True
        kernel.post_mortem(CallerOutput(), pool.config.interrupt_grace)
    return True


def install(shell: Any) -> None:
    """Route ``%debug`` (``shell.debugger``) and ``%pdb on`` to the isolated kernel when the last
    exception came from one; every other exception is debugged as before."""
    _installed.add(id(shell))
    original = shell.debugger

    def debugger(force: bool = False) -> None:
        if (force or shell.call_pdb) and post_mortem(getattr(sys, "last_value", None)):
            return
        original(force)

    def automatic(result: Any) -> None:  # %pdb on: IPython's own hook does not run for these exceptions
        error = getattr(result, "error_in_exec", None)
        if shell.call_pdb and error is not None and getattr(error, KERNEL_ATTR, None) is not None:
            post_mortem(error)

    shell.debugger = debugger
    shell.events.register("post_run_cell", automatic)
