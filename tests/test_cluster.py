"""Kernels on a cluster of two sshd hosts behind one Jupyter Server (gateway_provisioners' DistributedProvisioner)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import fal_magic
from fal_magic import isolated
from fal_magic.errors import EnvironmentBuildError, FalMagicError

from .conftest import TOKEN


def test_map_spreads_over_both_hosts_and_keeps_the_order(cluster, cluster_server):
    cluster_url, _ = cluster_server
    marker = str(cluster.marker_dir / "host")  # each host has its own file at this path

    @isolated(machine_type="S", max_kernels=4, keep_alive=60)
    def square_where(n):
        with open(marker) as f:
            return n * n, f.read().strip()

    results = list(square_where.map(range(8)))
    assert [r[0] for r in results] == [n * n for n in range(8)]
    assert {r[1] for r in results} == {"127.0.0.2", "127.0.0.3"}
    listed = fal_magic.kernels()
    assert sorted(k.node for k in listed) == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
    server = cluster_url.split("//")[1]
    text = str(listed)
    assert text.count(f" on 127.0.0.2 via {server}") == 2 and text.count(f" on 127.0.0.3 via {server}") == 2
    assert "[S]" in text and "not enforced" not in text  # the server's groups enforce the machine type


def test_machine_type_pins_a_group_and_an_unknown_one_is_refused(cluster):
    marker = str(cluster.marker_dir / "host")

    @isolated(machine_type="ONE", keep_alive=30)
    def where():
        import os

        with open(marker) as f:
            return f.read().strip(), os.environ.get("GROUP")

    assert where() == ("127.0.0.3", "one")
    with pytest.raises(FalMagicError, match="unknown machine_type 'XL'; this server has: FLAKY, ONE, S"):
        isolated(machine_type="XL")(lambda: 1)()


def test_an_environment_is_built_on_a_host_only_when_a_kernel_needs_it_there(cluster, caplog):
    import logging

    @isolated(machine_type="ONE", requirements=["text-unidecode==1.3"], keep_alive=30)
    def plain(text):
        import text_unidecode

        return text_unidecode.unidecode(text)

    def built(ip):
        return {line for line in cluster.run(ip, f"ls {cluster.cache}/envs").split() if len(line) == 16}

    before = {ip: built(ip) for ip in ("127.0.0.2", "127.0.0.3")}
    with caplog.at_level(logging.INFO, logger="fal_magic"):
        assert plain("Ærø") == "AEro"
    assert built("127.0.0.2") == before["127.0.0.2"]  # the other host of the cluster never needed it
    assert len(built("127.0.0.3") - before["127.0.0.3"]) == 1
    assert "127.0.0.3: building environment" in caplog.text  # the host's progress, in the caller


def test_a_build_that_fails_on_a_host_names_the_host_and_the_requirement(cluster):
    broken = isolated(machine_type="ONE", requirements=["fal-magic-no-such-package==0.0.1"])(lambda: 1)
    with pytest.raises(EnvironmentBuildError, match=r"(?s)on host 127\.0\.0\.3: .*fal-magic-no-such-package"):
        broken()


def test_kernels_on_hosts_end_when_their_server_is_killed(hosts, tmp_path):
    from .conftest import MACHINE_TYPES, kernel_pids, server_api, start_server, wait_until, ORPHAN_TIMEOUT

    servers = start_server(hosts.cache, tmp_path, f"--FalMagicServer.machine_types={MACHINE_TYPES!r}",
                           env=hosts.server_env())
    url, proc = next(servers)
    try:
        before, templates_before = set(kernel_pids()), set(kernel_pids(templates=True))
        fal_magic.configure(host=url, token=TOKEN)
        spread = isolated(machine_type="S", max_kernels=2, keep_alive=60)(lambda n: n)
        assert list(spread.map(range(4))) == [0, 1, 2, 3]
        ids = [k["id"] for k in server_api(url, "/api/kernels")]
        started = set(kernel_pids()) - before
        templates = set(kernel_pids(templates=True)) - templates_before  # one on each host, for this server
        assert len(ids) == 2 and len(started) >= 2 and len(templates) == 2
        proc.kill()  # SIGKILL: the server can clean up nothing
        proc.wait()
        assert wait_until(lambda: not started & set(kernel_pids()), timeout=ORPHAN_TIMEOUT + 15)
        assert wait_until(lambda: not templates & set(kernel_pids(templates=True)), timeout=ORPHAN_TIMEOUT + 15)
        for ip in ("127.0.0.2", "127.0.0.3"):  # nor are their connection files and logs left behind
            assert not any(kid in hosts.run(ip, "ls /tmp") for kid in ids)
        # its log said that other machines could not reach it at 127.0.0.1 (here the hosts are this one)
        assert "listens on 127.0.0.1 only" in (tmp_path / "server.log").read_text()
    finally:
        from fal_magic.kernel import get_pool

        get_pool().shutdown()
        next(servers, None)


def test_a_host_that_cannot_be_reached_is_passed_over(cluster, caplog):
    import logging

    marker = str(cluster.marker_dir / "host")

    @isolated(machine_type="FLAKY", keep_alive=30)
    def where():
        with open(marker) as f:
            return f.read().strip()

    with caplog.at_level(logging.INFO, logger="fal_magic"):
        assert where() == "127.0.0.3"
    assert "cannot reach host 127.0.0.9 over SSH" in caplog.text


def test_a_shared_cache_is_built_once_by_the_server_for_every_host(hosts, fal_home, tmp_path, caplog):
    import logging

    from fal_magic.server.cluster import cluster_spec

    from .conftest import MACHINE_TYPES, start_server

    shared = fal_home / "shared-cluster"  # not under the hosts' private mounts: every host sees it
    servers = start_server(shared, tmp_path, f"--FalMagicServer.machine_types={MACHINE_TYPES!r}",
                           "--FalMagicServer.shared_cache=True", env=hosts.server_env())
    url, _ = next(servers)
    marker = str(hosts.marker_dir / "host")
    try:
        fal_magic.configure(host=url, token=TOKEN)

        @isolated(machine_type="S", max_kernels=2, keep_alive=30, requirements=["text-unidecode==1.3"])
        def where(n):
            with open(marker) as f:
                return f.read().strip()

        with caplog.at_level(logging.INFO, logger="fal_magic"):
            assert set(where.map(range(4))) == {"127.0.0.2", "127.0.0.3"}
        assert caplog.text.count("building environment") == 1  # by the server, for both hosts
        assert "127.0.0.2: building" not in caplog.text and "127.0.0.3: building" not in caplog.text
        key = cluster_spec(where.spec).key
        assert key not in hosts.run("127.0.0.2", f"ls {hosts.cache}/envs")  # not in that host's own cache
    finally:
        from fal_magic.kernel import get_pool

        get_pool().shutdown()
        next(servers, None)


def _signed(url: str, method: str, kernel_id: str, key: bytes, data: bytes | None = None, when: int | None = None):
    """A blob request signed as a kernel signs it: its status and answer."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    from fal_magic_inside.head_blobs import KERNEL_HEADER, SIGNATURE_HEADER, TIME_HEADER, signature

    stamp = str(int(time.time()) if when is None else when)
    headers = {KERNEL_HEADER: kernel_id, TIME_HEADER: stamp,
               SIGNATURE_HEADER: signature(key, method, urlsplit(url).path, stamp)}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_blob_a_host_kernel_cannot_fetch_is_a_clear_error_and_its_kernel_stays(cluster, cluster_server, monkeypatch):
    """The kernel asks the head for a blob that is not there (as after a broken upload): the call
    raises why, instead of the kernel seeming to die without a reply, and the kernel serves the next."""
    import urllib.request

    import numpy as np

    from fal_magic_inside import head_blobs

    real, put = head_blobs.start_put, []

    def misnamed(*args, **kwargs):
        put.append(real(*args, **kwargs))
        sent = head_blobs.Sending.__new__(head_blobs.Sending)
        sent.__dict__.update(put[-1].__dict__, name="u-" + "0" * 16)  # names a blob nobody uploaded
        return sent

    @isolated(keep_alive=30, requirements=["numpy"], machine_type="S")
    def total(a):
        import os

        return float(a.sum()), os.getpid()

    _, pid = total(np.ones(4))
    monkeypatch.setattr(head_blobs, "start_put", misnamed)
    with pytest.raises(FalMagicError, match=r"could not fetch a large argument \(2097152 bytes\) from the server"):
        total(np.ones(2 << 17))
    monkeypatch.undo()
    assert total(np.ones(2 << 17)) == (2 << 17, pid)  # the same kernel, still warm
    url, _ = cluster_server
    for sent in put:  # the blob that was uploaded under its real name, never fetched
        request = urllib.request.Request(f"{url}/fal_magic/api/blobs/{sent.name}", method="DELETE",
                                         headers={"Authorization": f"token {TOKEN}"})
        urllib.request.urlopen(request, timeout=10).close()


