"""Moves deferred (WAITING) rows to READY when their run_after comes, then wakes the claimers.

Each process sleeps exactly until the earliest due time it knows of (from the last promotion and
from ``w:`` notifications of new deferred rows), or the fallback timer. Promotion is one
statement with SKIP LOCKED, so every process may run it at once. While the database is
unreachable it retries at most `db.RECONNECT_MAX_DELAY` apart.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from .. import db, sql

if TYPE_CHECKING:
    from .runtime import Runtime

BATCH = 1000


class Promoter:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.next_due: float | None = None  # epoch seconds
        self._noted: float | None = None  # earliest 'w:' due time heard during a promotion
        self._wake = anyio.Event()
        self.promoted = 0
        self.outage = db.Outage("promoter")

    def note_due(self, epoch: float) -> None:
        self._noted = epoch if self._noted is None else min(self._noted, epoch)
        if self.next_due is None or epoch < self.next_due:
            self.next_due = epoch
            self._wake.set()

    def poke(self) -> None:
        """Something was deferred here (a retry): look again now for the true next due time."""
        self.next_due = time.time()
        self._wake.set()

    async def promote_once(self) -> int:
        rt = self.runtime
        self._noted = None
        bound = db.round_trip_bound(rt.settings.lease_seconds)
        async with db.round_trip(rt.pool, bound) as conn:
            cur = await conn.execute(sql.PROMOTE, {"limit": BATCH})
            row = await cur.fetchone()
        promoted = int(row["promoted"] or 0)
        self.promoted += promoted
        # The statement's next_due misses rows deferred by transactions that committed after
        # its snapshot; their 'w:' notes may have arrived meanwhile (and been ignored while
        # next_due was the time being promoted), so keep the earliest of both.
        dues = [d for d in (row["next_due"], self._noted) if d is not None]
        self.next_due = min(dues) if dues else None
        if promoted and set(row["queues"] or ()) & set(rt.queues):
            rt.claimer.wake()
        return promoted

    async def run(self) -> None:
        rt = self.runtime
        while True:
            self._wake = anyio.Event()
            try:
                if await self.promote_once() >= BATCH:
                    continue
            except db.UNAVAILABLE as exc:
                await self.outage.failed(exc)
                continue
            self.outage.ok()
            wait = rt.settings.poll_fallback_seconds
            if self.next_due is not None:
                wait = min(wait, max(self.next_due - time.time(), 0.0))
            with anyio.move_on_after(wait):
                await self._wake.wait()
            # a 'w:' note or a retry may have arrived for a time still in the future; the
            # fallback look comes at least every POLL_FALLBACK_SECONDS all the same
            fallback_at = time.time() + rt.settings.poll_fallback_seconds
            while self.next_due is not None and time.time() < min(self.next_due, fallback_at):
                self._wake = anyio.Event()
                with anyio.move_on_after(min(self.next_due, fallback_at) - time.time()):
                    await self._wake.wait()
