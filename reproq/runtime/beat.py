"""The beat: enqueues due cron ticks, only in the process that holds the leader advisory lock.

Leadership
    Every process with ``BEAT`` on keeps one dedicated, non-pooled connection (a session
    advisory lock on a pooled connection would outlive its user). Standbys try
    ``pg_try_advisory_lock(key)`` every ``BEAT_INTERVAL_SECONDS``; the key is fixed and derived
    from the database name. The leader acquires once and then proves the connection alive every
    interval with its poll statement, bounded by a timeout. It trusts its leadership only until
    a local deadline (``LEADER_TIMEOUT_SECONDS`` after the last successful check was *sent*) and
    gives it up on any doubt - a failed or slow check, a passed deadline - by closing the
    connection. The server enforces the same bound from its side: the connection runs with
    ``idle_session_timeout = LEADER_TIMEOUT_SECONDS`` (and half that as statement_timeout), so a
    hung or partitioned leader's session, and with it the lock, ends within the timeout. A dead
    process or a killed backend releases the lock at once; a standby takes it at its next try.
    Shutdown releases the lock explicitly.

Exactly once
    Every statement that enqueues runs *on the lock connection*, so it can only execute while
    that session holds the lock. Independently of the lock, each tick is one statement
    (`BEAT_FIRE`): a compare-and-set on the schedule's next_run_at, the (schedule,
    scheduled_for) row in ``reproq_schedule_ticks`` (unique, ON CONFLICT DO NOTHING) and the
    task run, inserted only if the tick row was - so even two processes that both believe they
    lead cannot enqueue one tick twice.

Statements: `BEAT_POLL` once per wake-up (liveness check + worker row + due schedules + next due
time) and `BEAT_FIRE` once per batch of due ticks (one tick per schedule per batch): one
statement per tick when one schedule is due.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import psycopg

from .. import db, sql
from ..cron import CronSchedule, InvalidSchedule, Plan, plan

if TYPE_CHECKING:
    from ..backend import ReproqBackend
    from ..conf import RuntimeSettings

logger = logging.getLogger("reproq.beat")

POLL_LIMIT = 500
BROKEN_RETRY_SECONDS = 60.0
MAX_FIRES_PER_CYCLE = 1000

TRY_LOCK = "SELECT pg_try_advisory_lock(%(key)s::bigint) AS locked"

# Became leader: register (or refresh) this worker's row with leader_since = now and clear the
# flag on every other row (their holder lost the lock, or they would still hold it).
MARK_LEADER = """
WITH me AS (
    INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                                started_at, last_seen_at, leader_since)
    VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
            %(version)s, %(started_at)s, now(), now())
    ON CONFLICT (id) DO UPDATE SET leader_since = now(), last_seen_at = now()
    RETURNING leader_since
), deposed AS (
    UPDATE reproq_workers SET leader_since = NULL
    WHERE id <> %(worker)s AND leader_since IS NOT NULL
    RETURNING id
)
SELECT (SELECT leader_since FROM me) AS leader_since, (SELECT count(*) FROM deposed) AS deposed,
       pg_backend_pid() AS backend_pid
"""

# The leader's liveness check, once per wake-up: keeps the worker row (and its leader_since)
# current, returns the due schedules (LEFT JOIN: always at least one row) and the next due time.
BEAT_POLL = """
WITH me AS (
    INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                                started_at, last_seen_at, leader_since)
    VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
            %(version)s, %(started_at)s, now(), %(leader_since)s)
    ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), leader_since = EXCLUDED.leader_since
    RETURNING id
), due AS (
    SELECT id, name, cron_expr, timezone, task_path, args, kwargs, max_attempts,
           misfire_policy, next_run_at
    FROM reproq_periodic_tasks
    WHERE enabled AND (next_run_at <= now() OR next_run_at IS NULL)
      AND NOT (id = ANY(%(skip)s::bigint[]))
    ORDER BY next_run_at NULLS FIRST
    LIMIT %(limit)s
)
SELECT now() AS db_now,
       (SELECT min(next_run_at) FROM reproq_periodic_tasks
        WHERE enabled AND next_run_at > now()) AS next_due,
       d.*
