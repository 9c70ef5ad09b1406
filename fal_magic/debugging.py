"""``%debug`` and ``%pdb on`` after an exception from an isolated function or cell: the post-mortem
debugger opens in the kernel where the exception was raised, at the user's innermost frame, with its
locals; its prompts appear in the calling cell (the stdin bridge), as a local ``%debug``'s do. The
kernel keeps its last exception until its next call. Installed into the IPython shell the first time
an isolated call or cell fails there."""
from __future__ import annotations

import sys
from typing import Any

from fal_magic_inside import sources

from .outputs import CallerOutput, ipython_shell

#: The attribute that tags an exception with the id of the kernel that raised it.
KERNEL_ATTR = "_fal_magic_kernel"
#: ... with the files of the code that raised it (function name -> file), whose lines the debugger shows.
FILES_ATTR = "_fal_magic_files"
#: ... with the run of a cell in which ``%pdb on`` debugged it (IPython's traceback display or the
#: cell's end, whichever comes first: one error, one post-mortem).
DEBUGGED_ATTR = "_fal_magic_debugged_in"

_installed: set[int] = set()


def tag(exc: BaseException, kernel_id: str | None, files: dict[str, str] | None = None) -> None:
    """Remember which kernel raised ``exc``, from code of which ``files`` (and install the debugger
    hooks in this IPython shell)."""
    if kernel_id is None:
        return
    try:
        setattr(exc, KERNEL_ATTR, kernel_id)
        setattr(exc, FILES_ATTR, files or {})
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
        kernel.post_mortem(CallerOutput(), pool.config.interrupt_grace,
                           sources.texts(getattr(exc, FILES_ATTR, None) or {}))
    return True


def _automatic(exc: BaseException | None, cell: int) -> bool:
    """``%pdb on`` in the ``cell``-th run of a cell: debug ``exc`` once there, however many of IPython's hooks
    ask (False: not an isolated kernel's exception)."""
    if getattr(exc, KERNEL_ATTR, None) is None:
        return False
    if getattr(exc, DEBUGGED_ATTR, None) != cell:
        setattr(exc, DEBUGGED_ATTR, cell)
        post_mortem(exc)
    return True


def install(shell: Any) -> None:
    """Route ``%debug`` (``shell.debugger``) and ``%pdb on`` to the isolated kernel when the last
    exception came from one; every other exception is debugged as before."""
    _installed.add(id(shell))
    original = shell.debugger
    runs = [0]  # cells run so far (the execution count stays put for cells run without history)

    def counted(*_: Any) -> None:
        runs[0] += 1

    def debugger(force: bool = False) -> None:
        last = getattr(sys, "last_value", None)
        if shell.call_pdb and _automatic(last, runs[0]):  # (IPython's traceback display)
            return
        if force and post_mortem(last):  # %debug: every time it is asked
            return
        original(force)

    def automatic(result: Any) -> None:  # %pdb on, where IPython's display did not ask (a re-raised type)
        error = getattr(result, "error_in_exec", None)
        if shell.call_pdb and error is not None:
            _automatic(error, runs[0])

    shell.debugger = debugger
    shell.events.register("pre_run_cell", counted)
    shell.events.register("post_run_cell", automatic)
