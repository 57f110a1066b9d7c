"""Deleting finished runs past their retention: the rule, for ``manage.py reproq prune`` (sync,
Django's connection) and for the reclaim service (async, its pool), which prunes in the leader
only (or, when no leader exists for a while, everywhere: `reproq.runtime.peers.MaintenanceTurn`).

A run is prunable when it is finished (SUCCESSFUL, FAILED, CANCELLED or EXPIRED) and its
``finished_at`` lies more than ``keep_seconds`` in the past; filters narrow that by state, queue
and task path. Deletes go oldest first in batches (one statement and one short transaction
each, ``FOR UPDATE SKIP LOCKED``), so pruning never holds many locks or blocks a claim. A run
without ``finished_at`` (written by hand) is never pruned, nor a finished workflow step whose
dependents still wait for it (they need its result). The runtime also deletes cron
schedule ticks scheduled before the retention that lie behind their schedule's
``next_run_at`` (`aprune_ticks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import sql
from .conf import QUEUE_NAME_RE
from .states import FINAL

FINAL_STATES = tuple(s.value for s in FINAL)
DEFAULT_BATCH = 5000
RUNTIME_MAX_BATCHES = 2  # per reclaim pass: at most this many full batches, then the next pass
CATCH_UP_SECONDS = 1.0  # the pause before the next pass while full batches keep coming


@dataclass(frozen=True)
class PruneFilter:
    """Which finished runs may go: older than `keep_seconds`, in `states`, optionally only some
    queues and task paths."""

    keep_seconds: float
    states: tuple[str, ...] = FINAL_STATES
    queues: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        keep = self.keep_seconds
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not keep >= 0 \
                or keep == float("inf"):
            raise ValueError(f"keep_seconds must be a number of seconds >= 0, got {keep!r}")
        bad = [s for s in self.states if s not in FINAL_STATES]
        if bad or not self.states:
            raise ValueError(f"only finished states can be pruned ({', '.join(FINAL_STATES)}), "
                             f"got {', '.join(map(str, bad)) or 'none'}")
        bad = [q for q in self.queues if not isinstance(q, str) or not QUEUE_NAME_RE.match(q)]
        if bad:
            raise ValueError(f"invalid queue names {bad!r}")
        bad = [t for t in self.tasks if not isinstance(t, str) or not t or len(t) > 500]
        if bad:
            raise ValueError(f"invalid task paths {bad!r}")

    def params(self, limit: int) -> dict[str, Any]:
        return {"keep": float(self.keep_seconds), "states": list(self.states),
                "queues": list(self.queues) or None, "tasks": list(self.tasks) or None,
                "limit": int(limit)}


def _limit(batch: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, got {batch!r}")
    return batch


def count_prunable(which: PruneFilter, database: str = "default",
                   cap: int | None = None) -> int:
    """How many runs `prune` would delete now (at most `cap`, when given)."""
    from django.db import connections

    limit = cap if cap is not None else 2**62
    with connections[database].cursor() as cursor:
        cursor.execute(sql.COUNT_PRUNABLE, which.params(limit))
        return int(cursor.fetchone()[0])


def prune(which: PruneFilter, database: str = "default", batch: int = DEFAULT_BATCH,
          max_batches: int | None = None, progress: Any = None) -> int:
    """Delete the runs `which` selects, `batch` per transaction, until none is left (or
    `max_batches` were full); returns how many were deleted. Outside any transaction of the
    caller, each batch commits on its own."""
    from django.db import connections, transaction

    limit = _limit(batch)
    total = batches = 0
    while max_batches is None or batches < max_batches:
        with transaction.atomic(using=database), connections[database].cursor() as cursor:
            cursor.execute(sql.PRUNE_RUNS, which.params(limit))
            deleted = int(cursor.fetchone()[0])
        total += deleted
        batches += 1
        if progress is not None and deleted:
            progress(total)
        if deleted < limit:
            break
    return total


async def aprune(pool: Any, which: PruneFilter, batch: int = DEFAULT_BATCH,
                 max_batches: int = RUNTIME_MAX_BATCHES) -> int:
    """`prune` on an async psycopg pool of autocommit connections (the runtime's)."""
    limit = _limit(batch)
    total = 0
    for _ in range(max_batches):
        async with pool.connection() as conn:
            cur = await conn.execute(sql.PRUNE_RUNS, which.params(limit))
            row = await cur.fetchone()
            deleted = int(row["deleted"] if isinstance(row, dict) else row[0])
        total += deleted
        if deleted < limit:
            break
    return total


async def aprune_ticks(pool: Any, keep_seconds: float, batch: int = DEFAULT_BATCH) -> int:
    """Delete at most `batch` schedule ticks older than `keep_seconds` (one statement)."""
    async with pool.connection() as conn:
        cur = await conn.execute(sql.PRUNE_TICKS, {"keep": float(keep_seconds),
                                                   "limit": _limit(batch)})
        return max(int(cur.rowcount), 0)
