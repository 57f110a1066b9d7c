"""Renews the leases of every run this process holds and its worker row, in one statement.

Runs missing from the answer were reclaimed elsewhere (this process stalled past its lease): they
are stopped here so the same run never executes twice at once. Runs marked cancel_requested are
cancelled (a NOTIFY usually gets there first). Runs that finished here but whose result is not
written yet (the completer retries while the database is away) keep their lease too.

When the database cannot be reached (down, restarting, partitioned away), the leases of this
process run out on the database's side and another process may take the runs over. So the
heartbeat fences itself: once no renewal has succeeded for the lease minus a margin
(`fence_after`), every run still going here is stopped as lost (an async task is cancelled, a
child process killed; a sync thread cannot be stopped, it is asked to via
``context.cancel_requested``), and nothing is recorded for them. When the database answers again
the runs fenced here that are still this process's own go back to READY at once (`RELEASE`);
the others were reclaimed meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from .. import db, sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")


def fence_after(lease_seconds: float, heartbeat_seconds: float) -> float:
    """Seconds without a successful renewal after which this process stops its runs: the lease
    less a margin of one heartbeat (at least 0.5 s, at most a quarter of the lease)."""
    margin = max(0.5, min(heartbeat_seconds, lease_seconds / 4))
    return max(lease_seconds - margin, lease_seconds / 2)


class Heartbeat:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.beats = 0
        self.renewed_at = time.monotonic()  # when the last successful renewal was sent
        self.fenced: set[int] = set()  # runs stopped here for want of a renewal
        self.fences = 0
        self.outage = db.Outage("heartbeat")
        self._wake = anyio.Event()

    def poke(self) -> None:
        """Beat now (poll-only mode: how cancel requests of the runs held here are heard)."""
        self._wake.set()

    def held(self) -> list[int]:
        """Runs whose lease this process must renew: running here, or finished here with the
        result still to write."""
        rt = self.runtime
        return sorted(set(rt.executor.running) | rt.completer.unwritten())

    async def beat(self) -> None:
        rt = self.runtime
        held = self.held()
        sent = time.monotonic()
        async with db.round_trip(rt.pool, db.round_trip_bound(rt.settings.lease_seconds)) as conn:
            cur = await conn.execute(sql.HEARTBEAT, {
                "ids": held, "worker": rt.worker_id, "lease": rt.settings.lease_seconds,
                **rt.worker_row(),
            })
            rows = await cur.fetchall()
        self.renewed_at = sent
        self.beats += 1
        renewed = {int(r["id"]) for r in rows}
        for run_id in held:
            if run_id not in renewed and run_id in rt.executor.running:
                logger.warning("reproq: lost the lease of run %s; stopping it here", run_id)
                rt.executor.cancel(run_id, lost=True)
        for r in rows:
            if r["cancel_requested"]:
                rt.executor.cancel(int(r["id"]))
        await self._release_fenced()

    async def _release_fenced(self) -> None:
        """Fenced runs that stopped here and are still ours go back to READY now."""
        rt = self.runtime
        done = sorted(i for i in self.fenced if i not in rt.executor.running)
        if not done:
            return
        await rt.release(done)
        self.fenced.difference_update(done)
        logger.info("reproq: database reachable again; %d runs stopped during the outage are "
                    "READY again (those not reclaimed meanwhile)", len(done))

    def fence(self) -> int:
        """Stop every run going here as lost, if no renewal succeeded for `fence_after`."""
        rt = self.runtime
        silent = time.monotonic() - self.renewed_at
        if silent < fence_after(rt.settings.lease_seconds, rt.settings.heartbeat_seconds):
            return 0
        going = [i for i, job in rt.executor.running.items() if not job.lost]
        for run_id in going:
            rt.executor.cancel(run_id, lost=True)
        self.fenced.update(going)
        if going:
            self.fences += 1
            logger.warning("reproq: no lease renewal for %.1fs (database unreachable: %s); "
                           "stopping %d runs here, other processes may take them over", silent,
                           self.outage.last_error or "no answer", len(going))
        return len(going)

    async def _fence_loop(self) -> None:
        while True:
            self.fence()
            await anyio.sleep(min(self.runtime.settings.heartbeat_seconds, 0.5))

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._fence_loop)
            while True:
                try:
                    await self.beat()
                except db.UNAVAILABLE as exc:
                    await self.outage.failed(exc)
                    continue
                self.outage.ok()
                with anyio.move_on_after(self.runtime.settings.heartbeat_seconds):
                    await self._wake.wait()
                self._wake = anyio.Event()
