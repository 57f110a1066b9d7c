"""reproq's SQL statements, in one place: enqueue, claim, complete, heartbeat, reclaim, release,
promote/unblock, cancel, pause, events, pruning, metadata.

Each public statement is a `Statement` (a `str` carrying its name, which
`reproq.db.statement_counts` counts). Statements only one module runs live in that module and
are named there with `name_statements`: the beat's (`reproq.runtime.beat`), the SSE hub's
(`reproq.asgi.sse`), replay (`reproq.dashboard.ops`).

Rules for the hot path (enqueue, claim, complete, heartbeat, reclaim): each statement works on a
whole batch (arrays in, rows out); none scans the table per task; NOTIFY is sent once per queue
per statement (PostgreSQL folds duplicates within a transaction and delivers at COMMIT, so a
rolled-back enqueue wakes nobody).

Notification payloads on the ``reproq`` channel, ``<topic>:<value>`` (`reproq.runtime.ports.Topic`
and its `decode` are the one reader):
  ``r:<queue>``   READY work appeared in <queue> (enqueue, retry without delay, reclaim,
                  release, promote, unblock, the beat's ticks, replay)
  ``w:<epoch>``   a WAITING run becomes due at <epoch> (seconds since the epoch, fractional)
  ``c:<id>``      cancellation requested for run <id>, which is RUNNING somewhere
  ``q:<queue>``   <queue> was paused or resumed
  ``e:<id>``      dashboard events were written, the newest being reproq_events id <id>
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any, Self


class Statement(str):
    """A named SQL statement: the text itself (a `str`, usable wherever one is) and the name
    `reproq.db.statement_counts` counts it under (`name_of`).

    Text derived from a statement (``+``, ``.replace``, ``.format``, f-strings) is a plain `str`
    again, counted as ``'other'`` until it is named too.
    """

    name: str

    def __new__(cls, text: str, name: str) -> Self:
        statement = super().__new__(cls, text)
        statement.name = name
        return statement


def name_statements(namespace: MutableMapping[str, Any], names: Iterable[str],
                    prefix: str = "") -> None:
    """Replace each text ``namespace[name]`` by a `Statement` called ``prefix + name``: how a
    module that defines its own statements (the beat, the SSE hub, replay) names them."""
    for name in names:
        namespace[name] = Statement(namespace[name], prefix + name)


def name_of(query: object) -> str:
    """The name of a `Statement` (for statement counts), else 'other'."""
    return query.name if isinstance(query, Statement) else "other"


CHANNEL = "reproq"
ACTIVE_SQL = "('READY', 'WAITING', 'RUNNING')"

# Times a Python datetime can hold in any session time zone (PostgreSQL's range is wider, and
# holds ±infinity): a time outside it, in a row written by hand, reads as NULL instead of failing
# the driver's load of the whole result.
PY_TIME_RANGE = "'0001-01-02 00:00:00+00' AND '9999-12-30 23:59:59.999999+00'"


def _py_time(column: str) -> str:
    return f"CASE WHEN {column} BETWEEN {PY_TIME_RANGE} THEN {column} END AS {column}"


RESULT_COLUMNS = (
    "id, backend_alias, task_path, queue_name, priority, status, args, kwargs, "
    + ", ".join(_py_time(c) for c in ("enqueued_at", "run_after", "started_at",
                                      "last_attempted_at", "finished_at"))
    + ", attempts, max_attempts, worker_ids, errors, return_value, metadata, status_reason, "
    "lease_owner, " + _py_time("leased_until") + ", cancel_requested, "
    + _py_time("expires_at") + ", lock_key, concurrency_key, concurrency_limit, timeout_seconds"
)

# Columns every new run is inserted with (enqueue, the beat's ticks, pg_cron jobs), in order.
RUN_COLUMNS = """
        id, backend_alias, task_path, queue_name, priority, status, sort_key, args, kwargs,
        spec_hash, enqueued_at, run_after, attempts, max_attempts, timeout_seconds, worker_ids,
        errors, metadata, lock_key, concurrency_key, concurrency_limit, sem_key, sem_limit,
        blocked, cancel_requested, expires_at, status_reason, code_ref, pip_lock_hash
