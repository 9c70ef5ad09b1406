"""Shared fixtures: one environment cache for the whole run, a clean pool per test, the test
Jupyter Server (started once, when a test first needs it), and the suite-level check that no kernel
outlives the tests."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import cloudpickle
import pytest

from fal_magic_inside import forkserver

from testbed.server import (MACHINE_TYPES, ORPHAN_TIMEOUT, TOKEN, free_port, server_api,  # noqa: F401 (the tests'
                            start_server, wait_until)  # names for them)

from . import kernel_side

cloudpickle.register_pickle_by_value(kernel_side)

# Ctrl-C tests send SIGINT to this process: Python must turn it into KeyboardInterrupt even when the
# suite was started by a parent that ignores SIGINT (a job started with '&' by a non-interactive shell).
signal.signal(signal.SIGINT, signal.default_int_handler)

# Package sources come from PyPI unless a test says otherwise: the machine's pip and uv configuration
# (a local mirror, find-links) must not decide what the suite installs; the index tests set their own.
os.environ["PIP_CONFIG_FILE"] = os.devnull
for _name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "UV_DEFAULT_INDEX",
              "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS", "UV_NO_INDEX"):
    os.environ.pop(_name, None)

#: Merged into every kernelspec the test server writes (as a kernel provisioner's settings would be).
KERNELSPEC_METADATA = {"fal_magic_test": {"provisioner": "none"}}

# Environments are shared by every test of a run (and by the processes the tests start):
# FAL_MAGIC_TEST_HOME keeps them across runs on a developer's machine.
_HOME = os.environ.get("FAL_MAGIC_TEST_HOME")


def kernel_pids(templates: bool = False) -> list[int]:
    """Pids of running ipykernel processes on this machine (zombies excluded), whoever started them,
    forked ones included; with ``templates``, the kernel templates fal_magic forks them from instead."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            name = (entry / "comm").read_text().strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if templates:
            found = name == forkserver.TEMPLATE_NAME
        else:
            found = name == forkserver.KERNEL_NAME or any(
                b"ipykernel_launcher" in part or part == b"ipykernel" or part.endswith(b"launch_ipykernel.py")
                for part in cmd[:4])
        if found:
            pids.append(int(entry.name))
    return pids