def test_short_commands_on_a_host_run_apart_in_its_kept_shell_which_is_replaced_when_it_dies(hosts, monkeypatch):
    """Checks, launches and ends of kernels go through one shell kept open per host: what one command
    exports never reaches the next (a kernel's KERNEL_ID and variables stay its own), output without a
    final newline comes whole, and once the shell is gone the next command gets a new one."""
    from fal_magic.server import ssh

    for name, value in hosts.server_env().items():
        monkeypatch.setenv(name, value)
    try:
        shell, home = ssh.run_short("127.0.0.2", "echo $$; pwd")  # ($$ in a subshell: the kept shell's pid)
        assert home != "/"
        assert ssh.run_short("127.0.0.2", "export KERNEL_ID=one; cd /; echo $$ ${KERNEL_ID}") == [f"{shell} one"]
        assert ssh.run_short("127.0.0.2", "echo ${KERNEL_ID:-unset} $(pwd); printf tail") == [f"unset {home}", "tail"]
        assert ssh.run_short("127.0.0.2", "cat; echo after") == ["after"]  # reads nothing of the shell's input
        assert ssh.run_short("127.0.0.3", "echo $$") != [shell]  # a shell per host
        with pytest.raises(OSError):
            ssh.run_short("127.0.0.2", "kill -KILL $$")  # the shell dies under its command
        again = ssh.run_short("127.0.0.2", "echo $$")
        assert again and again != [shell]
    finally:
        ssh.close_connections()