"""

# One statement inserts a whole batch (unnest of arrays), skips active duplicates through the
# partial unique index, and notifies each queue once. Every column comes either as an array (one
# value per task, parameter ``<name>``) or, when the whole batch shares it, as one value
# (parameter ``<name>_1``, the array then being NULL): a batch of one task path and queue sends
# two arrays, not fifteen. ``args`` is always an array; it sets the row count. Ids are drawn
# before the insert (from the sequence by name: migration 0004 makes sure of the name, and a
# catalog lookup per call cost about 5 % of a one-row enqueue) so every input row maps back to
# its id, inserted or not. Runs of one batch share now(), so the batch position is added to sort_key
# (1 microsecond each): FIFO holds within a batch too (equal keys would be claimed, parked and
# woken in arbitrary order). No joins between the CTEs: their row counts are unknown to the
# planner, and a join estimate of rows x rows made large batches cross jit_above_cost (JIT
# compilation cost more than the insert).
ENQUEUE_COLUMNS = (
    ("task_path", "text"), ("queue_name", "text"), ("priority", "int"), ("kwargs", "text"),
    ("spec_hash", "text"), ("run_after", "timestamptz"), ("delay", "float8"),
    ("lock_key", "text"), ("concurrency_key", "text"), ("concurrency_limit", "int"),
    ("max_attempts", "int"), ("timeout", "int"), ("expires_in", "float8"),
)
_ENQUEUE_ARRAYS = ", ".join(f"%({name})s::{kind}[]" for name, kind in ENQUEUE_COLUMNS)
_ENQUEUE_NAMES = ", ".join(name for name, _ in ENQUEUE_COLUMNS)
_ENQUEUE_VALUES = ",\n           ".join(
    f"coalesce(t.{name}, %({name}_1)s::{kind}) AS {name}" for name, kind in ENQUEUE_COLUMNS)
# The INSERT of ENQUEUE and ENQUEUE_ONE, from their `input` (one row per task: ord, args, the
# ENQUEUE_COLUMNS, new_id, due, waiting).
_ENQUEUE_INSERT = f"""INSERT INTO reproq_task_runs ({RUN_COLUMNS})
    SELECT new_id, %(backend)s, task_path, queue_name, priority,
           CASE WHEN waiting THEN 'WAITING' ELSE 'READY' END,
           (extract(epoch FROM due) * 1000000)::bigint + ord
               - priority::bigint * %(aging_us)s::bigint,
           args::jsonb, kwargs::jsonb, spec_hash, now(), due, 0, max_attempts, timeout, '[]',
           '[]', '{{}}', lock_key, concurrency_key, concurrency_limit,
           CASE WHEN lock_key IS NOT NULL THEN 'l:' || lock_key
                WHEN concurrency_key IS NOT NULL THEN 'c:' || concurrency_key END,
           CASE WHEN lock_key IS NOT NULL THEN 1 ELSE concurrency_limit END,
           false, false,
           CASE WHEN expires_in IS NULL THEN NULL
                ELSE due + make_interval(secs => expires_in) END,
           '', %(code_ref)s, %(pip_lock_hash)s
    FROM input {{order}}
    ON CONFLICT (spec_hash) WHERE status IN {ACTIVE_SQL} DO NOTHING
    RETURNING id, task_path, queue_name, status, run_after"""

ENQUEUE = f"""
WITH input AS (
    SELECT t.ord - 1 AS ord, t.args,
           {_ENQUEUE_VALUES},
           nextval('reproq_task_runs_id_seq'::regclass) AS new_id,
           d.due, d.due > now() AS waiting
    FROM unnest(%(args)s::text[], {_ENQUEUE_ARRAYS})
         WITH ORDINALITY AS t(args, {_ENQUEUE_NAMES}, ord),
         LATERAL (SELECT coalesce(t.run_after, %(run_after_1)s::timestamptz,
                                  now() + make_interval(
                                      secs => coalesce(t.delay, %(delay_1)s::float8, 0))) AS due) d
), ins AS (
    {_ENQUEUE_INSERT.replace("{order}", "ORDER BY ord")}
), events AS (
    INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
    SELECT now(), 'enqueued', min(id), task_path, queue_name, '',
           jsonb_build_object('count', count(*), 'run_ids', (array_agg(id ORDER BY id))[1:20])
    FROM ins
    GROUP BY task_path, queue_name
    RETURNING 1
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', payload)) AS n FROM (
        SELECT DISTINCT 'r:' || queue_name AS payload FROM ins WHERE status = 'READY'
        UNION ALL
        SELECT 'w:' || extract(epoch FROM min(run_after))::text FROM ins
        WHERE status = 'WAITING' HAVING count(*) > 0
    ) p
)
SELECT CASE WHEN t.new_id IN (SELECT id FROM ins) THEN t.new_id END AS id,
       t.waiting,
       CASE WHEN t.waiting THEN t.due END AS run_after,
       CASE WHEN t.ord = 0 THEN now() END AS enqueued_at,
       (SELECT n FROM notified) AS notified
FROM input t
ORDER BY t.ord
"""

# ENQUEUE for one task (the common `enqueue` / `aenqueue`): the same row, event and NOTIFY, the
# same result shape, from scalar parameters (``<name>_1``, and ``args_1``) instead of arrays,
# and without the aggregates and sorts a batch needs. PostgreSQL spends about a fifth less CPU
# on it than on ENQUEUE with one task (mostly executor start-up of the batch's plan), and a
# one-by-one enqueue runs about 14 % faster.
_ENQUEUE_ONE_VALUES = ",\n           ".join(
    f"%({name}_1)s::{kind} AS {name}" for name, kind in ENQUEUE_COLUMNS)
ENQUEUE_ONE = f"""
WITH input AS (
    SELECT 0 AS ord, %(args_1)s::text AS args,
           {_ENQUEUE_ONE_VALUES},
           nextval('reproq_task_runs_id_seq'::regclass) AS new_id,
           d.due, d.due > now() AS waiting
    FROM (SELECT coalesce(%(run_after_1)s::timestamptz,
                          now() + make_interval(secs => coalesce(%(delay_1)s::float8, 0)))
                 AS due) d
), ins AS (
    {_ENQUEUE_INSERT.replace("{order}", "")}
), events AS (
    INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
    SELECT now(), 'enqueued', id, task_path, queue_name, '',
           jsonb_build_object('count', 1, 'run_ids', jsonb_build_array(id))
    FROM ins
)
SELECT (SELECT id FROM ins) AS id, t.waiting,
       CASE WHEN t.waiting THEN t.due END AS run_after,
       now() AS enqueued_at,
       (SELECT count(pg_notify('{CHANNEL}', CASE WHEN status = 'READY' THEN 'r:' || queue_name
                                  ELSE 'w:' || extract(epoch FROM run_after)::text END))
        FROM ins) AS notified
FROM input t
"""

# The active runs that made dedup skip an insert (a second statement, only when that happened).
ACTIVE_BY_SPEC = f"""
SELECT {RESULT_COLUMNS}, spec_hash FROM reproq_task_runs
WHERE spec_hash = ANY(%(hashes)s::text[]) AND status IN {ACTIVE_SQL}
"""

GET_RESULT = f"SELECT {RESULT_COLUMNS} FROM reproq_task_runs WHERE id = %(id)s"

# --------------------------------------------------------------------------- runtime statements

# Tokens in a bucket now: what was left plus what accrued since, capped at the burst size.
_REFILLED = ("LEAST(b.burst::float8, b.tokens"
             " + GREATEST(extract(epoch FROM now() - b.refreshed_at), 0)"
             " * b.rate / b.period_seconds)")

# Semaphore rows (reproq_concurrency) are locked by several statements that touch many keys at
# once: the claim, and the release trigger fired once per run leaving RUNNING (COMPLETE, RECLAIM,
# RELEASE). Row locks taken in whatever order a plan or a batch happens to produce deadlock
# against each other, so every such statement first locks the rows it needs in key order (and
# the claim locks its token buckets in key order before any semaphore row).
_LOCK_SEMAPHORES = """
    SELECT s.key FROM reproq_concurrency s
    WHERE s.key IN ({keys})
    ORDER BY s.key
    FOR UPDATE
