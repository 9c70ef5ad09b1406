"""Kernels forked from a per-environment template (kernel/forked.py): a new kernel comes from the
template, a template serves kernels with the start-up variables it was started with only, a changed
environment gets a new template without cutting its warm kernels short, and templates end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fal_magic import configure, isolated
from fal_magic.envs import make_spec
from fal_magic.kernel import get_pool
from fal_magic_inside import forkserver

from .conftest import pid_alive, wait_until


def _name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _who():
    import os

    return os.getpid(), os.getppid()


def test_a_new_kernel_is_forked_from_its_environments_template():
    who = isolated(keep_alive=30)(_who)
    pid, parent = who()
    assert _name(pid) == forkserver.KERNEL_NAME and _name(parent) == forkserver.TEMPLATE_NAME
    assert parent != os.getpid()
    get_pool().shutdown()
    again, same_parent = who()  # a kernel after the last one was shut down: the template stayed
    assert again != pid and same_parent == parent


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the writable memory of process ``pid``."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


def test_a_kernels_secret_variables_never_reach_its_template():
    secret = "sk-" + os.urandom(12).hex()

    def read():
        import os

        return os.environ["FAL_SECRET_PROBE"], os.getppid()

    value, template = isolated(keep_alive=30, env={"FAL_SECRET_PROBE": secret})(read)()
    assert value == secret and _name(template) == forkserver.TEMPLATE_NAME
    assert not _memory_holds(template, secret.encode())


def test_without_forking_a_kernel_is_launched_as_a_child_of_the_host():
    configure(fork_kernels=False)
    pid, parent = isolated(keep_alive=30)(_who)()
    assert parent == os.getpid() and _name(pid) != forkserver.KERNEL_NAME


def test_python_start_up_variables_get_a_template_of_their_own():
    expected = subprocess.run([sys.executable, "-c", "print(hash('fal_magic'))"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": "123"}, check=True).stdout

    def seeded():
        import os

        return hash("fal_magic"), os.getppid()

    plain_parent = isolated(keep_alive=30)(_who)()[1]
    value, parent = isolated(keep_alive=30, env={"PYTHONHASHSEED": "123"})(seeded)()
    assert value == int(expected)  # read at interpreter start-up: the template was started with it
    assert parent != plain_parent


def test_a_changed_environment_gets_a_new_template_and_its_warm_kernels_go_on(fal_home):
    who = isolated(keep_alive=60)(_who)
    warm, old_template = who()
    site = next((fal_home / "envs" / make_spec([]).key).glob("lib/python*/site-packages"))
    added = site / "fal_magic_test_added_package"
    added.mkdir()  # a package installed into the environment after the template imported from it
    try:
        other, new_template = who.on(env={"FAL_MAGIC_TEST_OTHER": "1"})()  # another kernel of that env
        assert new_template != old_template and pid_alive(old_template)
        assert who() == (warm, old_template)  # the warm kernel still serves, from its own template
        get_pool().shutdown()
        assert wait_until(lambda: not pid_alive(old_template), timeout=10)  # retired with its last kernel
        assert pid_alive(new_template)
    finally:
        added.rmdir()


def test_a_template_ends_its_keep_alive_after_its_last_kernel():
    configure(template_keep_alive=0.5)
    pid, template = isolated(keep_alive=0)(_who)()
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    assert wait_until(lambda: not pid_alive(template), timeout=10)