def test_large_frames_reach_a_host_kernel_through_the_head_blobs_signed_with_its_own_key(cluster, cluster_server):
    import numpy as np

    @isolated(keep_alive=30, requirements=["numpy"], machine_type="S")
    def doubled(a):
        import os

        from fal_magic_inside.head_blobs import moved
        from IPython import get_ipython

        a *= 2  # a large argument arrives writable, as a local one does
        return a, dict(moved), os.environ["KERNEL_ID"], bytes(get_ipython().kernel.session.key)

    url, server = cluster_server
    a = np.arange(8 * 2**20 // 8, dtype=np.float64)  # 8 MiB: over the blob threshold both ways
    twice, moved, kernel_id, key = doubled(a)
    assert np.array_equal(twice, a * 2)
    twice += 1  # and so does a large result
    assert twice[-1] == a[-1] * 2 + 1
    assert moved["fetched"] == 1  # the argument came from the head's blobs, not in websocket parts
    assert doubled(a)[1]["posted"] == 1  # and the first call's result went back there
    [blob_dir] = Path("/dev/shm").glob(f"fal_magic-blobs-{server.pid}-*")
    assert list(blob_dir.iterdir()) == []  # fetched by the kernel, then by the client: nothing left

    blobs = url + "/fal_magic/api/blobs"
    status, answer = _signed(blobs, "POST", kernel_id, key, b"x" * 100)  # what the kernel does with a result
    assert status == 200
    name = json.loads(answer)["name"]
    assert _signed(f"{blobs}/{name}", "GET", kernel_id, key) == (200, b"x" * 100)
    assert _signed(f"{blobs}/{name}", "GET", kernel_id, key)[0] == 404  # fetched once, then gone
    assert _signed(blobs, "POST", kernel_id, b"another key", b"x")[0] == 403
    assert _signed(blobs, "POST", "no-such-kernel", key, b"x")[0] == 403
    assert _signed(blobs, "POST", kernel_id, key, b"x", when=int(time.time()) - 3600)[0] == 403  # an old one
    assert _signed(f"{blobs}/..%2Fserver.log", "GET", kernel_id, key)[0] in (400, 404)
    assert list(blob_dir.iterdir()) == []


def test_a_head_on_https_listening_everywhere_gives_its_host_kernels_its_certificate_and_address(
        hosts, tmp_path, monkeypatch):
    """A head server on https with a self-signed certificate the hosts do not know, listening on every
    interface: a host's kernel fetches a large argument and puts a large result there, trusting the
    certificate the server passed it (only its certificates, never the key its file also holds), at
    the address hosts answer to, not 0.0.0.0 (which is the host itself)."""
    import base64

    import numpy as np

    from .conftest import MACHINE_TYPES, self_signed, start_server

    cert, key = self_signed(tmp_path)
    both = tmp_path / "server.pem"  # one file with the key and the certificate, as some servers keep them
    both.write_text(key.read_text() + cert.read_text())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the caller trusts it; the hosts' sshd passes on their own
    monkeypatch.setenv("WEBSOCKET_CLIENT_CA_BUNDLE", str(cert))
    (tmp_path / "root").mkdir()
    server = start_server(hosts.cache, tmp_path / "root", f"--ServerApp.certfile={both}",
                          f"--FalMagicServer.machine_types={MACHINE_TYPES!r}", env=hosts.server_env(), scheme="https",
                          ip="0.0.0.0")
    url, _ = next(server)
    try:
        @isolated(keep_alive=60, requirements=["numpy"], machine_type="S", host=url)
        def doubled(a):
            import os

            from fal_magic_inside.head_blobs import moved

            return a * 2, dict(moved), os.environ["FAL_MAGIC_HEAD"], os.environ["FAL_MAGIC_HEAD_CERT"]

        fal_magic.configure(token=TOKEN)
        a = np.random.default_rng(0).random(4 << 17)  # 4 MiB: a blob each way
        twice, moved, head, certificates = doubled(a)
        assert np.array_equal(twice, a * 2)
        assert moved["fetched"] == 1  # beside the websocket, over TLS
        assert doubled(a)[1]["posted"] == 1  # and so went the first call's result
        assert head == f"127.0.0.1:{url.rpartition(':')[2]}"  # GP_RESPONSE_IP, where hosts send replies
        passed = base64.b64decode(certificates).decode()
        assert passed.strip() == cert.read_text().strip() and "PRIVATE KEY" not in passed
        assert "listens on" not in (tmp_path / "root" / "server.log").read_text()
    finally:
        fal_magic.shutdown()
        server.close()


def test_a_host_kernel_is_forked_from_its_environments_template_which_holds_none_of_its_variables(cluster):
    """A host forks a kernel from the template of its environment there (imports done once), not from
    a new Python; the kernel gets its group's variables and its id, the template neither (they may
    be secrets), and the template runs in the host's own file namespace."""
    @isolated(machine_type="ONE", keep_alive=30)
    def where():
        import os

        parent = os.getppid()
        with open(f"/proc/{parent}/comm") as comm, open(f"/proc/{parent}/environ", "rb") as environ:
            return open("/proc/self/comm").read().strip(), comm.read().strip(), environ.read(), os.environ.get("GROUP")

    name, parent, parent_environ, group = where()
    assert (name, parent, group) == ("fal-kernel", "fal-template", "one")
    assert b"GROUP=" not in parent_environ and b"KERNEL_ID=" not in parent_environ
    assert b"FAL_MAGIC_HEAD=" in parent_environ  # what it needs: the server it ends without


def test_a_host_launches_its_kernel_anew_where_the_templates_directory_is_not_its_own(hosts, tmp_path):
    """Where the templates' directory is open to other users, a host does not use it: the kernel is
    launched as a new process, and says why in its log."""
    from .conftest import server_api, start_server

    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="fal-open-", dir="/tmp"))  # short: a socket's path is
    (shared / f"fal_magic-templates-{os.getuid()}").mkdir()
    os.chmod(shared / f"fal_magic-templates-{os.getuid()}", 0o777)
    groups = {"OPEN": {"hosts": ["127.0.0.2"], "env": {"TMPDIR": str(shared)}}}
    (tmp_path / "root").mkdir()
    server = start_server(hosts.cache, tmp_path / "root", f"--FalMagicServer.machine_types={groups!r}",
                          env=hosts.server_env())
    url, _ = next(server)
    try:
        @isolated(machine_type="OPEN", keep_alive=30, host=url)
        def where():
            import os

            return open("/proc/self/comm").read().strip(), os.getpid()

        fal_magic.configure(token=TOKEN)
        name, _ = where()
        assert name != "fal-kernel"
        [kernel] = server_api(url, "/api/kernels")
        log = Path(f"/tmp/kernel-{kernel['id']}.log").read_text()  # the hosts' /tmp is this machine's
        assert "kernel launched without its template" in log and "is not a directory of this user's alone" in log
        assert os.listdir(shared / f"fal_magic-templates-{os.getuid()}") == []
    finally:
        fal_magic.shutdown()
        server.close()
        shutil.rmtree(shared)
