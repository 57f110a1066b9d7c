"""Batches finished attempts into one COMPLETE statement per round trip.

Whatever finishes while a write is in flight goes into the next write, so under load one
statement records many runs; when idle, a single completion is written at once. A failed write
is retried with backoff (at most `db.RECONNECT_MAX_DELAY` apart: results go in within a second
of the database coming back) and nothing is dropped (leases cover a process that dies
meanwhile; the heartbeat renews the leases of runs whose result waits here, see `unwritten`).
A write is bounded in time (`db.round_trip`): one sent on a half-open connection is retried on
another. COMPLETE writes a result only for a run this worker still owns, so a run reclaimed
elsewhere during an outage gets nothing from here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from .. import db, sql
from ..conf import aging_factor_us
from .outcome import Completion

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
MAX_BATCH = 1000


class Completer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pending: list[Completion] = []
        self.writing: list[Completion] = []  # the batch being written now
        self.outage = db.Outage("completer")
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self.batches = 0
        self.written = 0

    def unwritten(self) -> set[int]:
        """Ids of the runs whose result is here, not yet in the database."""
        return {c.id for c in self.pending} | {c.id for c in self.writing}

    def put(self, completion: Completion) -> None:
        self.pending.append(completion)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write everything pending (retrying until the database takes it)."""
        delay = 0.05
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            self.writing = batch
            try:
                await self._write(batch)
                delay = 0.05
                self.outage.ok()
            except Exception as exc:
                if db.is_unavailable(exc):
                    self.pending[:0] = batch
                    await self.outage.failed(exc)
                    continue
                self.pending[:0] = batch
                logger.warning("reproq: recording %d results failed (%s); retrying in %.1fs",
                               len(batch), type(exc).__name__, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self.writing = []
        self._idle.set()

    async def _write(self, batch: list[Completion]) -> None:
        params: dict[str, Any] = {
            "ids": [c.id for c in batch],
            "status": [c.status for c in batch],
            "return_value": _column([c.return_value for c in batch]),
            "error": _column([c.error for c in batch]),
            "delay": _column([c.delay for c in batch]),
            "reason": _column([c.reason or None for c in batch]),  # NULL reads as ''
            "metadata": _column([c.metadata for c in batch]),
            "worker": self.runtime.worker_id,
            "aging_us": aging_factor_us(self.runtime.settings.priority_aging_factor),
        }
        rt = self.runtime
        async with db.round_trip(rt.pool, db.round_trip_bound(rt.settings.lease_seconds)) as conn:
            await conn.execute(sql.COMPLETE, params)
        self.batches += 1
        self.written += len(batch)
        if any(c.status == "WAITING" for c in batch):
            self.runtime.promoter.poke()


def _column(values: list[Any]) -> list[Any] | None:
    """NULL instead of an array of NULLs (a multi-array unnest pads a NULL array with NULLs):
    a batch of plain successes sends three arrays (ids, status, return value), not seven."""
    return None if all(v is None for v in values) else values
