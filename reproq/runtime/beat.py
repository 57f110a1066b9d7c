"""The beat: enqueues due cron ticks, only while this process leads (`reproq.runtime.peers`).

Leadership
    The beat subscribes to the process's `Peer` (``REPROQ_RUNTIME["LEADER"]``: a session
    advisory lock or a row lease, see `reproq.runtime.peers` for how each is held and its
    failover bounds). While ``peer.is_leader`` it wakes at the next due fire or every
    ``BEAT_INTERVAL_SECONDS`` (to see new and changed schedules), and runs each cycle inside
    ``peer.leading()``: on the lock connection (advisory: its statements only execute while that
    session holds the lock) or in a transaction fenced by the lease (lease: they only commit
    while the lease is ours). It checks ``peer.is_leader`` again before every FIRE.

Exactly once
    Independently of leadership, each tick is one statement (`BEAT_FIRE`): a compare-and-set on
    the schedule's next_run_at, the (schedule, scheduled_for) row in ``reproq_schedule_ticks``
    (unique, ON CONFLICT DO NOTHING) and the task run, inserted only if the tick row was - so
    even two processes that both believe they lead cannot enqueue one tick twice.

Statements: `BEAT_POLL` once per wake-up (due schedules + next due time) and `BEAT_FIRE` once
per batch of due ticks (one tick per schedule per batch): one statement per tick when one
schedule is due. The peer adds its own check once per interval (and the lease peer one
`LEASE_FENCE` per cycle).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import psycopg

from .. import db, sql
from ..cron import CronSchedule, InvalidSchedule, Plan, plan
from .ports import NotLeader
from .stoploop import StopLoop

if TYPE_CHECKING:
    from ..backend import ReproqBackend
    from ..conf import RuntimeSettings
    from .peers import ElectedPeer

logger = logging.getLogger("reproq.beat")

POLL_LIMIT = 500
BROKEN_RETRY_SECONDS = 60.0
MAX_FIRES_PER_CYCLE = 1000
_DB_ERRORS = (psycopg.Error, OSError, TimeoutError)

# The leader's look at the schedules, once per wake-up: the due ones (LEFT JOIN: always at
# least one row, carrying the database's now and the next due time).
BEAT_POLL = """
WITH due AS (
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

# Name the statements for `reproq.db.statement_counts` (the names live in `reproq.sql`).
sql.name_statements(globals(), ("BEAT_POLL", "BEAT_FIRE"))


class RunOptions:
    """(max_attempts, timeout, expires_in, concurrency_key, concurrency_limit) of a scheduled
    run, from the task's options like an enqueue (the beat's ticks and pg_cron's jobs)."""

    def __init__(self, backend: ReproqBackend) -> None:
        self.backend = backend
        self._task_cache: dict[str, Any] = {}

    def __call__(self, row: dict[str, Any]) -> tuple[int, int, float | None, str | None,
                                                     int | None]:
        """A task that no longer imports gets the backend's defaults (its run then fails with
        a readable error in the worker)."""
        from django.utils.module_loading import import_string

        from .. import payload
        from ..concurrency import rule_for
        from ..results import ReproqTask

        opts = self.backend.reproq_options
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


class Beat(StopLoop):
    """The beat service of one process (see the module docstring): fires while `peer` leads."""

    name = "beat"

    def __init__(self, settings: RuntimeSettings, backend: ReproqBackend, worker_id: str,
                 peer: ElectedPeer) -> None:
        self.settings = settings
        self.backend = backend
        self.worker_id = worker_id
        self.peer = peer
        self.run_options = RunOptions(backend)
        self.role = "stopped"
        self.ticks = 0  # runs enqueued by this process
        self.skipped = 0  # ticks recorded without a run (overlap) and fires skipped (misfire)
        self._init_stop()
        self._broken: dict[int, float] = {}

    @property
    def interval(self) -> float:
        return self.settings.beat_interval_seconds

    @property
    def statement_timeout(self) -> float:
        """Bound on one POLL or FIRE statement."""
        return max(self.settings.leader_timeout_seconds / 3, 0.2)

    def status(self) -> dict[str, Any]:
        """The peer's leadership and what this process's beat did."""
        return {**self.peer.status(), "beat": self.role, "ticks_enqueued": self.ticks,
                "ticks_skipped": self.skipped}

    # ------------------------------------------------------------------ service
    async def run(self) -> None:
        """Fire due ticks whenever the peer leads, until `stop()`."""
        self._events()
        unsubscribe = self.peer.subscribe(lambda _leading: self._poke())
        try:
            while not self._stopping:
                if not self.peer.is_leader:
                    self.role = "standby"
                    await self._sleep(self.interval)
                    continue
                self.role = "leading"
                try:
                    async with self.peer.leading() as conn:
                        wait = await self._cycle(conn)
                except NotLeader:
                    wait = self.interval
                except _DB_ERRORS as exc:
                    logger.warning("reproq: beat cycle failed (%s)", db.describe(exc))
                    wait = self.interval
                await self._sleep(min(wait, self.interval))
        finally:
            unsubscribe()
            self.role = "stopped"
            self._ended()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop firing; returns once `run` has returned (at most `timeout` seconds)."""
        await self._stop_and_wait(timeout)

    async def _execute(self, conn: psycopg.AsyncConnection, query: str,
                       params: dict[str, Any]) -> list[dict[str, Any]]:
        with anyio.fail_after(self.statement_timeout):
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    def _check_leading(self) -> None:
        if not self.peer.is_leader:
            raise NotLeader("leadership lost during a beat cycle")

    # ------------------------------------------------------------------ one cycle
    async def _cycle(self, conn: psycopg.AsyncConnection) -> float:
        """Poll, fire what is due; return seconds until the next due."""
        self._check_leading()
        now_broken = time.monotonic()
        self._broken = {k: t for k, t in self._broken.items()
                        if now_broken - t < BROKEN_RETRY_SECONDS}
        rows = await self._execute(conn, BEAT_POLL, {"skip": list(self._broken),
                                                     "limit": POLL_LIMIT})
        received = time.monotonic()
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
            self._check_leading()
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

    async def _fire(self, conn: psycopg.AsyncConnection,
                    plans: list[tuple[_Due, Plan]]) -> list[dict[str, Any]]:
        from ..conf import aging_factor_us

        opts = self.backend.reproq_options
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
            "backend": self.backend.alias, "worker": self.worker_id,
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
        """Enqueue what is due now if nobody else leads, then give leadership up (crontab)."""
        async with self.peer.once() as led:
            if not led:
                return OnceOutcome(led=False, holder=self.peer.holder)
            before = (self.ticks, self.skipped)
            for _ in range(MAX_FIRES_PER_CYCLE):
                async with self.peer.leading() as conn:
                    wait = await self._cycle(conn)
                if wait > 0:
                    break
            return OnceOutcome(led=True, fired=self.ticks - before[0],
                               skipped=self.skipped - before[1])


def standalone(settings: RuntimeSettings, worker_id: str = "") -> Beat:
    """The beat of ``manage.py reproq beat`` (and ``--once``): its own peer and worker row."""
    from django.tasks import task_backends

    from .peers import make_peer
    from .registry import WorkerIdentity, make_worker_id

    backend = task_backends[settings.backend]
    identity = WorkerIdentity(worker_id=make_worker_id(worker_id), queues=(), concurrency=0,
                              server="beat")
    peer = make_peer(settings, backend.database, identity.worker_id, identity.row,
                     standalone=True)
    return Beat(settings, backend, identity.worker_id, peer)
