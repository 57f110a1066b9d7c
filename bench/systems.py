"""The systems under test behind one interface: reproq (in this process + its worker command)
and each peer (driver subprocesses in the peers' virtualenv).

Every workload module talks to a `System`; the measuring (clocks, CPU, percentiles) is done by
the workload, the same way for everyone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

REPO = Path(__file__).resolve().parents[1]


class System:
    name: str
    db: str
    url: str
    task_kinds: tuple[str, ...] = ("native",)
    fill_label = "bulk"
    _conn: Any = None

    # -- SQL helpers on a dedicated autocommit connection (excluded from PostgreSQL CPU)
    @property
    def conn(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            for attempt in range(6):  # the server may be shared with busy test suites
                try:
                    self._conn = psycopg.connect(self.url, autocommit=True)
                    break
                except psycopg.OperationalError as exc:
                    if "too many clients" not in str(exc) or attempt == 5:
                        raise
                    time.sleep(5)
        return self._conn

    @property
    def conn_pid(self) -> int:
        return self.conn.info.backend_pid

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

    def done_count(self) -> int:
        return int(self.conn.execute(self.DONE_SQL).fetchone()[0])

    def span(self) -> tuple[float, float]:
        t0, t1 = self.conn.execute(self.SPAN_SQL).fetchone()
        return float(t0), float(t1)

    def latencies(self, drop_first: int = 0) -> list[float]:
        rows = self.conn.execute(self.LATENCY_SQL).fetchall()
        rows = sorted((float(a), float(b)) for a, b in rows)
        return [ms for _, ms in rows[drop_first:]]

    # -- to implement
    DONE_SQL = SPAN_SQL = LATENCY_SQL = ""

    def reset(self) -> None: ...
    def enqueue_rate(self, mode: str, n: int, kind: str) -> float: ...
    def fill(self, n: int, kind: str) -> None: ...
    def start_workers(self, concurrency: int, processes: int, kind: str
                      ) -> list[subprocess.Popen]: ...
    def latency_enqueue(self, n: int, gap_ms: float, kind: str) -> int: ...
    def serve(self, port: int) -> list[subprocess.Popen]: ...
    def scale(self, rows: int, ready: int, k: int, reps: int = 1) -> dict[str, Any]: ...
    def concurrency_note(self, concurrency: int, processes: int) -> str: ...
    def embedding_note(self) -> str: ...


def _log_file(prefix: str) -> Any:
    log_dir = Path(tempfile.gettempdir()) / "reproq-bench-logs"
    log_dir.mkdir(exist_ok=True)
    return open(log_dir / f"{prefix}-{time.time_ns()}.log", "wb")


# --------------------------------------------------------------------------- reproq

class Reproq(System):
    name = "reproq"
    task_kinds = ("sync", "async")
    fill_label = "`bulk_enqueue`"
    DONE_SQL = "SELECT count(*) FROM reproq_task_runs WHERE status = 'SUCCESSFUL'"
    SPAN_SQL = ("SELECT extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at))"
                " FROM reproq_task_runs")
    LATENCY_SQL = ("SELECT extract(epoch FROM enqueued_at), "
                   "extract(epoch FROM started_at - enqueued_at) * 1000 FROM reproq_task_runs "
                   "WHERE started_at IS NOT NULL")

    def __init__(self, admin_url: str):
        from bench.runtime import setup

        self.db = os.environ.get("REPROQ_BENCH_DB", "reproq_bench")
        os.environ["REPROQ_BENCH_DB"] = self.db
        setup(fresh=True)  # a new database, migrated: the schema may have changed since
        self.url = common.url_for_db(admin_url, self.db)

    def task(self, kind: str) -> Any:
        from bench.tasks import anoop, noop

        return anoop if kind == "async" else noop

    def reset(self) -> None:
        from bench.runtime import reset

        reset()
        self.conn.execute("VACUUM ANALYZE reproq_task_runs")

    def enqueue_rate(self, mode: str, n: int, kind: str) -> float:
        from bench import enqueue

        fn = {"sync": enqueue.sync_one_by_one, "async": enqueue.async_native,
              "bulk": enqueue.bulk}[mode]
        return fn(self.task(kind), n)

    def fill(self, n: int, kind: str) -> None:
        task = self.task(kind)
        task.get_backend().bulk_enqueue([(task, (i,), {}) for i in range(n)])

    def start_workers(self, concurrency: int, processes: int, kind: str
                      ) -> list[subprocess.Popen]:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings"}
        procs = []
        for _ in range(processes):
            with _log_file("reproq-worker") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "django", "reproq", "worker", "--concurrency",
                     str(concurrency)], env=env, cwd=REPO, stdout=log, stderr=log))
        return procs

    def latency_enqueue(self, n: int, gap_ms: float, kind: str) -> int:
        task = self.task(kind)
        for i in range(n):
            task.enqueue(i)
            time.sleep(gap_ms / 1000)
        return 0

    def serve(self, port: int) -> list[subprocess.Popen]:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings"}
        with _log_file("reproq-uvicorn") as log:
            return [subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "bench.asgi:application", "--host",
                 "127.0.0.1", "--port", str(port), "--lifespan", "on", "--log-level",
                 "warning", "--no-access-log"], env=env, cwd=REPO, stdout=log, stderr=log)]

    def scale(self, rows: int, ready: int, k: int, reps: int = 1) -> dict[str, Any]:
        """Fill ``rows`` SUCCESSFUL + ``ready`` READY runs, then time the claim a runtime with 10
        free slots issues first (``sql.claim_fast``: queues and limit written in; the full
        ``CLAIM`` is its fallback while gated or locked rows are about), committed like the
        runtime's."""
        from bench.peers._driver import claim_reps, explain, fill_from_template
        from reproq import sql

        self.reset()
        self.fill(1, "sync")
        tid = self.conn.execute("SELECT max(id) FROM reproq_task_runs").fetchone()[0]
        where = f"t.id = {int(tid)}"
        fill_from_template(self.conn, "reproq_task_runs", where, rows, {
            "status": "'SUCCESSFUL'", "started_at": "now()", "finished_at": "now()",
            "last_attempted_at": "now()", "attempts": "1", "spec_hash": "NULL",
            "sort_key": "t.sort_key - 1000000000 - g"})
        fill_from_template(self.conn, "reproq_task_runs", where, ready - 1, {
            "spec_hash": "NULL", "sort_key": "t.sort_key + g"})
        self.conn.execute("VACUUM ANALYZE reproq_task_runs")
        total = self.conn.execute("SELECT count(*) FROM reproq_task_runs").fetchone()[0]
        known = {"queues": ["default"], "limit": 10, "worker": "bench-w5", "lease": 60}
        statement = sql.claim_fast(tuple(known["queues"]), known["limit"])
        names = set(re.findall(r"%\((\w+)\)s", statement))
        missing = names - known.keys()
        if missing:
            raise RuntimeError(f"reproq's claim takes parameters the bench does not know: "
                               f"{sorted(missing)}")
        params = {k: v for k, v in known.items() if k in names}

        def claim() -> dict[str, Any]:
            return explain(self.conn.execute, statement, params)

        out = claim_reps(claim, k, reps)
        out["table_rows"] = total
        out["statement"] = "reproq.sql.claim_fast (limit 10), the runtime's claim"
        return out

    def claim_ceiling(self, n: int, limit: int) -> dict[str, float]:
        """Claim a backlog of ``n`` runs with the runtime's claim statement alone, back to back
        on one async connection (autocommit, prepared, dict rows: as the runtime's pool), ``limit``
        rows per claim, running nothing and recording nothing: the most one process with
        ``limit`` slots could drain if running and recording tasks cost nothing."""
        import asyncio

        import psycopg
        from psycopg.rows import dict_row

        from reproq import sql

        self.reset()
        self.fill(n, "async")
        self.conn.execute("VACUUM ANALYZE reproq_task_runs")
        statement = sql.claim_fast(("default",), limit)
        params = {"worker": "bench-ceiling", "lease": 60}

        async def drain() -> tuple[int, int, float]:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                         row_factory=dict_row)
            try:
                await (await conn.execute(statement, params)).fetchall()  # warm, not timed
                claimed, claims = limit, 0
                t0 = time.perf_counter()
                while True:
                    cur = await conn.execute(statement, params)
                    got = sum(1 for r in await cur.fetchall() if r["id"] is not None)
                    if not got:
                        break
                    claimed, claims = claimed + got, claims + 1
                return claimed, claims, time.perf_counter() - t0
            finally:
                await conn.close()

        claimed, claims, seconds = asyncio.run(drain())
        if claimed != n:
            raise RuntimeError(f"claimed {claimed} of {n} runs")
        timed = max(claimed - limit, 1)
        return {"jobs_per_s": timed / seconds, "claim_ms": seconds / max(claims, 1) * 1000}

    def concurrency_note(self, concurrency: int, processes: int) -> str:
        return f"{processes} x `reproq worker --concurrency {concurrency}`"

    def embedding_note(self) -> str:
        return "runtime inside the uvicorn process (reproq.asgi lifespan), concurrency 10"


