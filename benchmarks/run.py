"""fal_magic against its peers, measured side by side in one run; prints a table with ratios.

Run by hand:  .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/run.py [--quick]
Peers that are not installed (ipyparallel) are left out of the table; the cluster rows need root and
sshd (``benchmarks/cluster.py`` runs them alone). Medians; this machine is noisy, so compare ratios
from the same run rather than absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from testbed.timing import median_time  # noqa: E402

rows: list[tuple[str, str, str]] = []


def row(figure: str, value: str, note: str = "") -> None:
    rows.append((figure, value, note))
    print(f"  {figure:<58} {value:>14}  {note}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def noop():
    return None


def echo(x):
    return x


def copied(a):
    return a.copy()


def busy(x):
    """A small call with a little CPU work (~0.5 ms), so that spreading calls over kernels can pay off."""
    total = 0
    for i in range(40_000):
        total += i
    return x


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def pss_uss_of(pid: int) -> tuple[int, int]:
    """(PSS, USS) of a process in bytes: its proportional share of shared pages, and its private pages
    (what ending it gives back), from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def _tcp_sender(port: int, size: int) -> None:
    import socket

    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)


def loopback_tcp(size: int, repeat: int = 5) -> float:
    """Median time to receive ``size`` bytes from another process over a loopback TCP socket."""
    import socket

    times = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        for _ in range(repeat):
            sender = multiprocessing.Process(target=_tcp_sender, args=(server.getsockname()[1], size))
            sender.start()
            conn, _ = server.accept()
            with conn:
                buf = memoryview(bytearray(size))
                t = time.perf_counter()
                got = 0
                while got < size:
                    got += conn.recv_into(buf[got:])
                times.append(time.perf_counter() - t)
            sender.join()
    return statistics.median(times)


def start_server(home: Path) -> tuple[str, Any]:
    """A jupyter_server with the fal_magic extension on a free loopback port (its URL and process)."""
    import socket
    import subprocess
    import urllib.request

    import jupyter_server  # noqa: F401  (ImportError: not installed)

    from fal_magic import configure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = os.urandom(16).hex()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server",  # the extension: enabled by fal_magic's install
         f"--IdentityProvider.token={token}", f"--port={port}", "--ip=127.0.0.1", "--no-browser", "--allow-root",
         f"--ServerApp.root_dir={tempfile.mkdtemp(prefix='fal_bench_root_')}"],
        env={**os.environ, "FAL_MAGIC_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/api/status",
                                                          headers={"Authorization": f"token {token}"}), timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    configure(token=token)
    return url, proc


#: The README's tour, as a newcomer's script runs it: one cold call, then warm ones (printed as JSON).
TOUR = """
import json, statistics, time
from fal_magic import isolated

@isolated(keep_alive=300, requirements=["humanize==4.16.0"])
def nice(n):
    import humanize
    return humanize.intcomma(n)

t = time.perf_counter()
nice(10**6)
cold = time.perf_counter() - t
warm = []
for _ in range(200):
    t = time.perf_counter()
    nice(10**9)
    warm.append(time.perf_counter() - t)
print(json.dumps({"cold": cold, "warm": statistics.median(warm)}))
"""


