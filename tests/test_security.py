"""Kernels talk over unix sockets in a private directory, with signed messages, and trust no stranger's files."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from queue import Empty

import pytest

from fal_magic import FalMagicError, isolated
from fal_magic.envs import EnvCache, make_spec
from fal_magic.kernel import get_pool


@isolated(keep_alive=60)
def kernel_pid():
    import os

    return os.getpid()


def _connection_files() -> list[Path]:
    return sorted(get_pool().runtime_dir().glob("kernel-*.json"))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _inet_sockets() -> dict[str, str]:
    """inode -> local address (hex ip:port) of every internet socket on the machine."""
    sockets = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path("/proc/net") / table
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                sockets[fields[9]] = fields[1]
    return sockets


def test_kernels_use_ipc_in_a_private_directory_with_private_connection_files():
    pid = kernel_pid()
    runtime = get_pool().runtime_dir()
    assert stat.S_IMODE(runtime.stat().st_mode) & 0o777 == 0o700  # (jupyter_client adds the sticky bit)
    [cf] = _connection_files()
    assert stat.S_IMODE(cf.stat().st_mode) == 0o600
    info = json.loads(cf.read_text())
    assert info["transport"] == "ipc"
    assert info["signature_scheme"] == "hmac-sha256" and len(info["key"]) >= 32
    # the channels are unix sockets in the runtime directory; the only internet socket a kernel
    # holds is ipykernel's own pipe for subprocess output, on loopback (127.0.0.1)
    sockets = _socket_inodes(pid)
    unix = [line for line in Path("/proc/net/unix").read_text().splitlines() if str(runtime) in line]
    assert len([line for line in unix if line.split()[6] in sockets]) >= 5
    inet = {inode: addr for inode, addr in _inet_sockets().items() if inode in sockets}
    assert all(addr.startswith("0100007F:") for addr in inet.values()), inet


def test_each_kernel_gets_a_fresh_key():
    @isolated(keep_alive=60, max_kernels=2)
    def slow():
        import time

        time.sleep(1)

    futures = [slow.submit(), slow.submit()]  # two calls at once: two kernels
    for f in futures:
        f.result(timeout=120)
    keys = {json.loads(cf.read_text())["key"] for cf in _connection_files()}
    assert len(_connection_files()) == 2 and len(keys) == 2


def test_no_plain_tcp_warning_from_the_kernel():
    kernel_pid()
    [log] = get_pool().runtime_dir().glob("kernel-*.log")
    assert "without encryption" not in log.read_text()


def test_a_message_with_a_wrong_signature_is_dropped(tmp_path):
    from jupyter_client import BlockingKernelClient

    before = kernel_pid()
    [cf] = _connection_files()
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').write('x')"

    def client(key: bytes) -> BlockingKernelClient:
        kc = BlockingKernelClient()
        kc.load_connection_file(str(cf))
        kc.session.key = key
        kc.start_channels()
        return kc

    forger = client(b"not-the-key")
    try:
        forger.execute(code)
        with pytest.raises(Empty):
            forger.get_shell_msg(timeout=3)
        assert not marker.exists()
    finally:
        forger.stop_channels()
    honest = client(json.loads(cf.read_text())["key"].encode())
    try:
        honest.execute(code)
        assert honest.get_shell_msg(timeout=30)["content"]["status"] == "ok"
        assert marker.exists()
    finally:
        honest.stop_channels()
    assert kernel_pid() == before  # the same kernel still serves fal_magic


def test_an_environment_owned_by_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    cache = EnvCache(tmp_path / "home")
    spec = make_spec([])
    cache.get(spec)
    cache.release(spec.key)
    os.chown(cache.path_for(spec.key), 12345, 12345)
    with pytest.raises(FalMagicError, match="belongs to uid 12345"):
        EnvCache(tmp_path / "home").get(spec)


def test_a_cache_home_owned_by_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    home = tmp_path / "theirs"
    home.mkdir(mode=0o700)
    os.chown(home, 12345, 12345)
    with pytest.raises(FalMagicError, match="belongs to uid 12345"):
        EnvCache(home).get(make_spec([]))


def test_a_kernels_reply_may_not_name_a_file_of_the_host_for_it_to_map(tmp_path):
    """Large results come back as shared-memory segments the reply names: a name the kernel chose
    outside its own arena (here a path to a file of the host's) is refused, never mapped."""
    target = tmp_path / "notes.txt"
    target.write_bytes(b"the host's own file\n" * 1000)

    @isolated(keep_alive=60, requirements=["numpy"])
    def forge(path):
        import sys

        import numpy as np

        runtime = sys.modules["fal_magic_inside.runtime"]
        real = runtime.results_to_shm

        def lying(arena, held, out, segments):
            placed, free = real(arena, held, out, segments)
            for index in placed:
                placed[index][1] = "../" * 8 + path.lstrip("/")
            return placed, free

        runtime.results_to_shm = lying
        return np.zeros(16 << 20, dtype=np.uint8)  # large: it goes through shared memory

    with pytest.raises(FalMagicError, match="names a shared-memory segment it may not"):
        forge(str(target))
    assert target.read_bytes() == b"the host's own file\n" * 1000
