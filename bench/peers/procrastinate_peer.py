"""procrastinate driver: psycopg 3 connector, async no-op task, LISTEN/NOTIFY worker.

Enqueue: ``task.defer`` (sync), ``task.defer_async``, ``task.batch_defer`` (bulk). Worker:
``app.run_worker(concurrency=N)`` (asyncio tasks in one process, NOTIFY wakeups). Timestamps
come from procrastinate's own ``procrastinate_events`` table (``deferred``, ``started``,
``succeeded``; PostgreSQL clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from functools import cache
from typing import Any

from bench.peers import _driver

NAME = "procrastinate"
DB = "bench_procrastinate"
QUEUE = "bench"
TASK_KIND = "async"

DONE_SQL = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
SPAN_SQL = """
SELECT extract(epoch FROM min(at) FILTER (WHERE type = 'started')),
       extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded'))
FROM procrastinate_events
"""
LATENCY_SQL = """
SELECT extract(epoch FROM d.at), extract(epoch FROM s.at - d.at) * 1000
FROM procrastinate_events d
JOIN procrastinate_events s ON s.job_id = d.job_id AND s.type = 'started'
WHERE d.type = 'deferred'
"""

BULK_LABEL = "`batch_defer`"
WAKEUP = "LISTEN/NOTIFY (+5 s polling fallback)"
EMBEDDED = True
EMBEDDING_NOTE = (
    "worker inside the uvicorn process: `run_worker_async` started from the ASGI lifespan "
    "(procrastinate's documented in-process pattern), concurrency 10")


def worker_argv(python: str, concurrency: int) -> list[list[str]]:
    return [[python, "-m", __name__, "worker", "--concurrency", str(concurrency)]]


def concurrency_note(concurrency: int, processes: int) -> str:
    return f"{processes} process(es) x concurrency={concurrency} (asyncio)"


@cache
def app() -> Any:
    import procrastinate

    url = os.environ["BENCH_DB_URL"]
    application = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @application.task(name="noop", queue=QUEUE)
    async def noop(i: int = 0) -> None:
        return None

    application.noop = noop  # type: ignore[attr-defined]
    return application


def cmd_setup(args: Any) -> dict[str, Any]:
    a = app()
    with a.open():
        a.schema_manager.apply_schema()
    return {"ok": True}


def cmd_reset(args: Any) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute("TRUNCATE procrastinate_events, procrastinate_periodic_defers, "
                     "procrastinate_jobs, procrastinate_workers RESTART IDENTITY")
        conn.execute("VACUUM ANALYZE procrastinate_jobs")
    return {"ok": True}


def cmd_enqueue(args: Any) -> dict[str, Any]:
    a, n = app(), args.n
    noop = a.noop
    if args.mode == "sync":
        with a.open():
            t0 = time.perf_counter()
            for i in range(n):
                noop.defer(i=i)
            return _driver.rate(n, time.perf_counter() - t0)
    if args.mode == "async":
        async def run() -> dict[str, Any]:
            async with a.open_async():
                await noop.defer_async(i=-1)  # open the pool outside the timing
                t0 = time.perf_counter()
                for i in range(n):
                    await noop.defer_async(i=i)
                return _driver.rate(n, time.perf_counter() - t0)
        return asyncio.run(run())
    if args.mode == "bulk":
        calls = [{"i": i} for i in range(n)]
        with a.open():
            t0 = time.perf_counter()
            noop.batch_defer(*calls)
            return _driver.rate(n, time.perf_counter() - t0)
    raise SystemExit(f"unknown mode {args.mode}")


def cmd_latency(args: Any) -> dict[str, Any]:
    a = app()
    with a.open():
        a.noop.defer(i=-1)  # open the pool before the measured ones
        gap = args.gap_ms / 1000
        for i in range(args.n):
            a.noop.defer(i=i)
            time.sleep(gap)
    return {"ok": True, "warmup_jobs": 1}


def cmd_worker(args: Any) -> None:
    a = app()
    a.run_worker(queues=[QUEUE], concurrency=args.concurrency, install_signal_handlers=True)


async def embedded_worker(stop: asyncio.Event) -> None:
    """The documented in-process pattern: run_worker_async as a task, cancel on shutdown."""
    a = app()
    async with a.open_async():
        task = asyncio.create_task(a.run_worker_async(
            queues=[QUEUE], concurrency=10, install_signal_handlers=False))
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, timeout=10)


def cmd_scale(args: Any) -> dict[str, Any]:
    """Fill ``--rows`` finished + ``--ready`` todo jobs, then time the claim function."""
    import psycopg

    cmd_reset(args)
    a = app()
    with a.open():
        template = a.noop.defer(i=0)
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no per-row triggers
        where = f"t.id = {int(template)}"
        _driver.fill_from_template(conn, "procrastinate_jobs", where, args.rows,
                                   {"status": "'succeeded'::procrastinate_job_status",
                                    "attempts": "1"})
        _driver.fill_from_template(conn, "procrastinate_jobs", where, args.ready - 1, {})
        conn.execute("SET session_replication_role = DEFAULT")
        conn.execute("VACUUM ANALYZE procrastinate_jobs")
        total = conn.execute("SELECT count(*) FROM procrastinate_jobs").fetchone()[0]

        def claim() -> dict[str, Any]:
            out = _driver.explain(conn.execute,
                                  "SELECT (procrastinate_fetch_job_v2(%s::varchar[], NULL)).id",
                                  [[QUEUE]], rows_from_plan=False)
            out["rows"] = 1  # one job per call; there are ready jobs for every call
            return out

        out = _driver.claim_reps(claim, args.k, args.reps)
    out["table_rows"] = total
    out["statement"] = "procrastinate_fetch_job_v2 (1 job per call)"
    return out


def cmd_serve(args: Any) -> None:
    from bench.peers.web import serve

    serve(args.port, embedded_worker)


if __name__ == "__main__":
    _driver.main(globals())