"""
_SEMS_OF_INPUT = ("SELECT r.sem_key FROM reproq_task_runs r JOIN input i ON i.id = r.id"
                  " WHERE r.sem_key IS NOT NULL AND r.status = 'RUNNING'")
_SEMS_OF_EXPIRED = ("SELECT r.sem_key FROM reproq_task_runs r JOIN expired e ON e.id = r.id"
                    " WHERE r.sem_key IS NOT NULL")
_SEMS_OF_IDS = ("SELECT sem_key FROM reproq_task_runs WHERE id = ANY(%(ids)s::bigint[])"
                " AND sem_key IS NOT NULL AND status = 'RUNNING'")

# Statements that update several RUNNING runs of one worker by id (COMPLETE, HEARTBEAT,
# RELEASE) run concurrently on the worker's connections: each locks its rows in id order
# first, whatever order the batch or the plan would take, so that they cannot deadlock.
_LOCK_OWN_RUNS = """
    SELECT r.id FROM reproq_task_runs r
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.status = 'RUNNING' AND r.lease_owner = %(worker)s
    ORDER BY r.id
    FOR UPDATE
"""

# Workflow steps waiting on runs of this batch: locked in id order before the batch is written,
# so that the release trigger (reproq.workflows) of two concurrent batches whose runs feed the
# same steps in crossing orders cannot deadlock on them.
_LOCK_DEPENDENTS = """
    SELECT d.id FROM reproq_run_edges e JOIN reproq_task_runs d ON d.id = e.downstream_id
    WHERE e.upstream_id IN (SELECT id FROM own) AND d.status = 'WAITING'
    ORDER BY d.id
    FOR UPDATE OF d
"""

_NOTIFY_READY_QUEUES = f"""
    SELECT count(pg_notify('{CHANNEL}', 'r:' || q)) AS n
    FROM (SELECT DISTINCT queue_name AS q FROM {{source}} WHERE status = 'READY') d
