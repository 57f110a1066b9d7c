"""Batches finished attempts into one COMPLETE statement per round trip.

Whatever finishes while a write is in flight goes into the next write, so under load one
statement records many runs; when idle, a single completion is written at once. A failed write
is retried with backoff and nothing is dropped (leases cover a process that dies meanwhile).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from .. import sql
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
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self.batches = 0
        self.written = 0

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
            try:
                await self._write(batch)
                delay = 0.05
            except Exception as exc:
                self.pending[:0] = batch
                logger.warning("reproq: recording %d results failed (%s); retrying in %.1fs",
                               len(batch), type(exc).__name__, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
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
        async with self.runtime.pool.connection() as conn:
            await conn.execute(sql.COMPLETE, params)
        self.batches += 1
        self.written += len(batch)
        if any(c.status == "WAITING" for c in batch):
            self.runtime.promoter.poke()


def _column(values: list[Any]) -> list[Any] | None:
    """NULL instead of an array of NULLs (a multi-array unnest pads a NULL array with NULLs):
    a batch of plain successes sends three arrays (ids, status, return value), not seven."""
    return None if all(v is None for v in values) else values
