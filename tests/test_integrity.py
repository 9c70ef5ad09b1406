"""No result is ever silently overwritten: what a call returns stays the caller's, whatever later
calls send or return, on local kernels (shared-memory segments reused between calls) and on a
server's kernels (blobs beside the websocket)."""
from __future__ import annotations

import gc

import pytest

from fal_magic import isolated

np = pytest.importorskip("numpy")

#: 50 MiB of float64: well above the sizes that travel through shared memory or blobs.
N = 50 * (1 << 20) // 8


@pytest.fixture(params=["local", "remote"])
def where(request: pytest.FixtureRequest) -> str:
    if request.param == "remote":
        request.getfixturevalue("remote")
    return request.param


@isolated(keep_alive=120, requirements=["numpy"])
def split(x):
    n = int(len(x) * 0.8)
    return {"train": x[:n], "test": x[n:]}


@isolated(keep_alive=120, requirements=["numpy"])
def echo(x):
    return x


@isolated(keep_alive=120, requirements=["numpy"])
def fresh(n, value):
    import numpy as np

    return np.full(n, value)


def test_a_kept_view_survives_when_its_sibling_view_is_dropped(where):
    d = split(np.arange(N, dtype=np.float64))
    train = d["train"]
    saved = train.copy()
    del d
    gc.collect()
    echo(np.zeros(N))
    split(np.zeros(N))
    assert np.array_equal(train, saved)


def test_kept_results_survive_many_calls_under_pressure(where):
    """Results kept, dropped and passed back in every pattern over many calls: each kept one keeps
    exactly what it had when it was returned."""
    rng = np.random.default_rng(7)
    n = 6 * (1 << 20)  # 48 MiB of float64: both views of a split are large enough for shared memory
    kept: list[tuple[object, float]] = []
    for i in range(24):
        pattern = i % 4
        if pattern == 0:
            result = echo(np.full(n, float(i)))
        elif pattern == 1:
            result = fresh(n, float(i))
        elif pattern == 2:
            parts = split(np.full(n, float(i)))
            result = parts["train"] if i % 8 == 2 else parts["test"]
            del parts
        else:  # a kept result goes back out as an argument, and its echo is kept too
            result = echo(kept[-1][0]) if kept else echo(np.full(n, float(i)))
        if pattern == 2 or rng.random() < 0.5:
            kept.append((result, float(result[0])))
        del result
        if len(kept) > 6:
            kept.pop(int(rng.integers(len(kept))))
        gc.collect()
        for array, value in kept:
            assert array[0] == value and array[-1] == value and array[len(array) // 2] == value


def test_two_whole_views_of_an_argument_come_back_as_they_were(where):
    @isolated(keep_alive=120, requirements=["numpy"])
    def twice(x):
        return x, x[:]  # two buffers over one argument's whole memory

    for keep in (0, 1):  # whichever of the two is dropped
        pair = list(twice(np.arange(N, dtype=np.float64)))
        kept = pair[keep]
        del pair
        gc.collect()
        echo(np.zeros(N))
        assert kept[1] == 1 and kept[-1] == N - 1
