"""``@isolated``: a function that runs in a warm kernel of its own environment.

The call path: pickle the call here (an unpicklable object fails before anything starts), lease a
kernel from the pool (building the environment once), run, forward outputs into the caller, rebuild
the result or the remote exception.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import numbers
import threading
import warnings
from dataclasses import asdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict

from fal_magic_inside.broker import isolated_proxy, register_runner
from fal_magic_inside.runtime import map_chunk

from . import debugging
from .config import settings
from .envs import EnvSpec, spec_for
from .envs.reqfile import Requirements
from .envs.spec import describe_requirements
from .errors import FalMagicError
from .kernel import get_pool
from .kernel.remote import check_url
from .platforms import after_fork_in_child
from .kernel.contract import Frames
from .kernel.request import Stop, stopping
from .kernel.by_source import dump_by_source
from .kernel.wire import code_files, dump_call, load_result, rebuild_exception, shipped_code
from .outputs import CallerOutput
from .progress import StatusLine

log = logging.getLogger("fal_magic")

SUPPORTED_KINDS = ("virtualenv",)


class Options(TypedDict):
    """An isolated function's options, as ``isolated()`` takes them (and as they travel with a nested call)."""

    kind: str
    requirements: tuple[str, ...]
    #: What requirements files added besides requirements (plain data: they travel into kernels).
    indexes: dict[str, Any] | None
    constraints: tuple[str, ...]
    keep_alive: float | None
    max_kernels: int
    machine_type: str | None
    host: str | None
    env: dict[str, str] | None
    python_version: str | None


_OPTION_NAMES = tuple(Options.__annotations__)

_machine_type_warned = False

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _forget_executor_in_child() -> None:
    """A forked child has none of its parent's threads: it makes its own executor when it needs one."""
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


after_fork_in_child(_forget_executor_in_child)


def _background() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for ``submit``, ``map`` and ``warmup``."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fal_magic")
        return _executor


class CallFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The Future of an isolated call started in the background. ``cancel()`` also stops a call that
    has begun: its kernel is interrupted (as by Ctrl-C) and stays warm for the next call. So the
    future counts as pending, never running, until it is done."""

    def __init__(self) -> None:
        super().__init__()
        self.stop = Stop()

    def cancel(self) -> bool:
        if not super().cancel():
            return False  # done already
        self.stop.set()
        return True


def _run_into(future: CallFuture, run: Callable[..., Any], *args: Any) -> None:
    """Serve ``future`` in a worker thread: ``run(*args)`` unless it was cancelled before it began."""
    if future.cancelled():
        return
    try:
        with stopping(future.stop):
            value = run(*args)
    except BaseException as exc:  # the call's own error, or the interrupt its cancel() asked for
        if not future.cancelled():
            future.set_exception(exc)
    else:
        try:
            future.set_result(value)
        except concurrent.futures.InvalidStateError:  # cancelled as it finished: nobody wants the value
            pass


def check_env(env: Any) -> dict[str, str] | None:
    """``env`` as a dict of variable names to values; FalMagicError (naming no value) otherwise."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise FalMagicError(f"env must be a dict of variable names to values, not {type(env).__name__}")
    bad = [str(k) for k, v in env.items()
           if not isinstance(k, str) or not k or "=" in k or "\0" in k or not isinstance(v, str) or "\0" in v]
    if bad:
        raise FalMagicError(f"env: these variables need a name without '=' and a string value: {', '.join(bad)}")
    return dict(env)


def _check_options(kind: str, keep_alive: float | None, max_kernels: int, host: str | None = None) -> None:
    if kind == "conda":
        raise FalMagicError("kind='conda' is not supported: fal_magic builds virtualenvs from PyPI-style indexes "
                            "(no conda channel). Use kind='virtualenv' with requirements=[...] for the packages, "
                            "and python_version='3.12' (say) for another Python")
    if kind not in SUPPORTED_KINDS:
        raise FalMagicError(f"environment kind {kind!r} is not supported here; supported: "
                            f"{', '.join(SUPPORTED_KINDS)}")
    if keep_alive is not None and (not isinstance(keep_alive, numbers.Real) or isinstance(keep_alive, bool)
                                   or keep_alive < 0):
        raise FalMagicError(f"keep_alive must be a number of seconds >= 0, not {keep_alive!r}")
    if not isinstance(max_kernels, int) or isinstance(max_kernels, bool) or max_kernels < 1:
        raise FalMagicError(f"max_kernels must be an integer >= 1, not {max_kernels!r}")
    if host is not None:
        if not isinstance(host, str):
            raise FalMagicError(f"host must be a Jupyter Server URL (a string), not {type(host).__name__}")
        if host:
            check_url(host, settings().allow_plain_http)


