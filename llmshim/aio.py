"""Await sync-only LLM code safely: a shared, bounded, context-preserving thread pool.

    import llmshim.aio

    chat_async = llmshim.aio.to_async(client.chat)      # or @llmshim.aio.asyncify
    aclient = llmshim.aio.wrap(client)                   # aclient.chat_async(...), original untouched
    results = await llmshim.aio.batch(client.chat, prompts, max_concurrency=8)

What the hand-rolled versions got wrong, and this does not:

- **Context**: ``run_in_executor`` drops contextvars; here each call runs in a copy of the caller's
  context, so ``llmshim.priority(...)``, cache controls and the OpenTelemetry parent span reach the
  worker thread.
- **Back-pressure**: at most ``LLMSHIM_ASYNC_WORKERS`` running plus ``LLMSHIM_ASYNC_QUEUE_SIZE``
  queued; further callers wait (asynchronously) for a slot, so memory stays flat however much is
  submitted.
- **Timeouts**: ``LLMSHIM_ASYNC_TIMEOUT`` gives the awaiting task ``TimeoutError`` at once,
  counted from the call's start (waiting for a slot included). A running thread cannot be
  killed: it finishes in the background and keeps its slot until then (``active`` and the slot
  count say so), so the bound stays true.
- **run_sync** works with and without a running event loop (Jupyter, async web frameworks): inside
  one it runs the coroutine on a loop of its own in a worker thread.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # its exit hook is registered before ours, so ours runs first
import contextlib
import contextvars
import functools
import inspect
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar, cast

from . import config
from .aio_pool import AsyncPool, WaitTimeout, loop_blocked

__all__ = ["AsyncPool", "asyncify", "batch", "gather_with_limit", "pool", "run_sync", "run_with_timeout",
           "shutdown", "to_async", "wrap"]

P = ParamSpec("P")
T = TypeVar("T")

_pool: AsyncPool | None = None
_pool_lock = threading.Lock()


def pool() -> AsyncPool:
    """The shared pool, made on first use from ``LLMSHIM_ASYNC_*``."""
    global _pool
    with _pool_lock:
        if _pool is None:
            settings = config.load()
            _pool = AsyncPool(settings.async_workers, settings.async_queue_size, settings.async_timeout,
                              settings.async_enabled)
        return _pool


def shutdown(wait: bool = False) -> None:
    """Stop the shared pool (queued calls are cancelled); the next use makes a new one."""
    global _pool
    with _pool_lock:
        current, _pool = _pool, None
    if current is not None:
        current.shutdown(wait=wait)


atexit.register(shutdown)
if hasattr(threading, "_register_atexit"):
    # At exit, Python joins the executor's threads (running what is queued) *before* atexit hooks
    # run; this hook runs before that join, so calls nobody started are cancelled, not run.
    threading._register_atexit(shutdown)


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's pool threads (its queued calls would wait forever)
    and may have inherited a held lock: it starts from no pool."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def to_async(fn: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A coroutine function running ``fn`` in the shared pool, in a copy of the caller's context."""
    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await pool().run(fn, *args, **kwargs)

    return run


asyncify = to_async


