"""Rows PostgreSQL accepts but Python cannot load (written by SQL, pg_cron or another language):
each fails alone, at once, as non-retryable with a readable reason; the runs claimed beside it
run; a restarted service never strands what it held; pages show such a row instead of a 500."""

from __future__ import annotations

import asyncio

import pytest
from django.db import connection

from reproq.runtime.runtime import Runtime
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

DEEP = "[" * 2000 + "]" * 2000  # PostgreSQL nests jsonb far deeper than Python's json loads
HUGE = "[1e5000]"  # jsonb keeps it exact: 5,001 digits, past Python's int-from-str limit


def _poison(run_id: str, column: str, value: str) -> None:
    with connection.cursor() as cur:
        cur.execute(f"UPDATE reproq_task_runs SET {column} = %s::jsonb WHERE id = %s",
                    [value, int(run_id)])


@pytest.mark.parametrize("bad", [
    pytest.param(("args", DEEP), id="args-nested-2000-deep"),
    pytest.param(("args", HUGE), id="args-number-1e5000"),
    pytest.param(("kwargs", '{"n": 1e5000}'), id="kwargs-number-1e5000"),
    pytest.param(("metadata", '{"m": ' + DEEP + "}"), id="metadata-nested"),
])
def test_an_undecodable_row_fails_alone_and_the_batch_beside_it_runs(bad):
    column, value = bad
    good = [tasks.add.enqueue(i, 1) for i in range(4)] + [tasks.async_add.enqueue(1, 2)]
    ctx = tasks.with_context.enqueue("x")  # a context task reads metadata too
    bad_run = tasks.add.enqueue(0, 0)
    _poison(bad_run.id, column, value)
    with connection.cursor() as cur:  # retries allowed: the failure must still be final
        cur.execute("UPDATE reproq_task_runs SET max_attempts = 5 WHERE id = %s",
                    [int(bad_run.id)])

    async def body(rt: Runtime):
        done = [await wait_for(r.id, timeout=15) for r in [*good, ctx]]
        failed = await wait_for(bad_run.id, timeout=15)
        return rt, done, failed

    rt, done, failed = run_with_runtime(body, concurrency=10)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * len(done)
    assert failed.raw_status == "FAILED"
    assert failed.attempts == 1  # non-retryable: no second attempt, no lease expiry
    assert "cannot be decoded" in failed.status_reason
    assert "lease" not in failed.status_reason
    assert rt.crashes.get("claimer", 0) == 0


def test_a_claimer_crash_between_claim_and_start_releases_what_it_claimed(monkeypatch):
    """A service restarted by the supervisor gives back the runs it held (they run at once on
    the next claim, their attempt not burned) instead of leaving them RUNNING for a lease."""
    from reproq.runtime import executor as executor_module

    runs = [tasks.add.enqueue(i, i) for i in range(3)]
    crashed: list[int] = []
    real_submit = executor_module.Executor.submit

    def submit_crashing_once(self, rows):
        if not crashed:
            crashed.append(len(rows))
            raise RuntimeError("boom between claim and start")
        return real_submit(self, rows)

    monkeypatch.setattr(executor_module.Executor, "submit", submit_crashing_once)

    async def body(rt: Runtime):
        done = [await wait_for(r.id, timeout=10) for r in runs]
        return rt, done

    rt, done = run_with_runtime(body, concurrency=10, lease_seconds=60)
    assert crashed and crashed[0] >= 1
    assert rt.crashes["claimer"] == 1
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 3
    assert all(r.attempts == 1 for r in done)  # released, not failed by lease expiry


def test_healthz_reports_a_service_that_keeps_crashing_as_degraded(monkeypatch, settings):
    from django.test import AsyncClient

    from reproq.runtime import promoter

    settings.REPROQ_API_TOKEN = "health-token-0123456789"

    async def always_crash(self):
        raise RuntimeError("promoter broken")

    monkeypatch.setattr(promoter.Promoter, "run", always_crash)

    async def body(rt: Runtime):
        for _ in range(200):
            if rt.status()["degraded"]:
                break
            await asyncio.sleep(0.05)
        response = await AsyncClient().get(
            "/reproq/healthz", headers={"Authorization": "Bearer health-token-0123456789"})
        return rt.status(), response

    status, response = run_with_runtime(body, crash_loop_restarts=3, crash_loop_seconds=60)
    assert status["degraded"] == ["promoter"]
    assert "RuntimeError" in status["degraded_reasons"][0]
    assert response.status_code == 503
    body = response.json()
    assert body["ok"] is False and body["runtime"]["degraded"] == ["promoter"]
    assert any(r.startswith("degraded: promoter restarted") for r in body["reasons"])
    assert "promoter broken" not in response.content.decode()  # class only, never the message



