"""Chains, groups and chords (reproq.workflows) on a real PostgreSQL, run by real runtimes:
results handed on, failures cancelling what waits, callbacks released exactly once when many
processes finish a group at the same moment, and bad workflows refused with nothing written."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.tasks import default_task_backend

from reproq.exceptions import InvalidEnqueue
from reproq.models import RunEdge, TaskRun
from reproq.workflows import chain, chord, group, step
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.test_flow import assert_clean_stop, wait_all_final
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def rows(ids) -> dict[int, TaskRun]:
    return {r.pk: r for r in TaskRun.objects.filter(pk__in=[int(i) for i in ids])}


def test_chain_hands_each_result_to_the_next_step():
    wf = chain(step(tasks.add, 1, 2), step(tasks.add, 10), step(tasks.async_add, 100)).enqueue()
    first, second, third = wf.results
    assert [r.raw_status for r in wf.results] == ["READY", "WAITING", "WAITING"]
    assert second.status_reason == "waiting for 1 upstream run(s)"
    stored = rows(wf.ids)
    assert {r.workflow_id for r in stored.values()} == {int(first.id)}
    assert [stored[int(i)].has_dependents for i in wf.ids] == [True, True, False]
    assert set(RunEdge.objects.values_list("upstream_id", "downstream_id")) == {
        (int(first.id), int(second.id)), (int(second.id), int(third.id))}

    async def body(rt):
        return await wait_for(third.id, timeout=30)

    last = run_with_runtime(body)
    assert last.raw_status == "SUCCESSFUL" and last.return_value == 113
    done = [default_task_backend.get_result(i) for i in wf.ids]
    assert [r.return_value for r in done] == [3, 13, 113]
    assert [r.args for r in done] == [[1, 2], [3, 10], [13, 100]]
    assert done[1].enqueued_at <= done[0].finished_at <= done[1].started_at


def test_chord_callback_gets_the_group_results_in_group_order():
    wf = chord(group(*(step(tasks.add, i, i) for i in range(6))), step(tasks.echo, "x")).enqueue()
    assert [r.raw_status for r in wf.results] == ["READY"] * 6 + ["WAITING"]

    async def body(rt):
        return await wait_for(wf.last.id, timeout=30)

    last = run_with_runtime(body)
    assert last.raw_status == "SUCCESSFUL"
    assert last.return_value == {"args": [[0, 2, 4, 6, 8, 10], "x"], "kwargs": {}}

    # A group alone: every step READY at once, no edges.
    edges = RunEdge.objects.count()
    g = group(tasks.add.using(priority=3), step(tasks.add, 1, 1)).enqueue()
    assert [r.raw_status for r in g.results] == ["READY", "READY"]
    assert [r.task.priority for r in g.results] == [3, 0] and RunEdge.objects.count() == edges
    assert {r.workflow_id for r in rows(g.ids).values()} == {int(g.ids[0])}
    # pass_results=False: the next step gets only its own arguments.
    plain = chain(step(tasks.add, 2, 2), step(tasks.echo, "y"), pass_results=False).enqueue()

    async def body2(rt):
        return await wait_for(plain.last.id, timeout=30)

    assert run_with_runtime(body2).return_value == {"args": ["y"], "kwargs": {}}


def test_a_failed_step_cancels_everything_downstream():
    wf = chain(step(tasks.boom, "first"), step(tasks.add, 1), step(tasks.add, 2)).enqueue()
    side = chord(group(step(tasks.add, 1, 1), step(tasks.boom, "member")),
                 step(tasks.echo)).enqueue()

    async def body(rt):
        return [await wait_for(i, timeout=30) for i in (*wf.ids, *side.ids)]

    results = run_with_runtime(body)
    assert [r.raw_status for r in results[:3]] == ["FAILED", "CANCELLED", "CANCELLED"]
    assert results[0].attempts == 3  # retried first, like any run
    assert results[1].status_reason == f"upstream run {wf.ids[0]} ended FAILED"
    assert results[2].status_reason == f"upstream run {wf.ids[1]} ended CANCELLED"
    assert [r.raw_status for r in results[3:]] == ["SUCCESSFUL", "FAILED", "CANCELLED"]
    assert results[2].finished_at is not None and results[2].started_at is None


def test_cancelling_or_deleting_an_upstream_run_cancels_its_dependents():
    a = chain(step(tasks.add, 1, 1), step(tasks.add, 1)).enqueue()
    default_task_backend.cancel(a.ids[0])
    assert default_task_backend.get_result(a.ids[1]).raw_status == "CANCELLED"

    b = chain(step(tasks.add, 2, 2), step(tasks.add, 2), step(tasks.add, 3)).enqueue()
    TaskRun.objects.filter(pk=int(b.ids[0])).delete()
    states = {k: v.status for k, v in rows(b.ids[1:]).items()}
    assert list(states.values()) == ["CANCELLED", "CANCELLED"]
    assert rows([b.ids[1]])[int(b.ids[1])].status_reason == (
        f"upstream run {b.ids[0]} ended deleted")

    # Cancelling the waiting middle step leaves the first alone and cancels the last.
    c = chain(step(tasks.add, 3, 3), step(tasks.add, 3), step(tasks.add, 4)).enqueue()
    default_task_backend.cancel(c.ids[1])
    assert [r.status for r in rows(c.ids).values()] == ["READY", "CANCELLED", "CANCELLED"]


def test_a_workflow_joins_the_callers_transaction():
    with transaction.atomic():
        wf = chain(step(tasks.add, 1, 2), step(tasks.add, 3)).enqueue()
        assert TaskRun.objects.filter(pk__in=[int(i) for i in wf.ids]).count() == 2
        transaction.set_rollback(True)
    assert not TaskRun.objects.filter(pk__in=[int(i) for i in wf.ids]).exists()
    assert not RunEdge.objects.exists()


def test_a_waiting_step_never_runs_before_its_upstream(tmp_path):
    """The promoter and the claim leave waiting steps alone, however long they wait."""
    wf = chain(step(tasks.sleepy, 1.5), step(tasks.echo)).enqueue()

    async def body(rt):
        import asyncio

        await asyncio.sleep(1.0)
        early = await sync_to_async(default_task_backend.get_result)(wf.ids[1])
        await wait_for(wf.ids[1], timeout=30)
        return early

    early = run_with_runtime(body)
    assert early.raw_status == "WAITING"
    done = [default_task_backend.get_result(i) for i in wf.ids]
    assert done[1].started_at >= done[0].finished_at
    assert done[1].return_value == {"args": [1.5], "kwargs": {}}  # sleepy returns its seconds


def test_many_chords_finished_by_three_processes_release_each_callback_once(cluster):
    chords = [chord(group(*(step(tasks.add, c, i) for i in range(8))), step(tasks.echo, c))
              .enqueue() for c in range(25)]
    cluster.start_workers(3, concurrency=6)
    ids = [int(i) for wf in chords for i in wf.ids]
    wait_all_final(ids, timeout=120, cluster=cluster)
    for c, wf in enumerate(chords):
        last = default_task_backend.get_result(wf.last.id)
        assert last.raw_status == "SUCCESSFUL", last.status_reason
        assert last.return_value == {"args": [[c + i for i in range(8)], c], "kwargs": {}}
        assert last.attempts == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM reproq_task_runs WHERE pending_deps <> 0")
        assert cursor.fetchone()[0] == 0
    assert_clean_stop(cluster)  # no deadlock, no crash, no traceback in any worker's log


@pytest.mark.parametrize(("build", "message"), [
    (lambda: chain(), "chain() needs at least one step"),
    (lambda: group(), "group() needs at least one step"),
    (lambda: chain(step(tasks.add, 1, 2), "not a task"), "chain step 2: expected step"),
    (lambda: chord(step(tasks.add, 1, 2), step(tasks.echo)), "chord() takes a group() first"),
    (lambda: chord(group(tasks.add), 42), "chord callback: expected step"),
    (lambda: step(print), "a workflow step needs a @task"),
    (lambda: chain(step(tasks.add, 1, 2), group(tasks.add, None)), "group step 2: expected"),
    (lambda: chain(group(*[tasks.add] * 400), group(*[tasks.add] * 400)).enqueue(),
     "a workflow has at most 100000 dependencies, got 160000"),
    (lambda: chain(step(tasks.add, 1, 2), step(tasks.add, object())).enqueue(),
     "cannot round-trip through JSON"),
    (lambda: chain(step(tasks.add, 1, 2), step(tasks.add, 1, run_after=timedelta(seconds=5)))
     .enqueue(), "run_after applies to the first steps of a workflow only"),
    (lambda: chain(step(tasks.add, 1, 2), step(tasks.add, 1, priority=500)).enqueue(),
     "priority must be an int from -100 to 100"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_workflows_are_refused_and_nothing_is_written(build, message):
    with pytest.raises((InvalidEnqueue, TypeError, ValueError), match=re.escape(message)):
        build()
    assert not TaskRun.objects.exists() and not RunEdge.objects.exists()


def test_hand_written_edges_to_missing_runs_do_not_break_completion():
    """Rows written by hand: an edge to a run that does not exist, a waiting run whose
    upstream is gone. Upstream completion still succeeds; the orphan is cancelled on delete."""
    wf = chain(step(tasks.add, 1, 1), step(tasks.add, 1)).enqueue()
    RunEdge.objects.create(upstream_id=int(wf.ids[0]), downstream_id=987654321, position=0)

    async def body(rt):
        return await wait_for(wf.ids[1], timeout=30)

    assert run_with_runtime(body).return_value == 3


def test_far_off_waits_do_not_stop_the_fallback_promotion():
    """A workflow step waiting for its upstream (run_after 9999-12-31) and a run deferred by a
    year must not keep the promoter asleep: a due run written by hand, without any NOTIFY,
    is still promoted and run within POLL_FALLBACK_SECONDS or so."""
    from django.utils import timezone

    from tests.dashboard_helpers import make_run

    chain(step(tasks.sleepy, 60), step(tasks.echo)).enqueue()  # its head will not be claimed
    TaskRun.objects.filter(task_path__endswith="sleepy").update(queue_name="other")
    tasks.add.using(run_after=timezone.now() + timedelta(days=365)).enqueue(0, 0)

    async def body(rt):
        import asyncio

        await asyncio.sleep(0.5)  # the promoter has looked once and knows the next due times
        hand = await sync_to_async(make_run)(
            "WAITING", run_after=timezone.now() - timedelta(seconds=1), args=[20, 22])
        return await wait_for(str(hand.pk), timeout=15)

    done = run_with_runtime(body, poll_fallback_seconds=1, queues=["default"])
    assert done.raw_status == "SUCCESSFUL" and done.return_value == 42


def test_aenqueue_from_async_code():
    async def body(rt):
        wf = await chain(step(tasks.async_add, 20, 1), step(tasks.async_add, 21)).aenqueue()
        return await wait_for(wf.last.id, timeout=30)

    assert run_with_runtime(body).return_value == 42


def test_a_chord_survives_a_sigkilled_worker(cluster):
    """A member running when its worker is SIGKILLed is reclaimed after its lease and run
    again elsewhere; the callback is released once, with every member's result."""
    import signal
    import time

    wf = chord(group(step(tasks.sleepy, 2), step(tasks.add, 1, 1), step(tasks.add, 2, 2)),
               step(tasks.echo)).enqueue()
    first = cluster.start_workers(1, concurrency=3)[0]
    sleepy = int(wf.ids[0])
    deadline = time.monotonic() + 30
    while TaskRun.objects.get(pk=sleepy).status != "RUNNING":
        assert time.monotonic() < deadline, "the sleepy member never started"
        time.sleep(0.05)
    first.signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    cluster.children.remove(first)  # dead on purpose: not checked for liveness any more
    cluster.start_workers(1, concurrency=3)
    wait_all_final([int(i) for i in wf.ids], timeout=60, cluster=cluster)
    member = default_task_backend.get_result(wf.ids[0])
    assert member.raw_status == "SUCCESSFUL" and member.attempts == 2
    last = default_task_backend.get_result(wf.last.id)
    assert last.raw_status == "SUCCESSFUL" and last.attempts == 1
    assert last.return_value == {"args": [[2, 2, 4]], "kwargs": {}}


