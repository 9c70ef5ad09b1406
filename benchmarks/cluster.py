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
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from testbed import hosts as test_hosts  # noqa: E402  (the sshd hosts the tests run on too)
from testbed.server import MACHINE_TYPES, TOKEN, start_server  # noqa: E402
from testbed.timing import median_time  # noqa: E402


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
    """Round-trip throughput: 2 x size / median time of 9 (after one warm-up)."""
    import statistics
    import time

    fn(array)
    times = []
    for _ in range(9):
        t = time.perf_counter()
        fn(array)
        times.append(time.perf_counter() - t)
    return 2 * array.nbytes / statistics.median(times) / 1e9


def first_call_ms(fn) -> list[float]:
    """First calls on a built environment (each kernel started anew), 5 of them, in milliseconds."""
    import time

    import fal_magic

    times = []
    for _ in range(5):
        fal_magic.shutdown()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def measure(row: Callable[[str, str, str], None]) -> None:
    """Start two sshd hosts and a server with a cluster of them, measure, and report each figure by
    ``row(figure, value, note)``; everything started is stopped after."""
    root = Path(tempfile.mkdtemp(prefix="fal_bench_cluster_"))
    home = root / "home"
    import statistics
    import time

    import numpy as np

    import fal_magic
    from fal_magic import isolated

    hosts = test_hosts.Hosts(root / "hosts", home / "cluster", home / "host-marker")
    try:
        (root / "server").mkdir()
        server = start_server(hosts.cache, root / "server", f"--FalMagicServer.machine_types={MACHINE_TYPES!r}",
                              env=hosts.server_env())
        url, _ = next(server)
        try:
            fal_magic.configure(host=url, token=TOKEN)
            own = isolated(keep_alive=300)(noop)
            on_host = isolated(keep_alive=300, machine_type="S")(noop)
            before = median_ms(own)
            row("server's own kernel, warm no-op, no cluster kernel yet", f"{before:.2f} ms", "median of 60")
            on_host()
            row("server's own kernel, warm no-op, a cluster kernel live", f"{median_ms(own):.2f} ms", "median of 60")
            warm = median_ms(on_host)
            row("cluster kernel, warm no-op", f"{warm:.2f} ms",
                f"{warm / before:.2f}x the server's own before any cluster kernel (target <= 1.5x)")
            data = np.ones(50 << 17)  # 50 MiB
            for name, fn in (("echo", echo), ("new array", copied)):
                mine = gbps(isolated(keep_alive=300, requirements=["numpy"])(fn), data)
                row(f"server's own kernel, 50 MiB round trip, {name}", f"{mine:.2f} GB/s", "")
                theirs = gbps(isolated(keep_alive=300, requirements=["numpy"], machine_type="S")(fn), data)
                row(f"cluster kernel, 50 MiB round trip, {name}", f"{theirs:.2f} GB/s",
                    f"{theirs / mine:.2f}x the server's own" + (" (target >= 1 GB/s)" if fn is echo else ""))
            runs = first_call_ms(own)
            first_own = statistics.median(runs)
            row("server's own kernel, first call, env built", f"{first_own:.0f} ms",
                "median of " + " / ".join(f"{t:.0f}" for t in runs))
            for _ in range(2):  # the environment on both hosts (kernels go to them in turn)
                fal_magic.shutdown()
                on_host()
            runs = first_call_ms(on_host)
            first_host = statistics.median(runs)
            row("cluster kernel, first call, env built on its host", f"{first_host:.0f} ms",
                f"{first_host / first_own:.2f}x the server's own (target <= 2x); median of "
                + " / ".join(f"{t:.0f}" for t in runs))
            spread = isolated(keep_alive=300, machine_type="S", max_kernels=4)(slow)
            for _ in range(2):  # (the first builds the environment on the second host)
                fal_magic.shutdown()
                t = time.perf_counter()
                list(spread.map(range(8), chunksize=2))
                took = (time.perf_counter() - t) * 1000
            row("cluster .map(8 x 0.2 s) starting 4 kernels on 2 hosts", f"{took:.0f} ms",
                f"{took - 400:.0f} ms over its 2 x 0.2 s of work; one kernel's first call: {first_host:.0f} ms")
        finally:
            fal_magic.shutdown()
            fal_magic.configure(host="")  # (calls after these are local again)
            server.close()
    finally:
        hosts.stop()


def main() -> None:
    why = test_hosts.available()
    if why:
        sys.exit(f"cannot run the cluster here: {why}")
    os.environ["FAL_MAGIC_HOME"] = tempfile.mkdtemp(prefix="fal_bench_")
    rows: list[tuple[str, str, str]] = []
    measure(lambda *figure: rows.append(figure))
    print("\n| figure | value | note |\n|---|---|---|")
    for figure, value, note in rows:
        print(f"| {figure} | {value} | {note} |")


if __name__ == "__main__":
    main()
