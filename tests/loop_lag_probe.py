"""A probe of event-loop lag: how late a 5 ms sleep wakes up, sampled for as long as it runs. A loop
blocked by synchronous I/O shows as one large lag."""

from __future__ import annotations

import asyncio


class LoopLag:
    """``start()`` on the running loop, ``await stop()`` at the end; ``largest`` in seconds."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            start = loop.time()
            await asyncio.sleep(0.005)
            self.lags.append(loop.time() - start - 0.005)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def largest(self) -> float:
        return max(self.lags, default=0.0)
