"""Two cluster "hosts" on this machine: an sshd on 127.0.0.2 and one on 127.0.0.3 (jupyter_client
counts them as other machines, so the real SSH path runs), each in its own mount namespace with
private tmpfs over the server's environment cache and over a marker directory saying which host it is.
They listen on a port free on both addresses when they start (gateway_provisioners takes one SSH port
for every host, GP_SSH_PORT), so that two test runs on one machine do not meet."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOSTS = ("127.0.0.2", "127.0.0.3")
SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """Why the hosts cannot run here, or None."""
    if not os.path.exists(SSHD):
        return "no sshd (Debian's openssh-server)"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        return "cannot make mount namespaces (unshare -m)"
    return None


#: What a host of this machine needs in its own environment to reach the package index (its
#: certificates, a proxy), as a real host has it in its login environment.
PASSED_ON = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY",
             "https_proxy", "http_proxy", "no_proxy")


def free_port() -> int:
    """A port that no one listens on at either host address."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((HOSTS[0], 0))
            port = first.getsockname()[1]
            try:
                with socket.socket() as second:
                    second.bind((HOSTS[1], port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port is free on both test host addresses")


def _set_env() -> str:
    values = [f"{name}={os.environ[name]}" for name in PASSED_ON if os.environ.get(name)]
    return f"SetEnv {' '.join(values)}\n" if values else ""


class Hosts:
    """The sshd processes, the SSH home the server uses (key, known hosts), and the shared paths."""

    def __init__(self, root: Path, cache: Path, marker_dir: Path) -> None:
        self.root, self.cache, self.marker_dir = root, cache, marker_dir
        self.home = root / "home"
        self.port = free_port()
        ssh = self.home / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        for key in (ssh / "id_ed25519", root / "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copyfile(ssh / "id_ed25519.pub", root / "authorized_keys")
        host_key = " ".join((root / "host_key.pub").read_text().split()[:2])
        (ssh / "known_hosts").write_text("".join(f"[{ip}]:{self.port} {host_key}\n" for ip in HOSTS))
        cache.mkdir(parents=True, exist_ok=True)
        marker_dir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.procs: list[subprocess.Popen] = []
        for ip in HOSTS:
            config = root / f"sshd-{ip}.conf"
            config.write_text(f"ListenAddress {ip}:{self.port}\nHostKey {root / 'host_key'}\n"
                              "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                              "UsePAM no\nStrictModes no\n"
                              f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile none\n{_set_env()}")
            script = (f"mount -t tmpfs tmpfs {cache} && mount -t tmpfs tmpfs {marker_dir} && "
                      f"echo {ip} > {marker_dir}/host && exec {SSHD} -D -e -f {config}")
            self.procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                               stdout=subprocess.DEVNULL, stderr=open(root / f"sshd-{ip}.log", "wb"),
                                               start_new_session=True))
        deadline = time.monotonic() + 20
        while not all(self.reachable(ip) for ip in HOSTS):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test sshd hosts did not come up: "
                                   + " ".join((root / f"sshd-{ip}.log").read_text() for ip in HOSTS))
            time.sleep(0.1)

    def reachable(self, ip: str) -> bool:
        try:
            socket.create_connection((ip, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def run(self, ip: str, command: str) -> str:
        """Run a shell command on a host (in its namespace); its output."""
        return subprocess.run(["ssh", "-p", str(self.port), "-o", "BatchMode=yes",
                               "-i", str(self.home / ".ssh" / "id_ed25519"),
                               "-o", f"UserKnownHostsFile={self.home / '.ssh' / 'known_hosts'}", ip, command],
                              capture_output=True, text=True, timeout=30).stdout

    def server_env(self) -> dict[str, str]:
        """What the head server needs: the SSH home for paramiko, root allowed (tests run as root;
        gateway_provisioners refuses root by default and users keep that), replies to loopback."""
        return {"HOME": str(self.home), "GP_UNAUTHORIZED_USERS": "nobody-at-all", "GP_RESPONSE_IP": "127.0.0.1",
                "GP_SSH_PORT": str(self.port),
                "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv"))}

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
