"""Operator actions that make new runs: replay (a new copy of any run) and retry (a new copy of
a finished run that did not succeed).

Finished runs are immutable (a trigger rejects leaving SUCCESSFUL, FAILED, CANCELLED,
EXPIRED), so retrying is enqueueing a copy: same task, queue, arguments, priority, limits and
attempt budget, a new id, ``parent_id`` = the original, ``metadata.replay_of`` = the original.
One statement for the whole selection (INSERT ... SELECT), through Django's connection so it
joins the caller's transaction; it writes the 'enqueued' events and NOTIFYs each queue once,
like an enqueue. Dedup still holds: a copy whose spec is already active is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import connections

from .. import sql
from ..conf import aging_factor_us, current_runtime_settings
from ..ids import MAX_IDS, parse_ids

__all__ = ["MAX_IDS", "RETRYABLE", "discard_runs", "replay_runs", "retry_runs"]

RETRYABLE = ("FAILED", "CANCELLED", "EXPIRED")

REPLAY = f"""
WITH src AS (
    SELECT r.*, nextval(pg_get_serial_sequence('reproq_task_runs', 'id')) AS new_id
    FROM reproq_task_runs r
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.status = ANY(%(states)s::text[])
    ORDER BY r.id
), ins AS (
    INSERT INTO reproq_task_runs (
        id, backend_alias, task_path, queue_name, priority, status, sort_key, args, kwargs,
        spec_hash, enqueued_at, run_after, attempts, max_attempts, timeout_seconds, worker_ids,
        errors, metadata, lock_key, concurrency_key, concurrency_limit, sem_key, sem_limit,
        blocked, cancel_requested, expires_at, status_reason, parent_id, workflow_id, code_ref,
        pip_lock_hash
    )
    SELECT new_id, backend_alias, task_path, queue_name, priority, 'READY',
           (extract(epoch FROM now()) * 1000000)::bigint
               - priority::bigint * %(aging_us)s::bigint,
           args, kwargs, spec_hash, now(), now(), 0, max_attempts, timeout_seconds, '[]',
           '[]', jsonb_build_object('replay_of', id), lock_key, concurrency_key,
           concurrency_limit, sem_key, sem_limit, false, false,
           CASE WHEN expires_at IS NULL THEN NULL
                ELSE now() + greatest(expires_at - run_after, interval '1 second') END,
           %(reason)s || id, id, NULL, code_ref, pip_lock_hash
    FROM src
    ORDER BY id
    ON CONFLICT (spec_hash) WHERE status IN {sql.ACTIVE_SQL} DO NOTHING
    RETURNING id, parent_id, task_path, queue_name
), events AS (
    INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
    SELECT now(), 'enqueued', min(id), task_path, queue_name, '',
           jsonb_build_object('count', count(*), 'run_ids', (array_agg(id ORDER BY id))[1:20],
                              'replay', true)
    FROM ins GROUP BY task_path, queue_name
    RETURNING 1
), notified AS (
    SELECT count(pg_notify('{sql.CHANNEL}', 'r:' || q)) AS n
    FROM (SELECT DISTINCT queue_name AS q FROM ins) d
)
SELECT (SELECT count(*) FROM src) AS selected, ins.id, ins.parent_id,
       (SELECT n FROM notified) AS notified
FROM (SELECT 1) one LEFT JOIN ins ON true
ORDER BY ins.parent_id
"""
sql.name_statements(globals(), ("REPLAY",))


@dataclass
class ReplayOutcome:
    requested: int
    eligible: int = 0
    created: dict[int, int] = field(default_factory=dict)  # original id -> new id

    @property
    def skipped(self) -> int:
        """Eligible runs not copied because an identical run is active (dedup)."""
        return self.eligible - len(self.created)

    def summary(self, verb: str) -> str:
        parts = [f"{len(self.created)} of {self.requested} runs {verb}"]
        if self.requested - self.eligible:
            parts.append(f"{self.requested - self.eligible} not eligible")
        if self.skipped:
            parts.append(f"{self.skipped} skipped (an identical run is active)")
        return "; ".join(parts)


def _clean(ids: Iterable[int | str]) -> list[int]:
    return parse_ids(ids)


def replay_runs(ids: Iterable[int | str], *, only_failed: bool = False,
                database: str | None = None) -> ReplayOutcome:
    """Enqueue a new copy of each run (`only_failed`: only FAILED, CANCELLED, EXPIRED ones)."""
    from ..control import _database

    clean = _clean(ids)
    outcome = ReplayOutcome(requested=len(clean))
    if not clean:
        return outcome
    states = list(RETRYABLE) if only_failed else [
        "READY", "WAITING", "RUNNING", "SUCCESSFUL", *RETRYABLE]
    params = {"ids": clean, "states": states,
              "aging_us": aging_factor_us(current_runtime_settings().priority_aging_factor),
              "reason": "retry of #" if only_failed else "replay of #"}
    with connections[_database(database)].cursor() as cursor:
        cursor.execute(REPLAY, params)
        for selected, new_id, parent_id, _ in cursor.fetchall():
            outcome.eligible = int(selected)
            if new_id is not None:
                outcome.created[int(parent_id)] = int(new_id)
    return outcome


def retry_runs(ids: Iterable[int | str], database: str | None = None) -> ReplayOutcome:
    """Retry finished runs that did not succeed, as new linked copies."""
    return replay_runs(ids, only_failed=True, database=database)


def discard_runs(ids: Iterable[int | str], database: str | None = None) -> int:
    """Delete runs that are not RUNNING (cancel those first); returns how many went."""
    from ..control import _database

    clean = _clean(ids)
    if not clean:
        return 0
    with connections[_database(database)].cursor() as cursor:
        cursor.execute("DELETE FROM reproq_task_runs WHERE id = ANY(%s::bigint[]) "
                       "AND status <> 'RUNNING'", [clean])
        return int(cursor.rowcount)