def test_nested_workflows_fan_out_and_back_in():
    """chain(a, group(b, chain(c, d)), e): b and c get a's value, d gets c's, e gets [b, d];
    a chord over a group of one still hands on a list."""
    wf = chain(
        step(tasks.add, 1, 1),                                         # 2
        group(step(tasks.add, 10), chain(step(tasks.add, 100), step(tasks.add, 1000))),
        step(tasks.echo, "end"),                                       # echo([12, 1102], "end")
    ).enqueue()
    assert [r.raw_status for r in wf.results] == ["READY"] + ["WAITING"] * 4
    one = chord(group(step(tasks.add, 5, 5)), step(tasks.echo)).enqueue()

    async def body(rt):
        return [await wait_for(wf.last.id, timeout=30), await wait_for(one.last.id, timeout=30)]

    last, single = run_with_runtime(body)
    assert [default_task_backend.get_result(i).return_value for i in wf.ids[:4]] == [
        2, 12, 102, 1102]
    assert last.return_value == {"args": [[12, 1102], "end"], "kwargs": {}}
    assert single.return_value == {"args": [[10]], "kwargs": {}}
    edges = set(RunEdge.objects.filter(downstream_id=int(wf.ids[4]))
                .values_list("upstream_id", "position"))
    assert edges == {(int(wf.ids[1]), 0), (int(wf.ids[3]), 1)}