"""

def _epoch_us(column: str) -> str:
    """A timestamptz as epoch microseconds (exact); NULL for NULL, for ±infinity and for any
    time outside Python's datetime range (PY_TIME_RANGE; PostgreSQL's reaches year 294276, whose
    microseconds overflow bigint): a row written by hand must never fail a whole claim."""
    return (f"CASE WHEN {column} BETWEEN {PY_TIME_RANGE} "
            f"THEN (extract(epoch FROM {column}) * 1000000)::bigint END")


# The columns a claim returns for each row it decided on (what the executor needs to run it).
# What only a TaskResult needs (built for signals receivers, takes_context tasks and process
# runs, not for a plain run) comes in forms that cost nothing to receive: timestamps as epoch
# microseconds, JSON as text; `reproq.runtime.claimer.run_details` turns them into values when
# needed. Parsing them for every row was about a tenth of a worker's CPU on a no-op drain. The
# queue wait (the metric) is computed here. args and kwargs come as text too, decoded row by row
# by the executor (`reproq.runtime.executor.load_row`): PostgreSQL accepts JSON that Python
# cannot load (nesting ~1,000 deep, a number of 5,000 digits), and a driver-side jsonb loader
# would fail the whole batch's fetch on one such row, stranding the runs claimed beside it.
_CLAIM_RETURNING = f"""t.id, t.task_path, t.queue_name, t.priority, t.status,
              t.args::text AS args_json, t.kwargs::text AS kwargs_json,
              t.attempts, t.max_attempts, t.timeout_seconds, t.cancel_requested,
              {_epoch_us("t.enqueued_at")} AS enqueued_at_us,
              {_epoch_us("t.run_after")} AS run_after_us,
              {_epoch_us("t.started_at")} AS started_at_us,
              {_epoch_us("t.last_attempted_at")} AS last_attempted_at_us,
              t.worker_ids::text AS worker_ids_json, t.metadata::text AS metadata_json,
              CASE WHEN isfinite(t.last_attempted_at) AND isfinite(t.run_after)
                   THEN greatest(extract(epoch FROM t.last_attempted_at - t.run_after), 0)::float8
              END AS queue_wait"""

# Did the claim pass over READY rows of these queues that SKIP LOCKED left out? Only looked at
# when the claim found fewer rows than it asked for (a full claim is followed by another one
# anyway), and in index order, so that it never scans the table.
_SKIPPED_LOCKED = """CASE WHEN (SELECT count(*) FROM cand) < %(limit)s THEN EXISTS (
        SELECT 1 FROM live q CROSS JOIN LATERAL (
            SELECT 1 FROM reproq_task_runs r
            WHERE r.status = 'READY' AND r.queue_name = q.name
              AND r.id NOT IN (SELECT id FROM cand)
            ORDER BY r.sort_key
            LIMIT 1
        ) x
    ) ELSE false END"""

# The due, unlocked candidates of a claim: one index range scan per non-paused queue (LATERAL),
# rows locked with SKIP LOCKED so claimers never wait on each other, merged in sort_key order.
_CLAIM_LIVE = """live AS MATERIALIZED (
    SELECT q.name FROM unnest(%(queues)s::text[]) AS q(name)
    WHERE NOT EXISTS (SELECT 1 FROM reproq_queue_controls qc
                      WHERE qc.queue_name = q.name AND qc.paused)
)"""

# Claim up to %(limit)s due rows of the given queues in sort_key order, in ONE statement:
#  1. candidates: one index range scan per non-paused queue (LATERAL), rows locked with SKIP
#     LOCKED so claimers never wait on each other;
#  2. rate limits: each candidate's most specific token bucket (task:, queue:, global) is
#     refilled and debited atomically (a row lock on the bucket serialises claimers; PostgreSQL
#     re-evaluates the SET on the latest bucket row); rows without a token are deferred to when
#     their bucket has one (WAITING + run_after) so they do not block other tasks;
#  3. lock/concurrency keys: rows that got a token take a semaphore slot the same way; rows of a
#     full semaphore are parked (WAITING, blocked) and woken one per freed slot by a trigger;
#  4. expired rows become EXPIRED without running.
# Returns every row it decided on (the runtime runs the RUNNING ones), or one row of NULLs when
# there is none; every row carries `skipped_locked`: READY rows of these queues existed that
# SKIP LOCKED passed over. Their lock holder may not be about to change them: a statement whose
# FOR UPDATE found a row updated meanwhile (e.g. two promoters, or UNBLOCK and the release
# trigger, waking the same row) keeps the lock on the new version even when it no longer
# qualifies, until it commits, and sends no NOTIFY. The claimer then looks again shortly instead
# of sleeping until the next NOTIFY or the fallback timer. The runtime tries `CLAIM_FAST` first.
CLAIM = f"""
WITH {_CLAIM_LIVE}, cand AS (
    SELECT c.* FROM live q
    CROSS JOIN LATERAL (
        SELECT r.id, r.sort_key, r.queue_name, r.task_path, r.sem_key, r.sem_limit,
               coalesce(r.expires_at <= now(), false) AS expired
        FROM reproq_task_runs r
        WHERE r.status = 'READY' AND r.queue_name = q.name
        ORDER BY r.sort_key
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.sort_key
    LIMIT %(limit)s
), rated AS (
    SELECT c.*, CASE WHEN c.expired THEN NULL
                     ELSE coalesce(tb.key, qb.key, gb.key) END AS bucket
    FROM cand c
    LEFT JOIN reproq_rate_limits tb ON tb.key = 'task:' || c.task_path
    LEFT JOIN reproq_rate_limits qb ON qb.key = 'queue:' || c.queue_name
    LEFT JOIN reproq_rate_limits gb ON gb.key = 'global'
), want_tokens AS (
    SELECT bucket, count(*) AS n FROM rated WHERE bucket IS NOT NULL GROUP BY bucket
), bucket_locks AS MATERIALIZED (
    SELECT b.key FROM reproq_rate_limits b
    WHERE b.key IN (SELECT bucket FROM want_tokens)
    ORDER BY b.key
    FOR UPDATE
), tokens AS (
    UPDATE reproq_rate_limits b SET
        last_grant = LEAST(w.n, floor({_REFILLED}))::int,
        tokens = {_REFILLED} - LEAST(w.n, floor({_REFILLED})),
        refreshed_at = greatest(now(), b.refreshed_at)
    FROM want_tokens w JOIN bucket_locks l ON l.key = w.bucket
    WHERE b.key = w.bucket
    RETURNING b.key, b.last_grant, b.tokens, b.rate, b.period_seconds
), metered AS (
    SELECT r.*, t.tokens AS tokens_left, t.rate, t.period_seconds,
           row_number() OVER (PARTITION BY r.bucket ORDER BY r.sort_key) AS bucket_rank,
           (r.bucket IS NULL OR row_number() OVER (PARTITION BY r.bucket ORDER BY r.sort_key)
                                <= coalesce(t.last_grant, 0)) AS has_token
    FROM rated r LEFT JOIN tokens t ON t.key = r.bucket
), want_slots AS (
    SELECT sem_key, count(*) AS n, min(sem_limit) AS lim FROM metered
    WHERE sem_key IS NOT NULL AND has_token AND NOT expired
    GROUP BY sem_key
), sem_locks AS MATERIALIZED (
    {_LOCK_SEMAPHORES.format(keys="SELECT sem_key FROM want_slots")}
), slots AS (
    UPDATE reproq_concurrency s SET
        last_grant = LEAST(w.n, GREATEST(w.lim - s.running, 0)),
        running = s.running + LEAST(w.n, GREATEST(w.lim - s.running, 0))
    FROM want_slots w JOIN sem_locks l ON l.key = w.sem_key
    WHERE s.key = w.sem_key
    RETURNING s.key, s.last_grant
), decided AS (
    SELECT m.id, m.bucket, m.sem_key,
           CASE
               WHEN m.expired THEN 'EXPIRED'
               WHEN NOT m.has_token THEN 'RATE'
               WHEN m.sem_key IS NULL THEN 'RUN'
               WHEN row_number() OVER (PARTITION BY m.sem_key, (m.has_token AND NOT m.expired)
                                       ORDER BY m.sort_key) <= coalesce(sl.last_grant, 0)
                   THEN 'RUN'
               ELSE 'BLOCKED'
           END AS verdict,
           CASE WHEN m.bucket IS NOT NULL AND NOT m.has_token
                THEN GREATEST(m.bucket_rank - coalesce(m.tokens_left, 0) - coalesce(
                         (SELECT t.last_grant FROM tokens t WHERE t.key = m.bucket), 0), 0)
                     * m.period_seconds / m.rate
           END AS rate_delay
    FROM metered m LEFT JOIN slots sl ON sl.key = m.sem_key
), claimed AS (
    UPDATE reproq_task_runs t SET
        status = CASE d.verdict WHEN 'RUN' THEN 'RUNNING' WHEN 'EXPIRED' THEN 'EXPIRED'
                                ELSE 'WAITING' END,
        blocked = (d.verdict = 'BLOCKED'),
        run_after = CASE WHEN d.verdict = 'RATE'
                         THEN now() + make_interval(secs => GREATEST(d.rate_delay, 0.001))
                         ELSE t.run_after END,
        -- least(): a hand-written attempts of 2^31-1 must not overflow the whole claim
        attempts = least(t.attempts, 2147483646) + CASE WHEN d.verdict = 'RUN' THEN 1 ELSE 0 END,
        started_at = CASE WHEN d.verdict = 'RUN' THEN coalesce(t.started_at, now())
                          ELSE t.started_at END,
        last_attempted_at = CASE WHEN d.verdict = 'RUN' THEN now() ELSE t.last_attempted_at END,
        finished_at = CASE WHEN d.verdict = 'EXPIRED' THEN now() END,
        worker_ids = CASE WHEN d.verdict = 'RUN' THEN t.worker_ids || to_jsonb(%(worker)s::text)
                          ELSE t.worker_ids END,
        lease_owner = CASE WHEN d.verdict = 'RUN' THEN %(worker)s END,
        leased_until = CASE WHEN d.verdict = 'RUN'
                            THEN now() + make_interval(secs => %(lease)s) END,
        status_reason = CASE d.verdict
            WHEN 'EXPIRED' THEN 'expired: not started before ' || t.expires_at::text
            WHEN 'RATE' THEN 'rate limited by ' || d.bucket
            WHEN 'BLOCKED' THEN 'waiting for a free slot of ' || d.sem_key
            ELSE t.status_reason END
    FROM decided d
    WHERE t.id = d.id
    RETURNING {_CLAIM_RETURNING}
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', 'w:' || (due / 1000000.0)::text)) AS n
    FROM (SELECT min(run_after_us) AS due FROM claimed
          WHERE status = 'WAITING' AND run_after_us > extract(epoch FROM now()) * 1000000) d
    WHERE due IS NOT NULL
)
SELECT claimed.*, (SELECT n FROM notified) AS notified, {_SKIPPED_LOCKED} AS skipped_locked
FROM (SELECT 1) AS one LEFT JOIN claimed ON true
"""

# The claim without flow control, for the common case: candidates chosen exactly as CLAIM does,
# but only those that need no token and no semaphore slot are decided on (RUNNING, or EXPIRED),
# which is what CLAIM would decide for them too. A candidate that has a lock/concurrency key or
# a token bucket (task:, queue: or global) is left READY and counted in `passed`: the runtime
# then runs CLAIM at once for the slots still free (and keeps using it for a while). It is
# short to plan (CLAIM's planning costs more than its execution on a no-op drain) and touches
# neither reproq_rate_limits rows nor reproq_concurrency. Same result shape as CLAIM, with
# `passed` instead of `notified` (it defers nothing, so it never announces a due time).
CLAIM_FAST = f"""
WITH {_CLAIM_LIVE}, cand AS (
    SELECT c.*,
           NOT c.expired AND (c.sem_key IS NOT NULL OR EXISTS (
               SELECT 1 FROM reproq_rate_limits b
               WHERE b.key IN ('task:' || c.task_path, 'queue:' || c.queue_name, 'global')
           )) AS gated
    FROM live q
    CROSS JOIN LATERAL (
        SELECT r.id, r.sort_key, r.queue_name, r.task_path, r.sem_key,
               coalesce(r.expires_at <= now(), false) AS expired
        FROM reproq_task_runs r
        WHERE r.status = 'READY' AND r.queue_name = q.name
        ORDER BY r.sort_key
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.sort_key
    LIMIT %(limit)s
), claimed AS (
    UPDATE reproq_task_runs t SET
        status = CASE WHEN c.expired THEN 'EXPIRED' ELSE 'RUNNING' END,
        blocked = false,
        attempts = least(t.attempts, 2147483646) + CASE WHEN c.expired THEN 0 ELSE 1 END,
        started_at = CASE WHEN c.expired THEN t.started_at ELSE coalesce(t.started_at, now()) END,
        last_attempted_at = CASE WHEN c.expired THEN t.last_attempted_at ELSE now() END,
        finished_at = CASE WHEN c.expired THEN now() END,
        worker_ids = CASE WHEN c.expired THEN t.worker_ids
                          ELSE t.worker_ids || to_jsonb(%(worker)s::text) END,
        lease_owner = CASE WHEN c.expired THEN NULL ELSE %(worker)s END,
        leased_until = CASE WHEN c.expired THEN NULL
                            ELSE now() + make_interval(secs => %(lease)s) END,
        status_reason = CASE WHEN c.expired
                             THEN 'expired: not started before ' || t.expires_at::text
                             ELSE t.status_reason END
    FROM cand c
    WHERE t.id = ANY(ARRAY(SELECT id FROM cand WHERE NOT gated)) AND t.id = c.id
    RETURNING {_CLAIM_RETURNING}
)
SELECT claimed.*, (SELECT count(*) FROM cand WHERE gated) AS passed,
       {_SKIPPED_LOCKED} AS skipped_locked
FROM (SELECT 1) AS one LEFT JOIN claimed ON true
"""

_CLAIM_FAST_TEXTS: dict[tuple[tuple[str, ...], int], str] = {}
_CLAIM_FAST_TEXTS_MAX = 256


def claim_fast(queues: tuple[str, ...], limit: int) -> str:
    """`CLAIM_FAST` with the queues and the limit written into the text (one text per runtime
    and free-slot count; the worker and lease stay parameters).

    As parameters, a generic plan has to guess them (10 queues; 10% of the table), so
    PostgreSQL re-plans every claim, or settles on a generic plan built on those guesses —
    which, depending on the table's statistics, may be the cheaper-looking one. Written in,
    the prepared statement's generic plan is the custom plan, PostgreSQL switches to it after
    five runs, and a claim costs no planning at all. Counted as a CLAIM in
    `reproq.db.statement_counts`.
    """
    key = (tuple(queues), int(limit))
    text = _CLAIM_FAST_TEXTS.get(key)
    if text is None:
        if len(_CLAIM_FAST_TEXTS) >= _CLAIM_FAST_TEXTS_MAX or key[1] < 1:
            return CLAIM_FAST
        from psycopg.sql import Literal

        queues_sql = Literal(list(key[0])).as_string().replace("%", "%%")  # not a placeholder
        text = CLAIM_FAST.replace("%(queues)s", queues_sql).replace("%(limit)s", str(key[1]))
        text = Statement(text, "CLAIM")
        _CLAIM_FAST_TEXTS[key] = text
    return text

# Record finished attempts of one worker in one statement. Rows whose lease this worker lost
# (reclaimed elsewhere) are left alone. A retry goes to WAITING (or READY without delay).
COMPLETE = f"""
WITH input AS (
    SELECT * FROM unnest(
        %(ids)s::bigint[], %(status)s::text[], %(return_value)s::text[], %(error)s::text[],
        %(delay)s::float8[], %(reason)s::text[], %(metadata)s::text[]
    ) AS u(id, status, return_value, error, delay, reason, metadata)
), own AS MATERIALIZED (
    {_LOCK_OWN_RUNS}
), sem_locks AS MATERIALIZED (
    {_LOCK_SEMAPHORES.format(keys=_SEMS_OF_INPUT)}
), dep_locks AS MATERIALIZED (
    {_LOCK_DEPENDENTS}
), done AS (
    UPDATE reproq_task_runs t SET
        status = CASE WHEN t.cancel_requested AND u.status IN ('READY', 'WAITING', 'FAILED')
                      THEN 'CANCELLED' ELSE u.status END,
        finished_at = CASE WHEN u.status IN ('SUCCESSFUL', 'FAILED', 'CANCELLED', 'EXPIRED')
                                OR t.cancel_requested THEN now() END,
        return_value = u.return_value::jsonb,
        errors = CASE WHEN u.error IS NULL THEN t.errors
                      ELSE t.errors || jsonb_build_array(u.error::jsonb) END,
        metadata = coalesce(u.metadata::jsonb, t.metadata),
        run_after = CASE WHEN u.status IN ('READY', 'WAITING')
                         THEN now() + make_interval(secs => coalesce(u.delay, 0))
                         ELSE t.run_after END,
        sort_key = CASE WHEN u.status IN ('READY', 'WAITING')
                        THEN (extract(epoch FROM now()
                                      + make_interval(secs => coalesce(u.delay, 0)))
                              * 1000000)::bigint - t.priority::bigint * %(aging_us)s::bigint
                        ELSE t.sort_key END,
        status_reason = CASE WHEN t.cancel_requested AND u.status IN ('READY', 'WAITING', 'FAILED')
                             THEN 'cancelled while running' ELSE coalesce(u.reason, '') END,
        lease_owner = NULL,
        leased_until = NULL
    FROM input u
    WHERE t.id = u.id AND t.id IN (SELECT id FROM own)
      AND t.status = 'RUNNING' AND t.lease_owner = %(worker)s
      AND (SELECT count(*) FROM dep_locks) >= 0  -- lock the dependents first, in id order
    RETURNING t.id, t.status, t.queue_name, t.run_after
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', payload)) AS n FROM (
        SELECT DISTINCT 'r:' || queue_name AS payload FROM done WHERE status = 'READY'
        UNION ALL
        SELECT 'w:' || extract(epoch FROM min(run_after))::text FROM done
        WHERE status = 'WAITING' HAVING count(*) > 0
    ) p
)
SELECT done.id, done.status, (SELECT n FROM notified) AS notified,
       (SELECT count(*) FROM sem_locks) AS sem_locked
FROM done
"""

# Renew the leases of every run this worker holds, refresh the worker row, and report which
# runs are still ours and which were asked to cancel: one statement per heartbeat (a
# data-modifying CTE always runs, so the worker upsert happens even when no run is held).
HEARTBEAT = f"""
WITH own AS MATERIALIZED (
    {_LOCK_OWN_RUNS}
), renewed AS (
    UPDATE reproq_task_runs SET leased_until = now() + make_interval(secs => %(lease)s)
    WHERE id IN (SELECT id FROM own) AND status = 'RUNNING' AND lease_owner = %(worker)s
    RETURNING id, cancel_requested
), me AS (
    INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                                started_at, last_seen_at)
    VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
            %(version)s, %(started_at)s, now())
    ON CONFLICT (id) DO UPDATE SET last_seen_at = now()
    RETURNING id
)
SELECT renewed.id, renewed.cancel_requested FROM renewed
"""

# Expired leases go back to READY (attempts left) or FAILED with a 'lease expired' error; dead
# worker rows are removed. Safe in every process at once (SKIP LOCKED).
RECLAIM = f"""
WITH expired AS (
    SELECT id FROM reproq_task_runs
    WHERE status = 'RUNNING' AND leased_until < now()
    ORDER BY leased_until
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), sem_locks AS MATERIALIZED (
    {_LOCK_SEMAPHORES.format(keys=_SEMS_OF_EXPIRED)}
), back AS (
    UPDATE reproq_task_runs t SET
        status = CASE WHEN t.cancel_requested THEN 'CANCELLED'
                      WHEN t.attempts >= t.max_attempts THEN 'FAILED' ELSE 'READY' END,
        finished_at = CASE WHEN t.cancel_requested OR t.attempts >= t.max_attempts
                           THEN now() END,
        errors = t.errors || jsonb_build_array(jsonb_build_object(
            'exception_class_path', 'reproq.exceptions.LeaseExpired',
            'traceback', 'reproq.exceptions.LeaseExpired: lease expired: worker '
                         || coalesce(t.lease_owner, '?')
                         || ' stopped renewing it (process killed or stuck)',
            'attempt', t.attempts, 'worker_id', t.lease_owner, 'at', now())),
        status_reason = CASE WHEN t.cancel_requested THEN 'cancelled (its worker stopped)'
                             ELSE 'lease expired' END,
        lease_owner = NULL,
        leased_until = NULL
    FROM expired
    WHERE t.id = expired.id
    RETURNING t.id, t.status, t.queue_name
), gone AS (
    DELETE FROM reproq_workers
    WHERE last_seen_at < now() - make_interval(secs => %(worker_ttl)s)
    RETURNING id
), notified AS (
    {_NOTIFY_READY_QUEUES.format(source="back")}
)
SELECT (SELECT count(*) FROM back WHERE status = 'READY') AS requeued,
       (SELECT count(*) FROM back WHERE status = 'FAILED') AS failed,
       (SELECT count(*) FROM gone) AS workers_removed,
       (SELECT n FROM notified) AS notified,
       (SELECT count(*) FROM sem_locks) AS sem_locked
