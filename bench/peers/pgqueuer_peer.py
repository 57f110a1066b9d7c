"""pgqueuer driver: asyncpg (its fastest driver), async no-op entrypoint, LISTEN/NOTIFY worker.

Enqueue: ``SyncQueries.enqueue`` over a psycopg connection (sync), ``Queries.enqueue`` over
asyncpg (async), ``Queries.enqueue`` with lists (bulk). Worker: ``QueueManager.run`` with
``max_concurrent_tasks=N`` (its cap per worker; it needs ``batch_size <= N/2``). Timestamps come
from ``pgqueuer_log`` (``queued``, ``picked``, ``successful``; PostgreSQL clock). Finished jobs
leave the queue table for the log table, as pgqueuer does by design.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from typing import Any

from bench.peers import _driver

NAME = "pgqueuer"
DB = "bench_pgqueuer"
ENTRYPOINT = "noop"
TASK_KIND = "async"

DONE_SQL = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
SPAN_SQL = """
SELECT extract(epoch FROM min(created) FILTER (WHERE status = 'picked')),
       extract(epoch FROM max(created) FILTER (WHERE status = 'successful'))
FROM pgqueuer_log
"""
LATENCY_SQL = """
SELECT extract(epoch FROM q.created), extract(epoch FROM p.created - q.created) * 1000
FROM pgqueuer_log q
JOIN pgqueuer_log p ON p.job_id = q.job_id AND p.status = 'picked'
WHERE q.status = 'queued'
"""

BULK_LABEL = "`Queries.enqueue` with lists"
WAKEUP = "LISTEN/NOTIFY (asyncpg)"
EMBEDDED = True
EMBEDDING_NOTE = (
    "worker inside the uvicorn process: `QueueManager.run` started from the ASGI lifespan, "
    "max_concurrent_tasks 10")


def worker_argv(python: str, concurrency: int) -> list[list[str]]:
    return [[python, "-m", __name__, "worker", "--concurrency", str(concurrency)]]


def concurrency_note(concurrency: int, processes: int) -> str:
    return (f"{processes} process(es) x max_concurrent_tasks={concurrency}, "
            f"batch_size={max(1, concurrency // 2)} (asyncio, asyncpg)")


def _url() -> str:
    return os.environ["BENCH_DB_URL"]


async def _queries() -> Any:
    import asyncpg
    from pgqueuer import Queries

    conn = await asyncpg.connect(_url())
    return conn, Queries.from_asyncpg_connection(conn)


def cmd_setup(args: Any) -> dict[str, Any]:
    async def run() -> None:
        conn, q = await _queries()
        try:
            await q.install()
        finally:
            await conn.close()

    asyncio.run(run())
    return {"ok": True}


def cmd_reset(args: Any) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics RESTART IDENTITY")
        conn.execute("VACUUM ANALYZE pgqueuer")
        conn.execute("VACUUM ANALYZE pgqueuer_log")
    return {"ok": True}


def cmd_enqueue(args: Any) -> dict[str, Any]:
    n = args.n
    if args.mode == "sync":
        import psycopg
        from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
        from pgqueuer.adapters.persistence.queries import SyncQueries

        with psycopg.connect(args.url, autocommit=True) as conn:
            q = SyncQueries(SyncPsycopgDriver(conn))
            t0 = time.perf_counter()
            for i in range(n):
                q.enqueue(ENTRYPOINT, str(i).encode())
            return _driver.rate(n, time.perf_counter() - t0)

    async def run() -> dict[str, Any]:
        conn, q = await _queries()
        try:
            if args.mode == "async":
                await q.enqueue(ENTRYPOINT, b"-1")  # warm-up, as for the others
                t0 = time.perf_counter()
                for i in range(n):
                    await q.enqueue(ENTRYPOINT, str(i).encode())
                return _driver.rate(n, time.perf_counter() - t0)
            if args.mode == "bulk":
                payloads = [str(i).encode() for i in range(n)]
                t0 = time.perf_counter()
                await q.enqueue([ENTRYPOINT] * n, payloads, [0] * n)
                return _driver.rate(n, time.perf_counter() - t0)
            raise SystemExit(f"unknown mode {args.mode}")
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_latency(args: Any) -> dict[str, Any]:
    import psycopg
    from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
    from pgqueuer.adapters.persistence.queries import SyncQueries

    with psycopg.connect(args.url, autocommit=True) as conn:
        q = SyncQueries(SyncPsycopgDriver(conn))
        q.enqueue(ENTRYPOINT, b"-1")
        gap = args.gap_ms / 1000
        for i in range(args.n):
            q.enqueue(ENTRYPOINT, str(i).encode())
            time.sleep(gap)
    return {"ok": True, "warmup_jobs": 1}


def _queue_manager(conn: Any) -> Any:
    from pgqueuer import Queries, QueueManager

    qm = QueueManager(Queries.from_asyncpg_connection(conn))

    @qm.entrypoint(ENTRYPOINT)
    async def noop(job: Any) -> None:
        return None

    return qm


async def _run_qm(concurrency: int, stop: asyncio.Event) -> None:
    import asyncpg

    conn = await asyncpg.connect(_url())
    qm = _queue_manager(conn)

    async def watch() -> None:
        await stop.wait()
        qm.shutdown.set()

    watcher = asyncio.create_task(watch())
    try:
        await qm.run(batch_size=max(1, concurrency // 2), max_concurrent_tasks=concurrency)
    finally:
        watcher.cancel()
        await conn.close()


def cmd_worker(args: Any) -> None:
    async def run() -> None:
        stop = _driver.sigterm_event(asyncio.get_running_loop())
        await _run_qm(args.concurrency, stop)

    asyncio.run(run())


async def embedded_worker(stop: asyncio.Event) -> None:
    await _run_qm(10, stop)


def cmd_scale(args: Any) -> dict[str, Any]:
    """``--rows`` finished jobs (log rows, where pgqueuer keeps them) + ``--ready`` queued."""
    import uuid

    import psycopg
    from psycopg import RawCursor

    cmd_reset(args)

    async def template() -> int:
        conn, q = await _queries()
        try:
            return int((await q.enqueue(ENTRYPOINT, b"0"))[0])
        finally:
            await conn.close()

    tid = asyncio.run(template())
    with psycopg.connect(args.url, autocommit=True) as conn:
        _driver.fill_from_template(conn, "pgqueuer", f"t.id = {tid}", args.ready - 1, {})
        _driver.fill_from_template(
            conn, "pgqueuer_log", f"t.job_id = {tid}", args.rows,
            {"status": "'successful'::pgqueuer_status", "job_id": f"{tid} + 1000000000 + g",
             "aggregated": "true"})
        conn.execute("VACUUM ANALYZE pgqueuer")
        conn.execute("VACUUM ANALYZE pgqueuer_log")
        total = (conn.execute("SELECT count(*) FROM pgqueuer").fetchone()[0]
                 + conn.execute("SELECT count(*) FROM pgqueuer_log").fetchone()[0])
        from pgqueuer.adapters.drivers.psycopg import PsycopgDriver  # noqa: F401 (import check)
        from pgqueuer.adapters.persistence.queries import Queries

        builder = Queries.__dataclass_fields__["qbq"].default_factory()
        query = builder.build_dequeue_query(
            batch_size=10, entrypoints=[ENTRYPOINT], concurrency_limits=[0],
            queue_manager_id=uuid.uuid4(), global_concurrency_limit=None,
            heartbeat_timeout=timedelta(seconds=30))
        cur = RawCursor(conn)

        def execute(sql: str, params: Any) -> Any:
            cur.execute(sql, params)
            return cur

        def claim() -> dict[str, Any]:
            return _driver.explain(execute, query.sql, query.args)

        out = _driver.claim_reps(claim, args.k, args.reps)
    out["table_rows"] = total
    out["statement"] = "pgqueuer dequeue query (batch 10)"
    return out


def cmd_serve(args: Any) -> None:
    from bench.peers.web import serve

    serve(args.port, embedded_worker)


if __name__ == "__main__":
    _driver.main(globals())
