"""The runtime's fast paths: the flow-control-free claim and its fallback, statements per claim,
and the sync-thread pool's hand-off. Counts only, never wall-clock times."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.rows import dict_row

from reproq import control, db, sql
from reproq.runtime.threads import DaemonThreadPool
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def test_plain_backlog_uses_only_fast_claims_one_statement_each():
    results = tasks.async_add.get_backend().bulk_enqueue(
        [(tasks.async_add, (i, i), {}) for i in range(40)])

    async def body(rt):
        before = db.statement_counts["CLAIM"]
        rt.claimer.wake()
        done = [await wait_for(r.id) for r in results]
        return done, db.statement_counts["CLAIM"] - before, rt.claimer

    done, statements, claimer = run_with_runtime(body, concurrency=10)
    assert [r.return_value for r in done] == [2 * i for i in range(40)]
    assert claimer.fallbacks == 0
    assert claimer.claimed == 40
    # one statement per claim, at least 4 claims for 40 rows and 10 slots
    assert 4 <= statements == claimer.claims <= 40


def test_flow_controlled_rows_fall_back_to_the_full_claim():
    plain = [tasks.add.enqueue(i, 1) for i in range(3)]
    limited = [tasks.build_report.enqueue(f"r{i}") for i in range(3)]  # "reports", to=1
    control.set_rate_limit("task:tests.testapp.tasks.flow_rated", rate=1000, period_seconds=1)
    rated = [tasks.flow_rated.enqueue(i) for i in range(2)]

    async def body(rt):
        rt.claimer.wake()
        done = [await wait_for(r.id, timeout=30) for r in (*plain, *limited, *rated)]
        return done, rt.claimer.fallbacks

    done, fallbacks = run_with_runtime(body, concurrency=10)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 8
    assert [r.return_value for r in done] == [1, 2, 3, "r0", "r1", "r2", 0, 1]
    assert fallbacks >= 1


def test_fast_claim_text_quotes_queue_names_and_keeps_worker_and_lease_parameters():
    text = sql.claim_fast(("we'ird%q", "default"), 3)
    assert sql.claim_fast(("we'ird%q", "default"), 3) is text
    assert sql.name_of(text) == "CLAIM"
    assert "%(queues)s" not in text and "%(limit)s" not in text
    with psycopg.connect(db.conninfo(), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("BEGIN")
        try:
            rows = conn.execute(text, {"worker": "w-test", "lease": 60}).fetchall()
        finally:
            conn.execute("ROLLBACK")
    assert len(rows) == 1 and rows[0]["id"] is None and rows[0]["passed"] == 0


def test_thread_pool_grows_instead_of_queueing_behind_a_busy_thread():
    pool = DaemonThreadPool(3)
    release = threading.Event()

    async def main():
        stuck = pool.submit(release.wait, 30)
        quick = await asyncio.wait_for(pool.run(lambda: 42), timeout=10)
        outstanding = pool.outstanding
        release.set()
        await stuck
        return quick, outstanding, pool.outstanding, len(pool._threads)

    try:
        quick, during, after, threads = asyncio.run(main())
    finally:
        release.set()
        pool.close()
    assert quick == 42
    assert during == 1 and after == 0
    assert threads == 2


def test_thread_pool_settles_every_result_and_error_delivered_together():
    pool = DaemonThreadPool(4)
    gate = threading.Barrier(4)

    def call(i):
        if i < 4:
            gate.wait(10)  # four threads finish at the same moment
        if i % 5 == 0:
            raise ValueError(i)
        return i * 2

    async def main():
        results = await asyncio.gather(*(pool.run(call, i) for i in range(40)),
                                       return_exceptions=True)
        return results, pool.outstanding

    try:
        results, outstanding = asyncio.run(main())
    finally:
        pool.close()
    assert outstanding == 0
    for i, r in enumerate(results):
        if i % 5 == 0:
            assert isinstance(r, ValueError) and r.args == (i,)
        else:
            assert r == i * 2


@pytest.mark.parametrize("statement", ["COMPLETE", "HEARTBEAT", "RELEASE"])
def test_statements_on_a_workers_runs_lock_them_in_id_order(statement):
    """COMPLETE, HEARTBEAT and RELEASE of one worker run at once on different connections: each
    must lock its runs in id order (else two of them deadlock). Here the batch lists the higher
    id first and a third session holds that row: the statement must already hold the lower
    one while it waits."""
    low, high = (int(tasks.add.enqueue(i, i).id) for i in range(2))
    worker = "w-order"
    params = {
        "COMPLETE": {"ids": [high, low], "status": ["SUCCESSFUL"] * 2,
                     "return_value": ["1", "2"], "error": None, "delay": None, "reason": None,
                     "metadata": None, "worker": worker, "aging_us": 0},
        "HEARTBEAT": {"ids": [high, low], "worker": worker, "lease": 60, "hostname": "h",
                      "pid": 1, "queues": "[]", "concurrency": 1, "server": "test",
                      "version": "0", "started_at": datetime.now(UTC)},
        "RELEASE": {"ids": [high, low], "worker": worker, "delay": 0},
    }[statement]
    info = db.conninfo()
    with psycopg.connect(info, autocommit=True) as setup:
        setup.execute("UPDATE reproq_task_runs SET status = 'RUNNING', lease_owner = %s, "
                      "leased_until = now() + interval '1 minute', attempts = 1 "
                      "WHERE id = ANY(%s)", [worker, [low, high]])
        # a new version of the lower id, with new index entries (an indexed column changes, so
        # not a HOT update): a scan in heap order now meets the higher id first
        setup.execute("UPDATE reproq_task_runs SET leased_until = leased_until + interval "
                      "'1 second' WHERE id = %s", [low])
    holder = psycopg.connect(info)
    runner = psycopg.connect(info, autocommit=True)
    # plans that visit the rows in heap or batch order (as on a larger table)
    for setting in ("enable_indexscan", "enable_hashjoin", "enable_mergejoin"):
        runner.execute(f"SET {setting} = off")
    prober = psycopg.connect(info, autocommit=True)
    try:
        holder.execute("SELECT 1 FROM reproq_task_runs WHERE id = %s FOR UPDATE", [high])
        errors: list[BaseException] = []

        def run() -> None:
            try:
                runner.execute(getattr(sql, statement), params)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        waiting = False
        for _ in range(200):  # until the statement waits for the held row
            waiting = prober.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = "
                "'Lock'", [runner.info.backend_pid]).fetchone()[0] == 1
            if waiting:
                break
            threading.Event().wait(0.05)
        assert waiting
        with pytest.raises(psycopg.errors.LockNotAvailable):
            prober.execute("SELECT 1 FROM reproq_task_runs WHERE id = %s FOR UPDATE NOWAIT",
                           [low])
        holder.rollback()
        thread.join(10)
        assert not thread.is_alive() and not errors
    finally:
        holder.close()
        runner.close()
        prober.close()
