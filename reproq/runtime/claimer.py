"""Claims due rows for this process's queues, as many as there are free slots, one statement each.

It claims again at once while it fills every free slot (more work is likely), and otherwise
sleeps until the listener wakes it (NOTIFY), a slot frees up after a full claim, or the
fallback timer fires (missed notifications, poll-only mode).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from .. import sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")


class Claimer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._wake = anyio.Event()
        self.claims = 0
        self.claimed = 0
        self.stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def claim_once(self, limit: int) -> list[dict]:
        rt = self.runtime
        async with rt.pool.connection() as conn:
            cur = await conn.execute(sql.CLAIM, {
                "queues": list(rt.queues), "limit": limit, "worker": rt.worker_id,
                "lease": rt.settings.lease_seconds,
            })
            rows = await cur.fetchall()
        self.claims += 1
        self.claimed += len(rows)
        return rows

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        rt = self.runtime
        executor = rt.executor
        while not self.stopping:
            self._wake = anyio.Event()
            free = executor.free_slots()
            full = False
            if free > 0 and not rt.draining:
                rows = await self.claim_once(free)
                if rows:
                    executor.submit(tg, rows)
                    rt.note_claimed(rows)
                full = len(rows) == free
            if self.stopping or rt.draining:
                return
            if full or free == 0:
                # Work is probably waiting: claim again as soon as a slot frees up.
                slot = executor.slot_freed
                with anyio.move_on_after(rt.poll_interval):
                    await slot.wait()
                continue
            with anyio.move_on_after(rt.poll_interval):
                await self._wake.wait()
