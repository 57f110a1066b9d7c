"""The runtime's fast paths: the flow-control-free claim and its fallback, statements per claim,
and the sync-thread pool's hand-off. Counts only, never wall-clock times."""

from __future__ import annotations

import asyncio
import threading

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
