"""@isolated end to end: real virtualenvs, real installs, real kernels."""
from __future__ import annotations

import glob
import importlib.util
import inspect
import os
import re
import sys
import threading
import time

import pytest

import fal_magic
from fal_magic import (
    EnvironmentBuildError,
    FalMagicError,
    KernelDiedError,
    RemoteError,
    SerializationError,
    isolated,
    kernels,
)
from fal_magic.kernel import get_pool

from .kernel_side import mapped_file
from .conftest import pid_alive, wait_until

SCALE = 7  # a module-level global that functions below use


def helper(x):
    """A module-level helper: travels with the functions that use it."""
    return x * SCALE


def in_shared_memory(array) -> bool:
    return mapped_file(array) is not None


class Point:
    """A class defined in the test module: instances cross both ways."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class CustomError(Exception):
    pass


@isolated(keep_alive=300)
def get_two():
    return 1 + 1


@isolated(keep_alive=30)
def whoami():
    return os.getpid()


@isolated(keep_alive=30, requirements=["humanize==4.16.0"])
def nice(n):
    import humanize  # not installed where the tests run

    return humanize.intcomma(n)


def test_humanize_is_not_on_the_host():
    assert importlib.util.find_spec("humanize") is None


def test_seed_examples():
    assert get_two() == 2
    assert get_two() == 2
    assert nice(10**6) == "1,000,000"


def test_the_kernel_runs_the_environments_python_not_the_hosts():
    @isolated
    def where():
        import sys

        return sys.prefix, sys.version_info[:2]

    prefix, version = where()
    assert prefix != sys.prefix
    assert prefix.startswith(os.environ["FAL_MAGIC_HOME"])
    assert tuple(version) == sys.version_info[:2]


def test_two_pins_of_one_package_side_by_side():
    @isolated(requirements=["humanize==4.15.0"])
    def old_version():
        from importlib.metadata import version

        return version("humanize")

    @isolated(requirements=["humanize==4.16.0"])
    def new_version():
        from importlib.metadata import version

        return version("humanize")

    assert old_version() == "4.15.0"
    assert new_version() == "4.16.0"
    assert old_version() == "4.15.0"
    assert len({k.key for k in get_pool().snapshot()}) == 2


def test_closures_module_helpers_and_classes_travel():
    offset = 5

    @isolated
    def compute(p: Point):
        return Point(helper(p.x) + offset, p.y)

    result = compute(Point(2, "y"))
    assert isinstance(result, Point)
    assert (result.x, result.y) == (2 * SCALE + 5, "y")


def test_arguments_and_keyword_arguments_cross():
    @isolated
    def combine(a, b=1, *rest, c, **extra):
        return a, b, rest, c, extra

    assert combine(1, 2, 3, c=4, d=5) == (1, 2, (3,), 4, {"d": 5})


def test_numpy_array_round_trip():
    np = pytest.importorskip("numpy")

    @isolated(requirements=["numpy"])
    def double(a):
        a *= 2  # in place: received arrays are writable
        return a

    arr = np.arange(1_000_000, dtype=np.float64)
    out = double(arr)
    assert out.dtype == arr.dtype and (out == arr * 2).all()


def test_large_arrays_cross_through_shared_memory_and_stay_private_to_each_side():
    np = pytest.importorskip("numpy")
    from fal_magic_inside.shm import SHM_MIN

    @isolated(keep_alive=30, requirements=["numpy"])
    def keep(a):
        import sys

        sys.fal_kept = a  # the kernel holds on to its argument
        return a

    @isolated(keep_alive=30, requirements=["numpy"])
    def mapped_from_shared_memory(a):
        return in_shared_memory(a)

    @isolated(keep_alive=30, requirements=["numpy"])
    def kept_ends():
        import sys

        return float(sys.fal_kept[0]), float(sys.fal_kept[-1])

    @isolated(keep_alive=30, requirements=["numpy"])
    def double_in_place(a):
        a *= 2
        return a

    arr = np.ones(2 * SHM_MIN // 8)
    assert mapped_from_shared_memory(arr) is True
    back = keep(arr)
    back[0], back[-1] = 99, 7  # the host's result is its own memory, not the kernel's
    assert kept_ends() == (1.0, 1.0)
    doubled = double_in_place(arr)
    assert doubled.flags.writeable and (doubled == 2).all() and (arr == 1).all()
    get_pool().shutdown()
    left = [p for d in glob.glob(f"/dev/shm/fal_magic-{os.getpid()}-*") for p in os.listdir(d)]
    assert left == []  # the segments of both sides went with the kernel
    assert (back[0], back[-1], doubled[1]) == (99, 7, 2)  # and what the host holds stays valid


def test_shared_memory_is_reused_once_the_other_side_lets_go_and_never_before():
    np = pytest.importorskip("numpy")
    from fal_magic_inside.shm import SHM_MIN

    @isolated(keep_alive=30, requirements=["numpy"])
    def segment_of(a, keep=False):
        import sys

        if keep:
            sys.fal_kept = a
        return mapped_file(a)

    @isolated(keep_alive=30, requirements=["numpy"])
    def kept_sum():
        import sys

        return float(sys.fal_kept.sum())

    @isolated(keep_alive=30, requirements=["numpy"])
    def filled(n, value):
        import numpy as np

        return np.full(n, value)

    n = 2 * SHM_MIN // 8
    first = segment_of(np.ones(n))
    assert first is not None and segment_of(np.ones(n)) == first  # the host wrote into the same pages
    assert segment_of(np.ones(n), keep=True) == first  # this time the kernel keeps the array
    assert segment_of(np.full(n, 2.0)) != first  # so the next argument goes elsewhere
    assert kept_sum() == n  # and the kept array was not written over

    r1 = filled(n, 1.0)
    assert mapped_file(r1) is not None
    r2 = filled(n, 2.0)
    assert mapped_file(r2) != mapped_file(r1) and (r1 == 1).all()  # r1 is still used here
    released = mapped_file(r1)
    del r1
    r3 = filled(n, 3.0)
    assert mapped_file(r3) == released and (r2 == 2).all() and (r3 == 3).all()  # r1's pages, reused


def test_large_arrays_still_cross_when_shared_memory_cannot_be_written():
    np = pytest.importorskip("numpy")
    import resource
    import signal

    from fal_magic_inside.shm import SHM_MIN

    @isolated(keep_alive=30, requirements=["numpy"])
    def limit_file_size(limit):
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too large write then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    @isolated(keep_alive=30, requirements=["numpy"])
    def plus_one(a):
        return a + 1, in_shared_memory(a)

    arr = np.arange(2 * SHM_MIN // 8, dtype=np.float64)
    limit_file_size(2**20)  # as if the kernel's /dev/shm were full
    saved_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))  # and the host's
    try:
        out, shm = plus_one(arr)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, saved_handler)
    assert np.array_equal(out, arr + 1)
    assert shm is False  # it came inline: shared memory could not take it


def test_wraps_keeps_name_doc_signature_and_func():
    def area(width: float, height: float = 1.0) -> float:
        """Area of a rectangle."""
        return width * height

    f = isolated(keep_alive=1)(area)
    assert f.__name__ == "area"
    assert f.__doc__ == "Area of a rectangle."
    assert inspect.signature(f) == inspect.signature(area)
    assert f.func is area
    assert f(2, 3) == 6


def test_on_returns_a_copy_with_changed_options():
    g = whoami.on(keep_alive=0)
    assert g.keep_alive == 0 and whoami.keep_alive == 30
    assert g.spec == whoami.spec
    with pytest.raises(FalMagicError, match="unknown option"):
        whoami.on(keepalive=3)


def test_decorator_forms():
    @isolated
    def bare():
        return "bare"

    @isolated()
    def empty():
        return "empty"

    @isolated("virtualenv", requirements=[], keep_alive=1)
    def kind_first():
        return "kind"

    assert (bare(), empty(), kind_first()) == ("bare", "empty", "kind")


def test_bad_options_are_clear_errors():
    with pytest.raises(FalMagicError, match="kind 'docker' is not supported.*virtualenv"):
        isolated("docker")
    with pytest.raises(FalMagicError, match="keep_alive"):
        isolated(keep_alive=-1)
    with pytest.raises(FalMagicError, match="max_kernels"):
        isolated(max_kernels=0)
    with pytest.raises(EnvironmentBuildError, match="invalid requirement 'numpy>>1'"):
        isolated(requirements=["numpy>>1"])


# -- exceptions -----------------------------------------------------------------------------


def test_chained_exceptions_keep_their_chain():
    @isolated
    def chained():
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("explicit") from exc

    @isolated
    def implicit():
        try:
            1 / 0
        except ZeroDivisionError:
            raise RuntimeError("during handling")

    with pytest.raises(ValueError, match="explicit") as info:
        chained()
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RuntimeError) as info:
        implicit()
    assert isinstance(info.value.__context__, ZeroDivisionError)


def test_exception_class_that_exists_only_in_the_env_is_a_remote_error():
    @isolated
    def raise_env_only():
        import sys
        import types

        mod = types.ModuleType("env_only_errors")
        exec("class EnvOnlyError(Exception):\n    pass", mod.__dict__)
        sys.modules["env_only_errors"] = mod
        raise mod.EnvOnlyError("only in the env")

    with pytest.raises(RemoteError) as info:
        raise_env_only()
    err = info.value
    assert err.type_name == "env_only_errors.EnvOnlyError"
    assert err.remote_message == "only in the env"
    assert "raise mod.EnvOnlyError" in err.traceback_text
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err._render_traceback_()))
    assert "env_only_errors.EnvOnlyError: only in the env" in shown and 'raise mod.EnvOnlyError("only' in shown


def test_module_not_found_hints_at_requirements():
    @isolated(requirements=["humanize==4.16.0"])
    def needs_tabulate():
        import tabulate  # noqa: F401

    with pytest.raises(ModuleNotFoundError) as info:
        needs_tabulate()
    notes = "\n".join(info.value.__notes__)
    assert "'tabulate' is not installed in the isolated environment" in notes
    assert "humanize==4.16.0" in notes


def test_an_argument_whose_module_the_environment_lacks_gets_the_hint_without_fal_magic_frames():
    np = pytest.importorskip("numpy")

    @isolated(keep_alive=30)
    def length(a):
        return len(a)

    with pytest.raises(ModuleNotFoundError) as info:
        length(np.arange(3))  # unpickling the argument needs numpy, which the environment does not have
    notes = "\n".join(info.value.__notes__)
    assert "'numpy' is not installed in the isolated environment" in notes
    assert "fal_magic" not in notes and "runtime" not in notes  # the kernel's frames, none of them ours
    assert "fal_magic" not in "\n".join(info.value._render_traceback_())


# -- serialization ---------------------------------------------------------------------------


def test_unpicklable_argument_names_it_and_starts_nothing():
    lock = threading.Lock()

    @isolated
    def use(thing):
        return thing

    with pytest.raises(SerializationError, match=r"argument 'thing' of .*use\(\), of type _thread.lock"):
        use(lock)
    with pytest.raises(SerializationError, match="keyword argument 'thing'.*generator"):
        use(thing=(i for i in range(3)))
    assert get_pool().snapshot() == []


def test_unpicklable_closure_names_the_variable():
    lock = threading.Lock()

    @isolated
    def uses_lock():
        return lock.locked()

    with pytest.raises(SerializationError, match="uses 'lock' from an enclosing scope, of type _thread.lock"):
        uses_lock()
    assert get_pool().snapshot() == []


def test_unpicklable_result_is_a_serialization_error_and_the_kernel_stays():
    @isolated(keep_alive=30)
    def make_generator():
        import os

        return (os.getpid() for _ in range(1))

    @isolated(keep_alive=30)
    def pid():
        import os

        return os.getpid()

    before = pid()
    with pytest.raises(SerializationError, match="result, of type generator, cannot be pickled"):
        make_generator()
    assert pid() == before
    assert len(get_pool().snapshot()) == 1


def test_result_whose_class_exists_only_in_the_env():
    @isolated(keep_alive=30)
    def env_only_result():
        import sys
        import types

        mod = types.ModuleType("env_only_values")
        exec("class Thing:\n    pass", mod.__dict__)
        sys.modules["env_only_values"] = mod
        return mod.Thing()

    with pytest.raises(SerializationError, match="env_only_values.Thing, cannot be unpickled here"):
        env_only_result()
    assert get_pool().snapshot()[0].state == "idle"


# -- output ---------------------------------------------------------------------------------


class _WatchedStream:
    """A stream that keeps what is written and touches ``marker`` once ``trigger`` arrives."""

    def __init__(self, trigger: str, marker) -> None:
        self.parts: list[str] = []
        self.trigger, self.marker = trigger, marker

    def write(self, text):
        self.parts.append(text)
        if self.trigger in text:
            self.marker.touch()

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


def test_prints_stream_to_the_caller_while_the_function_runs(monkeypatch, tmp_path):
    marker = tmp_path / "first-line-arrived"
    out, err = _WatchedStream("first line", marker), _WatchedStream("never", tmp_path / "unused")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)

    @isolated
    def chatty(marker):
        import os
        import sys
        import time

        print("first line", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        for _ in range(1200):  # the host touches the marker when it has shown the first line
            if os.path.exists(marker):
                print("last line")
                return "streamed"
            time.sleep(0.05)
        return "the first line reached the caller only after the call"

    assert chatty(str(marker)) == "streamed"
    assert out.text() == "first line\nlast line\n"
    assert "to stderr" in err.text() and "first line" not in err.text()


# -- kernels dying, interrupts, threads -------------------------------------------------------


def test_kernel_death_raises_and_the_next_call_gets_a_fresh_kernel():
    @isolated(keep_alive=30)
    def pid():
        import os

        return os.getpid()

    @isolated(keep_alive=30)
    def die():
        import os
        import sys

        print("about to exit", file=sys.__stderr__, flush=True)
        os._exit(3)

    before = pid()
    started = time.monotonic()
    with pytest.raises(KernelDiedError, match="exited with code 3") as info:
        die()
    assert time.monotonic() - started < 30
    assert info.value.exit_code == 3
    assert "about to exit" in info.value.stderr_tail
    after = pid()
    assert after != before and pid_alive(after) and not pid_alive(before)


def test_threads_share_a_key_safely():
    @isolated(keep_alive=30)
    def square(x):
        return x * x

    results = {}

    def worker(n):
        results[n] = [square(n * 100 + i) for i in range(10)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {n: [(n * 100 + i) ** 2 for i in range(10)] for n in range(4)}
    assert len(get_pool().snapshot()) == 1  # max_kernels=1: calls queued on one kernel


def test_submit_and_map_over_two_kernels():
    @isolated(keep_alive=30, max_kernels=2)
    def slow_pid(x):
        import os
        import time

        time.sleep(0.3)
        return x, os.getpid()

    fut = slow_pid.submit(1)
    assert fut.result(timeout=120)[0] == 1
    out = list(slow_pid.map(range(8)))
    assert [x for x, _ in out] == list(range(8))
    assert len({p for _, p in out}) == 2


def test_warmup_starts_the_kernel_without_calling():
    @isolated(keep_alive=30)
    def pid():
        import os

        return os.getpid()

    pid.warmup().result(timeout=120)
    [info] = get_pool().snapshot()
    assert info.state == "idle" and info.calls == 0
    assert pid() == info.pid


SEES_THE_OTHERS = """
import os, pathlib, time
starting = pathlib.Path(os.environ["STARTING"])
(starting / str(os.getpid())).touch()
deadline = time.monotonic() + 20
while len(list(starting.iterdir())) < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
(starting.parent / f"saw-{os.getpid()}").write_text(str(len(list(starting.iterdir()))))
"""


def test_warmup_starts_every_kernel_at_once(tmp_path):
    """Each of three kernels, while it starts, waits (up to 20 s) until all three have begun starting:
    started one after another, the first would see only itself."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SEES_THE_OTHERS)
    (tmp_path / "starting").mkdir()
    fal_magic.configure(fork_kernels=False, kernel_start_timeout=120)  # (a forked kernel runs no sitecustomize)

    @isolated(keep_alive=30, max_kernels=3, env={"PYTHONPATH": str(site), "STARTING": str(tmp_path / "starting")})
    def pid():
        import os

        return os.getpid()

    pid.warmup().result(timeout=120)
    kernels = get_pool().snapshot()
    assert len(kernels) == 3 and all(k.state == "idle" for k in kernels)
    assert sorted(p.read_text() for p in tmp_path.glob("saw-*")) == ["3", "3", "3"]


