"""Code written for fal_serverless runs with only its import line changed (SPEC section 10)."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import pytest

from fal_magic import FalMagicError, cached, isolated
from fal_magic import decorator as decorator_module
from fal_magic.kernel import get_pool

from .conftest import wait_until


# -- in the style of fal_serverless's documented examples ----------------------------------------


@isolated()
def hello_world():
    return "hello world"


@isolated(requirements=["pyjokes==0.8.3"])
def get_joke():
    import pyjokes

    return pyjokes.get_joke()


@cached
def load_model():
    """Expensive set-up, done once per warm kernel."""
    import os
    import time

    time.sleep(0.5)
    return {"loaded_at": time.time(), "pid": os.getpid()}


@isolated(keep_alive=30)
def predict(x):
    model = load_model()
    return model["loaded_at"], model["pid"], x * 2


@cached
def scaled(x, factor=1):
    import random

    return x * factor, random.random()


@isolated(keep_alive=30)
def use_scaled(x, factor):
    return scaled(x, factor=factor)


def test_hello_world():
    assert hello_world() == "hello world"


def test_requirements():
    assert importlib.util.find_spec("pyjokes") is None
    joke = get_joke()
    assert isinstance(joke, str) and len(joke) > 10


def test_cached_function_runs_once_per_warm_kernel():
    first_loaded, pid, y = predict(1)
    assert y == 2
    for x in range(2, 5):
        loaded, same_pid, y = predict(x)
        assert (loaded, same_pid, y) == (first_loaded, pid, x * 2)  # the stored model, not a new one


def test_cached_results_are_per_arguments():
    a1 = use_scaled(3, 2)
    assert a1[0] == 6
    assert use_scaled(3, 2) == a1  # same arguments: the stored result
    b = use_scaled(3, 5)
    assert b[0] == 15 and b[1] != a1[1]


def test_the_cache_dies_with_the_kernel():
    short = predict.on(keep_alive=0.5)
    first_loaded, pid, _ = short(1)
    assert wait_until(lambda: get_pool().snapshot() == [], timeout=10)
    loaded, new_pid, _ = short(1)
    assert new_pid != pid and loaded != first_loaded


def test_cached_outside_isolated_caches_in_the_host():
    before = load_model()
    assert load_model() is before and before["pid"] == os.getpid()


def test_keep_alive_example():
    @isolated(keep_alive=2)
    def pid():
        import os

        return os.getpid()

    first = pid()
    assert pid() == first  # warm within keep_alive
    [info] = get_pool().snapshot()
    assert 0 < info.seconds_left <= 2
    assert wait_until(lambda: not get_pool().snapshot(), timeout=20)  # culled once keep_alive passed
    assert pid() != first


# -- the edge cases --------------------------------------------------------------------------------


def test_kind_first_and_unsupported_kinds():
    @isolated("virtualenv", requirements=[])
    def ok():
        return "ok"

    assert ok() == "ok"
    with pytest.raises(FalMagicError, match="kind='conda' is not supported.* Use kind='virtualenv'"):
        isolated("conda", requirements=["numpy"])
    with pytest.raises(FalMagicError, match="'kubernetes' is not supported here; supported: virtualenv"):
        isolated("kubernetes")


def test_fal_python_version_runs_on_that_python():
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.13"

    @isolated("virtualenv", python_version=other, keep_alive=30)
    def version():
        import sys

        return "%d.%d" % sys.version_info[:2]

    assert version() == other


def test_machine_type_is_recorded_and_warned_about_once(monkeypatch):
    monkeypatch.setattr(decorator_module, "_machine_type_warned", False)
    with pytest.warns(UserWarning, match="machine_type='M' is recorded .* but not enforced"):
        @isolated(machine_type="M")
        def on_m():
            return 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @isolated(machine_type="XL")
        def on_xl():
            return 2

    assert on_m() == 1
    assert [k.machine_type for k in get_pool().snapshot()] == ["M"]


# -- nested isolated calls: the host brokers them -----------------------------------------------


@isolated(keep_alive=30, requirements=["humanize==4.16.0"])
def inner_humanize(n):
    import os

    import humanize

    print("inner says hello")
    if n < 0:
        raise ValueError(f"negative: {n}")
    return humanize.intcomma(n), os.getpid()


@isolated(keep_alive=30, requirements=["pyjokes==0.8.3"])
def outer_jokes(n):
    import importlib.util
    import os

    text, inner_pid = inner_humanize(n)
    return text, inner_pid, os.getpid(), importlib.util.find_spec("humanize") is not None


def test_nested_call_runs_in_its_own_environment_and_kernel(capsys):
    text, inner_pid, outer_pid, outer_has_humanize = outer_jokes(10**6)
    assert text == "1,000,000"
    assert inner_pid != outer_pid and not outer_has_humanize
    assert "inner says hello" in capsys.readouterr().out  # the inner call's output reaches the caller
    assert {k.requirements for k in get_pool().snapshot()} == {("humanize==4.16.0",), ("pyjokes==0.8.3",)}


def test_nested_call_exceptions_surface_with_their_type():
    with pytest.raises(ValueError, match="negative: -1") as info:
        outer_jokes(-1)
    assert "raise ValueError" in "\n".join(info.value.__notes__)


def test_a_cycle_of_nested_calls_is_a_clear_error_not_a_hang():
    @isolated(keep_alive=30)
    def recurse(n):
        return recurse(n + 1)

    with pytest.raises(FalMagicError, match="cycle"):
        recurse(0)


@isolated(keep_alive=30, max_kernels=2)
def same_key_inner():
    import os

    return os.getpid()


@isolated(keep_alive=30, env={"WHO": "other"})
def other_env_inner():
    import os

    return os.getpid()


@isolated(keep_alive=30, max_kernels=2)
def same_key_outer():
    import os

    return os.getpid(), same_key_inner(), other_env_inner()


def test_a_nested_call_of_the_same_requirements_runs_on_another_kernel_when_there_is_room():
    """Not a cycle: the inner call may use a kernel the outer one does not hold (max_kernels=2), and
    one with other environment variables is another kernel altogether."""
    outer, inner, other = same_key_outer()
    assert len({outer, inner, other}) == 3


@isolated(keep_alive=30)
def ping(n):
    return pong(n)


@isolated(keep_alive=30, requirements=["pyjokes==0.8.3"])
def pong(n):
    return ping(n)  # environment A -> B -> A, while A waits for B: a cycle


def test_a_cycle_across_two_environments_is_a_clear_error():
    with pytest.raises(FalMagicError, match="cycle"):
        ping(1)


def test_cached_closures_of_one_factory_keep_their_own_results():
    def make(n, offset=0):
        @cached
        def value():
            return n + offset

        return value

    assert (make(1)(), make(2)(), make(1, offset=10)()) == (1, 2, 11)  # in the host

    @isolated(keep_alive=30)
    def in_kernel():
        return make(1)(), make(2)(), make(1)(), make(1, offset=10)()

    assert in_kernel() == (1, 2, 1, 11)