def test_an_undecodable_row_is_shown_by_get_result_the_admin_and_triage(client):
    from django.core.management import call_command
    from django.tasks import default_task_backend

    from reproq.storedjson import Undecodable
    from tests.dashboard_helpers import staff_user

    run = tasks.add.enqueue(1, 2)
    _poison(run.id, "args", DEEP)
    _poison(run.id, "metadata", HUGE)
    _poison(run.id, "return_value", '{"v": ' + DEEP + "}")

    shown = default_task_backend.get_result(run.id)
    assert isinstance(shown.args[0], Undecodable) and shown.args[0] == DEEP
    assert "RecursionError" in shown.args[0].reason
    assert shown.metadata == {}

    async def body(rt: Runtime):
        return await wait_for(run.id, timeout=15)

    failed = run_with_runtime(body)
    assert failed.raw_status == "FAILED" and isinstance(failed.args[0], Undecodable)

    client.force_login(staff_user())
    page = client.get(f"/admin/reproq/taskrun/{run.id}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "cannot be decoded (RecursionError" in html
    assert "stored args cannot be decoded" in html  # the run's failure reason

    import io
    out = io.StringIO()
    call_command("reproq", "triage", stdout=out)
    assert "tests.testapp.tasks.add" in out.getvalue()
    assert "RecursionError" in out.getvalue()


def test_times_out_of_pythons_range_written_by_hand_neither_block_a_claim_nor_get_result():
    """PostgreSQL holds years up to 294276 (and ±infinity): the claim reads such times as
    unknown, the runs claimed beside it run, and get_result shows the row."""
    from django.tasks import default_task_backend

    beside = [tasks.add.enqueue(i, 1) for i in range(3)]
    odd = tasks.with_context.enqueue("far")
    with connection.cursor() as cur:
        cur.execute("UPDATE reproq_task_runs SET enqueued_at = '200000-01-01', "
                    "started_at = '10000-01-01', expires_at = 'infinity' WHERE id = %s",
                    [int(odd.id)])
    shown = default_task_backend.get_result(odd.id)
    assert shown.enqueued_at is None and shown.started_at is None

    async def body(rt: Runtime):
        return [await wait_for(r.id, timeout=15) for r in [*beside, odd]]

    done = run_with_runtime(body)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 4


@pytest.mark.parametrize("kind", ["nul", "surrogate", "metadata", "raise"])
def test_an_unstorable_result_never_holds_up_the_results_beside_it(kind):
    """PostgreSQL refuses a NUL or a lone surrogate in jsonb: such an outcome is recorded
    without it (the run ends, with a reason), and every other result is still recorded."""
    bad = tasks.unstorable_output.using(priority=10).enqueue(kind)
    with connection.cursor() as cur:
        cur.execute("UPDATE reproq_task_runs SET max_attempts = 1 WHERE id = %s", [int(bad.id)])
    good = [tasks.add.enqueue(i, 1) for i in range(20)]

    async def body(rt: Runtime):
        first = await wait_for(bad.id, timeout=15)
        return first, [await wait_for(r.id, timeout=15) for r in good]

    first, done = run_with_runtime(body, concurrency=10)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 20
    assert first.raw_status in {"SUCCESSFUL", "FAILED"}
    assert "lease" not in first.status_reason
    if kind == "raise":
        assert first.raw_status == "FAILED"
        assert "bad \\x00 byte and \\ud800 half a pair" in first.errors[-1].traceback
    elif kind in {"nul", "surrogate"}:
        assert first.raw_status == "FAILED" and "cannot be stored" in first.status_reason


def test_a_hand_written_attempts_count_at_the_integer_limit_does_not_stop_the_claims():
    beside = [tasks.add.enqueue(i, 1) for i in range(3)]
    odd = tasks.add.enqueue(5, 5)
    with connection.cursor() as cur:
        cur.execute("UPDATE reproq_task_runs SET attempts = 2147483647, "
                    "max_attempts = 2147483647 WHERE id = %s", [int(odd.id)])

    async def body(rt: Runtime):
        return rt, [await wait_for(r.id, timeout=15) for r in [*beside, odd]]

    rt, done = run_with_runtime(body)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 4
    assert rt.crashes.get("claimer", 0) == 0


@pytest.mark.parametrize("column", ["sem_limit", "concurrency_limit"])
def test_a_negative_concurrency_limit_written_by_hand_is_refused_by_postgresql(column):
    """It means nothing (0 already holds a key's runs back): the database refuses the write."""
    from django.db import IntegrityError, transaction

    run = tasks.add.enqueue(1, 1)
    with pytest.raises(IntegrityError, match=f"reproq_runs_{column}_nonnegative"), \
            transaction.atomic(), connection.cursor() as cur:
        cur.execute(f"UPDATE reproq_task_runs SET {column} = -1 WHERE id = %s", [int(run.id)])
