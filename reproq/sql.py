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

# --------------------------------------------------------------------------- runtime statements

_NOTIFY_READY_QUEUES = f"""
    SELECT count(pg_notify('{CHANNEL}', 'r:' || q)) AS n
    FROM (SELECT DISTINCT queue_name AS q FROM {{source}} WHERE status = 'READY') d
"""

# Claim up to %(limit)s due rows of the given queues in sort_key order: one index range scan per
# queue (LATERAL), paused queues skipped, rows locked with SKIP LOCKED so claimers never wait on
# each other. Rows past expires_at are marked EXPIRED instead of RUNNING (and returned, so the
# runtime can report them); they do not burn an attempt.
CLAIM = """
WITH picked AS (
    SELECT c.id FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT r.id, r.sort_key FROM reproq_task_runs r
        WHERE r.status = 'READY' AND r.queue_name = q.name
        ORDER BY r.sort_key
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
    WHERE NOT EXISTS (
        SELECT 1 FROM reproq_queue_controls qc WHERE qc.queue_name = q.name AND qc.paused
    )
    ORDER BY c.sort_key
    LIMIT %(limit)s
)
UPDATE reproq_task_runs t SET
    status = CASE WHEN t.expires_at <= now() THEN 'EXPIRED' ELSE 'RUNNING' END,
    attempts = t.attempts + CASE WHEN t.expires_at <= now() THEN 0 ELSE 1 END,
    started_at = CASE WHEN t.expires_at <= now() THEN t.started_at
                      ELSE coalesce(t.started_at, now()) END,
    last_attempted_at = CASE WHEN t.expires_at <= now() THEN t.last_attempted_at ELSE now() END,
    finished_at = CASE WHEN t.expires_at <= now() THEN now() END,
    worker_ids = CASE WHEN t.expires_at <= now() THEN t.worker_ids
                      ELSE t.worker_ids || to_jsonb(%(worker)s::text) END,
    lease_owner = CASE WHEN t.expires_at <= now() THEN NULL ELSE %(worker)s END,
    leased_until = CASE WHEN t.expires_at <= now() THEN NULL
                        ELSE now() + make_interval(secs => %(lease)s) END,
    status_reason = CASE WHEN t.expires_at <= now()
                         THEN 'expired: not started before ' || t.expires_at::text
                         ELSE t.status_reason END
FROM picked
WHERE t.id = picked.id
RETURNING t.id, t.task_path, t.queue_name, t.priority, t.status, t.args, t.kwargs,
          t.enqueued_at, t.run_after, t.started_at, t.last_attempted_at, t.attempts,
          t.max_attempts, t.timeout_seconds, t.worker_ids, t.errors, t.metadata,
          t.cancel_requested
"""

# Record finished attempts of one worker in one statement. Rows whose lease this worker lost
# (reclaimed elsewhere) are left alone. A retry goes to WAITING (or READY without delay).
COMPLETE = f"""
WITH input AS (
    SELECT * FROM unnest(
        %(ids)s::bigint[], %(status)s::text[], %(return_value)s::text[], %(error)s::text[],
        %(delay)s::float8[], %(reason)s::text[], %(metadata)s::text[]
    ) AS u(id, status, return_value, error, delay, reason, metadata)
), done AS (
    UPDATE reproq_task_runs t SET
        status = u.status,
        finished_at = CASE WHEN u.status IN ('SUCCESSFUL', 'FAILED', 'CANCELLED', 'EXPIRED')
                           THEN now() END,
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
        status_reason = coalesce(u.reason, ''),
        lease_owner = NULL,
        leased_until = NULL
    FROM input u
    WHERE t.id = u.id AND t.status = 'RUNNING' AND t.lease_owner = %(worker)s
    RETURNING t.id, t.status, t.queue_name, t.run_after
), notified AS (
    SELECT count(pg_notify('{CHANNEL}', payload)) AS n FROM (
        SELECT DISTINCT 'r:' || queue_name AS payload FROM done WHERE status = 'READY'
        UNION ALL
        SELECT 'w:' || extract(epoch FROM min(run_after))::text FROM done
        WHERE status = 'WAITING' HAVING count(*) > 0
    ) p
)
SELECT done.id, done.status, (SELECT n FROM notified) AS notified FROM done
"""

# Renew the leases of every run this worker holds, refresh the worker row, and report which
# runs are still ours and which were asked to cancel: one statement per heartbeat (a
# data-modifying CTE always runs, so the worker upsert happens even when no run is held).
HEARTBEAT = """
WITH renewed AS (
    UPDATE reproq_task_runs SET leased_until = now() + make_interval(secs => %(lease)s)
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'RUNNING' AND lease_owner = %(worker)s
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
), back AS (
    UPDATE reproq_task_runs t SET
        status = CASE WHEN t.attempts >= t.max_attempts THEN 'FAILED' ELSE 'READY' END,
        finished_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
        errors = t.errors || jsonb_build_array(jsonb_build_object(
            'exception_class_path', 'reproq.exceptions.LeaseExpired',
            'traceback', 'reproq.exceptions.LeaseExpired: lease expired: worker '
                         || coalesce(t.lease_owner, '?')
                         || ' stopped renewing it (process killed or stuck)',
            'attempt', t.attempts, 'worker_id', t.lease_owner, 'at', now())),
        status_reason = 'lease expired',
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
       (SELECT n FROM notified) AS notified
"""

# Shutdown: runs still held go back to READY without burning the attempt they started.
RELEASE = f"""
WITH back AS (
    UPDATE reproq_task_runs SET
        status = 'READY',
        attempts = greatest(attempts - 1, 0),
        worker_ids = CASE WHEN jsonb_array_length(worker_ids) > 0
                          THEN worker_ids - (jsonb_array_length(worker_ids) - 1)
                          ELSE worker_ids END,
        started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END,
        lease_owner = NULL,
        leased_until = NULL,
        status_reason = 'released at shutdown'
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'RUNNING' AND lease_owner = %(worker)s
    RETURNING id, status, queue_name
), notified AS (
    {_NOTIFY_READY_QUEUES.format(source="back")}
)
SELECT (SELECT count(*) FROM back) AS released, (SELECT n FROM notified) AS notified
"""

# Deferred rows whose time has come become READY (and their queues are woken); also reports
# the next due time so the promoter can sleep exactly until then.
PROMOTE = f"""
WITH due AS (
    SELECT id FROM reproq_task_runs
    WHERE status = 'WAITING' AND run_after <= now()
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
        WHERE status = 'WAITING' AND run_after > now()) AS next_due
"""

DELETE_WORKER = "DELETE FROM reproq_workers WHERE id = %(worker)s"

SAVE_METADATA = """
UPDATE reproq_task_runs SET metadata = %(metadata)s::jsonb
WHERE id = %(id)s AND status = 'RUNNING'
"""


def name_of(query: object) -> str:
    """The name of a statement defined here (for statement counts), else 'other'."""
    return _NAMES.get(id(query), "other")


_NAMES = {id(value): key for key, value in list(globals().items())
          if key.isupper() and isinstance(value, str) and key not in {"CHANNEL", "ACTIVE_SQL",
                                                                       "RESULT_COLUMNS"}}
