"""Every hot-path SQL statement, named, in one place (enqueue, claim, heartbeat, reclaim, finish).

Rules: each statement works on a whole batch (arrays in, rows out); none scans the table per
task; NOTIFY is sent once per queue per statement (PostgreSQL folds duplicates within a
transaction and delivers at COMMIT, so a rolled-back enqueue wakes nobody).

Notification payloads on the ``reproq`` channel:
  ``r:<queue>``   READY work appeared in <queue>
  ``w:<epoch>``   a WAITING row becomes due at <epoch> (seconds)
  ``c:<id>``      cancellation requested for run <id>
  ``q:<queue>``   queue control changed (pause/resume)
"""

from __future__ import annotations

CHANNEL = "reproq"
ACTIVE_SQL = "('READY', 'WAITING', 'RUNNING')"

RESULT_COLUMNS = (
    "id, backend_alias, task_path, queue_name, priority, status, args, kwargs, enqueued_at, "
    "run_after, started_at, last_attempted_at, finished_at, attempts, max_attempts, worker_ids, "
    "errors, return_value, metadata, status_reason, lease_owner, leased_until, cancel_requested, "
    "expires_at, lock_key, concurrency_key, concurrency_limit, timeout_seconds"
)

# One statement inserts a whole batch (parallel arrays, unnest), skips active duplicates through
# the partial unique index, and notifies each queue once. Ids are drawn before the insert so
# every input row maps back to its id, inserted or not.
ENQUEUE = f"""
WITH input AS (
    SELECT *, nextval(pg_get_serial_sequence('reproq_task_runs', 'id')) AS new_id
    FROM unnest(
        %(ord)s::int[], %(task_path)s::text[], %(queue_name)s::text[], %(priority)s::int[],
        %(args)s::text[], %(kwargs)s::text[], %(spec_hash)s::text[], %(run_after)s::timestamptz[],
        %(delay)s::float8[], %(lock_key)s::text[], %(concurrency_key)s::text[],
        %(concurrency_limit)s::int[], %(max_attempts)s::int[], %(timeout)s::int[],
        %(expires_in)s::float8[]
    ) AS t(ord, task_path, queue_name, priority, args, kwargs, spec_hash, run_after, delay,
           lock_key, concurrency_key, concurrency_limit, max_attempts, timeout, expires_in)
), timed AS (
    SELECT i.*,
           coalesce(i.run_after, now() + make_interval(secs => coalesce(i.delay, 0))) AS due
    FROM input i
), ins AS (
    INSERT INTO reproq_task_runs (
        id, backend_alias, task_path, queue_name, priority, status, sort_key, args, kwargs,
        spec_hash, enqueued_at, run_after, attempts, max_attempts, timeout_seconds, worker_ids,
        errors, metadata, lock_key, concurrency_key, concurrency_limit, cancel_requested,
        expires_at, status_reason, code_ref, pip_lock_hash
    )
    SELECT new_id, %(backend)s, task_path, queue_name, priority,
           CASE WHEN due > now() THEN 'WAITING' ELSE 'READY' END,
           (extract(epoch FROM due) * 1000000)::bigint - priority::bigint * %(aging_us)s::bigint,
           args::jsonb, kwargs::jsonb, spec_hash, now(), due, 0, max_attempts, timeout, '[]',
           '[]', '{{}}', lock_key, concurrency_key, concurrency_limit, false,
           CASE WHEN expires_in IS NULL THEN NULL
                ELSE due + make_interval(secs => expires_in) END,
           '', %(code_ref)s, %(pip_lock_hash)s
    FROM timed ORDER BY ord
    ON CONFLICT (spec_hash) WHERE status IN {ACTIVE_SQL} DO NOTHING
    RETURNING id, spec_hash, status, enqueued_at, run_after, queue_name
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', payload)) AS n FROM (
        SELECT DISTINCT 'r:' || queue_name AS payload FROM ins WHERE status = 'READY'
        UNION ALL
        SELECT 'w:' || extract(epoch FROM min(run_after))::text FROM ins
        WHERE status = 'WAITING' HAVING count(*) > 0
    ) p
)
SELECT t.ord, t.spec_hash, ins.id, ins.status, ins.enqueued_at, ins.run_after,
       (SELECT n FROM notified) AS notified
FROM timed t LEFT JOIN ins ON ins.id = t.new_id
ORDER BY t.ord
"""

# The active runs that made dedup skip an insert (a second statement, only when that happened).
ACTIVE_BY_SPEC = f"""
SELECT {RESULT_COLUMNS}, spec_hash FROM reproq_task_runs
WHERE spec_hash = ANY(%(hashes)s::text[]) AND status IN {ACTIVE_SQL}
"""

GET_RESULT = f"SELECT {RESULT_COLUMNS} FROM reproq_task_runs WHERE id = %(id)s"
