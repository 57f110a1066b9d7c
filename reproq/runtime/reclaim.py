"""Returns runs whose lease expired to READY (or FAILED when attempts are spent), removes worker
rows that stopped renewing, wakes parked runs whose concurrency key has room again (a safety
net behind the release trigger), and deletes old events and finished runs past
FINISHED_RETENTION_SECONDS (`reproq.retention`). Every process runs it; SKIP LOCKED keeps them
apart. While the database is unreachable it retries at most `db.RECONNECT_MAX_DELAY` apart, so
that leases that ran out during an outage are reclaimed as soon as it is back."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from .. import db, retention, sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
BATCH = 500


class Reclaimer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.requeued = 0
        self.failed = 0
        self.pruned = 0
        self.pruned_ticks = 0
        self.prune_backlog = False  # the last pass deleted all it may: more are due
        self.outage = db.Outage("reclaim")

    async def reclaim_once(self) -> int:
        rt = self.runtime
        bound = db.round_trip_bound(rt.settings.lease_seconds)
        async with db.round_trip(rt.pool, bound) as conn:
            cur = await conn.execute(sql.RECLAIM, {
                "limit": BATCH, "worker_ttl": rt.settings.lease_seconds * 3,
            })
            row = await cur.fetchone()
        requeued, failed = int(row["requeued"]), int(row["failed"])
        if requeued or failed:
            logger.warning("reproq: reclaimed %d runs with expired leases (%d back to READY, "
                           "%d failed: attempts spent)", requeued + failed, requeued, failed)
            rt.claimer.wake()
        self.requeued += requeued
        self.failed += failed
        async with db.round_trip(rt.pool, bound) as conn:
            cur = await conn.execute(sql.UNBLOCK, {"limit": BATCH})
            woke = await cur.fetchone()
            await conn.execute(sql.PRUNE_EVENTS, {"keep": rt.settings.events_retention_seconds})
        if woke["woken"]:
            rt.claimer.wake()
        keep = rt.settings.finished_retention_seconds
        if keep > 0:
            batch, batches = retention.DEFAULT_BATCH, retention.RUNTIME_MAX_BATCHES
            deleted = await retention.aprune(rt.pool, retention.PruneFilter(keep), batch=batch,
                                             max_batches=batches)
            self.pruned += deleted
            ticks = await retention.aprune_ticks(rt.pool, keep, batch=batch)
            self.pruned_ticks += ticks
            self.prune_backlog = deleted >= batch * batches or ticks >= batch
        return requeued + failed

    async def run(self) -> None:
        while True:
            try:
                while await self.reclaim_once() >= BATCH:
                    pass
            except db.UNAVAILABLE as exc:
                await self.outage.failed(exc)
                continue
            self.outage.ok()
            pause = self.runtime.settings.reclaim_seconds
            if self.prune_backlog:  # old finished runs left: the next pass comes sooner
                pause = min(pause, retention.CATCH_UP_SECONDS)
            await anyio.sleep(pause)
