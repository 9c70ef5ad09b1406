"""Command line: ``python -m fal_magic demo``, ``envs list | rm KEY | prune``, ``kernels [stop KEY | --all]``
and ``lock show | refresh``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import settings
from .envs import EnvCache
from .errors import FalMagicError


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(ts: float) -> str:
    s = max(0.0, time.time() - ts)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


def demo(keep_alive: float = 3.0, host: str | None = None) -> int:
    """A cold call, warm calls, then the idle culler at work, with the times of each (on ``host``,
    a Jupyter Server with the fal_magic extension, if given; its token from $FAL_MAGIC_TOKEN)."""
    from . import isolated
    from .envs import make_spec
    from .kernel import get_pool

    requirements = ["humanize==4.16.0"]

    @isolated(keep_alive=keep_alive, requirements=requirements, host=host)
    def describe(n):
        import os

        import humanize  # type: ignore[import-not-found]  # in the function's environment only

        return os.getpid(), humanize.intword(n)

    cache = EnvCache(settings().home_path())
    built = host is None and (cache.path_for(make_spec(requirements).key) / "fal_magic-env.json").exists()
    where = f"server {host}" if host else f"cache {cache.home}"
    print(f"fal_magic demo: {where}; requirements {requirements}; keep_alive={keep_alive:g}s\n")

    t = time.perf_counter()
    pid, text = describe(12_345_678)
    cold = time.perf_counter() - t
    kind = "cached env, new kernel" if built else ("env on the server, new kernel" if host else "new env + new kernel")
    print(f"cold call ({kind}): {cold * 1000:8.1f} ms  -> {text!r} from kernel pid {pid}")
    warm = []
    for n in (10**6, 10**9, 10**12):
        t = time.perf_counter()
        same_pid, text = describe(n)
        warm.append(time.perf_counter() - t)
        print(f"warm call:                    {warm[-1] * 1000:8.1f} ms  -> {text!r} from kernel pid {same_pid}")
    [info] = [k for k in get_pool().snapshot() if k.pid == pid]
    print(f"\nkernel {pid} is idle, {info.calls} calls served; it will be culled in {info.seconds_left:.1f}s")
    t = time.perf_counter()
    while any(k.pid == pid for k in get_pool().snapshot()):
        time.sleep(0.05)
    print(f"culled after {time.perf_counter() - t:.1f}s idle; live kernels now: {len(get_pool().snapshot())}")

    t = time.perf_counter()
    new_pid, text = describe(42)
    again = time.perf_counter() - t
    print(f"\ncold call (cached env, new kernel): {again * 1000:8.1f} ms  -> {text!r} from kernel pid {new_pid}")
    pooled = host is None and settings().kernel_scope == "user"
    if not pooled:
        get_pool().shutdown()
    print("\nsummary:")
    print(f"  {'cold, ' + kind:<34} {cold * 1000:8.1f} ms")
    print(f"  {'cold, cached env':<34} {again * 1000:8.1f} ms")
    print(f"  {'warm (median of 3)':<34} {sorted(warm)[1] * 1000:8.1f} ms")
    if pooled:
        print(f"\nkernel {new_pid} stays warm for {keep_alive:g}s after this process ends (the user's pool): a "
              "demo run within that time finds it warm; 'python -m fal_magic kernels stop --all' ends it now")
    return 0


def envs_command(args: argparse.Namespace) -> int:
    """``envs list``, ``envs rm KEY``, ``envs prune``."""
    cache = EnvCache(settings().home_path())
    if args.action == "list":
        records = cache.records()
        if not records:
            print(f"no environments in {cache.envs_dir}")
            return 0
        total = sum(r.size_bytes for r in records)
        print(f"{len(records)} environment(s) in {cache.envs_dir}, {_human_size(total)} in all\n")
        print(f"{'KEY':<18}{'SIZE':>10}  {'LAST USED':<11} {'STATE':<8} {'FROM':<9} REQUIREMENTS")
        for r in records:
            state = "built" if r.built else "partial"
            origin = "lock" if r.locked else ("resolved" if r.built else "-")
            print(f"{r.key:<18}{_human_size(r.size_bytes):>10}  {_ago(r.last_used):<11} {state:<8} {origin:<9} "
                  f"{', '.join(r.requirements) or '-'}")
        return 0
    if args.action == "rm":
        status = 0
        for key in args.keys:
            matches = [r.key for r in cache.records() if r.key.startswith(key)]
            if len(matches) != 1:
                print(f"error: {key!r} matches {len(matches)} environments", file=sys.stderr)
                status = 1
                continue
            try:
                cache.remove(matches[0])
            except FalMagicError as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = 1
            else:
                print(f"removed {matches[0]}")
        return status
    sizes = {r.key: r.size_bytes for r in cache.records()}
    removed = cache.prune(args.older_than)
    freed = sum(sizes.get(key, 0) for key in removed)
    print(f"removed {len(removed)} environment(s)" + (f": {', '.join(removed)}" if removed else "")
          + (f" (freed {_human_size(freed)})" if removed else ""))
    return 0


def lock_command(args: argparse.Namespace) -> int:
    """``lock show FILE``: what a lock file holds, per environment; ``lock refresh FILE [REQ...]``:
    resolve its entries for this Python and platform again (those that name one of REQ, else all)."""
    from .envs import EnvCache, spec_for
    from .envs.indexes import own_settings, site_settings
    from .envs.lockfile import LockEntry, LockFile, host_platform
    from .envs.spec import host_python

    lock = LockFile(Path(args.file))
    if not lock.path.exists():
        print(f"error: no lock file at {lock.path}", file=sys.stderr)
        return 1
    entries = lock.entries()
    if args.action == "show":
        print(f"{lock.path}: {len(entries)} environment(s)")
        for e in entries:
            print(f"\n{', '.join(e.requirements) or '(no extra requirements)'}"
                  + (f"  (constraints: {', '.join(e.constraints)})" if e.constraints else ""))
            print(f"  {e.python} on {e.platform}, recorded {e.recorded or '?'} with {e.installer or '?'}: "
                  f"{len(e.packages)} packages")
            for package in e.packages:
                print(f"    {package}")
        return 0
    wanted = {_name(r) for r in args.requirements}
    chosen = [e for e in entries if not wanted or wanted & {_name(r) for r in e.requirements}]
    if not chosen:
        print(f"error: no entry in {lock.path} names {', '.join(sorted(wanted))}", file=sys.stderr)
        return 1
    cfg = settings()
    cache = EnvCache(cfg.home_path(), cfg.installer, prefer_cached=False)  # (today's index, not the cache)
    sources = site_settings(own_settings(cfg.index_url, cfg.extra_index_urls, cfg.find_links))
    status = 0
    for e in chosen:
        if (e.python, e.platform) != (host_python(), host_platform()):
            print(f"skipped {', '.join(e.requirements)}: recorded for {e.python} on {e.platform}, "
                  f"this is {host_python()} on {host_platform()}")
            continue
        try:
            spec = spec_for(list(e.requirements), constraints=e.constraints).resolved(sources)
            packages = cache.resolve(spec)
        except FalMagicError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        lock.record(LockEntry(e.requirements, e.constraints, e.python, e.platform,
                              installer=cache.installer_name(), packages=tuple(packages)))
        before, after = set(e.packages), set(lock.find(e.identity).packages)  # type: ignore[union-attr]
        change = (f"{len(after - before)} changed or added, {len(before - after)} gone" if before != after
                  else "unchanged")
        print(f"refreshed {', '.join(e.requirements)}: {change}")
        for line in sorted(before - after):
            print(f"  - {line}")
        for line in sorted(after - before):
            print(f"  + {line}")
    return status


def _name(requirement: str) -> str:
    """The canonical project name in a requirement (the text itself if it is not one)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        return canonicalize_name(Requirement(requirement).name)
    except InvalidRequirement:
        return requirement


