"""django-tasks-db driver: the reference ORM backend of Django's task framework.

Enqueue: ``task.enqueue`` (sync), ``task.aenqueue`` (async); it has no bulk API, so "bulk" is
``DBTaskResult.objects.bulk_create`` of the rows ``enqueue`` would write (marked as such in the
table). Worker: ``manage.py db_worker`` runs one task at a time per process and polls (default
interval 1 s); its authors' way to run tasks concurrently is more processes, so concurrency N
is N ``db_worker`` processes. Timestamps: ``enqueued_at`` / ``started_at`` / ``finished_at``
(Django's clock, the same host as PostgreSQL).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from bench.peers import _driver

NAME = "django-tasks-db"
DB = "bench_dtdb"
TASK_KIND = "sync"
ENV = {"DJANGO_SETTINGS_MODULE": "bench.peers.dtdb_settings"}
TABLE = "django_tasks_database_dbtaskresult"

DONE_SQL = f"SELECT count(*) FROM {TABLE} WHERE status = 'SUCCESSFUL'"
SPAN_SQL = f"SELECT extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at)) " \
           f"FROM {TABLE}"
LATENCY_SQL = f"SELECT extract(epoch FROM enqueued_at), " \
              f"extract(epoch FROM started_at - enqueued_at) * 1000 FROM {TABLE} " \
              f"WHERE started_at IS NOT NULL"

BULK_LABEL = "`bulk_create` of the rows (no bulk API)"
WAKEUP = "polling (each process every 1 s when idle)"
EMBEDDED = False
EMBEDDING_NOTE = (
    "no in-process worker exists: the web process serves only, 10 separate `db_worker` "
    "processes drain on the same machine")


def worker_argv(python: str, concurrency: int) -> list[list[str]]:
    # its defaults otherwise: 1 s polling interval and the random start-up delay that spreads
    # the processes' polls (without it they poll in lockstep)
    one = [python, "-m", "django", "db_worker", "--no-reload", "--verbosity", "0",
           "--queue-name", "default"]
    return [list(one) for _ in range(concurrency)]


def concurrency_note(concurrency: int, processes: int) -> str:
    return (f"{processes * concurrency} db_worker processes x 1 task "
            f"(polling, interval 1 s when idle; CONN_MAX_AGE 600)")


def _setup() -> Any:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.peers.dtdb_settings")
    import django

    django.setup()
    from bench.peers.dtdb_tasks import noop

    return noop


def cmd_setup(args: Any) -> dict[str, Any]:
    _setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    return {"ok": True}


def cmd_reset(args: Any) -> dict[str, Any]:
    _setup()
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"TRUNCATE {TABLE}")
        cur.execute(f"VACUUM ANALYZE {TABLE}")
    return {"ok": True}


def cmd_enqueue(args: Any) -> dict[str, Any]:
    noop, n = _setup(), args.n
    if args.mode == "sync":
        t0 = time.perf_counter()
        for i in range(n):
            noop.enqueue(i)
        return _driver.rate(n, time.perf_counter() - t0)
    if args.mode == "async":
        async def run() -> dict[str, Any]:
            await noop.aenqueue(-1)  # open the connection outside the timing
            t0 = time.perf_counter()
            for i in range(n):
                await noop.aenqueue(i)
            return _driver.rate(n, time.perf_counter() - t0)

        return asyncio.run(run())
    if args.mode == "bulk":
        from django.tasks import default_task_backend
        from django_tasks_db.compat import normalize_json
        from django_tasks_db.models import DBTaskResult, get_date_max

        backend = default_task_backend
        t0 = time.perf_counter()
        rows = [DBTaskResult(id=backend._get_id(),
                             args_kwargs=normalize_json({"args": [i], "kwargs": {}}),
                             priority=noop.priority, task_path=noop.module_path,
                             queue_name=noop.queue_name,
                             run_after=noop.run_after or get_date_max(),  # pre_save's job
                             backend_name=backend.alias)
                for i in range(n)]
        DBTaskResult.objects.bulk_create(rows, batch_size=10_000)
        return _driver.rate(n, time.perf_counter() - t0)
    raise SystemExit(f"unknown mode {args.mode}")


def cmd_latency(args: Any) -> dict[str, Any]:
    noop = _setup()
    noop.enqueue(-1)
    gap = args.gap_ms / 1000
    for i in range(args.n):
        noop.enqueue(i)
        time.sleep(gap)
    return {"ok": True, "warmup_jobs": 1}


def cmd_scale(args: Any) -> dict[str, Any]:
    """``--rows`` SUCCESSFUL + ``--ready`` READY rows; time db_worker's claim (one task)."""
    noop = _setup()
    cmd_reset(args)
    from django.db import connection
    from django_tasks_db.models import DBTaskResult
    from django_tasks_db.utils import exclusive_transaction

    template = noop.enqueue(0).id
    connection.ensure_connection()
    raw = connection.connection  # psycopg connection of Django
    where = f"t.id = '{template}'"
    with raw.cursor() as cur:  # fill with plain SQL through Django's own connection
        class Conn:
            @staticmethod
            def execute(sql: str, params: Any = None) -> Any:
                cur.execute(sql, params)
                return cur

        _driver.fill_from_template(Conn, TABLE, where, args.rows,
                                   {"id": "gen_random_uuid()", "status": "'SUCCESSFUL'",
                                    "started_at": "now()", "finished_at": "now()"})
        _driver.fill_from_template(Conn, TABLE, where, args.ready - 1,
                                   {"id": "gen_random_uuid()"})
        cur.execute(f"VACUUM ANALYZE {TABLE}")
        cur.execute(f"SELECT count(*) FROM {TABLE}")
        total = cur.fetchone()[0]

    def claim() -> dict[str, Any]:  # the loop body of db_worker, without running the task
        tasks = DBTaskResult.objects.ready().filter(backend_name="default",
                                                    queue_name__in=["default"])
        with exclusive_transaction(tasks.db):
            locked = tasks.select_for_update(skip_locked=True)[:1]
            sql, params = locked.query.sql_with_params()
            with connection.cursor() as cur:
                out = _driver.explain(lambda q, p: (cur.execute(q, p), cur)[1], sql, params)
            result = tasks.get_locked()  # the same row: this transaction holds its lock
            if result is not None:
                result.claim("bench")
        out["rows"] = 1 if result is not None else 0
        return out

    out = _driver.claim_reps(claim, args.k, args.reps)
    out["table_rows"] = total
    out["statement"] = ("db_worker claim: SELECT … FOR UPDATE SKIP LOCKED LIMIT 1 (timed), "
                        "then UPDATE by id")
    return out


def cmd_serve(args: Any) -> None:
    from bench.peers.web import serve

    serve(args.port, None)


if __name__ == "__main__":
    _driver.main(globals())
