"""Daemon worker threads for sync tasks.

anyio's and concurrent.futures' worker threads are joined at interpreter exit, so one stuck sync
task would keep a stopping server alive and keep running after its run was released. reproq's
threads are daemon threads: when the process exits, they end with it. Each call runs in a copy
of the caller's contextvars context; results come back to the event loop thread-safely, several
per wake-up: a finished call is appended to `_finished`, and only the first one since the loop
last looked schedules `_settle_finished` (``call_soon_threadsafe`` writes to the loop's wake-up
pipe, a system call per result otherwise).

The bookkeeping (calls outstanding, threads started) lives on the event loop thread only: a call
counts from `submit` until its result is settled on the loop, and a new thread is started only
while calls outstanding outnumber threads. So the hand-off takes no lock shared with the
workers, and a call never waits behind a busy thread while the pool may still grow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class DaemonThreadPool:
    """At most `size` daemon threads, started on demand and reused."""

    def __init__(self, size: int, name: str = "reproq-sync") -> None:
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.outstanding = 0  # calls submitted and not yet settled (event loop thread only)
        self._finished: collections.deque[tuple[asyncio.Future[Any], Any,
                                                BaseException | None]] = collections.deque()
        self._settle_scheduled = False

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, ctx, loop, future = item
            try:
                result = ctx.run(fn, *args)
            except BaseException as exc:
                self._deliver(loop, future, None, exc)
            else:
                self._deliver(loop, future, result, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 result: Any, exc: BaseException | None) -> None:
        """Worker thread: hand a result to the loop (appending is atomic; the flag is cleared
        by the loop *before* it drains, so a result is never left behind)."""
        self._finished.append((future, result, exc))
        if not self._settle_scheduled:
            self._settle_scheduled = True
            with contextlib.suppress(RuntimeError):  # loop closed: the process is exiting
                loop.call_soon_threadsafe(self._settle_finished)

    def _settle_finished(self) -> None:
        """Event loop thread: settle every result delivered so far."""
        self._settle_scheduled = False
        finished = self._finished
        while finished:
            future, result, exc = finished.popleft()
            self.outstanding -= 1
            if future.cancelled():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue fn(*args) for a pool thread; the future settles on the running loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.outstanding += 1
        if self.outstanding > len(self._threads) and len(self._threads) < self.size:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        self._queue.put((fn, args, contextvars.copy_context(), loop, future))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) in a pool thread. Cancelling the await does not stop the thread."""
        return await asyncio.shield(self.submit(fn, *args))

    def close(self) -> None:
        """Ask idle threads to exit (busy ones end with the process: they are daemons)."""
        for _ in self._threads:
            self._queue.put(_STOP)