def build_command(args: argparse.Namespace) -> int:
    """``envs build``: build an environment here for a server that starts kernels on this host; JSON
    lines of progress, then where its Python and kernel launcher are (or the error)."""
    from .envs.spec import EnvSpec, host_python, make_spec
    from .server.launcher import assemble_launcher

    def say(event: dict) -> None:
        print(json.dumps(event), flush=True)

    try:
        if args.python != host_python():
            raise FalMagicError(f"this host runs {host_python()}, the server {args.python}")
        spec = EnvSpec(requirements=make_spec(args.requirements).requirements, python=args.python,
                       cloudpickle=args.cloudpickle)
        cache = EnvCache(settings().home_path())
        env = cache.get(spec, lambda line: say({"progress": line}))
        launcher = assemble_launcher(env.path)
    except FalMagicError as exc:
        say({"error": str(exc), "type": type(exc).__name__})
        return 1
    say({"python": str(env.python), "launcher": str(launcher)})
    return 0


def kernels_command(args: argparse.Namespace) -> int:
    """``kernels``: the warm kernels of the user's pool on this machine (under the home), which
    process holds each; ``kernels stop KEY... | --all`` stops them, whichever process started them."""
    from . import configure, kernels, shutdown

    configure(kernel_scope="user")
    if args.action is None:
        print(kernels())
        return 0
    if not args.keys and not args.all:
        print("error: name the kernels to stop (a key, or a key prefix), or --all", file=sys.stderr)
        return 2
    stopped = shutdown(None if args.all else list(args.keys))
    print(f"stopped {len(stopped)} kernel{'s' if len(stopped) != 1 else ''}"
          + (f": {', '.join(stopped)}" if stopped else ""))
    return 0


