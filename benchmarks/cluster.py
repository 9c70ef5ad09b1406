"""Warm calls through a server with a cluster: the server's own kernel before and while a cluster
kernel lives, and the cluster kernel itself; prints a table (medians of 60 calls after 5 warm-ups).

Run by hand, as root (sshd hosts on 127.0.0.2/.3 in mount namespaces, as the tests make them):
    .venv/bin/python benchmarks/cluster.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import median_time  # noqa: E402
from tests import hosts as test_hosts  # noqa: E402  (the sshd harness of the test suite)
from tests.conftest import MACHINE_TYPES, TOKEN, start_server  # noqa: E402


def noop() -> None:
    return None


def median_ms(fn) -> float:
    return median_time(fn, repeat=60, warmup=5) * 1000


def main() -> None:
    why = test_hosts.available()
    if why:
        sys.exit(f"cannot run the cluster here: {why}")
    root = Path(tempfile.mkdtemp(prefix="fal_bench_cluster_"))
    home = root / "home"
    os.environ["FAL_MAGIC_HOME"] = str(home)
    import fal_magic
    from fal_magic import isolated

    hosts = test_hosts.Hosts(root / "hosts", home / "cluster", home / "host-marker")
    (root / "server").mkdir()
    server = start_server(hosts.cache, root / "server", f"--FalMagicServer.machine_types={MACHINE_TYPES!r}",
                          env=hosts.server_env())
    url, _ = next(server)
    try:
        fal_magic.configure(host=url, token=TOKEN)
        own = isolated(keep_alive=300)(noop)
        on_host = isolated(keep_alive=300, machine_type="S")(noop)
        rows = [("warm no-op, the server's own kernel, no cluster kernel yet", median_ms(own))]
        on_host()
        rows.append(("the same, while a cluster kernel lives", median_ms(own)))
        rows.append(("warm no-op on the cluster kernel", median_ms(on_host)))
        print(f"\n| {'figure':<60} | {'median':>9} |\n|{'-' * 62}|{'-' * 11}|")
        for figure, value in rows:
            print(f"| {figure:<60} | {value:>6.2f} ms |")
        print(f"\ncluster kernel / the server's own before any cluster kernel: {rows[2][1] / rows[0][1]:.2f}x")
    finally:
        fal_magic.shutdown()
        server.close()
        hosts.stop()


if __name__ == "__main__":
    main()
