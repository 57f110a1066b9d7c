"""Claims due rows for this process's queues, as many as there are free slots, one statement each.

It claims again as soon as a slot frees up while it keeps filling every free slot (more work is
likely waiting), and otherwise sleeps until the notifier wakes it (a ``r:``/``q:`` notification,
or every POLL_INTERVAL_SECONDS in poll-only mode: `reproq.runtime.notifier`), or the fallback
timer fires (missed notifications). When fewer than half the slots are free and runs
are still going, it first gives them up to COALESCE_SECONDS to free more, so that one claim fills
several slots. When its claim passed over READY rows locked by another statement, it looks again
shortly (see `reproq.sql.CLAIM`): their lock holder may leave them READY without announcing
them. Rows claimed while shutdown began are released.

While HTTP requests keep arriving in this process, a claim takes at most YIELD_CLAIM_BATCH runs
(`reproq.runtime.gate.RequestGate.claim_limit`); the next bite follows when a slot frees, or
after YIELD_MAX_WAIT_SECONDS.

Each claim first tries `reproq.sql.CLAIM_FAST` (no flow control; cheap to plan). When it passes
over rows that need a token or a semaphore slot, `reproq.sql.CLAIM` claims the free slots left at
once, and is used alone for the next FULL_CLAIM_SECONDS (flow-controlled work tends to keep
coming), then the fast claim is tried again.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio

from .. import db, sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
RECHECK_FIRST = 0.05  # seconds before claiming again after passing over locked READY rows
RECHECK_MAX = 1.0
FULL_CLAIM_SECONDS = 5.0  # after a fast claim passed over flow-controlled rows
COALESCE_SECONDS = 0.002  # longest wait for more slots to free before a small claim


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _from_us(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def run_details(row: dict[str, Any]) -> dict[str, Any]:
    """What a TaskResult of a claimed row needs beyond running it: ``enqueued_at``,
    ``started_at``, ``last_attempted_at`` (aware datetimes, UTC), ``worker_ids`` (list) and
    ``metadata`` (dict). A claim returns them raw (see `reproq.sql._CLAIM_RETURNING`); they are
    decoded once, on first use, and kept in the row."""
    details = row.get("_details")
    if details is None:
        details = row["_details"] = {
            "enqueued_at": _from_us(row["enqueued_at_us"]),
            "started_at": _from_us(row["started_at_us"]),
            "last_attempted_at": _from_us(row["last_attempted_at_us"]),
            "worker_ids": json.loads(row["worker_ids_json"] or "[]"),
            "metadata": json.loads(row["metadata_json"] or "{}") or {},
        }
    return details


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
        self.full_until = 0.0  # monotonic time until which only CLAIM is used
        self.fallbacks = 0  # fast claims that passed over flow-controlled rows
        self.coalesced = 0  # claims held back for more slots to free (`_gather_slots`)
        self.outage = db.Outage("claimer")

    def wake(self) -> None:
        self._wake.set()

    def slot_freed(self) -> None:
        if self.waiting_for_slot:
            self._wake.set()

    async def claim_once(self, limit: int) -> list[dict[str, Any]]:
        rt = self.runtime
        params = {"queues": list(rt.queues), "limit": limit, "worker": rt.worker_id,
                  "lease": rt.settings.lease_seconds}
        got: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] | None = None
        async with rt.pool.connection() as conn:
            if time.monotonic() >= self.full_until:
                cur = await conn.execute(sql.claim_fast(rt.queues, limit), params)
                rows = await cur.fetchall()
                if rows[0]["passed"]:
                    # Rows that need a token or a slot: CLAIM decides on them (and more).
                    self.full_until = time.monotonic() + FULL_CLAIM_SECONDS
                    self.fallbacks += 1
                    got = [r for r in rows if r["id"] is not None]
                    params["limit"] = limit - len(got)
                    rows = None
            if rows is None:
                cur = await conn.execute(sql.CLAIM, params)
                rows = await cur.fetchall()
        self.skipped_locked = bool(rows[0]["skipped_locked"])
        rows = got + [r for r in rows if r["id"] is not None]  # one row of NULLs when none
        self.claims += 1
        self.claimed += len(rows)
        return rows

    async def _hand_on(self, runnable: list[dict[str, Any]]) -> bool:
        """Give claimed runs to the executor; True when shutdown began (they go back instead).

        Whatever goes wrong here (the claimer then crashes and is restarted), no claimed run is
        left RUNNING without a job: those the executor did not take are released at once, their
        attempt not burned, rather than waiting out a lease to fail as "lost"."""
        executor = self.runtime.executor
        try:
            if self.stopping:
                await self.runtime.release([int(r["id"]) for r in runnable])
                return True
            if runnable:
                executor.submit(runnable)
            return False
        except BaseException:
            stranded = []
            for row in runnable:
                job = executor.running.get(int(row["id"]))
                if job is None or job.task is None:
                    executor.running.pop(int(row["id"]), None)
                    stranded.append(int(row["id"]))
            if stranded:
                logger.error("reproq: handing %d claimed runs to the executor failed; "
                             "releasing them", len(stranded))
                await self.runtime.release(stranded)
            raise

    async def _gather_slots(self) -> int:
        """A few slots freed while other runs go on: let more free (up to half of them, for at
        most COALESCE_SECONDS) so that one claim fills several; return the free slots."""
        executor = self.runtime.executor
        half = executor.concurrency // 2
        self.coalesced += 1
        with anyio.move_on_after(COALESCE_SECONDS):
            while executor.free_slots() < half and executor.running and not self.stopping:
                await executor.slot_freed.wait()
        return executor.free_slots()

    async def run(self) -> None:
        rt = self.runtime
        executor = rt.executor
        self.exited = anyio.Event()
        recheck = RECHECK_FIRST
        try:
            while not self.stopping:
                self._wake = anyio.Event()
                free = executor.free_slots()
                if 0 < free < executor.concurrency // 2 and executor.running:
                    free = await self._gather_slots()
                full = capped = False
                ran = 0
                if free > 0:
                    await rt.gate.wait()  # requests first (reproq.runtime.gate)
                    want = rt.gate.claim_limit(free)  # smaller bites while requests arrive
                    capped = want < free
                    try:  # bounded: a claim sent on a half-open connection is given up
                        with anyio.fail_after(db.round_trip_bound(rt.settings.lease_seconds)):
                            rows = await self.claim_once(want)
                    except db.UNAVAILABLE as exc:  # database away: retry soon, no crash loop
                        await self.outage.failed(exc, self._wake)
                        continue
                    self.outage.ok()
                    runnable = [r for r in rows if r["status"] == "RUNNING"]
                    ran = len(runnable)
                    if await self._hand_on(runnable):
                        return
                    rt.note_claimed(rows)
                    full = len(rows) == want
                    if full and ran < want:
                        continue  # parked blocked/rate-limited rows: look further at once
                self.waiting_for_slot = full or free == 0
                timeout = rt.poll_interval
                if full and capped:
                    timeout = min(timeout, rt.gate.max_wait)  # the next bite, if no slot frees
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