class _Wrapped:
    """``obj`` with ``NAME_async`` for each public method; everything else is the object's own."""

    def __init__(self, obj: Any) -> None:
        object.__setattr__(self, "_obj", obj)

    def __getattr__(self, name: str) -> Any:
        obj = object.__getattribute__(self, "_obj")
        if name.endswith("_async") and not name.startswith("_"):
            method = getattr(obj, name[: -len("_async")], None)
            if callable(method):
                return to_async(method)
        return getattr(obj, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """``aclient.timeout = 5`` sets the client's (kept on the proxy, it changed nothing the
        client's methods read)."""
        setattr(object.__getattribute__(self, "_obj"), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(object.__getattribute__(self, "_obj"), name)

    def __dir__(self) -> list[str]:
        obj = object.__getattribute__(self, "_obj")
        names = [n for n in dir(obj) if not n.startswith("_")]
        return sorted(set(names) | {f"{n}_async" for n in names if callable(getattr(obj, n, None))})

    def __repr__(self) -> str:
        return f"llmshim.aio.wrap({object.__getattribute__(self, '_obj')!r})"

    def __enter__(self) -> Any:
        """``with wrap(client) as aclient``: the client's own ``__enter__``/``__exit__`` (closing it);
        the proxy comes back where the client returns itself. Dunders bypass ``__getattr__``."""
        obj = object.__getattribute__(self, "_obj")
        entered = type(obj).__enter__(obj)
        return self if entered is obj else entered

    def __exit__(self, *exc_info: Any) -> Any:
        obj = object.__getattribute__(self, "_obj")
        return type(obj).__exit__(obj, *exc_info)


def wrap(obj: Any) -> Any:
    """A proxy of a sync client adding ``NAME_async`` for each public method (``client.chat`` ->
    ``client.chat_async``); the original object is left untouched."""
    return _Wrapped(obj)


async def gather_with_limit(*aws: Awaitable[T] | Iterable[Awaitable[T]], limit: int) -> list[T]:
    """``asyncio.gather`` with at most ``limit`` awaitables running at once; results in order.
    Awaitables are given as arguments or, as the hand-rolled helpers took them, as one list."""
    if len(aws) == 1 and not inspect.isawaitable(aws[0]) and isinstance(aws[0], Iterable):
        aws = tuple(aws[0])
    if limit < 1:
        for aw in aws:  # refused: close them, or each is also a "never awaited" warning
            if inspect.iscoroutine(aw):
                aw.close()
    semaphore = _semaphore(limit, "limit")

    async def one(aw: Awaitable[T]) -> T:
        async with semaphore:
            return await aw

    return list(await asyncio.gather(*(one(cast(Awaitable[T], aw)) for aw in aws)))


async def run_with_timeout(aw: Awaitable[T], timeout: float) -> T:
    """Await ``aw`` for at most ``timeout`` seconds (``TimeoutError`` after). A ``TimeoutError`` of
    ``aw``'s own (a socket's, an inner pool timeout) comes back as it was raised, traceback and all:
    only the time running out here is reported as this timeout."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.wait_for(task, timeout)
    except asyncio.TimeoutError:
        if task.done() and not task.cancelled():
            raise
        raise WaitTimeout(f"not done within {timeout:g}s") from None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, with or without a running event loop in this thread (inside
    one, on a loop of its own in a worker thread: this call blocks the caller, as sync code does;
    Ctrl-C meanwhile cancels the coroutine and is raised at once)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    context = contextvars.copy_context()
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[T]]] = []
    gave_up = threading.Event()

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        running.append((asyncio.get_running_loop(), task))
        if gave_up.is_set():  # interrupted before ``running`` had the task: see below
            task.cancel()
        return await task

    runner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmshim-run-sync")
    outer, job = main(), None
    with loop_blocked(loop):  # pools pass over this loop's waiters while it cannot run them
        try:
            job = runner.submit(context.run, asyncio.run, outer)
            return job.result()
        except BaseException:
            # Ctrl-C (or an exception raised into this thread) while blocked: cancel the coroutine,
            # as asyncio.run does, and do not wait for it (joining the runner made Ctrl-C wait for
            # the whole coroutine, for ever if it hangs). ``main`` checks ``gave_up`` after it
            # publishes its task and we read ``running`` after setting it: one of the two cancels it.
            gave_up.set()
            if job is not None and job.cancel():  # no thread took it yet
                outer.close()
                coro.close()
            elif running and not running[0][1].done():
                with contextlib.suppress(RuntimeError):  # its loop has closed: it is over anyway
                    running[0][0].call_soon_threadsafe(running[0][1].cancel)
            raise
        finally:
            runner.shutdown(wait=False)


async def batch(fn: Callable[[Any], Any], items: Iterable[Any], *, max_concurrency: int = 8,
                return_exceptions: bool = False, progress: bool | None = None) -> list[Any]:
    """``fn(item)`` for every item (sync functions in the shared pool, coroutine functions as they
    are), at most ``max_concurrency`` at once; results in input order. With ``return_exceptions``
    a failure is returned in its place instead of raised. A progress bar goes to stderr when it is
    a terminal (or ``progress=True``)."""
    values = list(items)
    show = sys.stderr.isatty() if progress is None else progress
    done = [0]
    semaphore = _semaphore(max_concurrency, "max_concurrency")
    run = fn if asyncio.iscoroutinefunction(fn) else to_async(fn)

    failed = [False]

    async def one(item: Any) -> Any:
        async with semaphore:
            if failed[0]:  # set before the failing item gave its place up: no item starts after it
                raise asyncio.CancelledError
            try:
                result = await run(item)
                if inspect.isawaitable(result):  # a sync callable handing back a coroutine (a lambda)
                    result = await result
                return result
            except Exception as exc:
                if return_exceptions:
                    return exc
                failed[0] = True
                raise
            finally:
                done[0] += 1
                if show:
                    width = 30
                    filled = int(width * done[0] / max(1, len(values)))
                    sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {done[0]}/{len(values)}")
                    if done[0] == len(values):
                        sys.stderr.write("\n")
                    sys.stderr.flush()

    tasks = [asyncio.ensure_future(one(item)) for item in values]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # After a failure gather lets the other items run on, and the ones still waiting for the
        # semaphore start later: LLM calls made (and billed) for a batch that has already failed.
        # ``failed`` keeps them from starting; the cancel stops the ones in flight (a call no thread
        # started never starts; a running thread ends in the background).
        for task in tasks:
            task.cancel()


def _semaphore(limit: int, name: str) -> asyncio.Semaphore:
    """``asyncio.Semaphore(limit)``, refusing a limit below 1 (0 would wait for ever, silently)."""
    if limit < 1:
        raise ValueError(f"{name} must be at least 1, not {limit!r}")
    return asyncio.Semaphore(limit)
