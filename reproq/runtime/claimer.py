"""Claims due rows for this process's queues, as many as there are free slots, one statement each.

It claims again as soon as a slot frees up while it keeps filling every free slot (more work is
likely waiting), and otherwise sleeps until the listener wakes it (NOTIFY), or the fallback timer
fires (missed notifications, poll-only mode). When its claim passed over READY rows locked by
another statement, it looks again shortly (see `reproq.sql.CLAIM`): their lock holder may leave
them READY without announcing them. Rows claimed while shutdown began are released.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from .. import sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
RECHECK_FIRST = 0.05  # seconds before claiming again after passing over locked READY rows
RECHECK_MAX = 1.0


class Claimer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._wake = anyio.Event()
        self.exited = anyio.Event()
        self.waiting_for_slot = False
        self.claims = 0
        self.claimed = 0
        self.stopping = False
        self.skipped_locked = False  # the last claim passed over locked READY rows
        self.rechecks = 0

    def wake(self) -> None:
        self._wake.set()

    def slot_freed(self) -> None:
        if self.waiting_for_slot:
            self._wake.set()

    async def claim_once(self, limit: int) -> list[dict[str, Any]]:
        rt = self.runtime
        async with rt.pool.connection() as conn:
            cur = await conn.execute(sql.CLAIM, {
                "queues": list(rt.queues), "limit": limit, "worker": rt.worker_id,
                "lease": rt.settings.lease_seconds,
            })
            rows = await cur.fetchall()
        self.skipped_locked = bool(rows and rows[0]["skipped_locked"])
        rows = [r for r in rows if r["id"] is not None]  # one row of NULLs when none
        self.claims += 1
        self.claimed += len(rows)
        return rows

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        rt = self.runtime
        executor = rt.executor
        self.exited = anyio.Event()
        recheck = RECHECK_FIRST
        try:
            while not self.stopping:
                self._wake = anyio.Event()
                free = executor.free_slots()
                full = False
                ran = 0
                if free > 0:
                    rows = await self.claim_once(free)
                    runnable = [r for r in rows if r["status"] == "RUNNING"]
                    ran = len(runnable)
                    if self.stopping:
                        await rt.release([int(r["id"]) for r in runnable])
                        return
                    if runnable:
                        executor.submit(tg, runnable)
                    rt.note_claimed(rows)
                    full = len(rows) == free
                    if full and ran < free:
                        continue  # parked blocked/rate-limited rows: look further at once
                self.waiting_for_slot = full or free == 0
                timeout = rt.poll_interval
                if free > 0 and not full and self.skipped_locked:
                    # Rows we could not lock may never be announced again: look again soon
                    # (backing off while the same locks persist).
                    timeout, recheck = min(timeout, recheck), min(recheck * 2, RECHECK_MAX)
                    self.rechecks += 1
                else:
                    recheck = RECHECK_FIRST
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
        finally:
            self.exited.set()