def test_public_names():
    from fal_magic import (AuthenticationError, EnvironmentBuildError, KernelStartError, cached, configure,
                           kernels)

    for error in (AuthenticationError, EnvironmentBuildError, KernelDiedError, KernelStartError, RemoteError,
                  SerializationError):
        assert issubclass(error, FalMagicError) and error.__module__ == "fal_magic.errors"
    assert callable(isolated) and callable(configure) and callable(kernels) and callable(cached)
    assert set(fal_magic.__all__) >= {"isolated", "cached", "configure", "kernels", "FalMagicError",
                                      "AuthenticationError"}


def test_shutting_down_a_busy_kernel_fails_its_call_saying_why():
    @isolated(keep_alive=30)
    def slow():
        import time

        time.sleep(60)

    future = slow.submit()
    assert wait_until(lambda: [k.state for k in get_pool().snapshot()] == ["busy"], timeout=120)
    assert len(fal_magic.shutdown()) == 1
    with pytest.raises(KernelDiedError, match="shut down while this call ran"):
        future.result(timeout=30)


def test_the_default_keep_alive_and_configure():
    @isolated
    def one():
        return 1

    one()
    [info] = get_pool().snapshot()
    assert 0 < info.seconds_left <= 10  # fal's default
    get_pool().shutdown()
    fal_magic.configure(default_keep_alive=600)
    one()
    [info] = get_pool().snapshot()
    assert 590 < info.seconds_left <= 600


