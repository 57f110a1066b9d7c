"""Moves deferred (WAITING) rows to READY when their run_after comes, then wakes the claimers.

Each process sleeps exactly until the earliest due time it knows of (from the last promotion and
from ``w:`` notifications of new deferred rows), or the fallback timer. Promotion is one
statement with SKIP LOCKED, so every process may run it at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from .. import sql

if TYPE_CHECKING:
    from .runtime import Runtime

BATCH = 1000


class Promoter:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.next_due: float | None = None  # epoch seconds
        self._wake = anyio.Event()
        self.promoted = 0

    def note_due(self, epoch: float) -> None:
        if self.next_due is None or epoch < self.next_due:
            self.next_due = epoch
            self._wake.set()

    def poke(self) -> None:
        """Something was deferred here (a retry): look again now for the true next due time."""
        self.next_due = time.time()
        self._wake.set()

    async def promote_once(self) -> int:
        rt = self.runtime
        async with rt.pool.connection() as conn:
            cur = await conn.execute(sql.PROMOTE, {"limit": BATCH})
            row = await cur.fetchone()
        promoted = int(row["promoted"] or 0)
        self.promoted += promoted
        self.next_due = row["next_due"]
        if promoted and set(row["queues"] or ()) & set(rt.queues):
            rt.claimer.wake()
        return promoted

    async def run(self) -> None:
        rt = self.runtime
        while True:
            self._wake = anyio.Event()
            if await self.promote_once() >= BATCH:
                continue
            wait = rt.settings.poll_fallback_seconds
            if self.next_due is not None:
                wait = min(wait, max(self.next_due - time.time(), 0.0))
            with anyio.move_on_after(wait):
                await self._wake.wait()
            # a 'w:' note or a retry may have arrived for a time still in the future
            while self.next_due is not None and self.next_due > time.time():
                self._wake = anyio.Event()
                with anyio.move_on_after(min(self.next_due - time.time(),
                                             rt.settings.poll_fallback_seconds)):
                    await self._wake.wait()