"""

# Shutdown: runs still held go back to READY without burning the attempt they started. Runs
# whose sync thread is still busy come back only after %(delay)s seconds (WAITING), by which time
# this process — and its daemon threads — have exited, so they never run twice at once.
RELEASE = f"""
WITH own AS MATERIALIZED (
    {_LOCK_OWN_RUNS}
), sem_locks AS MATERIALIZED (
    {_LOCK_SEMAPHORES.format(keys=_SEMS_OF_IDS)}
), back AS (
    UPDATE reproq_task_runs SET
        status = CASE WHEN cancel_requested THEN 'CANCELLED'
                      WHEN %(delay)s > 0 THEN 'WAITING' ELSE 'READY' END,
        run_after = CASE WHEN %(delay)s > 0 AND NOT cancel_requested
                         THEN now() + make_interval(secs => %(delay)s) ELSE run_after END,
        finished_at = CASE WHEN cancel_requested THEN now() END,
        attempts = greatest(attempts - 1, 0),
        worker_ids = CASE WHEN jsonb_array_length(worker_ids) > 0
                          THEN worker_ids - (jsonb_array_length(worker_ids) - 1)
                          ELSE worker_ids END,
        started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END,
        lease_owner = NULL,
        leased_until = NULL,
        status_reason = CASE WHEN cancel_requested THEN 'cancelled while running'
                             ELSE 'released at shutdown' END
    WHERE id IN (SELECT id FROM own) AND status = 'RUNNING' AND lease_owner = %(worker)s
    RETURNING id, status, queue_name, run_after
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', payload)) AS n FROM (
        SELECT DISTINCT 'r:' || queue_name AS payload FROM back WHERE status = 'READY'
        UNION ALL
        SELECT 'w:' || extract(epoch FROM min(run_after))::text FROM back
        WHERE status = 'WAITING' HAVING count(*) > 0
    ) p
)
SELECT (SELECT count(*) FROM back) AS released, (SELECT n FROM notified) AS notified,
       (SELECT count(*) FROM sem_locks) AS sem_locked