FROM (SELECT 1) AS one LEFT JOIN due d ON true
ORDER BY d.next_run_at NULLS FIRST
"""

# One statement per batch of due ticks (at most one per schedule). Per input row: move the
# schedule's next_run_at if it still is the value the plan was made from (compare-and-set), and
# for a fire record the tick (schedule, scheduled_for) - unique, ON CONFLICT DO NOTHING - with
# the run's id drawn up front; the run is inserted only when its tick row was. With the overlap
# policy 'skip' and the previous run still active, the tick is recorded with run_id NULL.
BEAT_FIRE = """
WITH input AS (
    SELECT u.*, nextval(pg_get_serial_sequence('reproq_task_runs', 'id')) AS new_id
    FROM unnest(
        %(schedule_id)s::bigint[], %(expected)s::timestamptz[], %(fire)s::bool[],
        %(scheduled_for)s::timestamptz[], %(label)s::text[], %(next_run_at)s::timestamptz[],
        %(max_attempts)s::int[], %(timeout)s::int[], %(expires_in)s::float8[],
        %(concurrency_key)s::text[], %(concurrency_limit)s::int[]
    ) AS u(schedule_id, expected, fire, scheduled_for, label, next_run_at, max_attempts,
           timeout, expires_in, concurrency_key, concurrency_limit)
), gate AS (
    SELECT i.*,
           i.fire
           AND NOT EXISTS (SELECT 1 FROM reproq_schedule_ticks t
                           WHERE t.schedule_id = i.schedule_id
                             AND t.scheduled_for = i.scheduled_for)
           AND NOT (p.overlap_policy = 'skip' AND EXISTS (
                   SELECT 1 FROM reproq_task_runs r
                   WHERE r.id = p.last_run_id AND r.status IN ('READY', 'WAITING', 'RUNNING')
           )) AS launch
    FROM input i JOIN reproq_periodic_tasks p ON p.id = i.schedule_id
), moved AS (
    UPDATE reproq_periodic_tasks p SET
        next_run_at = g.next_run_at,
        last_run_at = CASE WHEN g.launch THEN g.scheduled_for ELSE p.last_run_at END,
        last_run_id = CASE WHEN g.launch THEN g.new_id ELSE p.last_run_id END
    FROM gate g
    WHERE p.id = g.schedule_id AND p.enabled
      AND p.next_run_at IS NOT DISTINCT FROM g.expected
    RETURNING p.id, p.name, p.task_path, p.queue_name, p.priority, p.args, p.kwargs,
              g.fire, g.launch, g.scheduled_for, g.label, g.new_id,
              g.max_attempts AS run_max_attempts, g.timeout, g.expires_in, g.concurrency_key,
              g.concurrency_limit
), tick AS (
    INSERT INTO reproq_schedule_ticks (schedule_id, scheduled_for, run_id, created_at)
    SELECT m.id, m.scheduled_for, CASE WHEN m.launch THEN m.new_id END, now()
    FROM moved m WHERE m.fire
    ON CONFLICT (schedule_id, scheduled_for) DO NOTHING
    RETURNING schedule_id, run_id
), ins AS (
    INSERT INTO reproq_task_runs (""" + sql.RUN_COLUMNS + """)
    SELECT m.new_id, %(backend)s, m.task_path, m.queue_name, m.priority, 'READY',
           (extract(epoch FROM least(m.scheduled_for, now())) * 1000000)::bigint
               - m.priority::bigint * %(aging_us)s::bigint,
           m.args, m.kwargs, NULL, now(), least(m.scheduled_for, now()), 0,
           m.run_max_attempts, m.timeout, '[]', '[]',
           jsonb_build_object('schedule', m.name, 'scheduled_for', m.label),
           NULL, m.concurrency_key, m.concurrency_limit,
           CASE WHEN m.concurrency_key IS NOT NULL THEN 'c:' || m.concurrency_key END,
           m.concurrency_limit, false, false,
           CASE WHEN m.expires_in IS NULL THEN NULL
                ELSE now() + make_interval(secs => m.expires_in) END,
           '', %(code_ref)s, %(pip_lock_hash)s
    FROM moved m JOIN tick t ON t.run_id = m.new_id
    RETURNING id, task_path, queue_name
), events AS (
    INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
    SELECT now(), 'enqueued', i.id, i.task_path, i.queue_name, %(worker)s,
           jsonb_build_object('count', 1, 'run_ids', jsonb_build_array(i.id),
                              'schedule', m.name, 'scheduled_for', m.label)
    FROM ins i JOIN moved m ON m.new_id = i.id
    RETURNING 1
), notified AS (
    SELECT count(pg_notify('reproq', 'r:' || q)) AS n
    FROM (SELECT DISTINCT queue_name AS q FROM ins) d
)
SELECT i.schedule_id, i.fire, i.scheduled_for, i.next_run_at,
       m.id IS NOT NULL AS applied, t.schedule_id IS NOT NULL AS ticked, t.run_id,
       (SELECT n FROM notified) AS notified