def describe_pids(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode()[:200]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return "; ".join(out)


#: Kernels that ran before the suite started (not ours to judge).
_KERNELS_BEFORE = set(kernel_pids())


_TEMPLATES_BEFORE = set(kernel_pids(templates=True))


def leaked_kernels() -> list[int]:
    return [pid for pid in kernel_pids() if pid not in _KERNELS_BEFORE]


def leaked_templates() -> list[int]:
    """Kernel templates running now that did not before the suite (they outlive tests, not the suite)."""
    return [pid for pid in kernel_pids(templates=True) if pid not in _TEMPLATES_BEFORE]


def pid_alive(pid: int) -> bool:
    """True while any thread of the process runs (a zombie leader may still have live threads)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        tasks = len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return False
    return state != "Z" or tasks > 1


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (a server's TLS in a test)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="session")
def fal_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = Path(_HOME) if _HOME else tmp_path_factory.mktemp("fal_home")
    return home


@pytest.fixture(scope="session", autouse=True)
def _session_home(fal_home: Path):
    """Point fal_magic (and every process a test starts) at the shared cache; check for orphans at the end."""
    os.environ["FAL_MAGIC_HOME"] = str(fal_home)
    yield
    from fal_magic.kernel import get_pool

    get_pool().close()
    assert wait_until(lambda: not leaked_kernels(), timeout=15), (
        f"kernels outlived the test suite: {describe_pids(leaked_kernels())}")
    assert wait_until(lambda: not leaked_templates(), timeout=15), (
        f"kernel templates outlived the test suite: {describe_pids(leaked_templates())}")


@pytest.fixture(autouse=True)
def _fresh_pool():
    """Each test starts with no warm kernels and leaves none running: a kernel process of any kind
    (isolated, notebook, server) that outlives the test's own clean-up fails that test."""
    from fal_magic import config
    from fal_magic.kernel import get_pool

    yield
    get_pool().shutdown()
    config.adopt(config.FalMagic())
    end_pools()
    assert wait_until(lambda: not leaked_kernels(), timeout=15), (
        f"this test left kernels running: {describe_pids(leaked_kernels())}")


def end_pools() -> None:
    """End the kernels of every user's pool a test left (scripts and notebooks may point at homes of
    their own, which this process's shutdown does not reach), as ``fal_magic kernels stop`` would:
    its registry entry goes, and the kernel ends itself."""
    for pid in leaked_kernels():
        try:  # <home>/envs/<key>/bin/python: the kernel's environment says which home's pool it is in
            python = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
        except OSError:
            continue
        registry = python.parents[3] / "kernels" if len(python.parents) > 3 else None
        for entry in registry.glob("*.json") if registry is not None and registry.is_dir() else ():
            try:
                if json.loads(entry.read_text()).get("pid") == pid:
                    entry.unlink()
            except (OSError, ValueError):
                continue


@pytest.fixture(scope="session")
def server(fal_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """The test Jupyter Server; its kernels are its children. Started once for the run, by the first
    test that needs it."""
    yield from start_server(fal_home / "server", tmp_path_factory.mktemp("server_root"),
                            f"--FalMagicServer.kernelspec_metadata={KERNELSPEC_METADATA!r}")


@pytest.fixture(scope="session")
def hosts(fal_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two sshd hosts (see hosts.py); skipped where they cannot run, except on CI."""
    from testbed import hosts as hosts_module

    why = hosts_module.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the cluster tests must run on CI: {why}")
        pytest.skip(why)
    started = hosts_module.Hosts(tmp_path_factory.mktemp("hosts"), fal_home / "cluster", fal_home / "host-marker")
    yield started
    started.stop()


@pytest.fixture(scope="session")
def cluster_server(hosts, tmp_path_factory: pytest.TempPathFactory):
    """A Jupyter Server whose machine types are groups of the two hosts."""
    yield from start_server(hosts.cache, tmp_path_factory.mktemp("cluster_root"),
                            f"--FalMagicServer.machine_types={MACHINE_TYPES!r}",
                            "--FalMagicServer.default_machine_type=S", env=hosts.server_env())


@pytest.fixture
def cluster(hosts, cluster_server):
    """fal_magic configured for the cluster server; after the test no kernel is left there or on a host."""
    import fal_magic
    from fal_magic.kernel import get_pool

    url, _ = cluster_server
    fal_magic.configure(host=url, token=TOKEN)
    yield hosts
    get_pool().shutdown()
    assert wait_until(lambda: not server_api(url, "/api/kernels"), timeout=20), "kernels left on the server"


@pytest.fixture
def remote(server):
    """The server's URL, with fal_magic configured for it; after the test no kernel is left there."""
    import fal_magic
    from fal_magic.kernel import get_pool

    url, _ = server
    fal_magic.configure(host=url, token=TOKEN)
    yield url
    get_pool().shutdown()
    assert wait_until(lambda: not server_api(url, "/api/kernels"), timeout=20), "kernels left on the server"


@pytest.fixture(params=["local", "pool", "remote", "cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    """Each kind of kernel in turn: this machine's (the process's own, and the user's pool), the test
    Jupyter Server, and a host of the test cluster behind another server (one contract)."""
    if request.param in ("remote", "cluster"):
        request.getfixturevalue(request.param)
    if request.param == "pool":
        import fal_magic

        fal_magic.configure(kernel_scope="user")
    return request.param


@pytest.fixture(scope="module")
def ip():
    """The test IPython shell (as a notebook's, without a frontend), with the extension loaded."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "fal_magic")
    yield shell
    shell.run_line_magic("unload_ext", "fal_magic")


def run_cell(ip, source):
    """Run a cell as a notebook would; return (result, captured outputs)."""
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        result = ip.run_cell(source)
    return result, captured
