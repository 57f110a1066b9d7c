"""Batches finished attempts into one COMPLETE statement per round trip.

Whatever finishes while a write is in flight goes into the next write, so under load one
statement records many runs; when idle, a single completion is written at once. A failed write
is retried with backoff (at most `db.RECONNECT_MAX_DELAY` apart: results go in within a second
of the database coming back) and nothing is dropped (leases cover a process that dies
meanwhile; the heartbeat renews the leases of runs whose result waits here, see `unwritten`).
A write is bounded in time (`db.round_trip`): one sent on a half-open connection is retried on
another. COMPLETE writes a result only for a run this worker still owns, so a run reclaimed
elsewhere during an outage gets nothing from here.
An outcome PostgreSQL refuses is isolated and recorded as FAILED (`unstorable`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import psycopg

from .. import db, sql
from ..conf import aging_factor_us
from .outcome import Completion, storable_text

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
MAX_BATCH = 1000


class UnstorableOutcome(Exception):
    """Recorded, never raised: PostgreSQL refused to store an attempt's outcome (`unstorable`).

    The attempt is then recorded as FAILED with this class as its ``exception_class_path``
    and, as its traceback, only reproq's own text (the SQLSTATE and primary message).
    """


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
                await self._write_isolating(batch)
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

    async def _write_isolating(self, batch: list[Completion]) -> None:
        """Write `batch`; when PostgreSQL refuses its data (a NUL or a lone surrogate in a return
        value or metadata, which jsonb rejects), split it until the refused completion is alone
        and record that one as FAILED without what was refused, so one bad outcome never holds
        up the results beside it. Other errors (connection lost) propagate: `flush` retries
        the whole batch, and COMPLETE skips runs it already recorded."""
        try:
            await self._write(batch)
        except (psycopg.DataError, UnicodeError) as exc:
            if len(batch) > 1:
                mid = len(batch) // 2
                await self._write_isolating(batch[:mid])
                await self._write_isolating(batch[mid:])
                return
            await self._write([unstorable(batch[0], exc)])

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


def unstorable(completion: Completion, exc: BaseException) -> Completion:
    """The outcome PostgreSQL refused, as a final failure that stores only our own text (the
    error's SQLSTATE and primary message: never its detail or context, which quote the data)."""
    diag = getattr(exc, "diag", None)
    why = (f"{diag.sqlstate} {diag.message_primary}" if diag is not None and diag.sqlstate
           else type(exc).__name__)
    reason = storable_text(f"the outcome ({completion.status}) cannot be stored: {why}")
    logger.error("reproq: run %s: %s; recorded as FAILED", completion.id, reason)
    error = json.dumps({"exception_class_path": "reproq.runtime.completer.UnstorableOutcome",
                        "traceback": reason, "attempt": None, "worker_id": "",
                        "at": datetime.now(UTC).isoformat()})
    return dataclasses.replace(completion, status="FAILED", return_value=None, error=error,
                               delay=None, reason=reason, metadata=None)


def _column(values: list[Any]) -> list[Any] | None:
    """NULL instead of an array of NULLs (a multi-array unnest pads a NULL array with NULLs):
    a batch of plain successes sends three arrays (ids, status, return value), not seven."""
    return None if all(v is None for v in values) else values
