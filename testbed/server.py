"""A Jupyter Server with the fal_magic extension on a free loopback port, for the tests and the
benchmarks: its token, the cluster's machine types, and the waits around it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import os
import sys
import time
import urllib.request
from pathlib import Path

#: The token of the test Jupyter Server, and how long it lets a kernel without a host live.
TOKEN = "fal-magic-test-token"
ORPHAN_TIMEOUT = 3


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; bounds waits without timing claims."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_api(url: str, path: str, token: str = TOKEN):
    """GET a JSON resource of the test server."""
    req = urllib.request.Request(url + path, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def start_server(home: Path, root: Path, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
                 scheme: str = "http", ip: str = "127.0.0.1"):
    """Start a jupyter_server with the extension listening on ``ip`` (its own cache and token), through
    the command ``prefix`` if any; yield its URL on 127.0.0.1 and its process, and stop it after. With
    ``scheme="https"`` the ``args`` give its certificate (and the client must trust it)."""
    port = free_port()
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "jupyter_server",  # the extension: enabled by fal_magic's install
         f"--IdentityProvider.token={TOKEN}", f"--port={port}", f"--ip={ip}", "--no-browser",
         "--allow-root", f"--ServerApp.root_dir={root}", f"--FalMagicServer.orphan_timeout={ORPHAN_TIMEOUT}", *args],
        env={**os.environ, "FAL_MAGIC_HOME": str(home), **(env or {})},
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    url = f"{scheme}://127.0.0.1:{port}"

    def up() -> bool:
        try:
            server_api(url, "/api/status")
            return True
        except OSError:
            return False

    try:
        assert wait_until(up, timeout=60, interval=0.2), (root / "server.log").read_text()[-3000:]
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: The test cluster's groups: both hosts, one host with a variable of its own, and one whose first
#: host is down.
MACHINE_TYPES = {"S": {"hosts": ["127.0.0.2", "127.0.0.3"]}, "ONE": {"hosts": ["127.0.0.3"], "env": {"GROUP": "one"}},
                 "FLAKY": {"hosts": ["127.0.0.9", "127.0.0.3"]}}  # nothing listens on 127.0.0.9