def _warn_machine_type(machine_type: str) -> None:
    """Say once per process that kernels on this machine record machine_type but cannot enforce it."""
    global _machine_type_warned
    if not _machine_type_warned:
        _machine_type_warned = True
        warnings.warn(f"machine_type={machine_type!r} is recorded (see fal_magic.kernels()) but not enforced: "
                      "kernels run on this machine", UserWarning, stacklevel=4)


class IsolatedFunction:
    """A function bound to an environment; calling it runs it in that environment's warm kernel."""

    def __init__(self, func: Callable[..., Any], *, kind: str = "virtualenv", requirements: Requirements = (),
                 keep_alive: float | None = None, max_kernels: int = 1, machine_type: str | None = None,
                 host: str | None = None, env: Mapping[str, str] | None = None,
                 indexes: dict[str, Any] | None = None, constraints: tuple[str, ...] = (),
                 python_version: str | None = None) -> None:
        if not callable(func):
            raise FalMagicError(f"@isolated decorates a function, not {type(func).__name__}")
        _check_options(kind, keep_alive, max_kernels, host)
        if machine_type is not None and not (settings().host if host is None else host):
            _warn_machine_type(machine_type)  # (a server with host groups enforces it)
        self.func = func
        self.spec: EnvSpec = spec_for(requirements, indexes, constraints, python_version or settings().python or None)
        self._options: Options = {"kind": kind, "requirements": self.spec.requirements,
                                  "indexes": None if self.spec.indexes.is_default else asdict(self.spec.indexes),
                                  "constraints": self.spec.constraints, "keep_alive": keep_alive,
                                  "max_kernels": max_kernels, "machine_type": machine_type, "host": host,
                                  "env": check_env(env), "python_version": python_version}
        functools.update_wrapper(self, func)

    @property
    def keep_alive(self) -> float:
        """Seconds the kernel stays warm after a call (the configured default when not given)."""
        value = self._options["keep_alive"]
        return float(settings().default_keep_alive) if value is None else float(value)

    @property
    def max_kernels(self) -> int:
        return self._options["max_kernels"]

    def __repr__(self) -> str:
        reqs = ", ".join(self.spec.requirements) or "no requirements"
        return f"<isolated function {self.func.__qualname__} [{reqs}] keep_alive={self.keep_alive:g}s>"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        """Support methods: ``obj.f(...)`` binds ``obj`` as the first argument."""
        if obj is None:
            return self
        return functools.partial(self.__call__, obj)

    def __reduce__(self) -> tuple[Any, ...]:
        """Travelling into a kernel (used by another isolated function), it becomes a proxy that asks
        the host to run it in its own environment; the kernel needs no fal_magic install."""
        return (isolated_proxy, (self.func, dict(self._options)))

    def on(self, **options: Any) -> "IsolatedFunction":
        """A copy with some options changed, e.g. ``f.on(keep_alive=0)``."""
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise FalMagicError(f"unknown option(s) {', '.join(unknown)}; options: {', '.join(_OPTION_NAMES)}")
        return IsolatedFunction(self.func, **{**self._options, **options})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # IPython shows the remote frames, not these
        return self._run(self._dump(args, kwargs))

    def _dump(self, args: Sequence[Any], kwargs: dict[str, Any], via: Callable[..., Any] | None = None) -> Frames:
        """The call's frames: cloudpickle on the host's own Python; on another, the function as source."""
        if self.spec.same_python:
            return dump_call(self.func, args, kwargs, via)
        return dump_by_source(self.func, args, kwargs, shipped_code(self.func), via)

    def _run(self, frames: Frames, sink: CallerOutput | None = None, status: StatusLine | None = None) -> Any:
        """One call through the pool; ``sink`` and ``status`` are made in the caller's context (a worker
        thread serving ``submit`` or ``map`` writes into the cell that started it)."""
        __tracebackhide__ = True
        status = status or self._status()
        try:
            reply = get_pool().call(self.spec, frames, sink or CallerOutput(), keep_alive=self.keep_alive,
                                    max_kernels=self.max_kernels, machine_type=self._options["machine_type"],
                                    host=self._options["host"], progress=status, env=self._options["env"])
        except BaseException:
            status.finish(ok=False)
            raise
        status.finish()
        try:
            return load_result(reply.content, reply.buffers, self.spec.requirements, self.func)
        except Exception as exc:
            debugging.tag(exc, reply.kernel_id, code_files(self.func))  # %debug then opens there
            raise

    def _status(self) -> StatusLine:
        return StatusLine(describe_requirements(self.spec.requirements))

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start a call in the background and return its Future (``asyncio.wrap_future`` makes it awaitable).

        The call is pickled now, so its arguments are taken as they are at this moment.
        """
        return self._start(self._dump(args, kwargs))[0]

    def _start(self, frames: Frames) -> tuple[CallFuture, concurrent.futures.Future[None]]:
        """Run a call in a worker thread: its future, and the worker's (done once the kernel is free
        again, also after a cancel). The output sink and status line are made here, in the caller's
        context: a worker writes into the cell that started it."""
        future = CallFuture()
        worker = _background().submit(_run_into, future, self._run, frames, CallerOutput(), self._status())
        return future, worker

    def map(self, *iterables: Iterable[Any], chunksize: int | None = None,
            timeout: float | None = None) -> Iterator[Any]:
        """Results of the function over the inputs, in input order, spread over the key's kernels.

        Inputs travel in chunks (by default four per kernel), each one request, so small calls do
        not pay a round trip each. Like ``Executor.map``, a failing item raises when it is reached.
        """
        items = list(zip(*iterables))
        if chunksize is None:
            chunksize = max(1, -(-len(items) // (4 * self.max_kernels)))
        if not isinstance(chunksize, int) or chunksize < 1:
            raise FalMagicError(f"chunksize must be an integer >= 1, not {chunksize!r}")
        chunks = [self._dump([items[start:start + chunksize]], {}, via=map_chunk)
                  for start in range(0, len(items), chunksize)]
        if len(chunks) > 1:  # every kernel the map will use starts at once, not as the first ones happen to be busy
            self._hold(min(self.max_kernels, len(chunks))).result()
        started = [self._start(chunk) for chunk in chunks]
        grace = settings().interrupt_grace

        def results() -> Iterator[Any]:
            try:
                for fut, _ in started:
                    for ok, value in fut.result(timeout=timeout):
                        if not ok:
                            raise rebuild_exception(value, self.spec.requirements, self.func)
                        yield value
            finally:  # Ctrl-C, a failed item, or results no longer wanted: stop the chunks still running
                for fut, _ in started:
                    fut.cancel()
                # and wait for their kernels to be free again (a kernel that ignores the interrupt
                # is given up after the grace period), so the next call finds them idle
                concurrent.futures.wait([worker for _, worker in started], timeout=grace + 5)

        return results()

    def warmup(self) -> concurrent.futures.Future[Any]:
        """Start the key's kernel(s) in the background, all at once, so that a later first call is fast."""
        return self._hold(self.max_kernels)

    def _hold(self, count: int) -> concurrent.futures.Future[Any]:
        """In the background: lease ``count`` kernels of the key at once (starting those missing, together),
        then give them back warm."""
        pool = get_pool()
        all_held = threading.Barrier(count)  # each kernel is held until every one is: the next acquire starts another
        errors: list[BaseException] = []

        def hold() -> None:
            try:
                kernel = pool.acquire(self.spec, self.max_kernels, machine_type=self._options["machine_type"],
                                      host=self._options["host"], env=self._options["env"])
            except BaseException as exc:
                errors.append(exc)
                all_held.abort()
                return
            try:
                all_held.wait()
            except threading.BrokenBarrierError:
                pass
            finally:
                pool.release(kernel, self.keep_alive)

        def start() -> None:
            holders = [threading.Thread(target=hold, name="fal_magic-warmup", daemon=True) for _ in range(count)]
            for thread in holders:
                thread.start()
            for thread in holders:
                thread.join()
            if errors:
                raise errors[0]

        return _background().submit(start)


