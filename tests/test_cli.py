"""``python -m fal_magic envs ...`` on a temporary cache, and the demo."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from fal_magic.envs import EnvCache, make_spec


def cli(home, *args, timeout=300):
    env = dict(os.environ, FAL_MAGIC_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "fal_magic", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_envs_list_rm_and_prune(tmp_path):
    home = tmp_path / "home"
    assert "no environments" in cli(home, "envs", "list").stdout
    cache = EnvCache(home)
    spec = make_spec([])
    cache.get(spec)
    cache.release(spec.key)
    (home / "envs" / "deadbeefdeadbeef" / "bin").mkdir(parents=True)  # remains of a killed build

    listing = cli(home, "envs", "list").stdout
    assert listing.startswith(f"2 environment(s) in {home / 'envs'}, ") and "in all" in listing
    assert spec.key in listing and "built" in listing and "partial" in listing and "MiB" in listing

    pruned = cli(home, "envs", "prune", "--older-than", "1")
    assert pruned.returncode == 0 and "removed 1 environment(s): deadbeefdeadbeef" in pruned.stdout
    assert spec.key in cli(home, "envs", "list").stdout

    removed = cli(home, "envs", "rm", spec.key[:6])
    assert removed.returncode == 0 and f"removed {spec.key}" in removed.stdout
    assert "no environments" in cli(home, "envs", "list").stdout
    assert cli(home, "envs", "rm", "nope").returncode == 1


def test_rm_refuses_an_environment_another_process_uses(tmp_path):
    home = tmp_path / "home"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from fal_magic.envs import EnvCache, make_spec
            EnvCache({str(home)!r}).get(make_spec([]))
            print("holding", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        key = make_spec([]).key
        out = cli(home, "envs", "rm", key)
        assert out.returncode == 1 and "in use by another process" in out.stderr
        assert (home / "envs" / key).exists()
    finally:
        holder.communicate("", timeout=30)
    assert cli(home, "envs", "rm", make_spec([]).key).returncode == 0


def test_bad_cli_arguments_are_usage_errors(tmp_path):
    out = cli(tmp_path, "envs", "frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_demo_shows_cold_warm_and_cull(fal_home):
    out = cli(fal_home, "demo", "--keep-alive", "1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "cold call" in text and text.count("warm call:") == 3
    assert "culled after" in text and "live kernels now: 0" in text


def test_prune_by_age_skips_recent_environments_and_those_in_use(tmp_path):
    import os
    import time

    from fal_magic.envs.cache import LAST_USED

    home = tmp_path / "home"
    cache = EnvCache(home)
    old, used, recent = make_spec(["humanize==4.16.0"]), make_spec([]), make_spec(["humanize==4.15.0"])
    for spec in (old, used, recent):
        cache.get(spec)
        cache.release(spec.key)
    cache.get(used)  # this process holds it (a live kernel would): another process must not remove it
    three_days_ago = time.time() - 3 * 86400
    for spec in (old, used):
        os.utime(home / "envs" / spec.key / LAST_USED, (three_days_ago, three_days_ago))
    try:
        pruned = cli(home, "envs", "prune", "--older-than", "2")
    finally:
        cache.release(used.key)
    assert pruned.returncode == 0 and pruned.stdout.startswith(f"removed 1 environment(s): {old.key} (freed ")
    assert "MiB)" in pruned.stdout
    left = cli(home, "envs", "list").stdout
    assert old.key not in left and used.key in left and recent.key in left


def test_help_names_the_commands_and_the_cache_variable():
    out = subprocess.run([sys.executable, "-m", "fal_magic", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "$FAL_MAGIC_HOME" in out.stdout and "envs prune" in out.stdout
    assert "``" not in out.stdout  # no reST markup
