"""The user's pool (``kernel_scope``), measured in new processes: a script's first call when its
kernel is warm in the pool, against one that starts a kernel; a whole run of such a script from its
process's start; three runs of a script whose ``@cached`` value takes 2 s; a notebook restarted by
nbclient; and the warm call in both scopes. Prints a table (alone, or as rows of ``run.py``).

Run by hand:  .venv/bin/python benchmarks/pool.py
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.timing import median_time  # noqa: E402

#: A script's first call and its warm calls, timed inside it (the scope is its first argument).
SCRIPT = """
import json, os, sys, time
import fal_magic
from fal_magic import cached, isolated

fal_magic.configure(kernel_scope=sys.argv[1])
LOAD = float(sys.argv[2])

@cached
def model():
    import time
    time.sleep(LOAD)  # a model that loads slowly, once per warm kernel
    return 1

@isolated(keep_alive=120)
def noop():
    return model()

t = time.perf_counter()
noop()
first = time.perf_counter() - t
with open("/proc/self/stat") as f:  # the process's start, in clock ticks since boot
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
from_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
warm = []
for _ in range(200):
    t = time.perf_counter()
    noop()
    warm.append(time.perf_counter() - t)
warm.sort()
print(json.dumps({"first": first, "whole": from_start, "warm": warm[len(warm) // 2]}))
"""

#: A notebook's first ``%%isolated`` cell, timed in the notebook (nbclient runs it in a new kernel).
NOTEBOOK = """
%load_ext fal_magic
import time, fal_magic
fal_magic.configure(kernel_scope=SCOPE)
t = time.perf_counter()
get_ipython().run_cell_magic("isolated", "--keep-alive 120", "x = 1")
print("cell", time.perf_counter() - t)
"""


def run_script(path: Path, env: dict[str, str], scope: str, load: float = 0.0) -> dict[str, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(path), scope, str(load)], env=env, capture_output=True, text=True,
                         check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - t  # from the process's start to its end
    return result


def stop_pool(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "fal_magic", "kernels", "stop", "--all"], env=env, check=True,
                   capture_output=True)


def run_notebook(env: dict[str, str], scope: str) -> float:
    import nbformat
    from nbclient import NotebookClient

    cell = nbformat.v4.new_code_cell(textwrap.dedent(NOTEBOOK).replace("SCOPE", repr(scope)))
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                         "display_name": "Python 3"}})
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout")
    return float(text.split()[-1])


def measure(row: Callable[[str, str, str], None], runs: int = 5) -> None:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"

    home = tempfile.mkdtemp(prefix="fal_bench_pool_")
    env = {**os.environ, "FAL_MAGIC_HOME": home}
    script = Path(home) / "script.py"
    script.write_text(SCRIPT)
    try:
        run_script(script, env, "process")  # the environment, built once
        from jupyter_client.manager import start_new_kernel

        def bare() -> None:
            km, kc = start_new_kernel(kernel_name="python3")
            kc.execute_interactive("pass", timeout=30, output_hook=lambda m: None)
            kc.stop_channels()
            km.shutdown_kernel(now=True)

        floor = median_time(bare, repeat=runs, warmup=1)
        cold = [run_script(script, env, "process") for _ in range(runs)]  # each starts a kernel
        run_script(script, env, "user")  # a warm kernel in the pool
        warm = [run_script(script, env, "user") for _ in range(runs)]
        stop_pool(env)
        first_warm = statistics.median(r["first"] for r in warm)
        first_cold = statistics.median(r["first"] for r in cold)
        whole_warm = statistics.median(r["whole"] for r in warm)
        whole_cold = statistics.median(r["whole"] for r in cold)
        row("pool: first call of a new process, kernel warm in the pool", ms(first_warm),
            f"median of {runs} processes (target <= 15 ms); starting a kernel instead: {ms(first_cold)}")
        row("pool: a script's first result from its process's start, kernel warm", ms(whole_warm),
            f"{whole_warm / floor:.2f}x a bare start_new_kernel to ready ({ms(floor)}; target <= 0.3x); "
            f"with a kernel to start: {ms(whole_cold)}, {whole_cold / floor:.2f}x")
        row("pool: warm call, one process", ms(statistics.median(r["warm"] for r in warm)),
            f"kernel_scope='user'; 'process': {ms(statistics.median(r['warm'] for r in cold))}")

        def three(scope: str) -> float:
            t = time.perf_counter()
            for _ in range(3):
                run_script(script, env, scope, load=2.0)
            took = time.perf_counter() - t
            stop_pool(env)
            return took

        one = time.perf_counter()
        run_script(script, env, "process", load=2.0)
        one = time.perf_counter() - one
        row("pool: three runs of a script whose @cached load takes 2 s", ms(three("user")),
            f"one run {ms(one)} (target: within 2.5 s of it); 'process': {ms(three('process'))}")

        before = [run_notebook(env, "process") for _ in range(3)]
        run_notebook(env, "user")
        after = [run_notebook(env, "user") for _ in range(3)]
        stop_pool(env)
        row("pool: a restarted notebook's first %%isolated cell", ms(statistics.median(after)),
            f"median of 3 nbclient runs; 'process': {ms(statistics.median(before))}")
    finally:
        stop_pool(env)


if __name__ == "__main__":
    print("the user's pool against kernels of one process (kernel_scope), new processes each")
    measure(lambda figure, value, note="": print(f"  {figure:<58} {value:>14}  {note}", flush=True))
