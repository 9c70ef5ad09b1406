"""A server with a cluster against the server's own kernels, in one run: warm calls (the server's own
kernel before and while a cluster kernel lives, and the cluster kernel itself; medians of 60 calls
after 5 warm-ups), 50 MiB round trips, first calls on a built environment, and a ``.map`` that starts
4 kernels on 2 hosts; prints a table.

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


def echo(a):
    return a


def copied(a):
    return a.copy()


def slow(x):
    import time

    time.sleep(0.2)
    return x


def gbps(fn, array) -> float:
    """Round-trip throughput: 2 x size / median time of 5 (after one warm-up)."""
    import statistics
    import time

    fn(array)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn(array)
        times.append(time.perf_counter() - t)
    return 2 * array.nbytes / statistics.median(times) / 1e9


def first_call_ms(fn) -> float:
    """A first call on a built environment (the kernel started anew), median of 3."""
    import statistics
    import time

    import fal_magic

    times = []
    for _ in range(3):
        fal_magic.shutdown()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


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
        rows = [("warm no-op, the server's own kernel, no cluster kernel yet", median_ms(own), "ms")]
        on_host()
        rows.append(("the same, while a cluster kernel lives", median_ms(own), "ms"))
        rows.append(("warm no-op on the cluster kernel", median_ms(on_host), "ms"))
        import numpy as np

        data = np.ones(50 << 17)  # 50 MiB
        for name, fn in (("echo", echo), ("result a new array", copied)):
            rows.append((f"50 MiB round trip, {name}, the server's own kernel",
                         gbps(isolated(keep_alive=300, requirements=["numpy"])(fn), data), "GB/s"))
            rows.append((f"50 MiB round trip, {name}, cluster kernel",
                         gbps(isolated(keep_alive=300, requirements=["numpy"], machine_type="S")(fn), data), "GB/s"))
        rows.append(("first call, env built, the server's own machine", first_call_ms(own), "ms"))
        rows.append(("first call, env built, a cluster host", first_call_ms(on_host), "ms"))
        spread = isolated(keep_alive=300, machine_type="S", max_kernels=4)(slow)
        import time

        for attempt in range(2):
            fal_magic.shutdown()
            t = time.perf_counter()
            list(spread.map(range(8), chunksize=2))
            took = (time.perf_counter() - t) * 1000
        rows.append((".map(8 x 0.2 s) starting 4 kernels on 2 hosts (envs built)", took, "ms"))
        print(f"\n| {'figure':<62} | {'value':>11} |\n|{'-' * 64}|{'-' * 13}|")
        for figure, value, unit in rows:
            print(f"| {figure:<62} | {value:>6.2f} {unit:<4} |")
        print(f"\ncluster kernel / the server's own before any cluster kernel: {rows[2][1] / rows[0][1]:.2f}x")
    finally:
        fal_magic.shutdown()
        server.close()
        hosts.stop()


if __name__ == "__main__":
    main()
