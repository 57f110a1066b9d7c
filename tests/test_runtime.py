"""The runtime inside the test process: execution, retries, timeouts, leases, shutdown, counts."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.tasks.signals import task_finished, task_started
from django.utils import timezone

from reproq import db, sql
from reproq.exceptions import LeaseExpired
from reproq.models import TaskRun
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.servers import expect_listeners
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def test_sync_async_and_context_tasks_run_and_store_results():
    r_sync = tasks.add.enqueue(2, 3)
    r_async = tasks.async_add.enqueue(4, 5)
    r_ctx = tasks.with_context.enqueue("hello")

    async def body(rt):
        return [await wait_for(r.id) for r in (r_sync, r_async, r_ctx)]

    done = run_with_runtime(body)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 3
    assert [r.return_value for r in done] == [5, 9, 1]
    assert done[2].metadata == {"seen": "hello"}
    assert all(r.attempts == 1 and len(r.worker_ids) == 1 for r in done)
    assert all(r.started_at and r.finished_at and r.last_attempted_at for r in done)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_running_task_sees_the_same_result_fields_as_get_result(mode):
    """The claim sends timestamps and JSON raw (decoded only when a TaskResult is built): what
    a task sees through its context equals what get_result reads from the row."""
    queue = "reports" if mode == "process" else "default"
    r = tasks.reports_its_result.using(queue_name=queue).enqueue()
    TaskRun.objects.filter(pk=int(r.id)).update(metadata={"pre": [1, "two"]})

    async def body(rt):
        return await wait_for(r.id, timeout=60)

    overrides = {"process_queues": ["reports"], "process_workers": 1} if mode == "process" else {}
    done = run_with_runtime(body, **overrides)
    assert done.raw_status == "SUCCESSFUL", done.errors
    seen = done.metadata["seen"]
    assert seen == {
        "enqueued_at": done.enqueued_at.isoformat(), "started_at": done.started_at.isoformat(),
        "last_attempted_at": done.last_attempted_at.isoformat(), "worker_ids": done.worker_ids,
        "pre": [1, "two"], "aware": True,
    }
    assert len(done.worker_ids) == 1


def test_a_run_with_infinite_timestamps_written_by_hand_still_runs():
    """Rows written by hand may hold ±infinity (PostgreSQL accepts it): the claim still claims
    them, and the task still runs and reports (the result's datetimes are None then)."""
    r = tasks.with_context.enqueue("odd")
    with connection.cursor() as cur:
        cur.execute("UPDATE reproq_task_runs SET enqueued_at = 'infinity', "
                    "run_after = '-infinity' WHERE id = %s", [int(r.id)])

    async def body(rt):
        conn = await db.connect()
        try:
            for _ in range(200):
                cur = await conn.execute("SELECT status, return_value FROM reproq_task_runs "
                                         "WHERE id = %s", [int(r.id)])
                row = await cur.fetchone()
                if row["status"] not in ("READY", "RUNNING"):
                    return row
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        return row

    row = run_with_runtime(body)
    assert (row["status"], row["return_value"]) == ("SUCCESSFUL", 1)


def test_signals_fire_for_started_and_finished():
    seen: list[tuple[str, str]] = []

    def on_started(sender, task_result, **kwargs):
        seen.append(("started", task_result.status))

    def on_finished(sender, task_result, **kwargs):
        seen.append(("finished", task_result.status))

    task_started.connect(on_started)
    task_finished.connect(on_finished)
    try:
        r1 = tasks.add.enqueue(1, 1)
        r2 = tasks.async_add.enqueue(1, 2)

        async def body(rt):
            await wait_for(r1.id)
            await wait_for(r2.id)

        run_with_runtime(body)
    finally:
        task_started.disconnect(on_started)
        task_finished.disconnect(on_finished)
    assert seen.count(("started", "RUNNING")) == 2
    assert seen.count(("finished", "SUCCESSFUL")) == 2


def test_values_reach_the_task_as_passed():
    from decimal import Decimal
    from uuid import UUID

    # A list keeps its order; dict key order is not kept by jsonb (documented).
    value = [timezone.now(), Decimal("9.99"), UUID(int=7), (1, 2), timedelta(minutes=3),
             {"nested": frozenset({1})}]
    r = tasks.receives.enqueue(value)

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "SUCCESSFUL"
    assert done.return_value == repr(value)


def test_model_instances_travel_by_pk():
    from tests.testapp.models import Account

    account = Account.objects.create(name="acme")
    r = tasks.receives.enqueue(account)

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "SUCCESSFUL", done.errors
    assert done.return_value == repr(account)


def test_retry_then_succeed_records_each_error():
    r = tasks.fail_until.enqueue(3)

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "SUCCESSFUL"
    assert done.return_value == 3
    assert done.attempts == 3
    assert [e.exception_class_path for e in done.errors] == ["builtins.RuntimeError"] * 2
    assert "failing attempt 1" in done.errors[0].traceback


def test_retries_exhausted_fail_with_every_traceback():
    r = tasks.boom.enqueue("kaput")

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "FAILED"
    assert done.status == "FAILED"
    assert done.attempts == 3
    assert len(done.errors) == 3
    assert all("ValueError: kaput" in e.traceback for e in done.errors)
    assert done.errors[0].exception_class is ValueError
    assert "on attempt 3 of 3" in done.status_reason
    with pytest.raises(ValueError, match="Task failed"):
        done.return_value  # noqa: B018


def test_per_task_max_attempts_override():
    r = tasks.boom.using(max_attempts=1).enqueue()

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "FAILED" and done.attempts == 1


def test_async_timeout_cancels_the_task():
    r = tasks.async_sleep.using(timeout_seconds=1, max_attempts=1).enqueue(30)

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "FAILED"
    assert done.errors[-1].exception_class_path == "reproq.runtime.executor.TaskTimeout"
    assert "was cancelled" in done.errors[-1].traceback


def test_sync_thread_timeout_keeps_the_run_until_its_thread_returns():
    r = tasks.sleepy.using(timeout_seconds=1, max_attempts=2).enqueue(2.5)

    async def body(rt):
        await wait_for(r.id, {"RUNNING"})
        await asyncio.sleep(1.8)  # past the deadline, thread still sleeping
        still = await wait_for(r.id, {"RUNNING", "WAITING", "READY", "FAILED"})
        held = r.id and int(r.id) in rt.executor.running
        done = await wait_for(r.id, {"WAITING", "READY", "FAILED"})
        return still.raw_status, held, done

    still, held, done = run_with_runtime(body, concurrency=2)
    assert still == "RUNNING" and held  # slot and lease kept: no overlap with a retry
    assert done.errors[-1].exception_class_path == "reproq.runtime.executor.TaskTimeout"
    assert "threads cannot be killed" in done.errors[-1].traceback


def test_process_mode_kills_a_timed_out_sync_task():
    r = tasks.sleepy.using(timeout_seconds=2, max_attempts=1, queue_name="reports").enqueue(60)
    ok = tasks.add.using(queue_name="reports").enqueue(20, 22)

    async def body(rt):
        done = await wait_for(r.id, timeout=60)
        fine = await wait_for(ok.id, timeout=60)
        return done, fine, rt.processes.replaced

    done, fine, replaced = run_with_runtime(body, process_queues=["reports"], process_workers=1)
    assert done.raw_status == "FAILED"
    assert "child process was killed" in done.errors[-1].traceback
    assert replaced == 1
    assert fine.raw_status == "SUCCESSFUL" and fine.return_value == 42


def test_unstorable_return_value_fails_without_retry():
    r = tasks.unstorable.enqueue()

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    assert done.raw_status == "FAILED"
    assert done.attempts == 1
    assert "return value" in done.status_reason
    assert done.errors[0].exception_class_path == "reproq.payload.PayloadError"


def test_metadata_saved_while_running_sync_and_async():
    r1 = tasks.saves_metadata.enqueue("m1")
    r2 = tasks.async_saves_metadata.enqueue("m2")

    async def body(rt):
        return await wait_for(r1.id), await wait_for(r2.id)

    d1, d2 = run_with_runtime(body)
    assert d1.metadata == {"marker": "m1"} and d1.return_value == r1.id
    assert d2.metadata == {"marker": "m2"}


def test_deferred_task_waits_then_runs():
    r = tasks.add.enqueue(1, 2, run_after=timedelta(seconds=1))
    assert r.raw_status == "WAITING"

    async def body(rt):
        return await wait_for(r.id)

    done = run_with_runtime(body)
    row = TaskRun.objects.get(pk=r.id)
    assert done.raw_status == "SUCCESSFUL"
    assert row.started_at >= row.run_after


def test_expired_task_never_runs():
    # The expiry clock starts when the run becomes due (run_after), so a deferred run gets its
    # whole window after its delay.
    r = tasks.add.using(expires_in=timedelta(milliseconds=200)).enqueue(
        1, 1, run_after=timedelta(milliseconds=100))

    async def body(rt):
        return await wait_for(r.id)

    import time

    time.sleep(0.5)  # nobody claims it before its deadline

    done = run_with_runtime(body)
    assert done.raw_status == "EXPIRED"
    assert done.status == "FAILED"
    assert done.attempts == 0
    assert "expired" in done.status_reason


def test_strict_priority_then_fifo_with_one_slot():
    low = tasks.add.enqueue(0, 1, priority=-10)
    mid1 = tasks.add.enqueue(0, 2)
    mid2 = tasks.add.enqueue(0, 3)
    high = tasks.add.enqueue(0, 4, priority=50)

    async def body(rt):
        for r in (low, mid1, mid2, high):
            await wait_for(r.id)

    run_with_runtime(body, concurrency=1)
    order = list(TaskRun.objects.order_by("started_at").values_list("id", flat=True))
    assert order == [int(high.id), int(mid1.id), int(mid2.id), int(low.id)]


def test_notify_wakes_an_idle_runtime_without_the_fallback_timer():
    async def body(rt):
        await asyncio.sleep(0.3)  # idle: the claimer is asleep on a 300 s fallback timer
        r = await tasks.add.aenqueue(7, 8)
        return await wait_for(r.id, timeout=10)

    done = run_with_runtime(body, poll_fallback_seconds=300)
    assert done.return_value == 15


@pytest.mark.skipif(not expect_listeners(), reason="CONNECTION_MODE 'pgbouncer' (the suite "
                    "runs through PgBouncer): there is no LISTEN connection to kill")
def test_listener_reconnects_after_its_backend_is_killed():
    async def body(rt):
        await asyncio.wait_for(rt.notifier.wait_connected(), timeout=10)
        old_pid = rt.notifier.backend_pid
        async with rt.pool.connection() as conn:
            await conn.execute("SELECT pg_terminate_backend(%s)", [old_pid])
        for _ in range(200):
            if rt.notifier.connections >= 2 and rt.notifier.connected:
                break
            await asyncio.sleep(0.05)
        r = await tasks.add.aenqueue(1, 1)
        done = await wait_for(r.id, timeout=10)
        return old_pid, rt.notifier.backend_pid, rt.notifier.connections, done

    old_pid, new_pid, connections, done = run_with_runtime(body, poll_fallback_seconds=300)
    assert connections == 2 and new_pid != old_pid
    assert done.raw_status == "SUCCESSFUL"


def _insert_running(lease_owner: str, attempts: int, max_attempts: int) -> int:
    r = tasks.add.enqueue(attempts, max_attempts)
    TaskRun.objects.filter(pk=r.id).update(
        status="RUNNING", attempts=attempts, max_attempts=max_attempts, lease_owner=lease_owner,
        leased_until=timezone.now() - timedelta(seconds=5), worker_ids=[lease_owner] * attempts)
    return int(r.id)


def test_reclaim_requeues_or_fails_expired_leases():
    retry_id = _insert_running("dead-worker", attempts=1, max_attempts=3)
    spent_id = _insert_running("dead-worker", attempts=3, max_attempts=3)

    async def body(rt):
        return await wait_for(str(retry_id)), await wait_for(str(spent_id))

    retried, spent = run_with_runtime(body)
    assert retried.raw_status == "SUCCESSFUL" and retried.attempts == 2
    assert retried.errors[0].exception_class_path == "reproq.exceptions.LeaseExpired"
    assert retried.errors[0].exception_class is LeaseExpired  # the stored path imports
    assert spent.raw_status == "FAILED" and spent.status_reason == "lease expired"


def test_graceful_stop_finishes_short_runs_and_releases_long_ones():
    short = tasks.sleepy.enqueue(0.5)
    long = tasks.async_sleep.enqueue(60)

    async def body(rt):
        await wait_for(short.id, {"RUNNING", "SUCCESSFUL"})
        await wait_for(long.id, {"RUNNING"})

    run_with_runtime(body, shutdown_grace_seconds=2)
    s = TaskRun.objects.get(pk=short.id)
    lg = TaskRun.objects.get(pk=long.id)
    assert s.status == "SUCCESSFUL"
    assert lg.status == "READY" and lg.attempts == 0 and lg.worker_ids == []
    assert lg.status_reason == "released at shutdown" and lg.lease_owner is None
    assert not TaskRun.objects.filter(status="RUNNING").exists()
    from reproq.models import Worker

    assert not Worker.objects.exists()


def test_bad_rows_fail_readably_and_the_runtime_keeps_going():
    good = tasks.add.enqueue(2, 2)
    bad_ids = []
    for path, args in [("tests.testapp.tasks.no_such_task", "[]"),
                       ("no_such_module.tasks.thing", "[]"),
                       ("tests.testapp.tasks.add", '{"x": 1}'),
                       ("tests.testapp.tasks.add", '[{"__reproq__": "martian", "v": 1}]')]:
        r = tasks.echo.enqueue(len(bad_ids))
        TaskRun.objects.filter(pk=r.id).update(task_path=path, args=json.loads(args),
                                               max_attempts=1)
        bad_ids.append(r.id)

    async def body(rt):
        return [await wait_for(i) for i in bad_ids], await wait_for(good.id)

    bad, ok = run_with_runtime(body)
    assert ok.raw_status == "SUCCESSFUL"
    assert [b.raw_status for b in bad] == ["FAILED"] * 4
    assert "no_such_task" in bad[0].errors[0].traceback
    assert "no_such_module" in bad[1].errors[0].traceback
    assert "must be a JSON array" in bad[2].errors[0].traceback
    assert "martian" in bad[3].errors[0].traceback


def test_claim_costs_one_statement_per_batch():
    results = tasks.add.get_backend().bulk_enqueue([(tasks.add, (i, i), {}) for i in range(40)])

    async def body(rt):
        before = db.statement_counts["CLAIM"]
        rt.claimer.wake()
        for r in results:
            await wait_for(r.id)
        return db.statement_counts["CLAIM"] - before, rt.claimer.claimed, rt.completer.batches

    claims, claimed, batches = run_with_runtime(body, concurrency=10)
    assert claimed == 40
    # 40 rows with 10 slots: at least 4 claims; each claim is a single statement for its batch.
    assert 4 <= claims <= 40
    assert batches <= 40


def test_heartbeat_renews_all_leases_in_one_statement():
    rs = [tasks.async_sleep.enqueue(1.5 + i / 100) for i in range(5)]

    async def body(rt):
        for r in rs:
            await wait_for(r.id, {"RUNNING"})
        before = db.statement_counts["HEARTBEAT"]
        await rt.heartbeat.beat()
        return db.statement_counts["HEARTBEAT"] - before

    assert run_with_runtime(body) == 1


def test_pool_connections_are_psycopg():
    assert issubclass(db.CountingConnection, psycopg.AsyncConnection)
    assert sql.name_of(sql.CLAIM) == "CLAIM"
    assert connection.vendor == "postgresql"


def test_run_observers_hear_claims_and_finished_attempts_and_one_that_raises_breaks_nothing():
    from reproq.runtime import observers

    heard: list[tuple] = []

    class Recorder:
        def claimed(self, source, rows):
            heard.append(("claimed", source.worker_id, [r["status"] for r in rows]))

        def finished(self, source, completion):
            heard.append(("finished", source.worker_id, completion.status, completion.id))

    class Broken:
        def claimed(self, source, rows):
            raise RuntimeError("observer bug")

        def finished(self, source, completion):
            raise RuntimeError("observer bug")

    removals = [observers.register(Broken()), observers.register(Recorder())]
    try:
        async def body(rt):
            r = await tasks.add.aenqueue(2, 3)
            return rt.worker_id, await wait_for(r.id)

        worker, done = run_with_runtime(body)
    finally:
        for remove in removals:
            remove()
    assert done.raw_status == "SUCCESSFUL" and done.return_value == 5
    assert any(h[:2] == ("claimed", worker) and "RUNNING" in h[2] for h in heard), heard
    assert ("finished", worker, "SUCCESSFUL", int(done.id)) in heard


def test_statements_carry_their_names_and_derived_text_counts_as_other():
    from reproq.asgi import sse
    from reproq.dashboard import ops
    from reproq.runtime import beat

    assert [sql.name_of(s) for s in (sql.CLAIM, sql.CLAIM_FAST, sql.RECLAIM, beat.BEAT_FIRE,
                                     sse.FETCH, ops.REPLAY)] == [
        "CLAIM", "CLAIM", "RECLAIM", "BEAT_FIRE", "SSE_FETCH", "REPLAY"]
    # the name belongs to the object, not to its text or its address
    assert sql.name_of(str(sql.RECLAIM)) == sql.name_of(sql.RECLAIM + " ") == "other"
    assert sql.name_of("".join(sql.RECLAIM)) == "other"
    assert str(sql.RECLAIM) == sql.RECLAIM and isinstance(sql.RECLAIM, str)
    assert sql.name_of(None) == sql.name_of(b"RECLAIM") == "other"