def isolated(kind: str | Callable[..., Any] = "virtualenv", *, requirements: Requirements = (),
             keep_alive: float | None = None, max_kernels: int = 1,
             machine_type: str | None = None, host: str | None = None, env: Mapping[str, str] | None = None,
             python_version: str | None = None) -> Any:
    """Run the decorated function in a warm, isolated kernel whose environment has ``requirements``.

    Usable bare (``@isolated``), with parentheses, or with the environment kind first
    (``@isolated("virtualenv", requirements=[...])``), as in fal_serverless. ``host`` is a Jupyter
    Server URL with the fal_magic extension (default: the configured ``host``; "" is this machine).
    ``env`` gives the kernel environment variables (secrets included): never shown, not part of the
    requirements key, and kernels with other values are other kernels. ``python_version`` (``"3.12"``)
    runs the function on another installed Python (default: ``FalMagic.python``, else this one's); the
    function then travels as its source, and arguments and results as plain pickles.
    """
    if callable(kind):
        return IsolatedFunction(kind, requirements=requirements, keep_alive=keep_alive,
                                max_kernels=max_kernels, machine_type=machine_type, host=host, env=env,
                                python_version=python_version)
    _check_options(kind, keep_alive, max_kernels, host)
    check_env(env)
    spec_for(requirements, python=python_version)  # a bad requirement (or version) fails at decoration

    def decorate(func: Callable[..., Any]) -> IsolatedFunction:
        return IsolatedFunction(func, kind=kind, requirements=requirements, keep_alive=keep_alive,
                                max_kernels=max_kernels, machine_type=machine_type, host=host, env=env,
                                python_version=python_version)

    return decorate


def _run_outside_a_kernel(fn: Callable[..., Any], options: dict[str, Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
    """How an isolated function that came back from a kernel (a proxy) runs when called here."""
    return IsolatedFunction(fn, **options)(*args, **kwargs)


register_runner(_run_outside_a_kernel)