"""

# Deferred rows whose time has come become READY (and their queues are woken); also reports
# the next due time so the promoter can sleep exactly until then.
PROMOTE = f"""
WITH due AS (
    SELECT id FROM reproq_task_runs
    WHERE status = 'WAITING' AND NOT blocked AND run_after <= now()
    ORDER BY run_after
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), up AS (
    UPDATE reproq_task_runs t SET status = 'READY' FROM due WHERE t.id = due.id
    RETURNING t.queue_name, t.status
), notified AS (
    {_NOTIFY_READY_QUEUES.format(source="up")}
)
SELECT (SELECT count(*) FROM up) AS promoted,
       (SELECT array_agg(DISTINCT queue_name) FROM up) AS queues,
       (SELECT n FROM notified) AS notified,
       (SELECT extract(epoch FROM min(run_after))::float8 FROM reproq_task_runs
        WHERE status = 'WAITING' AND NOT blocked AND run_after > now()
          AND pending_deps = 0) AS next_due
"""

# Safety net for parked runs: create missing semaphore rows and wake blocked runs whose key has
# room (the release trigger normally wakes them one per freed slot).
UNBLOCK = f"""
WITH missing AS (
    INSERT INTO reproq_concurrency (key, running, last_grant)
    SELECT DISTINCT sem_key, 0, 0 FROM reproq_task_runs WHERE blocked AND status = 'WAITING'
    ON CONFLICT (key) DO NOTHING
    RETURNING key
), free AS (
    SELECT r.id FROM reproq_task_runs r JOIN reproq_concurrency c ON c.key = r.sem_key
    WHERE r.blocked AND r.status = 'WAITING' AND c.running < coalesce(r.sem_limit, 1)
    ORDER BY r.sort_key
    LIMIT %(limit)s
    FOR UPDATE OF r SKIP LOCKED
), woke AS (
    UPDATE reproq_task_runs t SET status = 'READY', blocked = false, status_reason = ''
    FROM free WHERE t.id = free.id
    RETURNING t.queue_name, t.status
), notified AS (
    {_NOTIFY_READY_QUEUES.format(source="woke")}
)
SELECT (SELECT count(*) FROM woke) AS woken, (SELECT count(*) FROM missing) AS created,
       (SELECT n FROM notified) AS notified
