"""Wake a sleeper, a thread or an asyncio task, from any thread.

Three parts of llmshim put a caller to sleep until some other thread says "go": a cache follower
waiting for the identical request in flight (``singleflight.py``), a call queued under a rate
limit (the scheduler's waiters), and a caller waiting for a slot of the ``llmshim.aio`` pool. The
waker may run on any thread (a reply's end, a timer, a pool worker), so:

- a **thread** sleeps on a ``threading.Event``; ``wake()`` sets it;
- a **task** awaits a future of its own loop; a future may only be touched from that loop's
  thread, so ``wake()`` schedules the resolution there (``call_soon_threadsafe``). A loop that has
  closed cannot be woken: ``wake()`` answers False and raises nothing, so the waker goes on to the
  next sleeper instead of failing them all (or leaking what it was handing over).

Waking is idempotent: a second ``wake()``, or one that lands after the task stopped waiting (timed
out, cancelled), changes nothing. Waiting never cancels the future: a waiter that gave up can
still be woken, harmlessly, and the waker cannot tell a late waiter from a live one, so whoever
keeps a list of sleepers takes a sleeper out of it (under its own lock) before or when it gives up.

    wakeup = Wakeup.for_thread()      # or Wakeup.for_task() on the loop that will wait
    queue.append(wakeup)              # another thread: queue.pop(0).wake()
    woken = wakeup.wait(timeout)      # or: woken = await wakeup.wait_async(timeout)
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["Wakeup", "wake_task"]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def wake_task(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> bool:
    """Resolve ``future`` on its ``loop``, from any thread. False when that loop has closed."""
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # "Event loop is closed": nobody is left there to wake
        return False
    return True


class Wakeup:
    """One sleeper and the way to wake it from any thread (see the module docstring)."""

    __slots__ = ("event", "future", "loop")

    def __init__(self, event: threading.Event | None, loop: asyncio.AbstractEventLoop | None,
                 future: asyncio.Future[None] | None) -> None:
        self.event, self.loop, self.future = event, loop, future

    @classmethod
    def for_thread(cls) -> Wakeup:
        """A sleeper that blocks its thread in ``wait``."""
        return cls(threading.Event(), None, None)

    @classmethod
    def for_task(cls, loop: asyncio.AbstractEventLoop | None = None) -> Wakeup:
        """A sleeper that awaits ``wait_async`` on ``loop`` (default: the running loop)."""
        loop = loop or asyncio.get_running_loop()
        return cls(None, loop, loop.create_future())

    def wake(self) -> bool:
        """Wake the sleeper, from any thread. False only when its event loop has closed."""
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        return wake_task(self.loop, self.future)

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread until woken (True) or ``timeout`` seconds pass (False)."""
        assert self.event is not None, "a task's Wakeup is awaited with wait_async"
        return self.event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Await until woken (True) or ``timeout`` seconds pass (False). Cancelling the awaiting
        task raises ``CancelledError`` here and leaves the future alone (a late wake is harmless)."""
        assert self.future is not None, "a thread's Wakeup is waited for with wait"
        try:
            await asyncio.wait_for(asyncio.shield(self.future), timeout)
        except asyncio.TimeoutError:
            return False
        return True