def tour_rows(runs: int) -> None:
    """The README's figures: the tour's first call on a new machine (empty fal_magic and uv caches:
    the packages are downloaded), the same with uv's cache warm, and its warm calls."""
    import json
    import subprocess

    def run_tour(uv_cache: str) -> dict[str, float]:
        env = {**os.environ, "FAL_MAGIC_HOME": tempfile.mkdtemp(prefix="fal_bench_tour_"), "UV_CACHE_DIR": uv_cache}
        out = subprocess.run([sys.executable, "-c", TOUR], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    fresh, cached = [], []
    for _ in range(runs):
        uv_cache = tempfile.mkdtemp(prefix="fal_bench_uv_")
        fresh.append(run_tour(uv_cache))  # nothing cached: what a newcomer's first run costs
        cached.append(run_tour(uv_cache))  # the packages in uv's cache, a new fal_magic cache
    row("tour: first call, new machine (empty caches, downloads)", ms(statistics.median(r["cold"] for r in fresh)),
        f"median of {runs}; a new process builds the env (humanize) and starts its kernel")
    row("tour: first call, uv's cache warm, new fal_magic cache", ms(statistics.median(r["cold"] for r in cached)),
        f"median of {runs}")
    row("tour: warm call", ms(statistics.median(r["warm"] for r in fresh + cached)),
        "median of 200 calls per run, nice(10**9) in the tour's process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no 200 MiB payload")
    parser.add_argument("--tour", action="store_true", help="only the README tour's figures")
    opts = parser.parse_args()
    if opts.tour:
        tour_rows(3)
        return
    reps = 50 if opts.quick else 300
    home = Path(os.environ.get("FAL_MAGIC_HOME") or tempfile.mkdtemp(prefix="fal_bench_"))
    os.environ["FAL_MAGIC_HOME"] = str(home)

    import logging

    import fal_magic
    from fal_magic import isolated
    from fal_magic.kernel import get_pool

    logging.getLogger("fal_magic").setLevel("WARNING")
    print(f"fal_magic {fal_magic.__version__} benchmark; cache {home}; python {sys.version.split()[0]}; "
          f"{os.cpu_count()} cores\n")

    f_noop = isolated(keep_alive=600)(noop)
    f_echo = isolated(keep_alive=600, requirements=["numpy"])(echo)
    f_copy = isolated(keep_alive=600, requirements=["numpy"])(copied)

    # -- first calls ----------------------------------------------------------------------------
    print("first calls")
    from jupyter_client.manager import start_new_kernel

    def bare_kernel() -> float:
        """start_new_kernel, then one execute_request: start to first result (shutdown not timed)."""
        t = time.perf_counter()
        km, kc = start_new_kernel(kernel_name="python3")
        kc.execute_interactive("pass", timeout=30, output_hook=lambda m: None)
        took = time.perf_counter() - t
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        return took

    bare_kernel()
    bare = statistics.median(bare_kernel() for _ in range(5))
    row("jupyter_client.start_new_kernel + 1 execute (host python)", ms(bare), "start to first result")
    f_noop()  # build the env once
    get_pool().shutdown()

    def cold_built():
        t = time.perf_counter()
        f_noop()
        took = time.perf_counter() - t
        get_pool().shutdown()
        return took

    cold = statistics.median(cold_built() for _ in range(5))
    row("fal_magic first call, env already built", ms(cold),
        f"start to first result, kernel forked from the env's template; {cold / bare:.2f}x bare (target <= 0.4x)")

    from fal_magic.kernel import forked

    def cold_process():
        forked.stop_all()  # as in a new process: the template starts too
        return cold_built()

    first = statistics.median(cold_process() for _ in range(5))
    row("fal_magic first call of a process, env already built", ms(first),
        f"the env's template starts, then forks the kernel; {first / bare:.2f}x bare")
    fal_magic.configure(fork_kernels=False)
    launched = statistics.median(cold_built() for _ in range(5))
    fal_magic.configure(fork_kernels=True)
    row("fal_magic first call, env built, fork_kernels=False", ms(launched),
        f"the kernel launched as a new process; {launched / bare:.2f}x bare")

    def after_warmup():
        t = time.perf_counter()
        f_noop.warmup().result()
        f_noop()
        took = time.perf_counter() - t
        get_pool().shutdown()
        return took

    row("fal_magic warmup() then first call", ms(statistics.median(after_warmup() for _ in range(5))),
        "start to first result")

    new_envs = 3 if opts.quick else 5

    def first_env_of_an_empty_cache() -> float:
        fal_magic.configure(home=tempfile.mkdtemp(prefix="fal_bench_new_"))
        t = time.perf_counter()
        isolated(keep_alive=0)(noop)()
        took = time.perf_counter() - t
        get_pool().shutdown()
        return took

    row("fal_magic first call, first env of an empty cache",
        ms(statistics.median(first_env_of_an_empty_cache() for _ in range(new_envs))),
        f"median of {new_envs}, each a new cache; warm uv cache; its kernel compiles what it imports")

    def new_env_beside_others(i: int) -> float:
        # a marker that always holds gives a new key for the same small install
        small = isolated(keep_alive=0, requirements=[f'text-unidecode==1.3 ; python_version >= "3.{i}"'])(noop)
        t = time.perf_counter()
        small()
        took = time.perf_counter() - t
        get_pool().shutdown()
        return took

    fal_magic.configure(home=tempfile.mkdtemp(prefix="fal_bench_new_"))
    isolated(keep_alive=0)(noop)()  # another env in this cache, to share bytecode with
    row("fal_magic first call, new env + 1 small requirement",
        ms(statistics.median(new_env_beside_others(i) for i in range(new_envs))),
        f"median of {new_envs} new keys; warm uv cache, another env in the cache; includes kernel start")
    # a lock per environment: a new environment built from a lock entry, beside the same one resolved
    lock = Path(tempfile.mkdtemp(prefix="fal_bench_lock_")) / "bench.isolated.lock"
    locked_requirements = ["humanize==4.16.0", "text-unidecode==1.3"]

    def new_env(lock_file: Path | None) -> float:
        fal_magic.configure(home=tempfile.mkdtemp(prefix="fal_bench_new_"), lock=str(lock_file) if lock_file else None)
        t = time.perf_counter()
        isolated(keep_alive=0, requirements=locked_requirements)(noop)()
        took = time.perf_counter() - t
        get_pool().shutdown()
        return took

    recording = new_env(lock)  # (no entry yet: resolve, record, build from the record)
    resolved, from_lock = [], []
    for _ in range(new_envs):  # interleaved, so that both meet the same machine
        resolved.append(new_env(None))
        from_lock.append(new_env(lock))
    row("fal_magic first call, new env resolved (2 requirements)", ms(statistics.median(resolved)),
        f"median of {new_envs}, each a new cache; warm uv cache; includes kernel start")
    row("fal_magic first call, the same env from the lock", ms(statistics.median(from_lock)),
        f"same run; exact set installed with --no-deps, nothing resolved; "
        f"{statistics.median(from_lock) / statistics.median(resolved):.2f}x resolved")
    row("fal_magic first call, lock without its entry yet", ms(recording),
        "one run: resolve (uv pip compile), record, then build from the record")
    fal_magic.configure(home=str(home), lock=None)
    get_pool().shutdown()

    print("\nthe README's tour, in a new process")
    tour_rows(2 if opts.quick else 3)
    print("\nthe user's pool against kernels of one process (kernel_scope), new processes each")
    from benchmarks import pool as pool_rows

    pool_rows.measure(row, runs=3 if opts.quick else 5)

    # -- warm round trips ----------------------------------------------------------------------
    print("\nwarm no-op round trip")
    local = median_time(noop, reps)
    row("local call", ms(local))
    with multiprocessing.Pool(1) as pool:
        mp = median_time(lambda: pool.apply(noop), reps)
    row("multiprocessing.Pool(1).apply", ms(mp))
    km, kc = start_new_kernel(kernel_name="python3")
    raw = median_time(lambda: kc.execute_interactive("pass", timeout=30, output_hook=lambda m: None), reps)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    row("raw jupyter_client execute_request", ms(raw))
    warm = median_time(f_noop, reps)
    row("fal_magic warm call", ms(warm), f"{warm / raw:.2f}x raw execute_request")
    from fal_magic.envs.interpreters import SUPPORTED, find_python

    host = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for other in [v for v in SUPPORTED if v != host][-1:]:
        try:
            find_python(f"cpython-{other}")
        except fal_magic.FalMagicError:
            print(f"  (Python {other} not installed: no cross-version row)")
            continue
        f_other = isolated(keep_alive=600, python_version=other)(noop)
        f_other()
        across = median_time(f_other, reps)
        row(f"fal_magic warm call on Python {other} (function as source)", ms(across),
            f"{across / warm:.2f}x the same call on the notebook's own Python {host}")

    ipp_rc = None
    try:
        import ipyparallel as ipp

        cluster = ipp.Cluster(n=1, log_level=40)
        ipp_rc = cluster.start_and_connect_sync()
        ipp_rc.wait_for_engines(1, timeout=120)
        view = ipp_rc[0]
        ipp_t = median_time(lambda: view.apply_sync(noop), reps)
        row("ipyparallel apply_sync, one engine", ms(ipp_t))
        row("  fal_magic / ipyparallel (target <= 0.3)", f"{warm / ipp_t:.2f}x")
    except ImportError:
        print("  (ipyparallel not installed: pip install -e '.[bench]')")

    # -- payloads ----------------------------------------------------------------------------------
    print("\nNumPy array round trip (throughput = 2 x size / time; every row moves the array there and back)")
    f_echo(np.zeros(1))
    f_copy(np.zeros(1))
    sizes = [1, 50] if opts.quick else [1, 50, 200]
    with multiprocessing.Pool(1) as pool:
        for mib in sizes:
            arr = np.random.default_rng(0).random(mib * 2**20 // 8)
            n = 20 if mib == 1 else 5
            gbps = lambda t: f"{2 * arr.nbytes / t / 1e9:.2f} GB/s"  # noqa: E731
            t_fal = median_time(lambda: f_echo(arr), n, warmup=1)
            row(f"fal_magic {mib} MiB, echo", gbps(t_fal),
                "the argument comes back (by reference when it lies in shared memory)")
            t_copy = median_time(lambda: f_copy(arr), n, warmup=1)
            row(f"fal_magic {mib} MiB, result a new array", gbps(t_copy), "a.copy() in the kernel: like with like")
            t_mp = median_time(lambda: pool.apply(copied, (arr,)), n, warmup=1)
            row(f"multiprocessing {mib} MiB, result a new array", gbps(t_mp))
            if ipp_rc is not None:
                t_ipp = median_time(lambda: ipp_rc[0].apply_sync(copied, arr), n, warmup=1)
                row(f"ipyparallel {mib} MiB, result a new array", gbps(t_ipp),
                    f"fal_magic is {t_ipp / t_copy:.2f}x faster on the same work")

    # -- map ------------------------------------------------------------------------------------
    print("\n.map of 1,000 small calls (no-op calls measure overhead; ~0.5 ms calls measure spreading)")
    runs = 3 if opts.quick else 5
    for fn in (echo, busy):
        fns = {n: isolated(keep_alive=600, max_kernels=n)(fn) for n in (1, 2)}
        by_kernels: dict[int, list[float]] = {1: [], 2: []}
        for run in range(runs):
            for n in ((1, 2) if run % 2 == 0 else (2, 1)):  # alternate the order
                get_pool().shutdown()  # both share one key: start exactly n kernels before timing
                fns[n].warmup().result()
                list(fns[n].map(range(1000)))  # a warm-up, as for ipyparallel below (a forked kernel's first
                t = time.perf_counter()         # call is ~10 ms slower than the next ones)
                assert list(fns[n].map(range(1000))) == list(range(1000))
                by_kernels[n].append(time.perf_counter() - t)
        timings = {n: statistics.median(s) for n, s in by_kernels.items()}
        for n in (1, 2):
            row(f"fal_magic map of {fn.__name__}, {n} kernel(s)", ms(timings[n]), f"median of {runs}")
        row(f"  speed-up of 2 kernels over 1, {fn.__name__} (target >= 1.8)", f"{timings[1] / timings[2]:.2f}x")
        get_pool().shutdown()
        if ipp_rc is not None:
            ipp_rc[:].map_sync(fn, range(1000))  # warm up
            ipp_times = []
            for _ in range(runs):
                t = time.perf_counter()
                ipp_rc[:].map_sync(fn, range(1000))
                ipp_times.append(time.perf_counter() - t)
            row(f"ipyparallel map_sync of {fn.__name__}, one engine", ms(statistics.median(ipp_times)),
                f"median of {runs}, after a warm-up")
    if ipp_rc is not None:
        ipp_rc.cluster.stop_cluster_sync()

    # -- a remote Jupyter Server over loopback ---------------------------------------------------
    print("\nremote kernel on a Jupyter Server with the fal_magic extension, over loopback")
    try:
        url, server = start_server(home)
    except ImportError:
        print("  (jupyter_server not installed: pip install -e '.[server]')")
    else:
        try:
            r_noop = isolated(keep_alive=600, host=url)(noop)
            r_echo = isolated(keep_alive=600, requirements=["numpy"], host=url)(echo)
            r_copy = isolated(keep_alive=600, requirements=["numpy"], host=url)(copied)
            r_warm = median_time(r_noop, reps, warmup=20)
            row("fal_magic remote warm call", ms(r_warm),
                f"{r_warm / warm:.1f}x the local warm call (target <= 2.5 ms)")
            arr = np.random.default_rng(0).random(50 * 2**20 // 8)
            r_echo(np.zeros(1))
            r_copy(np.zeros(1))
            t_r = median_time(lambda: r_echo(arr), 5, warmup=1)
            row("fal_magic remote 50 MiB round trip, echo", f"{2 * arr.nbytes / t_r / 1e9:.2f} GB/s",
                "large buffers beside the websocket (target >= 1 GB/s)")
            t_rc = median_time(lambda: r_copy(arr), 5, warmup=1)
            row("fal_magic remote 50 MiB round trip, result a new array", f"{2 * arr.nbytes / t_rc / 1e9:.2f} GB/s")
            t_tcp = loopback_tcp(arr.nbytes)
            row("plain TCP over loopback, 50 MiB one way", ms(t_tcp),
                f"two processes, Python sockets: a round trip's floor is {arr.nbytes / t_tcp / 1e9:.2f} GB/s")
        finally:
            get_pool().shutdown()
            server.terminate()
            server.wait(timeout=30)

    # -- a cluster of two sshd hosts behind a Jupyter Server over loopback -------------------------
    print("\ncluster kernels on two sshd hosts (127.0.0.2/.3) behind a Jupyter Server, against its own kernels")
    from testbed import hosts as test_hosts

    why = test_hosts.available()
    if why:
        print(f"  (no cluster here: {why})")
    else:
        from benchmarks import cluster

        cluster.measure(row)

    # -- memory ---------------------------------------------------------------------------------
    print("\nmemory")
    get_pool().shutdown()
    f_noop()
    [info] = get_pool().snapshot()
    row("idle kernel RSS", f"{rss_of(info.pid) / 2**20:.0f} MiB", "target <= 60 MB")
    pss, uss = pss_uss_of(info.pid)
    row("idle kernel PSS / USS", f"{pss / 2**20:.0f} / {uss / 2**20:.0f} MiB", "USS: what ending it frees")
    ten = isolated(keep_alive=600, max_kernels=10)(noop)
    ten.warmup().result()
    total = sum(rss_of(k.pid) for k in get_pool().snapshot())
    row("10 warm kernels, total RSS", f"{total / 2**20:.0f} MiB")
    shares = [pss_uss_of(k.pid) for k in get_pool().snapshot()]
    row("10 warm kernels, total PSS / USS", f"{sum(p for p, _ in shares) / 2**20:.0f} / "
        f"{sum(u for _, u in shares) / 2**20:.0f} MiB", "RSS counts shared pages once per kernel")
    row("host RSS with 10 warm kernels", f"{rss_of(os.getpid()) / 2**20:.0f} MiB")
    template_pss, template_uss = pss_uss_of(parent_of(info.pid))
    row("the environment's kernel template, PSS / USS", f"{template_pss / 2**20:.0f} / {template_uss / 2**20:.0f} MiB",
        "kernels forked from it share its pages until they write them")
    get_pool().shutdown()

    print("\n| figure | value | note |\n|---|---|---|")
    for figure, value, note in rows:
        print(f"| {figure.strip()} | {value} | {note} |")


if __name__ == "__main__":
    main()