"""

# Cancel: waiting runs end at once; running ones get cancel_requested and a NOTIFY so that the
# process running them stops them (async: cancelled; sync: context.cancel_requested; process
# mode: the child is killed). Final runs are left as they are.
CANCEL = f"""
WITH upd AS (
    UPDATE reproq_task_runs t SET
        status = CASE WHEN t.status IN ('READY', 'WAITING') THEN 'CANCELLED' ELSE t.status END,
        finished_at = CASE WHEN t.status IN ('READY', 'WAITING') THEN now()
                           ELSE t.finished_at END,
        blocked = false,
        cancel_requested = true,
        status_reason = CASE WHEN t.status IN ('READY', 'WAITING')
                             THEN 'cancelled before it started'
                             ELSE 'cancel requested while running' END
    WHERE t.id = ANY(%(ids)s::bigint[]) AND t.status IN ('READY', 'WAITING', 'RUNNING')
    RETURNING t.id, t.status
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', 'c:' || id)) AS n FROM upd WHERE status = 'RUNNING'
)
SELECT (SELECT count(*) FROM upd) AS changed, (SELECT n FROM notified) AS notified
"""

SET_PAUSED = f"""
WITH up AS (
    INSERT INTO reproq_queue_controls (queue_name, paused, reason, updated_at, updated_by)
    VALUES (%(queue)s, %(paused)s, %(reason)s, now(), %(by)s)
    ON CONFLICT (queue_name) DO UPDATE SET paused = EXCLUDED.paused, reason = EXCLUDED.reason,
        updated_at = now(), updated_by = EXCLUDED.updated_by
    RETURNING queue_name, paused, reason
), events AS (
    INSERT INTO reproq_events (created_at, kind, task_path, queue_name, worker_id, data)
    SELECT now(), CASE WHEN paused THEN 'queue_paused' ELSE 'queue_resumed' END, '',
           queue_name, '', jsonb_build_object('reason', reason, 'by', %(by)s::text)
    FROM up
    RETURNING 1
)
SELECT pg_notify('{CHANNEL}', 'q:' || queue_name) FROM up
"""

# The runtime's event buffer, flushed a few times a second at most: one INSERT and one NOTIFY
# per flush, never per task.
PUBLISH_EVENTS = f"""
WITH ins AS (
    INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
    SELECT now(), kind, run_id, task_path, queue_name, %(worker)s, data::jsonb
    FROM unnest(%(kind)s::text[], %(run_id)s::bigint[], %(task_path)s::text[],
                %(queue_name)s::text[], %(data)s::text[])
         AS e(kind, run_id, task_path, queue_name, data)
    RETURNING id
)
SELECT pg_notify('{CHANNEL}', 'e:' || max(id)) FROM ins
"""

PRUNE_EVENTS = """
DELETE FROM reproq_events
WHERE id IN (SELECT id FROM reproq_events
             WHERE created_at < now() - make_interval(secs => %(keep)s)
             ORDER BY id LIMIT 10000)
