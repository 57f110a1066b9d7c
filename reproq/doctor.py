"""The health diagnosis behind ``manage.py reproq doctor``: one `Finding` per thing that can
keep tasks from running — settings, PostgreSQL version, migrations, tables, the run id sequence,
LISTEN/NOTIFY delivery, a transaction pooler in the way, clock skew against the database, live
runtimes, expired leases, the backlog's age, READY runs in queues no live runtime serves, paused
queues and the beat leader. Reads only; it changes nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_SERVER_VERSION = 120000  # MATERIALIZED CTEs: older servers cannot run the statements
SUPPORTED_SERVER_VERSION = 150000  # what reproq is tested on
CLOCK_SKEW_WARN_SECONDS = 2.0
BACKLOG_WARN_SECONDS = 300.0
NOTIFY_WAIT_SECONDS = 3.0
UNSERVED_SCAN_ROWS = 100_000  # READY runs looked at for unserved queues (bounds the check)
UNSERVED_SHOWN = 10  # queues named in the finding

# READY runs whose queue no live runtime lists (reproq_workers.queues, heartbeat fresh): no claim
# will ever take them. The scan of READY rows is bounded; past the bound counts are "at least".
UNSERVED_QUEUES = """
WITH served AS MATERIALIZED (
    SELECT DISTINCT q.name FROM reproq_workers w,
           jsonb_array_elements_text(CASE WHEN jsonb_typeof(w.queues) = 'array'
                                          THEN w.queues ELSE '[]' END) AS q(name)
    WHERE w.last_seen_at > now() - make_interval(secs => %(ttl)s)
), unserved AS (
    SELECT r.queue_name FROM reproq_task_runs r
    WHERE r.status = 'READY'
      AND NOT EXISTS (SELECT 1 FROM served s WHERE s.name = r.queue_name)
    LIMIT %(scan)s
)
SELECT queue_name, count(*) FROM unserved GROUP BY queue_name ORDER BY count(*) DESC, queue_name
"""


@dataclass(frozen=True)
class Finding:
    level: str  # OK, WARN or FAIL
    topic: str
    detail: str
    hint: str = ""


def _settings() -> Iterator[Finding]:
    from django.core.checks import WARNING, run_checks

    messages = [m for m in run_checks(include_deployment_checks=False)
                if (m.id or "").startswith("reproq.") and m.level >= WARNING]
    if not messages:
        yield Finding(OK, "settings", "REPROQ_RUNTIME, the reproq TASKS options and the access "
                      "settings are valid")
    for m in messages:
        yield Finding(FAIL if m.is_serious() else WARN, "settings", str(m.msg), m.hint or "")


def _server(cursor: Any, alias: str) -> Iterator[Finding]:
    cursor.execute("SELECT current_setting('server_version_num')::int, "
                   "current_setting('server_version'), current_database()")
    num, text, name = cursor.fetchone()
    if num < MIN_SERVER_VERSION:
        yield Finding(FAIL, "database", f"PostgreSQL {text} is too old",
                      "reproq supports PostgreSQL 15 and newer")
    elif num < SUPPORTED_SERVER_VERSION:
        yield Finding(WARN, "database", f"PostgreSQL {text} is older than the supported 15",
                      "upgrade PostgreSQL; reproq is tested on 15 and newer")
    else:
        yield Finding(OK, "database", f"PostgreSQL {text}, database {name!r} (alias {alias!r})")


def _migrations(alias: str) -> Iterator[Finding]:
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[alias])
    leaves = [node for node in executor.loader.graph.leaf_nodes() if node[0] == "reproq"]
    plan = executor.migration_plan(leaves)
    missing = [m.name for m, backwards in plan if not backwards]
    if missing:
        yield Finding(FAIL, "migrations", f"{len(missing)} reproq migrations are not applied: "
                      + ", ".join(missing), "run: python manage.py migrate reproq")
    else:
        yield Finding(OK, "migrations", "all reproq migrations are applied")


def _tables(cursor: Any) -> Iterator[Finding]:
    from django.apps import apps

    names = sorted(m._meta.db_table for m in apps.get_app_config("reproq").get_models())
    cursor.execute("SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL", [names])
    missing = [r[0] for r in cursor.fetchall()]
    if missing:
        yield Finding(FAIL, "tables", "missing although the migrations are recorded as applied: "
                      + ", ".join(missing),
                      "they were dropped or renamed by hand: restore them from a backup, or "
                      "rename them back")
    else:
        yield Finding(OK, "tables", f"all {len(names)} present")


def _sequence(cursor: Any) -> Iterator[Finding]:
    cursor.execute("SELECT pg_get_serial_sequence('reproq_task_runs', 'id'), "
                   "to_regclass('reproq_task_runs_id_seq')::text")
    owned, named = cursor.fetchone()
    if owned and named and owned.split(".")[-1].strip('"') == named.split(".")[-1]:
        yield Finding(OK, "run ids", "sequence reproq_task_runs_id_seq")
    else:
        yield Finding(FAIL, "run ids",
                      f"the runs' id sequence is {owned or 'missing'}, but enqueue uses "
                      "reproq_task_runs_id_seq: every enqueue fails",
                      f"ALTER SEQUENCE {owned} RENAME TO reproq_task_runs_id_seq" if owned
                      else "restore the sequence (python manage.py migrate reproq)")


def _notify(alias: str) -> Iterator[Finding]:
    import psycopg

    from .db import conninfo

    channel = f"reproq_doctor_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo(alias, application_name="reproq-doctor"),
                         autocommit=True) as listener, \
            psycopg.connect(conninfo(alias, application_name="reproq-doctor"),
                            autocommit=True) as sender:
        listener.execute(f"LISTEN {channel}")
        began = time.monotonic()
        sender.execute("SELECT pg_notify(%s, 'ping')", [channel])
        got = any(n.payload == "ping" for n in listener.notifies(timeout=NOTIFY_WAIT_SECONDS,
                                                                  stop_after=1))
        waited = time.monotonic() - began
    if got:
        yield Finding(OK, "listen/notify", f"a notification arrived in {waited * 1000:.0f} ms")
    else:
        yield Finding(WARN, "listen/notify",
                      f"a notification sent on another connection did not arrive within "
                      f"{NOTIFY_WAIT_SECONDS:g}s: runtimes will only find work by polling",
                      "behind PgBouncer in transaction mode set REPROQ_RUNTIME['LISTEN'] = False;"
                      " otherwise check for a proxy between the app and PostgreSQL")


def _pooler(alias: str) -> Iterator[Finding]:
    """A transaction pooler (PgBouncer) between reproq and PostgreSQL (`reproq.pooler`), and
    which settings for running behind one are still missing (CONNECTION_MODE, Django's
    DISABLE_SERVER_SIDE_CURSORS) — or a pgbouncer CONNECTION_MODE on a direct connection."""
    import psycopg
    from django.db import connections
    from django.tasks import task_backends

    from .conf import current_runtime_settings
    from .pooler import DIRECT, detect

    try:
        found = detect(alias, notify_timeout=0)  # the listen/notify check waits for NOTIFY
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        yield Finding(WARN, "connection mode",
                      f"cannot probe for a pooler: {type(exc).__name__}: {first}")
        return
    rs = current_runtime_settings()
    if found.mode == DIRECT:
        if rs.connection_mode == "pgbouncer":
            yield Finding(WARN, "connection mode", f"direct: {found.summary}, but "
                          "CONNECTION_MODE is 'pgbouncer' (LISTEN and prepared statements are "
                          "off for nothing)", "set REPROQ_RUNTIME['CONNECTION_MODE'] = 'direct'")
            return
        yield Finding(OK, "connection mode", f"direct: {found.summary}")
        return
    missing = []
    if rs.connection_mode != "pgbouncer":
        missing.append("REPROQ_RUNTIME['CONNECTION_MODE'] = 'pgbouncer'")
    if rs.beat and getattr(rs, "leader", "advisory") != "lease":
        missing.append("REPROQ_RUNTIME['BEAT'] = False (run the beat on a direct DSN)")
    try:
        options = getattr(task_backends[rs.backend], "reproq_options", None)
    except Exception:  # an invalid backend is the settings check's finding
        options = None
    if options is not None and options.prepared_statements:
        missing.append(f"TASKS[{rs.backend!r}]['OPTIONS']['PREPARED_STATEMENTS'] = False")
    if not connections[alias].settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        missing.append(f"DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True")
    if missing:
        yield Finding(WARN, "connection mode", f"pgbouncer: {found.summary}",
                      "set " + ", ".join(missing) + "; or give reproq a direct DSN")
    else:
        yield Finding(OK, "connection mode", f"pgbouncer: {found.summary}; the settings for "
                      "a transaction pooler are in place")


def _clock(cursor: Any) -> Iterator[Finding]:
    before = time.time()
    cursor.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
    db_now = float(cursor.fetchone()[0])
    skew = db_now - (before + time.time()) / 2
    if abs(skew) > CLOCK_SKEW_WARN_SECONDS:
        yield Finding(WARN, "clock", f"this host's clock is {abs(skew):.1f}s "
                      f"{'behind' if skew > 0 else 'ahead of'} the database's",
                      "run NTP on both: run_after and expiry times written here are compared "
                      "with the database's clock")
    else:
        yield Finding(OK, "clock", f"within {abs(skew) * 1000:.0f} ms of the database's")


def _runtime(cursor: Any, rs: Any) -> Iterator[Finding]:
    cursor.execute("""
        SELECT (SELECT count(*) FROM reproq_workers
                WHERE last_seen_at > now() - make_interval(secs => %(ttl)s)) AS alive,
               (SELECT count(*) FROM reproq_workers) AS rows,
               (SELECT count(*) FROM reproq_workers WHERE leader_since IS NOT NULL
                  AND last_seen_at > now() - make_interval(secs => %(ttl)s)) AS leaders,
               (SELECT count(*) FROM reproq_task_runs WHERE status = 'RUNNING'
                  AND leased_until < now() - make_interval(secs => %(reclaim)s)) AS expired,
               (SELECT extract(epoch FROM now() - min(run_after))::float8
                FROM reproq_task_runs WHERE status = 'READY' AND NOT blocked
                  AND run_after <= now()) AS oldest_due,
               (SELECT count(*) FROM reproq_periodic_tasks WHERE enabled) AS schedules
    """, {"ttl": rs.lease_seconds * 3, "reclaim": rs.reclaim_seconds * 2})
    alive, rows, leaders, expired, oldest_due, schedules = cursor.fetchone()
    oldest_due = float(oldest_due or 0.0)
    if alive:
        yield Finding(OK, "runtimes", f"{alive} alive" + (
            f" ({rows - alive} stale worker rows, removed by the next reclaim)"
            if rows > alive else ""))
    elif oldest_due > 0:
        yield Finding(WARN, "runtimes", "no runtime is alive and runs are due: nothing runs them",
                      "serve the app through reproq.asgi (AUTOSTART on) or run "
                      "python manage.py reproq worker")
    else:
        yield Finding(OK, "runtimes", "none alive (nothing is due)")
    if expired:
        yield Finding(WARN, "leases", f"{expired} running runs hold leases that expired over "
                      f"{rs.reclaim_seconds * 2:g}s ago and nobody took them back",
                      "a live runtime reclaims them; or run python manage.py reproq reclaim")
    else:
        yield Finding(OK, "leases", "no expired leases waiting")
    if oldest_due > BACKLOG_WARN_SECONDS:
        yield Finding(WARN, "backlog", f"the oldest due run has waited {oldest_due:,.0f}s",
                      "add concurrency or processes, or look for paused queues and limits "
                      "(python manage.py reproq status)")
    else:
        yield Finding(OK, "backlog", f"the oldest due run has waited {oldest_due:,.1f}s")
    if alive:
        yield from _unserved(cursor, rs.lease_seconds * 3)
    if schedules and not leaders:
        yield Finding(WARN, "beat", f"{schedules} enabled schedules and no live beat leader: "
                      "cron ticks are not enqueued",
                      "keep REPROQ_RUNTIME['BEAT'] = True in at least one runtime, or run "
                      "python manage.py reproq beat")
    else:
        yield Finding(OK, "beat", f"{schedules} enabled schedules, "
                      f"{'a leader is' if leaders else 'no leader'} alive")
    cursor.execute("SELECT queue_name FROM reproq_queue_controls WHERE paused "
                   "ORDER BY queue_name LIMIT 50")
    paused = [r[0] for r in cursor.fetchall()]
    if paused:
        yield Finding(WARN, "queues", "paused: " + ", ".join(paused),
                      "python manage.py reproq resume-queue NAME")
    else:
        yield Finding(OK, "queues", "none paused")


def _unserved(cursor: Any, ttl: float) -> Iterator[Finding]:
    """READY runs in queues that no live runtime claims from: they would wait forever, though
    the backlog (which only sees the oldest due run) can look fine. Only asked while some
    runtime is alive; with none, the runtimes finding already says that nothing runs."""
    cursor.execute(UNSERVED_QUEUES, {"ttl": ttl, "scan": UNSERVED_SCAN_ROWS})
    rows = [(str(name), int(n)) for name, n in cursor.fetchall()]
    if not rows:
        yield Finding(OK, "served queues", "every queue with READY runs is served by a live "
                      "runtime")
        return
    total = sum(n for _, n in rows)
    capped = total >= UNSERVED_SCAN_ROWS
    shown = ", ".join(f"{name} ({n:,}{'+' if capped else ''})"
                      for name, n in rows[:UNSERVED_SHOWN])
    more = f" and {len(rows) - UNSERVED_SHOWN} more" if len(rows) > UNSERVED_SHOWN else ""
    yield Finding(WARN, "served queues",
                  f"{'at least ' if capped else ''}{total:,} READY runs in {len(rows)} "
                  f"queue{'s' if len(rows) != 1 else ''} that no live runtime serves, so they "
                  f"wait forever: {shown}{more}",
                  "add the queues to a runtime (REPROQ_RUNTIME['QUEUES'] or the backend's "
                  "QUEUES, or python manage.py reproq worker --queues NAME,...), or cancel the "
                  "runs if the queue name is a mistake")


def diagnose(alias: str) -> list[Finding]:
    """Every finding for the database `alias`; a check that cannot run is a FAIL of its own,
    and the checks that need what it found missing are skipped."""
    from django.db import DatabaseError

    from .conf import current_runtime_settings

    findings: list[Finding] = []

    def step(topic: str, check: Callable[[], Iterator[Finding]]) -> bool:
        try:
            findings.extend(check())
        except (DatabaseError, OSError, ImportError) as exc:
            findings.append(Finding(FAIL, topic, f"{type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc) else ''}"))
            return False
        return True

    step("settings", _settings)
    cursor_ok = step("database", lambda: _with_cursor(alias, lambda c: _server(c, alias)))
    if not cursor_ok:
        return findings
    migrated = step("migrations", lambda: _migrations(alias))
    if migrated and not _failed(findings, "migrations"):
        step("tables", lambda: _with_cursor(alias, _tables))
        if not _failed(findings, "tables"):
            step("run ids", lambda: _with_cursor(alias, _sequence))
            rs = current_runtime_settings()
            step("runtimes", lambda: _with_cursor(alias, lambda c: _runtime(c, rs)))
    step("listen/notify", lambda: _notify(alias))
    step("connection mode", lambda: _pooler(alias))
    step("clock", lambda: _with_cursor(alias, _clock))
    return findings


def _failed(findings: list[Finding], topic: str) -> bool:
    return any(f.level == FAIL for f in findings if f.topic == topic)


def _with_cursor(alias: str, check: Callable[[Any], Iterator[Finding]]) -> Iterator[Finding]:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        return iter(list(check(cursor)))
