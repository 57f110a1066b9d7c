"""Returns runs whose lease expired to READY (or FAILED when attempts are spent), removes worker
rows that stopped renewing, wakes parked runs whose concurrency key has room again (a safety
net behind the release trigger), and deletes old events and finished runs past
FINISHED_RETENTION_SECONDS (`reproq.retention`).

Leader only: every process runs this service, but a pass does its work only where
`peers.MaintenanceTurn` says so - in the process that leads (`reproq.runtime.peers`), or, when
no live leader has been seen for 3 x LEADER_TIMEOUT_SECONDS (no process competes, or the leader
cannot be elected), in every process as a fallback; the statements are safe in several
processes at once (SKIP LOCKED keeps them apart), so the fallback needs no coordination. While
the database is unreachable it retries at most `db.RECONNECT_MAX_DELAY` apart, so that leases
that ran out during an outage are reclaimed as soon as it is back."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .. import db, retention, sql

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from ..conf import RuntimeSettings
    from .peers import MaintenanceTurn

logger = logging.getLogger("reproq.runtime")
BATCH = 500


class Reclaimer:
    """The maintenance sweeps of one process: `pool` to run them on, `turn` to say whether it
    is this process's turn, `wake` to call when runs became READY (this process's claimer)."""

    name = "reclaim"

    def __init__(self, settings: RuntimeSettings, pool: AsyncConnectionPool,
                 turn: MaintenanceTurn, wake: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.pool = pool
        self.turn = turn
        self.wake = wake
        self.passes = 0
        self.skipped = 0  # passes left to the leader
        self.requeued = 0
        self.failed = 0
        self.pruned = 0
        self.pruned_ticks = 0
        self.prune_backlog = False  # the last pass deleted all it may: more are due
        self.outage = db.Outage("reclaim")

    async def reclaim_once(self) -> int:
        """One pass of every sweep (whoever's turn it is); returns the runs reclaimed."""
        rs = self.settings
        bound = db.round_trip_bound(rs.lease_seconds)
        async with db.round_trip(self.pool, bound) as conn:
            cur = await conn.execute(sql.RECLAIM, {
                "limit": BATCH, "worker_ttl": rs.lease_seconds * 3,
            })
            row = await cur.fetchone()
        requeued, failed = int(row["requeued"]), int(row["failed"])
        if requeued or failed:
            logger.warning("reproq: reclaimed %d runs with expired leases (%d back to READY, "
                           "%d failed: attempts spent)", requeued + failed, requeued, failed)
            self.wake()
        self.requeued += requeued
        self.failed += failed
        async with db.round_trip(self.pool, bound) as conn:
            cur = await conn.execute(sql.UNBLOCK, {"limit": BATCH})
            woke = await cur.fetchone()
            await conn.execute(sql.PRUNE_EVENTS, {"keep": rs.events_retention_seconds})
        if woke["woken"]:
            self.wake()
        keep = rs.finished_retention_seconds
        if keep > 0:
            batch, batches = retention.DEFAULT_BATCH, retention.RUNTIME_MAX_BATCHES
            deleted = await retention.aprune(self.pool, retention.PruneFilter(keep),
                                             batch=batch, max_batches=batches)
            self.pruned += deleted
            ticks = await retention.aprune_ticks(self.pool, keep, batch=batch)
            self.pruned_ticks += ticks
            self.prune_backlog = deleted >= batch * batches or ticks >= batch
        return requeued + failed

    async def mine(self) -> bool:
        """Whether this pass is this process's to do (`MaintenanceTurn`)."""
        async with db.round_trip(self.pool, db.round_trip_bound(self.settings.lease_seconds)
                                 ) as conn:
            return await self.turn.mine(conn)

    async def run(self) -> None:
        wake = anyio.Event()

        def leadership(leading: bool) -> None:
            if leading:  # a new leader does its first pass at once (leases may be waiting)
                wake.set()

        peer = self.turn.peer
        unsubscribe = peer.subscribe(leadership) if peer is not None else None
        try:
            while True:
                await self._pass()
                pause = self.settings.reclaim_seconds
                if self.prune_backlog:  # old finished runs left: the next pass comes sooner
                    pause = min(pause, retention.CATCH_UP_SECONDS)
                with anyio.move_on_after(pause):
                    await wake.wait()
                wake = anyio.Event()
        finally:
            if unsubscribe is not None:
                unsubscribe()

    async def _pass(self) -> None:
        while True:
            try:
                if await self.mine():
                    self.passes += 1
                    while await self.reclaim_once() >= BATCH:
                        pass
                else:
                    self.skipped += 1
                    self.prune_backlog = False
            except db.UNAVAILABLE as exc:
                await self.outage.failed(exc)
                continue
            self.outage.ok()
            return

    def status(self) -> dict[str, Any]:
        return {**self.turn.status(), "passes": self.passes, "left_to_leader": self.skipped,
                "requeued": self.requeued, "failed": self.failed, "pruned": self.pruned}