"""

# Finished runs past their retention, oldest first, at most %(limit)s per statement (see
# `reproq.retention`). NULL filters mean "any". Rows locked elsewhere are left for the next pass.
_PRUNABLE = """
    SELECT r.id FROM reproq_task_runs r
    WHERE r.finished_at IS NOT NULL
      AND r.finished_at < now() - make_interval(secs => %(keep)s)
      AND r.status = ANY(%(states)s::text[])
      AND (%(queues)s::text[] IS NULL OR r.queue_name = ANY(%(queues)s::text[]))
      AND (%(tasks)s::text[] IS NULL OR r.task_path = ANY(%(tasks)s::text[]))
      AND NOT (r.has_dependents AND EXISTS (
          SELECT 1 FROM reproq_run_edges e JOIN reproq_task_runs d ON d.id = e.downstream_id
          WHERE e.upstream_id = r.id AND d.status = 'WAITING'))
    ORDER BY r.finished_at
    LIMIT %(limit)s
"""
# A workflow step still waiting keeps its finished upstream runs (it needs their results); the
# edges of a pruned upstream run go with it.
PRUNE_RUNS = f"""
WITH doomed AS ({_PRUNABLE}    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM reproq_task_runs t USING doomed d WHERE t.id = d.id
    RETURNING t.id, t.has_dependents
), unlinked AS (
    DELETE FROM reproq_run_edges e USING gone g
    WHERE g.has_dependents AND e.upstream_id = g.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM unlinked) AS edges
"""
COUNT_PRUNABLE = f"SELECT count(*) AS n FROM ({_PRUNABLE}) p"

# Schedule ticks (the exactly-once records of cron fires) scheduled more than %(keep)s seconds
# ago and behind their schedule's next_run_at (a beat never fires those again), oldest first:
# a range scan of the (schedule, scheduled_for) unique index per schedule.
PRUNE_TICKS = """
DELETE FROM reproq_schedule_ticks
WHERE id IN (
    SELECT old.id FROM reproq_periodic_tasks p
    CROSS JOIN LATERAL (
        SELECT t.id FROM reproq_schedule_ticks t
        WHERE t.schedule_id = p.id
          AND t.scheduled_for < least(p.next_run_at, now() - make_interval(secs => %(keep)s))
        ORDER BY t.scheduled_for
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) old
    LIMIT %(limit)s
)
"""

DELETE_WORKER = "DELETE FROM reproq_workers WHERE id = %(worker)s"

SAVE_METADATA = """
UPDATE reproq_task_runs SET metadata = %(metadata)s::jsonb
WHERE id = %(id)s AND status = 'RUNNING'
"""


_FRAGMENTS = {"CHANNEL", "ACTIVE_SQL", "PY_TIME_RANGE", "RUN_COLUMNS", "RESULT_COLUMNS"}


def _compact(query: str) -> str:
    """The statement without indentation and blank lines (same SQL, fewer bytes to send)."""
    return "\n".join(line.strip() for line in query.splitlines() if line.strip())


# psycopg caches the parsing of a statement's %(name)s placeholders only up to 4 KB of text
# (psycopg._queries.MAX_CACHED_STATEMENT_LENGTH); longer ones are parsed again on every call,
# which costs a claim or an enqueue about half a millisecond of CPU. Statements are compacted,
# and the limit is raised where this psycopg version has it. Each public statement is a
# `Statement` named after its constant, except CLAIM_FAST: either claim counts as a CLAIM.
for _key, _value in list(globals().items()):
    if _key.isupper() and isinstance(_value, str) and _key not in _FRAGMENTS:
        _text = _compact(_value)
        globals()[_key] = _text if _key.startswith("_") else Statement(
            _text, "CLAIM" if _key == "CLAIM_FAST" else _key)
try:
    from psycopg import _queries as _psycopg_queries

    if getattr(_psycopg_queries, "MAX_CACHED_STATEMENT_LENGTH", 0) < 16384:
        _psycopg_queries.MAX_CACHED_STATEMENT_LENGTH = 16384
except ImportError:  # pragma: no cover - a psycopg without this module parses every time
    pass
