"""Isolated kernels on a real Jupyter Server (its own process, FAL_MAGIC_HOME and token) with the
fal_magic extension, reached over loopback: the decorator, the cell magic, keep-alive, errors,
deaths, interrupts, large payloads, authentication, and the server's culler of orphaned kernels."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from IPython.utils.capture import capture_output

import fal_magic
from fal_magic import AuthenticationError, FalMagicError, KernelStartError, RemoteError, isolated
from fal_magic.kernel.remote import pack_v1, unpack_v1

from .conftest import ORPHAN_TIMEOUT, TOKEN, free_port, pid_alive, wait_until
from .kernel_side import mapped_file
from .conftest import server_api as _api


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def test_v1_framing_matches_jupyter_servers():
    from jupyter_server.services.kernels.connection.base import (deserialize_msg_from_ws_v1,
                                                                 serialize_msg_to_ws_v1)

    parts = [b'{"msg_id": "1"}', b"{}", b"{}", b'{"a": 1}', b"\x00" * 10, b"buffer"]
    channel, got = deserialize_msg_from_ws_v1(pack_v1("shell", parts))
    assert channel == "shell" and got == parts
    channel, views = unpack_v1(serialize_msg_to_ws_v1(parts, "iopub"))
    assert channel == "iopub" and [bytes(v) for v in views] == parts


def test_the_server_extension_is_enabled_by_installing_fal_magic():
    listed = subprocess.run([sys.executable, "-m", "jupyter_server", "extension", "list"], capture_output=True,
                            text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)
    assert re.search(r"fal_magic\s+enabled", text) and re.search(r"fal_magic [0-9.]+\s+OK", text), text


def test_decorator_runs_on_the_server_warm_and_streams_output(remote, server, capsys, caplog):
    _, proc = server

    @isolated(keep_alive=30, requirements=["humanize==4.16.0"])
    def where(n):
        import os

        import humanize

        print("printed in the remote kernel")
        return os.getpid(), humanize.intcomma(n)

    pid, text = where(10**6)
    assert text == "1,000,000"
    assert _parent(_parent(pid)) == proc.pid  # the server started it (from its template), not this process
    assert "printed in the remote kernel" in capsys.readouterr().out
    assert where(1)[0] == pid  # warm: the same kernel
    [info] = fal_magic.kernels()
    assert info.host == remote and info.pid == pid and info.calls == 2 and info.rss_bytes is None
    assert [k["name"] for k in _api(remote, "/api/kernels")] == [f"fal_magic-{info.key}"]
    assert "signing is disabled" not in caplog.text + capsys.readouterr().err  # nothing to alarm anyone


def test_host_per_function_and_local_stays_local(remote, server):
    fal_magic.configure(host="")  # the default is this machine again; only the function names the server

    @isolated(keep_alive=30, host=remote)
    def there():
        import os

        return os.getpid()

    @isolated(keep_alive=30)
    def here():
        import os

        return os.getpid()

    assert _parent(_parent(there())) == server[1].pid  # forked from the server's template
    local = here()
    assert os.getpid() in (_parent(local), _parent(_parent(local)))  # a child of this host, or of its template


def test_50_mib_array_round_trip(remote):
    import numpy as np

    @isolated(keep_alive=30, requirements=["numpy"])
    def double(a):
        return a * 2

    a = np.arange(50 * 2**20 // 8, dtype=np.float64)
    b = double(a)
    assert b.shape == a.shape and b[-1] == 2 * a[-1] and np.array_equal(b, a * 2)


def _blob_dir(server) -> Path:
    [found] = Path("/dev/shm").glob(f"fal_magic-blobs-{server[1].pid}-*")
    return found


def test_large_frames_travel_beside_the_websocket_and_leave_nothing_behind(remote, server):
    import numpy as np

    @isolated(keep_alive=30, requirements=["numpy"])
    def received(a):
        return mapped_file(a), a  # where the argument lives in the kernel, and the argument itself

    @isolated(keep_alive=30, requirements=["numpy"])
    def doubled(a, keep=False):
        import sys

        if keep:
            sys.fal_kept = a
        return a * 2, a

    a = np.arange(4 * 2**20 // 8, dtype=np.float64)
    where, back = received(a)
    assert where is not None and Path(where).parent == _blob_dir(server)  # uploaded, then mapped from there
    assert np.array_equal(back, a)
    twice, same = doubled(a, keep=True)  # an argument the kernel keeps still comes back whole
    assert np.array_equal(twice, a * 2) and np.array_equal(same, a)
    assert list(_blob_dir(server).iterdir()) == []  # every blob was mapped or fetched, then removed


def _http(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"{head}\r\nHost: 127.0.0.1:{port}\r\nAuthorization: token {TOKEN}\r\n\r\n".encode())
    return sock


def _read_at_least(sock: socket.socket, data: bytes, count: int) -> bytes:
    while len(data) < count:
        more = sock.recv(1 << 20)
        assert more, f"the connection ended after {len(data)} bytes"
        data += more
    return data


def test_a_blob_reaches_its_reader_while_it_is_still_being_uploaded(remote, server):
    """An argument reaches a cluster host's kernel while the caller still uploads it: the head sends
    a reader what has come, then the rest as it comes, byte for byte, and keeps nothing after."""
    from urllib.parse import urlsplit

    from fal_magic_inside.head_blobs import _answer

    port, name, half = urlsplit(remote).port, f"r-{os.urandom(8).hex()}", 6 << 20
    body = os.urandom(2 * half)
    put = _http(port, f"PUT /fal_magic/api/blobs/{name} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                      "Expect: 100-continue\r\nConnection: close")
    get = None
    try:
        assert _answer(put)[0] == 100
        put.sendall(body[:half])
        get = _http(port, f"GET /fal_magic/api/blobs/{name} HTTP/1.1")
        got = _read_at_least(get, b"", 1)
        got = _read_at_least(get, got, got.index(b"\r\n\r\n") + 4 + half)
        head, _, first = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(body)}".encode() in head
        assert first == body[:half]  # the first half, before the second was sent
        put.sendall(body[half:])
        assert _answer(put)[0] == 200
        assert _read_at_least(get, first, len(body)) == body
        assert get.recv(1) == b""  # and nothing more
    finally:
        put.close()
        if get is not None:
            get.close()
    assert list(_blob_dir(server).iterdir()) == []


def test_large_buffers_travel_whole_through_a_server_on_https(fal_home, tmp_path, monkeypatch):
    """Over TLS, a large argument and a large result (blobs beside the websocket) arrive byte for
    byte, and so does a blob a kernel streams to the server and another reads while it comes: the
    server's sending them with ``sendfile`` put them unencrypted into the TLS stream."""
    import urllib.request

    import numpy as np

    from fal_magic_inside.head_blobs import start_put

    from .conftest import self_signed, start_server

    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts it: urllib by this, websocket-client by the next
    monkeypatch.setenv("WEBSOCKET_CLIENT_CA_BUNDLE", str(cert))
    server = start_server(fal_home / "server", tmp_path, f"--ServerApp.certfile={cert}", f"--ServerApp.keyfile={key}",
                          scheme="https")
    url, _ = next(server)
    try:
        @isolated(keep_alive=0, requirements=["numpy"], host=url)
        def doubled(a):
            return a * 2

        fal_magic.configure(token=TOKEN)
        a = np.random.default_rng(0).random(4 << 17)  # 4 MiB: a blob each way
        assert np.array_equal(doubled(a), a * 2)

        body = os.urandom(6 << 20)
        sending = start_put(url + "/fal_magic/api/blobs", body, lambda _: {"Authorization": f"token {TOKEN}"})
        request = urllib.request.Request(f"{url}/fal_magic/api/blobs/{sending.name}",
                                         headers={"Authorization": f"token {TOKEN}"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.read() == body
        sending.wait(timeout=60)
    finally:
        fal_magic.shutdown()
        server.close()


def test_blobs_need_the_token_and_take_only_their_own_names(remote, server):
    import urllib.error
    import urllib.request

    def status(method, path, token=TOKEN, data=None):
        headers = {"Authorization": f"token {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(remote + path, data=data, method=method,
                                                               headers=headers), timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("POST", "/fal_magic/api/blobs", token="", data=b"x" * 10) == 403
    try:
        urllib.request.urlopen(urllib.request.Request(remote + "/fal_magic/api/blobs", data=b"x", method="POST"))
    except urllib.error.HTTPError as exc:
        assert b"needs the server's token" in exc.read()  # not jupyter_server's "'_xsrf' argument missing"
    assert status("POST", "/fal_magic/api/blobs", token="wrong", data=b"x" * 10) == 403
    assert status("GET", "/fal_magic/api/blobs/r-00", token="") == 403
    assert status("GET", "/fal_magic/api/blobs/..%2F..%2Fetc%2Fpasswd") in (400, 404)
    assert status("GET", "/fal_magic/api/blobs/server.log") == 400
    assert status("GET", "/fal_magic/api/blobs/r-0123") == 404
    assert list(_blob_dir(server).iterdir()) == []  # refused uploads left nothing


def test_blobs_past_the_quota_or_a_full_disk_are_refused_with_a_reason_and_calls_still_run(fal_home, tmp_path):
    """A server whose blobs may hold 12 MiB, and whose files cannot grow past 9 MiB (as if its shared
    memory were full): uploads past either are answered (413, 507) and leave nothing; a call whose
    buffers do not fit still runs, its frames through the websocket."""
    import urllib.error
    import urllib.request

    from .conftest import start_server

    def post(url, size):
        req = urllib.request.Request(url + "/fal_magic/api/blobs", data=b"x" * size, method="POST",
                                     headers={"Authorization": f"token {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    server = start_server(fal_home / "server", tmp_path, f"--FalMagicServer.blob_quota={12 << 20}",
                          prefix=("prlimit", f"--fsize={9 << 20}", "--"))
    url, proc = next(server)
    try:
        code, answer = post(url, 13 << 20)
        assert code == 413 and "larger than this server's blob quota of 12 MiB" in answer
        code, kept = post(url, 8 << 20)
        assert code == 200
        code, answer = post(url, 6 << 20)
        assert code == 507 and "no room" in answer  # 8 + 6 > 12
        req = urllib.request.Request(url + f"/fal_magic/api/blobs/{kept['name']}", method="DELETE",
                                     headers={"Authorization": f"token {TOKEN}"})
        urllib.request.urlopen(req, timeout=10).close()
        code, answer = post(url, 10 << 20)  # within the quota, past what the disk takes
        assert code == 507 and "cannot store the blob" in answer
        from fal_magic_inside.head_blobs import Refused, start_put

        sending = start_put(url + "/fal_magic/api/blobs", b"x" * (10 << 20),
                            lambda _: {"Authorization": f"token {TOKEN}"})
        with pytest.raises(Refused, match="cannot store the blob"):  # the same, for a kernel's streamed upload
            sending.wait(timeout=60)
        [blob_dir] = Path("/dev/shm").glob(f"fal_magic-blobs-{proc.pid}-*")
        assert list(blob_dir.iterdir()) == []
        assert "Uncaught exception" not in (tmp_path / "server.log").read_text()

        import numpy as np

        @isolated(keep_alive=0, requirements=["numpy"], host=url)
        def total(a):
            return float(a.sum())

        fal_magic.configure(token=TOKEN)
        assert total(np.ones(10 << 17)) == 10 << 17  # 10 MiB: refused as a blob, sent through the websocket
    finally:
        fal_magic.shutdown()
        server.close()


def test_nested_isolated_call_in_a_remote_kernel_is_a_clear_error(remote):
    @isolated(keep_alive=30)
    def inner():
        return 1

    @isolated(keep_alive=30)
    def outer():
        return inner()

    with pytest.raises(FalMagicError, match="cannot be called from inside a kernel on a remote server"):
        outer()


def test_wrong_or_missing_token_is_an_authentication_error(remote):
    @isolated(keep_alive=30)
    def one():
        return 1

    fal_magic.configure(token="not-the-token")
    with pytest.raises(AuthenticationError, match="token is not the one configured"):
        one()
    fal_magic.configure(token="")
    with pytest.raises(AuthenticationError, match="needs a token"):
        one()
    assert len(fal_magic.kernels()) == 0


def test_bad_hosts_are_clear_errors():
    with pytest.raises(FalMagicError, match="refusing plain http to gpu-box"):
        isolated(host="http://gpu-box:8888")(lambda: 1)
    with pytest.raises(FalMagicError, match="must be a Jupyter Server URL"):
        isolated(host="gpu-box:8888")(lambda: 1)
    fal_magic.configure(allow_plain_http=True)
    isolated(host="http://gpu-box:8888")(lambda: 1)  # allowed explicitly; nothing is contacted yet

    @isolated(host=f"http://127.0.0.1:{free_port()}")
    def nowhere():
        return 1

    with pytest.raises(KernelStartError, match="cannot reach the Jupyter Server"):
        nowhere()


def test_cell_magic_runs_on_the_server(remote, server):
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "fal_magic")
    try:
        fal_magic.configure(host="")
        with capture_output() as out:
            first = ip.run_cell(f"%%isolated --host {remote} --keep-alive 30 --requirements humanize==4.16.0\n"
                                "import humanize, os\nprint(humanize.intcomma(2**20))\nkernel_pid = os.getpid()")
            second = ip.run_cell(f"%%isolated --host {remote} --keep-alive 30 --requirements humanize==4.16.0 "
                                 "--pull kernel_pid\nprint('still', humanize.intcomma(7000))")
        assert first.success and second.success, (first.error_in_exec, second.error_in_exec)
        assert out.stdout == "1,048,576\nstill 7,000\n"
        assert _parent(_parent(ip.user_ns["kernel_pid"])) == server[1].pid
        failed = ip.run_cell(f"%%isolated --host {remote}\n1 / 0")
        assert isinstance(failed.error_in_exec, RemoteError)
        assert type(failed.error_in_exec).__name__ == "ZeroDivisionError"  # named like the remote type
    finally:
        ip.run_line_magic("unload_ext", "fal_magic")


def test_server_culls_the_kernels_of_a_host_that_was_killed(remote):
    script = textwrap.dedent(f"""
        import fal_magic
        fal_magic.configure(host={remote!r}, token={TOKEN!r})

        @fal_magic.isolated(keep_alive=600)
        def pid():
            import os
            return os.getpid()

        print(pid(), flush=True)
        import time
        time.sleep(600)
    """)
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        kernel_pid = int(host.stdout.readline())
        assert pid_alive(kernel_pid) and len(_api(remote, "/api/kernels")) == 1
    finally:
        host.kill()
        host.wait()
    assert wait_until(lambda: not _api(remote, "/api/kernels"), timeout=ORPHAN_TIMEOUT + 20)
    assert wait_until(lambda: not pid_alive(kernel_pid), timeout=10)


def test_failed_remote_build_is_an_environment_build_error_with_progress(remote, capsys):
    from fal_magic import EnvironmentBuildError

    @isolated(requirements=["fal-magic-no-such-package==1.0"])
    def never():
        return 1

    with pytest.raises(EnvironmentBuildError, match="fal-magic-no-such-package") as info:
        never()
    assert remote in str(info.value)
    assert f"{remote}: building environment" in capsys.readouterr().err  # progress streamed from the server
    assert not _api(remote, "/api/kernels") and len(fal_magic.kernels()) == 0


def test_demo_runs_on_the_server(remote):
    env = {**os.environ, "FAL_MAGIC_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-m", "fal_magic", "demo", "--keep-alive", "1", "--host", remote],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert f"server {remote}" in out.stdout and out.stdout.count("warm call:") == 3
    assert "live kernels now: 0" in out.stdout
    env["FAL_MAGIC_TOKEN"] = "wrong"
    out = subprocess.run([sys.executable, "-m", "fal_magic", "demo", "--host", remote],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "error: the Jupyter Server" in out.stderr and "Traceback" not in out.stderr


def test_bad_request_bodies_are_refused_with_400(remote):
    import urllib.error
    import urllib.request

    from fal_magic.envs.spec import host_python

    bodies = [[], "text", 3, {"requirements": "humanize", "python": host_python(), "cloudpickle": "3"},
              {"requirements": [1], "python": host_python(), "cloudpickle": "3"},
              {"requirements": [], "python": host_python(), "cloudpickle": '3.1.3; python_version<"0"'},
              {"requirements": ["x"] * 1001, "python": host_python(), "cloudpickle": "3"}]
    for body in bodies:
        req = urllib.request.Request(remote + "/fal_magic/api/envs", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 400, (body, info.value.code)


def test_the_server_refuses_paths_on_its_own_machine_however_they_are_written(remote):
    import urllib.error
    import urllib.request

    from fal_magic.envs.spec import host_python

    for requirement in ("x@file:///etc/passwd", "x @ file:///etc/passwd", "file:///etc/passwd", "/etc/passwd"):
        body = {"requirements": [requirement], "python": host_python(), "cloudpickle": "3"}
        req = urllib.request.Request(remote + "/fal_magic/api/envs", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 400 and b"local package paths" in info.value.read(), requirement


def test_eight_hosts_asking_for_one_environment_at_once_all_get_it(remote):
    from concurrent.futures import ThreadPoolExecutor

    from fal_magic.envs import make_spec
    from fal_magic.kernel.remote import ServerClient

    spec = make_spec([])
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: ServerClient(remote, TOKEN).build_env(spec, lambda line: None)[0], range(8)))
    assert names == [f"fal_magic-{spec.key}"] * 8


def test_a_python_mismatch_is_refused_with_409(remote):
    import urllib.error
    import urllib.request

    body = {"requirements": [], "python": "cpython-2.7", "cloudpickle": "3.1.3"}
    req = urllib.request.Request(remote + "/fal_magic/api/envs", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 409 and "cannot cross between Python versions" in info.value.read().decode()


def test_kernelspecs_carry_the_configured_metadata(remote):
    from .conftest import KERNELSPEC_METADATA

    @isolated(keep_alive=30)
    def one():
        return 1

    assert one() == 1
    [info] = fal_magic.kernels()
    spec = _api(remote, "/api/kernelspecs")["kernelspecs"][f"fal_magic-{info.key}"]["spec"]
    assert spec["metadata"]["fal_magic_test"] == KERNELSPEC_METADATA["fal_magic_test"]
    assert spec["metadata"]["fal_magic"]["key"] == info.key
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "fal-magic-template-provisioner"


def test_the_servers_own_kernels_are_forked_from_a_template_that_holds_none_of_their_variables(remote, server):
    """As on a notebook's own machine: the server forks an environment's kernels from its template
    (imports done once), which ends with the server and never holds a kernel's own variables."""
    @isolated(keep_alive=30)
    def where():
        import os

        parent = os.getppid()
        with open(f"/proc/{parent}/comm") as comm, open(f"/proc/{parent}/environ", "rb") as environ:
            return open("/proc/self/comm").read().strip(), comm.read().strip(), environ.read(), dict(os.environ)

    name, parent, parent_environ, variables = where()
    assert (name, parent) == ("fal-kernel", "fal-template")
    assert variables["FAL_MAGIC_REMOTE"] == "1" and b"FAL_MAGIC_REMOTE=" not in parent_environ


def test_the_orphan_culler_spares_a_kernel_whose_host_is_connected(remote):
    @isolated(keep_alive=60)
    def where():
        import os

        return os.getpid()

    first = where()
    time.sleep(ORPHAN_TIMEOUT + 3)  # past the orphan timeout, connected all along
    assert where() == first and len(_api(remote, "/api/kernels")) == 1


def test_environment_variables_for_a_remote_kernel_are_a_clear_error(remote):
    @isolated(keep_alive=30, env={"FAL_TEST_TOKEN": "secret-value"})
    def one():
        return 1

    with pytest.raises(FalMagicError, match="cannot be given to a kernel on the Jupyter Server") as info:
        one()
    assert "FAL_TEST_TOKEN" in str(info.value) and "secret-value" not in str(info.value)
    assert not _api(remote, "/api/kernels")


def test_a_servers_blob_directory_goes_with_it_even_when_it_is_killed(tmp_path, fal_home):
    from .conftest import start_server

    def blob_dirs(pid):
        return list(Path("/dev/shm").glob(f"fal_magic-blobs-{pid}-*"))

    stopped = start_server(fal_home / "server", tmp_path)
    _, proc = next(stopped)
    assert blob_dirs(proc.pid)
    stopped.close()  # SIGTERM: the server exits normally
    assert not blob_dirs(proc.pid)
    killed = start_server(fal_home / "server", tmp_path)
    _, proc = next(killed)
    proc.kill()
    proc.wait()
    assert blob_dirs(proc.pid)  # nothing could remove it
    later = start_server(fal_home / "server", tmp_path)
    next(later)
    try:
        assert not blob_dirs(proc.pid)  # the next server did
    finally:
        later.close()
        killed.close()