DESCRIPTION = """\
fal_magic runs Python functions and notebook cells in isolated, warm Jupyter kernels.

  python -m fal_magic demo             a cold call, warm calls, then the idle culler
  python -m fal_magic envs list        the cached environments
  python -m fal_magic envs rm KEY      remove one (not while a kernel uses it)
  python -m fal_magic envs prune       remove unfinished builds and long-unused environments
  python -m fal_magic kernels          the warm kernels of the user's pool, and who holds each
  python -m fal_magic kernels stop KEY|--all
                                       stop them, whichever process started them
  python -m fal_magic lock show FILE   what a lock file holds, per environment
  python -m fal_magic lock refresh FILE [REQUIREMENT ...]
                                       resolve its entries again (those naming a requirement, else all)

The environment cache is $FAL_MAGIC_HOME/envs (default: the user cache directory)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fal_magic", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="show a cold call, warm calls and the idle culler")
    p_demo.add_argument("--keep-alive", type=float, default=3.0, help="seconds (default 3)")
    p_demo.add_argument("--host", default=None, metavar="URL",
                        help="run on a Jupyter Server with the fal_magic extension (token: $FAL_MAGIC_TOKEN)")
    p_envs = sub.add_parser("envs", help="inspect or prune the environment cache")
    envs_sub = p_envs.add_subparsers(dest="action", required=True)
    envs_sub.add_parser("list", help="list cached environments")
    p_rm = envs_sub.add_parser("rm", help="remove environments (not while in use)")
    p_rm.add_argument("keys", nargs="+", metavar="KEY", help="a key or unique key prefix")
    p_prune = envs_sub.add_parser("prune", help="remove unfinished builds and unused environments")
    p_prune.add_argument("--older-than", type=float, default=30.0, metavar="DAYS",
                         help="remove environments unused for this many days (default 30)")
    p_build = envs_sub.add_parser("build", help="build an environment for kernels a server starts on this host "
                                                "(JSON lines; used by the server over SSH)")
    p_build.add_argument("--python", required=True, help="the server's Python, e.g. cpython-3.11")
    p_build.add_argument("--cloudpickle", required=True, help="the exact cloudpickle version")
    p_build.add_argument("requirements", nargs="*", metavar="REQUIREMENT")
    p_kernels = sub.add_parser("kernels", help="list or stop the warm kernels of the user's pool")
    kernels_sub = p_kernels.add_subparsers(dest="action")
    p_stop = kernels_sub.add_parser("stop", help="stop kernels of the pool (any process's)")
    p_stop.add_argument("keys", nargs="*", metavar="KEY", help="a key or key prefix")
    p_stop.add_argument("--all", action="store_true", help="every kernel of the pool")
    p_lock = sub.add_parser("lock", help="show or refresh a lock file (FalMagic.lock)")
    lock_sub = p_lock.add_subparsers(dest="action", required=True)
    p_show = lock_sub.add_parser("show", help="what the lock file holds, per environment")
    p_show.add_argument("file", metavar="FILE")
    p_refresh = lock_sub.add_parser("refresh", help="resolve entries again and rewrite them")
    p_refresh.add_argument("file", metavar="FILE")
    p_refresh.add_argument("requirements", nargs="*", metavar="REQUIREMENT",
                           help="refresh the entries whose requirements name one of these (default: all)")
    args = parser.parse_args(argv)
    commands = {"demo": lambda: demo(args.keep_alive, args.host), "kernels": lambda: kernels_command(args),
                "lock": lambda: lock_command(args)}
    if args.command in commands:
        try:
            return commands[args.command]()
        except FalMagicError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.action == "build":
        return build_command(args)
    return envs_command(args)


if __name__ == "__main__":
    sys.exit(main())