# --------------------------------------------------------------------------- peers

class PeerSystem(System):
    def __init__(self, name: str, python: str, admin_url: str):
        from bench.peers import Peer

        self.peer = Peer(name, python, admin_url)
        self.admin_url = admin_url
        self.name = name
        self.db = self.peer.db
        self.url = self.peer.url
        mod = self.peer.mod
        self.DONE_SQL, self.SPAN_SQL = mod.DONE_SQL, mod.SPAN_SQL
        self.LATENCY_SQL = mod.LATENCY_SQL
        self.task_kinds = (mod.TASK_KIND,)
        self.fill_label = getattr(mod, "BULK_LABEL", "bulk")

    def setup(self) -> None:
        self.close()
        common.ensure_database(self.admin_url, self.db, fresh=True)
        self.peer.call("setup", timeout=300)

    def reset(self) -> None:
        self.peer.call("reset", timeout=300)

    def enqueue_rate(self, mode: str, n: int, kind: str) -> float:
        return float(self.peer.call("enqueue", "--mode", mode, "--n", str(n))["rate"])

    def fill(self, n: int, kind: str) -> None:
        self.peer.call("enqueue", "--mode", "bulk", "--n", str(n))

    def start_workers(self, concurrency: int, processes: int, kind: str
                      ) -> list[subprocess.Popen]:
        return self.peer.start_workers(concurrency, processes)

    def latency_enqueue(self, n: int, gap_ms: float, kind: str) -> int:
        out = self.peer.call("latency", "--n", str(n), "--gap-ms", str(gap_ms))
        return int(out.get("warmup_jobs", 0))

    def serve(self, port: int) -> list[subprocess.Popen]:
        procs = [self.peer.spawn(self.peer.argv("serve", "--port", str(port)))]
        if not getattr(self.peer.mod, "EMBEDDED", True):
            procs += self.peer.start_workers(10, 1)
        return procs

    def scale(self, rows: int, ready: int, k: int, reps: int = 1) -> dict[str, Any]:
        return self.peer.call("scale", "--rows", str(rows), "--ready", str(ready),
                              "--k", str(k), "--reps", str(reps), timeout=1800)

    def concurrency_note(self, concurrency: int, processes: int) -> str:
        return self.peer.concurrency_note(concurrency, processes)

    def embedding_note(self) -> str:
        return getattr(self.peer.mod, "EMBEDDING_NOTE", "")