FROM input i
LEFT JOIN moved m ON m.id = i.schedule_id
LEFT JOIN tick t ON t.schedule_id = i.schedule_id
"""

# Leaving leadership (shutdown) or clearing a stale flag after a reconnect.
RESIGN = """
WITH me AS (
    UPDATE reproq_workers SET leader_since = NULL
    WHERE id = %(worker)s AND leader_since IS NOT NULL
    RETURNING id
)
SELECT CASE WHEN %(unlock)s THEN pg_advisory_unlock(%(key)s::bigint) END AS unlocked,
       (SELECT count(*) FROM me) AS cleared
"""

# Who holds the leader lock now (pg_locks splits a bigint key into classid/objid, objsubid 1).
LOCK_HOLDER = """
SELECT l.pid, a.application_name, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(hi)s::bigint::oid AND l.objid = %(lo)s::bigint::oid
"""

# Name the statements for `reproq.db.statement_counts` (the names live in `reproq.sql`).
sql.name_statements(globals(), ("TRY_LOCK", "MARK_LEADER", "BEAT_POLL", "BEAT_FIRE", "RESIGN",
                                "LOCK_HOLDER"))


def lock_key(database_name: str) -> int:
    """The leader lock's key: a fixed signed 64-bit number derived from the database name."""
    digest = hashlib.sha256(f"reproq.beat:{database_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_key_parts(key: int) -> dict[str, int]:
    """The key as pg_locks shows it: classid (high 32 bits) and objid (low 32 bits)."""
    return {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}


def lock_key_for_alias(alias: str) -> int:
    from django.db import connections

    return lock_key(str(connections[alias].settings_dict["NAME"]))


class LeadershipLost(Exception):
    """Leadership is in doubt: the trust deadline passed or the connection misbehaved."""


class BeatOwner(Protocol):
    """What the beat needs from its host (the `Runtime`, or `StandaloneOwner`)."""

    settings: RuntimeSettings
    backend: ReproqBackend
    worker_id: str

    def worker_row(self) -> dict[str, Any]: ...


class StandaloneOwner:
    """The host of ``manage.py reproq beat``: settings, backend and a worker identity."""

    def __init__(self, settings: RuntimeSettings, worker_id: str = "") -> None:
        from django.tasks import task_backends

        from .registry import WorkerIdentity, make_worker_id

        self.settings = settings
        self.backend = task_backends[settings.backend]
        self.worker_id = make_worker_id(worker_id)
        self.identity = WorkerIdentity(worker_id=self.worker_id, queues=(), concurrency=0,
                                       server="beat")

    def worker_row(self) -> dict[str, Any]:
        return self.identity.row()


@dataclass
class OnceOutcome:
    led: bool
    fired: int = 0
    skipped: int = 0
    holder: str = ""


@dataclass
class _Due:
    """One due schedule as the poll returned it, and what its runs need."""

    id: int
    name: str
    schedule: CronSchedule
    misfire_policy: str
    next_run_at: datetime | None
    options: tuple[int, int, float | None, str | None, int | None]


class Beat:
    """The beat service of one process (see the module docstring)."""

    def __init__(self, owner: BeatOwner, *, standalone: bool = False) -> None:
        self.owner = owner
        self.settings = owner.settings
        self.standalone = standalone
        self.database = owner.backend.database
        self.key = lock_key_for_alias(self.database)
        self.role = "stopped"
        self.is_leader = False
        self.leader_since: datetime | None = None
        self.backend_pid: int | None = None
        self.leaderships = 0
        self.ticks = 0  # runs enqueued by this process
        self.skipped = 0  # ticks recorded without a run (overlap) and fires skipped (misfire)
        self.last_check: float | None = None
        self.lost_reason = ""
        self._trust_until = 0.0
        self._stopping = False
        self._stop: anyio.Event | None = None
        self._exited: anyio.Event | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._broken: dict[int, float] = {}
        self._task_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ settings
    @property
    def interval(self) -> float:
        return self.settings.beat_interval_seconds

    @property
    def timeout(self) -> float:
        return self.settings.leader_timeout_seconds

    @property
    def check_timeout(self) -> float:
        """Bound on one liveness check (and on one FIRE statement)."""
        return max(self.timeout / 3, 0.2)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.settings.beat, "role": self.role, "is_leader": self.is_leader,
            "worker_id": self.owner.worker_id,
            "since": self.leader_since.isoformat() if self.leader_since else None,
            "lock_backend_pid": self.backend_pid if self.is_leader else None,
            "leaderships": self.leaderships, "ticks_enqueued": self.ticks,
            "ticks_skipped": self.skipped,
            "last_check_age": (round(time.monotonic() - self.last_check, 3)
                               if self.last_check is not None and self.is_leader else None),
            "lost_reason": self.lost_reason,
        }

    # ------------------------------------------------------------------ connection
    async def _connect(self) -> psycopg.AsyncConnection:
        from django.db import connections

        timeout = self.timeout
        base = str(connections[self.database].get_connection_params().get("options") or "")
        options = (f"{base} -c idle_session_timeout={int(timeout * 1000)} "
                   f"-c statement_timeout={int(timeout * 500)}").strip()
        with anyio.fail_after(timeout):
            conn = await db.connect(
                self.database, application_name=f"reproq-beat-{self.owner.worker_id}"[:63],
                options=options, connect_timeout=max(2, int(timeout / 3)), keepalives=1,
                keepalives_idle=max(1, int(timeout / 3)), keepalives_interval=1,
                keepalives_count=3)
        self.backend_pid = conn.info.backend_pid
        return conn

    async def _close(self, conn: psycopg.AsyncConnection) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                contextlib.suppress(Exception):
            await conn.close()

    async def _execute(self, conn: psycopg.AsyncConnection, query: str,
                       params: dict[str, Any]) -> list[dict[str, Any]]:
        with anyio.fail_after(self.check_timeout):
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0 or self._stop is None:
            return
        with anyio.move_on_after(seconds):
            await self._stop.wait()

    # ------------------------------------------------------------------ service
    async def run(self) -> None:
        """Compete for leadership until `shutdown()`; lead while holding the lock."""
        self._stop, self._exited = anyio.Event(), anyio.Event()
        if self._stopping:
            self._stop.set()
        delay = self.interval
        try:
            while not self._stopping:
                self.role = "connecting"
                try:
                    conn = await self._connect()
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    logger.warning("reproq: beat connection failed (%s: %s); retrying in %.1fs",
                                   type(exc).__name__, exc, delay)
                    await self._sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = self.interval
                self._conn = conn
                was_leader = False
                try:
                    was_leader = await self._compete(conn)
                except (psycopg.Error, OSError, TimeoutError, LeadershipLost) as exc:
                    was_leader = self.is_leader
                    self._lose(f"{type(exc).__name__}: {exc}".strip())
                finally:
                    self._conn = None
                    await self._close(conn)
                    if self.is_leader:
                        self._lose("stopped")
                if not self._stopping:
                    # A process that just lost leadership waits longer than a standby does, so
                    # that a healthy standby, not a flapping leader, takes over.
                    await self._sleep(2 * self.interval if was_leader else self.interval)
        finally:
            self.role = "stopped"
            self._exited.set()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop competing; a leader releases the lock and clears its leader_since."""
        self._stopping = True
        if self._stop is not None:
            self._stop.set()
        if self._exited is not None and self._stop is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await self._exited.wait()

    async def _compete(self, conn: psycopg.AsyncConnection) -> bool:
        """Standby loop on one connection; returns True if it led (then stopped)."""
        self.role = "standby"
        await self._execute(conn, RESIGN, {"worker": self.owner.worker_id, "unlock": False,
                                           "key": self.key})
        while not self._stopping:
            rows = await self._execute(conn, TRY_LOCK, {"key": self.key})
            if rows[0]["locked"]:
                await self._lead(conn)
                return True
            await self._sleep(self.interval * random.uniform(0.75, 1.0))
        return False

    async def _become_leader(self, conn: psycopg.AsyncConnection) -> None:
        sent = time.monotonic()
        rows = await self._execute(conn, MARK_LEADER, {"worker": self.owner.worker_id,
                                                       **self.owner.worker_row()})
        self.leader_since = rows[0]["leader_since"]
        self.backend_pid = rows[0]["backend_pid"]
        self.is_leader = True
        self.role = "leader"
        self.leaderships += 1
        self.lost_reason = ""
        self._trust(sent)
        logger.info("reproq: %s is the beat leader (lock connection pid %s)",
                    self.owner.worker_id, self.backend_pid)

    async def _lead(self, conn: psycopg.AsyncConnection) -> None:
        await self._become_leader(conn)
        while not self._stopping:
            wait = await self._cycle(conn)
            await self._sleep(min(wait, self.interval))
        await self._resign(conn)

    async def _resign(self, conn: psycopg.AsyncConnection) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._execute(conn, RESIGN, {"worker": self.owner.worker_id, "unlock": True,
                                               "key": self.key})
            if self.standalone:
                await self._execute(conn, sql.DELETE_WORKER, {"worker": self.owner.worker_id})
        if self.is_leader:
            logger.info("reproq: %s released beat leadership", self.owner.worker_id)
        self.is_leader = False
        self.leader_since = None

    def _lose(self, reason: str) -> None:
        if self.is_leader:
            logger.warning("reproq: %s gave up beat leadership (%s)", self.owner.worker_id,
                           reason)
        self.is_leader = False
        self.leader_since = None
        self.lost_reason = reason
        self.role = "standby"

    def _trust(self, sent: float) -> None:
        # The server ends the session LEADER_TIMEOUT after it went idle, which is after `sent`:
        # until sent + timeout the lock cannot have been released by that timeout. 10% margin.
        self._trust_until = sent + self.timeout * 0.9
        self.last_check = sent

    def _check_trust(self) -> None:
        if time.monotonic() > self._trust_until:
            raise LeadershipLost("trust deadline passed without a successful check")

    # ------------------------------------------------------------------ one cycle
    async def _cycle(self, conn: psycopg.AsyncConnection) -> float:
        """Poll (the liveness check), fire what is due; return seconds until the next due."""
        self._check_trust()
        now_broken = time.monotonic()
        self._broken = {k: t for k, t in self._broken.items()
                        if now_broken - t < BROKEN_RETRY_SECONDS}
        sent = time.monotonic()
        rows = await self._execute(conn, BEAT_POLL, {
            "worker": self.owner.worker_id, **self.owner.worker_row(),
            "leader_since": self.leader_since, "skip": list(self._broken), "limit": POLL_LIMIT,
        })
        received = time.monotonic()
        self._trust(sent)
        db_now: datetime = rows[0]["db_now"]
        next_due: datetime | None = rows[0]["next_due"]

        def now() -> datetime:
            return db_now + timedelta(seconds=time.monotonic() - received)

        due = [self._due(row) for row in rows if row["id"] is not None]
        due = [d for d in due if d is not None]
        plans: list[tuple[_Due, Plan]] = []
        for d in due:
            p = self._plan(d, now())
            if p is not None:
                plans.append((d, p))
        fires = 0
        again = len(due) >= POLL_LIMIT
        while plans and fires < MAX_FIRES_PER_CYCLE:
            self._check_trust()
            results = await self._fire(conn, plans)
            fires += 1
            follow: list[tuple[_Due, Plan]] = []
            for (d, p), res in zip(plans, results, strict=True):
                if not res["applied"]:
                    again = True  # changed under us (admin edit, another beat): look again
                    continue
                d.next_run_at = p.next_run_at
                if p.next_run_at <= now():
                    nxt = self._plan(d, now())
                    if nxt is not None:
                        follow.append((d, nxt))
                elif next_due is None or p.next_run_at < next_due:
                    next_due = p.next_run_at
            plans = follow
        if again or plans:
            return 0.0
        if next_due is None:
            return self.interval
        return max((next_due - now()).total_seconds(), 0.0)

    def _due(self, row: dict[str, Any]) -> _Due | None:
        try:
            schedule = CronSchedule.parse(row["cron_expr"], row["timezone"])
        except InvalidSchedule as exc:
            self._mark_broken(row, str(exc))
            return None
        return _Due(id=row["id"], name=row["name"], schedule=schedule,
                    misfire_policy=row["misfire_policy"], next_run_at=row["next_run_at"],
                    options=self.run_options(row))

    def _plan(self, d: _Due, now: datetime) -> Plan | None:
        try:
            return plan(d.id, d.schedule, d.next_run_at, d.misfire_policy, now,
                        self.settings.misfire_grace_seconds)
        except Exception as exc:
            self._mark_broken({"id": d.id, "name": d.name}, str(exc))
            return None

    def _mark_broken(self, row: dict[str, Any], reason: str) -> None:
        if row["id"] not in self._broken:
            logger.error("reproq: schedule %r (id %s) cannot be planned and is skipped: %s",
                         row.get("name"), row["id"], reason)
        self._broken[row["id"]] = time.monotonic()

    def run_options(self, row: dict[str, Any]) -> tuple[int, int, float | None, str | None,
                                                         int | None]:
        """(max_attempts, timeout, expires_in, concurrency_key, concurrency_limit) of a run.

        From the task's options like an enqueue; a task that no longer imports gets the
        backend's defaults (its run then fails with a readable error in the worker).
        """
        from django.utils.module_loading import import_string

        from .. import payload
        from ..concurrency import rule_for
        from ..results import ReproqTask

        opts = self.owner.backend.reproq_options
        path = row["task_path"]
        if path not in self._task_cache:
            try:
                self._task_cache[path] = import_string(path)
            except Exception:
                self._task_cache[path] = None
        task = self._task_cache[path]
        max_attempts, timeout, expires = opts.max_attempts, opts.timeout_seconds, opts.expires_in
        if isinstance(task, ReproqTask):
            max_attempts = task.max_attempts or max_attempts
            timeout = task.timeout_seconds or timeout
            expires = task.expires_in or expires
        max_attempts = row["max_attempts"] or max_attempts
        key: str | None = None
        limit: int | None = None
        rule = rule_for(path)
        if rule is not None:
            limit = rule.limit
            try:
                args = payload.decode(row["args"], None)
                kwargs = payload.decode(row["kwargs"], None)
                key = rule.resolve_key(args, kwargs)
            except Exception as exc:
                key = f"schedule:{row['name']}"
                logger.warning("reproq: the concurrency key of schedule %r could not be "
                               "computed (%s); using %r", row["name"], exc, key)
        return (max_attempts, timeout, expires.total_seconds() if expires else None, key, limit)

    async def _fire(self, conn: psycopg.AsyncConnection,
                    plans: list[tuple[_Due, Plan]]) -> list[dict[str, Any]]:
        from ..conf import aging_factor_us

        opts = self.owner.backend.reproq_options
        params: dict[str, Any] = {
            "schedule_id": [p.schedule_id for _, p in plans],
            "expected": [p.expected for _, p in plans],
            "fire": [p.fire for _, p in plans],
            "scheduled_for": [p.scheduled_for for _, p in plans],
            "label": [p.scheduled_for.astimezone(UTC).isoformat() if p.scheduled_for else None
                      for _, p in plans],
            "next_run_at": [p.next_run_at for _, p in plans],
            "max_attempts": [d.options[0] for d, _ in plans],
            "timeout": [d.options[1] for d, _ in plans],
            "expires_in": [d.options[2] for d, _ in plans],
            "concurrency_key": [d.options[3] for d, _ in plans],
            "concurrency_limit": [d.options[4] for d, _ in plans],
            "backend": self.owner.backend.alias, "worker": self.owner.worker_id,
            "aging_us": aging_factor_us(self.settings.priority_aging_factor),
            "code_ref": opts.code_ref, "pip_lock_hash": opts.pip_lock_hash,
        }
        rows = await self._execute(conn, BEAT_FIRE, params)
        by_id = {r["schedule_id"]: r for r in rows}
        out = []
        for d, p in plans:
            res = by_id[p.schedule_id]
            out.append(res)
            if not res["applied"]:
                continue
            if res["run_id"] is not None:
                self.ticks += 1
                logger.info("reproq: schedule %r fired for %s (run %s)", d.name,
                            p.scheduled_for.isoformat() if p.scheduled_for else "?",
                            res["run_id"])
            elif p.fire and res["ticked"]:
                self.skipped += 1
                logger.info("reproq: schedule %r skipped its fire for %s: the previous run is "
                            "still active (overlap policy 'skip')", d.name, p.scheduled_for)
            elif not p.fire and p.reason.startswith("misfire"):
                self.skipped += 1
                logger.warning("reproq: schedule %r: %s; next fire %s", d.name, p.reason,
                               p.next_run_at.isoformat())
        return out

    # ------------------------------------------------------------------ --once
    async def run_once(self) -> OnceOutcome:
        """Enqueue what is due now if the lock is free, then release it (for crontab)."""
        self._stop, self._exited = anyio.Event(), anyio.Event()
        conn = await self._connect()
        try:
            rows = await self._execute(conn, TRY_LOCK, {"key": self.key})
            if not rows[0]["locked"]:
                return OnceOutcome(led=False, holder=await self.holder_description(conn))
            await self._become_leader(conn)
            before = (self.ticks, self.skipped)
            try:
                for _ in range(MAX_FIRES_PER_CYCLE):
                    wait = await self._cycle(conn)
                    if wait > 0:
                        break
            finally:
                await self._resign(conn)
            return OnceOutcome(led=True, fired=self.ticks - before[0],
                               skipped=self.skipped - before[1])
        finally:
            self._exited.set()
            await self._close(conn)

    async def holder_description(self, conn: psycopg.AsyncConnection) -> str:
        with contextlib.suppress(Exception):
            rows = await self._execute(conn, LOCK_HOLDER, lock_key_parts(self.key))
            if rows:
                return f"{rows[0]['application_name'] or '?'} (backend pid {rows[0]['pid']})"
        return "another process"