@pytest.mark.slow
def test_the_pip_installer_builds_an_environment(tmp_path):
    import json

    fal_magic.configure(installer="pip", home=str(tmp_path / "home"))

    @isolated(keep_alive=0, requirements=["humanize==4.16.0"])
    def nice(n):
        import humanize

        return humanize.intcomma(n)

    assert nice(10**6) == "1,000,000"
    [marker] = (tmp_path / "home" / "envs").glob("*/fal_magic-env.json")
    assert json.loads(marker.read_text())["installer"] == "pip"


def test_environment_variables_reach_the_kernel_and_are_never_shown(monkeypatch, caplog):
    import logging

    secret = "sk-test-0123456789"
    caplog.set_level(logging.DEBUG, logger="fal_magic")

    @isolated(keep_alive=30, env={"FAL_TEST_TOKEN": secret})
    def token():
        import os

        return os.environ.get("FAL_TEST_TOKEN"), os.getpid()

    value, first = token()
    assert value == secret
    other_value, other = token.on(env={"FAL_TEST_TOKEN": "another"})()
    assert other_value == "another" and other != first  # other values: another kernel
    assert token()[1] == first  # the same values: the same warm kernel
    fal_magic.configure(kernel_env={"FAL_TEST_DEFAULT": "from-config"})

    @isolated(keep_alive=30)
    def default():
        import os

        return os.environ.get("FAL_TEST_DEFAULT")

    assert default() == "from-config"
    shown = kernels().text() + kernels()._repr_html_() + repr(token) + caplog.text
    shown += "".join(repr(k) for k in kernels())
    assert secret not in shown and "another" not in shown and "from-config" not in shown
    with pytest.raises(FalMagicError, match="need a name without '=' and a string value: A=B") as info:
        isolated(env={"A=B": "x"})
    assert "x" not in str(info.value).split(":")[-1]
    with pytest.raises(FalMagicError, match="env must be a dict"):
        isolated(env=["FAL_TEST_TOKEN"])
