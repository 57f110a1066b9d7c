"""Flow control with real processes and real PostgreSQL (no mocks).

Lock keys and concurrency limits (8 worker processes, thousands of runs, every run's own
execution interval checked by a sweep), rate limits (starts per window on the database clock,
most specific bucket wins, no head-of-line blocking), pause/resume through NOTIFY in every
process, priority ordering with aging (including a starvation case), expiry, cancellation in
every state (READY, WAITING, RUNNING async / sync thread / child process, final), the raw state
machine enforced in SQL, and bad input at the API, CLI and admin.

Every wait is bounded in time; worker processes are stopped with SIGTERM (SIGKILL after a bound)
in teardown. Measured figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection
from django.tasks import TaskResultStatus, default_task_backend
from django.tasks.exceptions import TaskResultDoesNotExist
from django.test import Client, override_settings
from django.utils import timezone

from reproq import control
from reproq.exceptions import InvalidEnqueue
from reproq.models import QueueControl, RateLimit, TaskRun, Worker
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.servers import (
    Child,
    Servers,
    expect_listeners,
    listener_backends,
    listening,
    wait_until,
)
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

FINAL = frozenset({"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"})
WORKER = ["django", "reproq", "worker"]
# A fallback timer far beyond every wait below: whatever a worker does promptly was triggered by
# a NOTIFY. A small pool keeps 8 workers well inside max_connections on a shared server.
WORKER_ENV = {"REPROQ_POLL_FALLBACK_SECONDS": "300", "REPROQ_POOL_MAX_SIZE": "4"}
BAD_LOG_LINES = ("Traceback", "crashed", "DeadlockDetected", "deadlock detected")


# --------------------------------------------------------------------------- harness


class Cluster(Servers):
    """`manage.py reproq worker` processes on the test database."""

    def start_workers(self, count: int, *, concurrency: int = 4,
                      extra: Iterable[str] = ()) -> list[Child]:
        procs = [self.command(f"worker{i}", [*WORKER, "--concurrency", str(concurrency),
                                             *extra], env=WORKER_ENV)
                 for i in range(count)]

        def ready() -> bool:
            for proc in procs:
                proc.check_alive()
            rows = list(Worker.objects.filter(pid__in=[p.pid for p in procs]))
            if len(rows) < count:
                return False
            if not expect_listeners():
                return True
            up = [b for b in listener_backends([r.id for r in rows]) if listening(b)]
            return len(up) == count

        wait_until(ready, timeout=60, interval=0.1, what=f"{count} workers to listen",
                   describe=self.logs)
        return procs

    def stop_all(self, timeout: float = 20.0) -> list[int | None]:
        """SIGTERM every worker at once, wait (bounded), SIGKILL what is left; exit codes."""
        for child in self.children:
            if not child.stopped:
                child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        codes = [child.proc.poll() for child in self.children]
        self.close()  # SIGKILLs only processes still alive
        return codes

    def full_logs(self) -> str:
        return "\n".join(c.log_path.read_text(errors="replace") for c in self.children)


def assert_clean_stop(cluster: Cluster) -> None:
    """Every worker stopped on SIGTERM with exit code 0 and logged no crash, no traceback and
    no deadlock (a deadlock crashes the claimer, which then restarts with a growing backoff)."""
    assert cluster.stop_all() == [0] * len(cluster.children), cluster.logs()
    logs = cluster.full_logs()
    assert not [line for line in BAD_LOG_LINES if line in logs], cluster.logs()


def backend():
    return default_task_backend


def statuses(ids: Iterable[int]) -> dict[int, str]:
    return dict(TaskRun.objects.filter(pk__in=list(ids)).values_list("pk", "status"))


def wait_all_final(ids: list[int], *, timeout: float, cluster: Cluster | None = None) -> None:
    """Bounded wait until every run is final (workers checked alive on the way)."""

    def done() -> bool:
        if cluster is not None:
            for child in cluster.children:
                child.check_alive()
        return TaskRun.objects.filter(pk__in=ids).exclude(status__in=FINAL).count() == 0

    def describe() -> str:
        left = TaskRun.objects.filter(pk__in=ids).exclude(status__in=FINAL)
        sample = list(left.values_list("pk", "status", "status_reason", "run_after",
                                       "blocked", "lease_owner")[:5])
        with connection.cursor() as cur:
            cur.execute("SELECT now(), (SELECT json_agg(b) FROM reproq_rate_limits b), "
                        "(SELECT json_agg(c) FROM reproq_concurrency c WHERE c.running > 0)")
            now, buckets, slots = cur.fetchone()
            cur.execute("SELECT application_name, state, wait_event_type, wait_event, "
                        "left(query, 60) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            activity = cur.fetchall()
        return (f"{left.count()} runs not final, e.g. {sample}\nnow {now}; buckets {buckets}; "
                f"busy slots {slots}\nsessions: {activity}") + (
            "\n" + cluster.logs() if cluster is not None else "")

    wait_until(done, timeout=timeout, interval=0.1, what=f"{len(ids)} runs to finish",
               describe=describe)


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one instant: sweep over (start, +1) / (end, -1) events, ends
    sorted before starts at equal times (a run that ended as another began did not overlap)."""
    spans = list(intervals)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def probe_report(ids: list[int]) -> tuple[dict[str, list[tuple[float, float]]], set[int]]:
    """Each probe run's own execution interval by key, and the pids that ran them."""
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    pids: set[int] = set()
    rows = TaskRun.objects.filter(pk__in=ids).values_list("status", "return_value")
    for status, value in rows:
        assert status == "SUCCESSFUL", (status, value)
        by_key[value["key"]].append((value["start"], value["end"]))
        pids.add(value["pid"])
    return by_key, pids


def enqueue_many(calls) -> list[int]:
    return [int(r.id) for r in backend().bulk_enqueue(calls)]


def admin_client() -> Client:
    user = get_user_model().objects.create_superuser("flow-admin", "a@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def run_by_hand_to(run_id: int | str, final: str) -> None:
    """Put a READY row into a final state by allowed transitions only."""
    with connection.cursor() as cur:
        if final == "EXPIRED":
            cur.execute("UPDATE reproq_task_runs SET status = 'EXPIRED' WHERE id = %s", [run_id])
            return
        cur.execute("UPDATE reproq_task_runs SET status = 'RUNNING' WHERE id = %s", [run_id])
        cur.execute("UPDATE reproq_task_runs SET status = %s WHERE id = %s", [final, run_id])


# --------------------------------------------------------------------------- 1-2. keys, 8 procs


def test_concurrency_key_limit_holds_across_eight_processes(cluster):
    procs = cluster.start_workers(8, concurrency=4)
    keys = [f"k{i}" for i in range(10)]
    ids = enqueue_many([(tasks.flow_probe, (keys[i % 10], 5, i),
                         {"concurrency_key": f"ck-{keys[i % 10]}", "concurrency_limit": 2})
                        for i in range(2000)])
    began = time.monotonic()
    wait_all_final(ids, timeout=60, cluster=cluster)
    elapsed = time.monotonic() - began

    by_key, pids = probe_report(ids)
    overlap = {key: max_overlap(spans) for key, spans in sorted(by_key.items())}
    everything = max_overlap([s for spans in by_key.values() for s in spans])
    print(f"\n2,000 runs over 10 keys (limit 2) on 8x4 slots in {elapsed:.1f}s; max overlap "
          f"per key {overlap}; across keys {everything}; {len(pids)} processes")
    assert sorted(by_key) == keys and all(len(v) == 200 for v in by_key.values())
    assert max(overlap.values()) <= 2, overlap
    # Not vacuous: the limit was reached, more than 2 ran at once overall, in many processes.
    assert max(overlap.values()) == 2 and everything > 2
    assert len(pids) >= 2 and pids <= {p.pid for p in procs}
    assert TaskRun.objects.filter(pk__in=ids, attempts=1).count() == 2000
    assert_clean_stop(cluster)


def test_lock_key_and_decorated_limits_hold_across_eight_processes(cluster):
    procs = cluster.start_workers(8, concurrency=4)
    lock_ids = enqueue_many([(tasks.flow_probe, (f"lock{i % 10}", 5, i),
                              {"lock_key": f"lock{i % 10}"}) for i in range(1000)])
    deco_ids = enqueue_many([(tasks.flow_probe_limited, (f"d{i % 5}", 5, i), {})
                             for i in range(300)])
    wait_all_final(lock_ids + deco_ids, timeout=60, cluster=cluster)

    lock_keys, lock_pids = probe_report(lock_ids)
    deco_keys, deco_pids = probe_report(deco_ids)
    lock_overlap = {k: max_overlap(v) for k, v in sorted(lock_keys.items())}
    deco_overlap = {k: max_overlap(v) for k, v in sorted(deco_keys.items())}
    print(f"\nlock_key: max overlap per key {lock_overlap} ({len(lock_pids)} processes); "
          f"@limits_concurrency(to=2): {deco_overlap} ({len(deco_pids)} processes)")
    assert len(lock_keys) == 10 and max(lock_overlap.values()) == 1
    assert max_overlap([s for v in lock_keys.values() for s in v]) > 1
    assert len(deco_keys) == 5 and max(deco_overlap.values()) <= 2
    assert len(lock_pids | deco_pids) >= 2 and lock_pids | deco_pids <= {p.pid for p in procs}
    row = TaskRun.objects.get(pk=deco_ids[0])
    assert (row.concurrency_key, row.concurrency_limit, row.sem_key) == (
        "flow-decorated:d0", 2, "c:flow-decorated:d0")
    row = TaskRun.objects.get(pk=lock_ids[0])
    assert (row.lock_key, row.sem_key, row.sem_limit) == ("lock0", "l:lock0", 1)
    assert_clean_stop(cluster)


# --------------------------------------------------------------------------- 2. head of queue


def test_a_blocked_key_at_the_head_of_the_queue_does_not_delay_other_tasks():
    blocked = enqueue_many([(tasks.flow_probe, ("K", 300, i),
                             {"concurrency_key": "K", "concurrency_limit": 1})
                            for i in range(30)])
    never = tasks.flow_other.enqueue(-1, concurrency_key="zero", concurrency_limit=0)
    quick = enqueue_many([(tasks.flow_other, (i,), {}) for i in range(5)])

    async def body(rt):
        for run_id in quick:
            await wait_for(str(run_id), timeout=20)
        snapshot = await sync_to_async(lambda: list(
            TaskRun.objects.filter(pk__in=blocked).values_list("status", "status_reason")))()
        zero = await wait_for(never.id, {"WAITING"}, timeout=10)
        for run_id in blocked:
            await wait_for(str(run_id), timeout=30)
        await asyncio.sleep(1.2)  # past an UNBLOCK sweep: a limit of 0 still admits nobody
        zero_after = await default_task_backend.aget_result(never.id)
        cancelled = await default_task_backend.acancel(never.id)
        return snapshot, zero, zero_after, cancelled

    snapshot, zero, zero_after, cancelled = run_with_runtime(body, concurrency=4)
    finished = [s for s, _ in snapshot if s == "SUCCESSFUL"]
    parked = [r for s, r in snapshot if s == "WAITING"]
    print(f"\nwhen the 5 unrelated runs were done: {len(finished)} of 30 K runs finished, "
          f"{len(parked)} parked")
    assert len(finished) <= 2
    assert len(parked) >= 25 and set(parked) == {"waiting for a free slot of c:K"}
    # All K runs finished eventually (trigger / UNBLOCK wake-ups), one at a time, in FIFO order.
    by_key, _ = probe_report(blocked)
    assert max_overlap(by_key["K"]) == 1
    rows = TaskRun.objects.filter(pk__in=blocked).order_by("started_at")
    assert [r.pk for r in rows] == sorted(blocked)
    # concurrency_limit=0 is allowed: the run is parked and never starts.
    assert zero.raw_status == zero_after.raw_status == "WAITING"
    assert zero_after.status_reason == "waiting for a free slot of c:zero"
    assert TaskRun.objects.get(pk=never.id).attempts == 0
    assert cancelled.raw_status == "CANCELLED"  # a parked run is cancelled at once


# --------------------------------------------------------------------------- 3. rate limits


def test_rate_limit_holds_across_eight_processes(cluster):
    path = "tests.testapp.tasks.flow_rated"
    rate, burst = 20, 5
    call_command("reproq", "limit", "set", f"task:{path}", str(rate), "--per", "1",
                 "--burst", str(burst))
    cluster.start_workers(8, concurrency=4)
    ids = enqueue_many([(tasks.flow_rated, (i,), {}) for i in range(60)])
    wait_all_final(ids, timeout=30, cluster=cluster)

    rows = list(TaskRun.objects.filter(pk__in=ids).values_list("status", "started_at",
                                                                 "worker_ids"))
    assert {s for s, _, _ in rows} == {"SUCCESSFUL"}
    starts = sorted(started.timestamp() for _, started, _ in rows)
    # started_at is the claim's now() on the database clock, the clock the bucket refills on.
    per_window = max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))
    span = starts[-1] - starts[0]
    workers = {w[-1] for _, _, w in rows}
    print(f"\nrate {rate}/s burst {burst}: at most {per_window} starts in any 1 s window "
          f"(bound {burst + rate}); 60 runs started over {span:.2f}s by {len(workers)} workers")
    # A bucket holds at most `burst` tokens and gains `rate` per second, so no 1 s window can
    # see more than burst + rate grants. +1 tolerance: a claim that waited on the bucket's row
    # lock takes tokens refilled up to the lock holder's time but records its own (earlier)
    # transaction start as started_at, so a grant can be attributed a few ms early.
    assert per_window <= burst + rate + 1
    # ... and the limit really bit: 55 runs beyond the burst need 55/20 = 2.75 s of refill.
    assert span >= 2.5
    assert len(workers) >= 2

    out = call_output("reproq", "limit", "ls")
    assert f"task:{path}" in out and f"{rate} per 1s burst {burst}" in out
    assert "removed" in call_output("reproq", "limit", "rm", f"task:{path}")
    assert not RateLimit.objects.exists()
    assert_clean_stop(cluster)


def call_output(*args: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_most_specific_bucket_wins_and_an_exhausted_bucket_blocks_nothing_else(tmp_path):
    control.set_rate_limit("global", rate=1, period_seconds=60, burst=1)
    control.set_rate_limit("queue:default", rate=1, period_seconds=60, burst=1)
    control.set_rate_limit("queue:emails", rate=1000, burst=1000)
    control.set_rate_limit("task:tests.testapp.tasks.flow_rated", rate=1000, burst=1000)
    control.set_rate_limit("task:tests.testapp.tasks.flow_touch", rate=1, period_seconds=60,
                           burst=1)
    # Exhausted bucket first in the queue (A = flow_touch in 'emails', 1 per minute)...
    a_ids = enqueue_many([(tasks.flow_touch.using(queue_name="emails"), (str(tmp_path / f"a{i}"),),
                           {}) for i in range(10)])
    # ...then work governed by other buckets behind it.
    task_bucket = enqueue_many([(tasks.flow_rated, (i,), {}) for i in range(10)])
    queue_bucket = enqueue_many([(tasks.flow_other.using(queue_name="emails"), (i,), {})
                                 for i in range(10)])
    default_q = enqueue_many([(tasks.flow_other, (100 + i,), {}) for i in range(5)])
    global_q = enqueue_many([(tasks.flow_other.using(queue_name="other"), (200 + i,), {})
                             for i in range(5)])

    def settled(ids: list[int]) -> bool:
        return all(s == "SUCCESSFUL" or s == "WAITING" for s in statuses(ids).values())

    async def body(rt):
        for run_id in task_bucket + queue_bucket:
            await wait_for(str(run_id), timeout=20)
        for _ in range(200):
            if await sync_to_async(settled)(a_ids + default_q + global_q):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # nothing else sneaks through meanwhile

    run_with_runtime(body, concurrency=4)
    assert set(statuses(task_bucket + queue_bucket).values()) == {"SUCCESSFUL"}
    for ids, bucket in [(a_ids, "task:tests.testapp.tasks.flow_touch"),
                        (default_q, "queue:default"), (global_q, "global")]:
        rows = list(TaskRun.objects.filter(pk__in=ids).order_by("pk"))
        done = [r for r in rows if r.status == "SUCCESSFUL"]
        waiting = [r for r in rows if r.status == "WAITING"]
        assert len(done) == 1 and len(waiting) == len(ids) - 1, [(r.status, r.status_reason)
                                                                  for r in rows]
        assert {r.status_reason for r in waiting} == {f"rate limited by {bucket}"}
        # Deferred to when their bucket has a token again (about a minute per token).
        assert min(r.run_after for r in waiting) > timezone.now() + timedelta(seconds=30)
        assert all(r.attempts == 0 for r in waiting)
    # A rate-limited (deferred) run is cancelled at once too.
    cancelled = backend().cancel(str(a_ids[-1]))
    assert cancelled.raw_status == "CANCELLED" and cancelled.attempts == 0


def test_rate_limits_managed_from_the_admin():
    client = admin_client()
    key = "task:tests.testapp.tasks.flow_rated"
    response = client.post("/admin/reproq/ratelimit/add/", {"key": "bogus", "rate": "1",
                                                            "period_seconds": "60", "burst": "2"})
    assert response.status_code == 200  # the form again, with the error
    assert "invalid rate limit key" in response.content.decode()
    response = client.post("/admin/reproq/ratelimit/add/", {"key": key, "rate": "1",
                                                            "period_seconds": "60", "burst": "2"})
    assert response.status_code == 302
    bucket = RateLimit.objects.get()
    assert (bucket.key, bucket.rate, bucket.period_seconds, bucket.burst, bucket.tokens) == (
        key, 1, 60.0, 2, 2.0)  # starts full, like `reproq limit set`
    assert client.get("/admin/reproq/ratelimit/").status_code == 200
    ids = enqueue_many([(tasks.flow_rated, (i,), {}) for i in range(4)])

    async def body(rt):
        for _ in range(200):
            found = await sync_to_async(statuses)(ids)
            if sorted(found.values()) == ["SUCCESSFUL", "SUCCESSFUL", "WAITING", "WAITING"]:
                break
            await asyncio.sleep(0.05)

    run_with_runtime(body)
    rows = list(TaskRun.objects.filter(pk__in=ids).order_by("pk"))
    assert [r.status for r in rows] == ["SUCCESSFUL", "SUCCESSFUL", "WAITING", "WAITING"]
    assert {r.status_reason for r in rows[2:]} == {f"rate limited by {key}"}


# --------------------------------------------------------------------------- 4. pause / resume


def test_pause_and_resume_take_effect_in_every_process_through_notify(cluster):
    cluster.start_workers(2, concurrency=2)
    running = enqueue_many([(tasks.flow_probe, ("p", 1500, i), {}) for i in range(2)])
    wait_until(lambda: set(statuses(running).values()) == {"RUNNING"}, timeout=15,
               what="two runs to start", describe=cluster.logs)

    out = call_output("reproq", "pause-queue", "default", "--reason", "maintenance")
    assert "paused in every process" in out
    qc = QueueControl.objects.get(pk="default")
    assert qc.paused and qc.reason == "maintenance" and qc.updated_by.startswith("cli:")
    held = enqueue_many([(tasks.flow_probe, ("q", 1000, i), {}) for i in range(4)])
    # The running ones finish while paused; the new ones (their NOTIFY woke both processes)
    # stay READY.
    wait_all_final(running, timeout=15, cluster=cluster)
    assert set(statuses(running).values()) == {"SUCCESSFUL"}
    time.sleep(1.0)
    assert set(statuses(held).values()) == {"READY"}
    assert TaskRun.objects.filter(pk__in=held, attempts=0).count() == 4

    began = time.monotonic()
    call_command("reproq", "resume-queue", "default")
    assert not QueueControl.objects.get(pk="default").paused
    # 4 runs of 1 s RUNNING at once on 2 processes x 2 slots: both processes claimed them, and
    # with a 300 s fallback timer only the resume NOTIFY can have woken them.
    wait_until(lambda: list(statuses(held).values()).count("RUNNING") == 4, timeout=10,
               interval=0.02, what="all 4 held runs running at once", describe=cluster.logs)
    latency = time.monotonic() - began
    wait_all_final(held, timeout=15, cluster=cluster)
    owners = {TaskRun.objects.get(pk=i).worker_ids[-1] for i in held}
    print(f"\nresume -> 4 runs running in 2 processes after {latency:.2f}s")
    assert len(owners) == 2
    assert latency < 5
    assert_clean_stop(cluster)


def test_pause_and_resume_from_the_admin_and_bad_queue_names():
    control.set_paused("emails", False)
    client = admin_client()
    url = "/admin/reproq/queuecontrol/"
    response = client.post(url, {"action": "pause", "_selected_action": ["emails"]})
    assert response.status_code == 302
    qc = QueueControl.objects.get(pk="emails")
    assert qc.paused and qc.updated_by == "flow-admin"
    r = tasks.send_email.enqueue("x@example.com", "while paused")

    async def body(rt):
        await asyncio.sleep(1.0)
        return await default_task_backend.aget_result(r.id)

    assert run_with_runtime(body).raw_status == "READY"
    response = client.post(url, {"action": "resume", "_selected_action": ["emails"]})
    assert response.status_code == 302
    assert not QueueControl.objects.get(pk="emails").paused

    async def body2(rt):
        return await wait_for(r.id, timeout=10)

    assert run_with_runtime(body2).raw_status == "SUCCESSFUL"
    with pytest.raises(CommandError, match="invalid queue name"):
        call_command("reproq", "pause-queue", "bad name")
    with pytest.raises(ValueError):
        control.set_paused("", True)


# --------------------------------------------------------------------------- 5. priorities


def _order(ids: list[int]) -> list[int]:
    return list(TaskRun.objects.filter(pk__in=ids).order_by("started_at")
                .values_list("pk", flat=True))


def _runtime_settings(**extra):
    return override_settings(REPROQ_RUNTIME={**settings.REPROQ_RUNTIME, **extra})


def test_priority_then_fifo_strict_and_with_aging():
    """Claim order is sort_key = eligible_at - priority x F (F = PRIORITY_AGING_FACTOR seconds
    per priority point, applied when the run is enqueued). F = 0: priority, then FIFO. F > 0:
    a run gains one priority point per F seconds of waiting; equal keys are FIFO."""
    old = timezone.now() - timedelta(minutes=10)

    def scenario(label):
        low_old = tasks.flow_other.enqueue(f"{label}-low", run_after=old)  # waited 10 min, p 0
        high_new = tasks.flow_other.enqueue(f"{label}-high", priority=5)
        fifo = [tasks.flow_other.enqueue(f"{label}-fifo{i}", priority=1) for i in range(3)]
        return [int(r.id) for r in (low_old, high_new, *fifo)]

    strict = scenario("strict")  # default PRIORITY_AGING_FACTOR 0
    with _runtime_settings(PRIORITY_AGING_FACTOR=60):
        aged = scenario("aged")

    async def body(rt):
        for run_id in strict + aged:
            await wait_for(str(run_id), timeout=20)

    # Concurrency 1: one row claimed at a time, in sort_key order.
    run_with_runtime(body, concurrency=1)
    low_old, high_new, *fifo = strict
    assert [i for i in _order(strict + aged) if i in strict] == [high_new, *fifo, low_old]
    a_low, a_high, *a_fifo = aged
    # 10 min of waiting at 60 s per point = 10 points > 5: the old low-priority run goes first;
    # the fresh runs keep priority order, FIFO within a priority.
    assert [i for i in _order(strict + aged) if i in aged] == [a_low, a_high, *a_fifo]


def test_an_old_low_priority_run_is_not_starved_by_a_stream_of_higher_ones():
    """Concurrency 1, a backlog of priority-10 runs that arrived every minute for 20 minutes,
    a priority-0 run that arrived first, and more priority-10 runs arriving while it works.
    Strict priority starves the low run until the stream stops; with F = 60 s it overtakes
    every high run that arrived more than 10 minutes after it (10 points x 60 s)."""
    now = timezone.now()

    def scenario(label: str) -> tuple[int, list[int], list[int]]:
        t0 = now - timedelta(minutes=20)
        low = int(tasks.flow_other.enqueue(f"{label}-low", run_after=t0).id)
        early, late = [], []
        for k in range(20):  # arrivals at t0 + 0.5, 1.5, ... 19.5 minutes
            arrival = t0 + timedelta(minutes=k + 0.5)
            run_id = int(tasks.flow_other.enqueue(f"{label}-h{k}", priority=10,
                                                  run_after=arrival).id)
            (early if k < 10 else late).append(run_id)
        return low, early, late

    def stream(label: str):
        async def body(rt):
            live = []
            for i in range(15):  # a steady stream of fresh high-priority runs
                r = await tasks.flow_other.using(priority=10).aenqueue(f"{label}-live{i}")
                live.append(int(r.id))
                await asyncio.sleep(0.03)
            for run_id in live:
                await wait_for(str(run_id), timeout=20)
            return live
        return body

    with _runtime_settings(PRIORITY_AGING_FACTOR=60):
        low, early, late = scenario("aged")
        live = run_with_runtime(stream("aged"), concurrency=1)
    wait_all_final([low, *early, *late], timeout=10)
    order = _order([low, *early, *late, *live])
    position = order.index(low)
    print(f"\nwith aging the old low-priority run started {position + 1}th of {len(order)}")
    assert order[:position] == early  # only the high runs that came < 10 min after it
    assert set(order[position + 1:]) == set(late + live)

    low, early, late = scenario("strict")
    live = run_with_runtime(stream("strict"), concurrency=1)
    wait_all_final([low, *early, *late], timeout=10)
    low_start = TaskRun.objects.get(pk=low).started_at
    highs = list(TaskRun.objects.filter(pk__in=[*early, *late, *live]))
    before = [h for h in highs if h.started_at < low_start]
    print(f"strict priority: the low run started after {len(before)} of {len(highs)} high runs")
    # Strict priority starves it: it started only after every high run enqueued before it
    # started (a 50 ms margin for an enqueue committing while the claim ran).
    assert all(h.started_at < low_start for h in highs
               if h.enqueued_at < low_start - timedelta(milliseconds=50))
    assert len(before) >= 20


# --------------------------------------------------------------------------- 6. expiry


def test_delayed_run_that_misses_its_deadline_expires_without_running(tmp_path):
    marker, marker2 = tmp_path / "ran.txt", tmp_path / "ran-too.txt"
    control.set_paused("default", True, reason="expiry test")
    late = tasks.flow_touch.using(expires_in=timedelta(milliseconds=300)).enqueue(
        str(marker), run_after=timedelta(milliseconds=100))
    options = {**settings.TASKS["default"]["OPTIONS"], "EXPIRES_IN": timedelta(milliseconds=300)}
    with override_settings(TASKS={"default": {**settings.TASKS["default"], "OPTIONS": options}}):
        by_option = tasks.flow_touch.enqueue(str(marker2), run_after=timedelta(milliseconds=100))
    fine = tasks.flow_other.enqueue("after resume", run_after=timedelta(milliseconds=100))
    assert late.raw_status == "WAITING"
    row = TaskRun.objects.get(pk=late.id)
    # The window starts when the run becomes due: run_after + 300 ms.
    assert row.expires_at - row.run_after == timedelta(milliseconds=300)

    async def body(rt):
        await asyncio.sleep(0.8)  # promoted to READY at 100 ms, but the queue is paused
        before = await default_task_backend.aget_result(late.id)
        await sync_to_async(control.set_paused)("default", False)
        return (before, await wait_for(late.id, timeout=10), await wait_for(fine.id, timeout=10),
                await wait_for(by_option.id, timeout=10))

    before, done, ok, done2 = run_with_runtime(body)
    assert before.raw_status == "READY"
    assert ok.raw_status == "SUCCESSFUL"
    assert done.raw_status == "EXPIRED"
    assert done.status == TaskResultStatus.FAILED and done.is_finished
    assert done.status_reason.startswith("expired: not started before")
    assert done.attempts == 0 and done.worker_ids == [] and done.started_at is None
    assert done.finished_at is not None
    assert not marker.exists()  # the task body never ran
    # The same through the backend's OPTIONS["EXPIRES_IN"].
    assert (done2.raw_status, done2.attempts, done2.worker_ids) == ("EXPIRED", 0, [])
    assert TaskRun.objects.get(pk=by_option.id).expires_at is not None
    assert not marker2.exists()


# --------------------------------------------------------------------------- 7. cancellation


def test_cancel_waiting_runs_at_once_by_api_cli_and_admin():
    ready = tasks.add.enqueue(1, 100)
    deferred = tasks.add.enqueue(2, 100, run_after=timedelta(hours=1))
    by_cli = tasks.add.enqueue(3, 100)
    by_admin = [tasks.add.enqueue(4 + i, 100) for i in range(2)]
    assert (ready.raw_status, deferred.raw_status) == ("READY", "WAITING")

    for r in (ready, deferred):
        result = backend().cancel(r.id)
        assert result.raw_status == "CANCELLED" and result.status == TaskResultStatus.FAILED
        assert result.status_reason == "cancelled before it started"
        assert result.attempts == 0 and result.finished_at is not None

    out = call_output("reproq", "cancel", "--id", str(by_cli.id))
    assert f"{by_cli.id}: CANCELLED" in out and "1 of 1 runs" in out

    client = admin_client()
    response = client.post("/admin/reproq/taskrun/", {
        "action": "cancel_runs", "_selected_action": [r.id for r in by_admin]})
    assert response.status_code == 302
    assert set(statuses(int(r.id) for r in by_admin).values()) == {"CANCELLED"}

    # Final runs are left alone, without error, whatever their final state.
    finals = {}
    for final in ("SUCCESSFUL", "FAILED", "EXPIRED"):
        r = tasks.add.enqueue(len(finals), 200)
        run_by_hand_to(r.id, final)
        finals[final] = r.id
    for final, run_id in finals.items():
        assert backend().cancel(run_id).raw_status == final
    again = backend().cancel(ready.id)
    assert again.raw_status == "CANCELLED" and again.status_reason == "cancelled before it started"

    with pytest.raises(TaskResultDoesNotExist):
        backend().cancel("987654321")
    with pytest.raises(CommandError, match="no such runs: 987654321"):
        call_command("reproq", "cancel", "--id", "987654321")
    with pytest.raises(CommandError, match="is not a run id"):
        call_command("reproq", "cancel", "--id", "abc")

    # CANCELLED is never retried: a runtime running for a while leaves them alone.
    cancelled = [int(r.id) for r in (ready, deferred, by_cli, *by_admin)]

    async def body(rt):
        await asyncio.sleep(1.5)

    run_with_runtime(body)
    rows = TaskRun.objects.filter(pk__in=cancelled)
    assert {(r.status, r.attempts, tuple(r.worker_ids)) for r in rows} == {("CANCELLED", 0, ())}


def test_running_async_task_is_cancelled_through_notify_not_the_heartbeat():
    r = tasks.async_sleep.enqueue(60)

    async def body(rt):
        await wait_for(r.id, {"RUNNING"}, timeout=10)
        for _ in range(100):
            if int(r.id) in rt.executor.running:
                break
            await asyncio.sleep(0.02)
        beats = await startup_beat_done(rt)
        began = time.monotonic()
        requested = await default_task_backend.acancel(r.id)
        done = await wait_for(r.id, {"CANCELLED"}, timeout=10)
        latency = time.monotonic() - began
        return requested, done, latency, rt.heartbeat.beats - beats

    # One heartbeat at start-up, the next only after 30 s: only the NOTIFY can stop it sooner.
    requested, done, latency, beats = run_with_runtime(body, heartbeat_seconds=30,
                                                       lease_seconds=90)
    print(f"\nasync run cancelled {latency * 1000:.0f} ms after acancel (heartbeats meanwhile: "
          f"{beats})")
    # acancel reads the run back right after its UPDATE: usually still RUNNING (told to stop),
    # sometimes already CANCELLED by the worker, which is that fast.
    assert (requested.raw_status, requested.status_reason) in {
        ("RUNNING", "cancel requested while running"), ("CANCELLED", "cancelled while running")}
    # Through a transaction pooler (CONNECTION_MODE "pgbouncer": no LISTEN) the cancel is heard
    # by the heartbeat each poll tick brings forward while runs are held, not the 30 s one.
    assert beats == 0 if expect_listeners() else beats >= 1
    assert latency < 5  # generous; the point is that the 30 s heartbeat was not waited for
    assert done.status_reason == "cancelled while running"
    assert done.errors[-1].exception_class_path == "reproq.runtime.executor.TaskCancelled"
    assert_never_retried(r.id, attempts=1)


async def startup_beat_done(rt) -> int:
    """Wait (bounded) for the heartbeat's start-up beat; the next one is HEARTBEAT_SECONDS away."""
    for _ in range(200):
        if rt.heartbeat.beats >= 1:
            break
        await asyncio.sleep(0.05)
    assert rt.heartbeat.beats == 1
    return rt.heartbeat.beats


def assert_never_retried(run_id: str, attempts: int) -> None:
    async def body(rt):
        await asyncio.sleep(1.2)
        return await default_task_backend.aget_result(run_id)

    later = run_with_runtime(body)
    assert later.raw_status == "CANCELLED" and later.attempts == attempts


def test_running_sync_task_sees_cancel_requested_in_its_context():
    r = tasks.flow_cooperative.enqueue(30)

    async def body(rt):
        for _ in range(200):
            row = await default_task_backend.aget_result(r.id)
            if row.metadata.get("polling"):
                break
            await asyncio.sleep(0.05)
        beats = await startup_beat_done(rt)
        began = time.monotonic()
        await sync_to_async(backend().cancel)(r.id)
        done = await wait_for(r.id, {"CANCELLED"}, timeout=10)
        return done, time.monotonic() - began, rt.heartbeat.beats - beats

    done, latency, beats = run_with_runtime(body, heartbeat_seconds=30, lease_seconds=90)
    print(f"\nsync thread run saw context.cancel_requested; CANCELLED after "
          f"{latency * 1000:.0f} ms")
    assert (beats == 0 if expect_listeners() else beats >= 1) and latency < 5
    assert done.metadata == {"polling": True, "saw_cancel": True}
    assert done.status_reason == "cancelled while running" and done.attempts == 1
    assert_never_retried(r.id, attempts=1)


def test_running_sync_task_in_process_mode_is_killed_and_its_child_replaced():
    r = tasks.sleepy.using(queue_name="reports").enqueue(60)

    async def body(rt):
        child = None
        for _ in range(600):  # the child process starts Django first
            child = rt.processes.busy.get(int(r.id))
            if child is not None:
                break
            await asyncio.sleep(0.05)
        assert child is not None, "the run never reached a child process"
        pid = child.process.pid
        began = time.monotonic()
        await sync_to_async(call_command)("reproq", "cancel", "--id", r.id)
        done = await wait_for(r.id, {"CANCELLED"}, timeout=15)
        latency = time.monotonic() - began
        after = await tasks.add.using(queue_name="reports").aenqueue(40, 2)
        ok = await wait_for(after.id, timeout=60)
        return done, latency, pid, child.process.is_alive(), rt.processes.replaced, ok

    done, latency, pid, alive, replaced, ok = run_with_runtime(
        body, process_queues=["reports"], process_workers=1, heartbeat_seconds=30,
        lease_seconds=90)
    print(f"\nprocess-mode run: child {pid} killed, CANCELLED after {latency * 1000:.0f} ms")
    assert done.raw_status == "CANCELLED" and done.attempts == 1
    assert "child process killed" in done.errors[-1].traceback
    assert not alive and replaced == 1
    assert latency < 5
    assert ok.raw_status == "SUCCESSFUL" and ok.return_value == 42  # the new child works
    assert_never_retried(r.id, attempts=1)


# --------------------------------------------------------------------------- 8. state machine


def test_state_machine_rejects_any_transition_out_of_a_final_state():
    runs = {}
    for final in ("SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"):
        r = tasks.add.enqueue(len(runs), 300)
        run_by_hand_to(r.id, final)
        runs[final] = int(r.id)
    for final, run_id in runs.items():
        before = TaskRun.objects.get(pk=run_id)
        for target in ("READY", "WAITING", "RUNNING", "SUCCESSFUL", "FAILED", "CANCELLED",
                       "EXPIRED"):
            if target == final:
                continue
            with (pytest.raises(IntegrityError, match=f"cannot go from {final} to {target}"),
                  connection.cursor() as cur):
                cur.execute("UPDATE reproq_task_runs SET status = %s WHERE id = %s",
                            [target, run_id])
        with pytest.raises(IntegrityError):
            TaskRun.objects.filter(pk=run_id).update(status="READY", attempts=0)
        after = TaskRun.objects.get(pk=run_id)
        assert (after.status, after.attempts, after.finished_at) == (
            before.status, before.attempts, before.finished_at)
    # Shortcuts that skip RUNNING are refused too; allowed steps still work.
    r = tasks.add.enqueue(9, 300)
    with pytest.raises(IntegrityError, match="cannot go from READY to SUCCESSFUL"):
        TaskRun.objects.filter(pk=r.id).update(status="SUCCESSFUL")
    TaskRun.objects.filter(pk=r.id).update(status="WAITING")
    with pytest.raises(IntegrityError, match="cannot go from WAITING to RUNNING"):
        TaskRun.objects.filter(pk=r.id).update(status="RUNNING")
    TaskRun.objects.filter(pk=r.id).update(status="READY")
    TaskRun.objects.filter(pk=r.id).update(status="RUNNING")
    TaskRun.objects.filter(pk=r.id).update(status="SUCCESSFUL")
    assert TaskRun.objects.get(pk=r.id).status == "SUCCESSFUL"


# --------------------------------------------------------------------------- bad input


def test_bad_flow_control_input_is_refused_readably():
    before = TaskRun.objects.count()
    with pytest.raises(InvalidEnqueue, match="either lock_key or a concurrency key"):
        tasks.add.enqueue(1, 2, lock_key="a", concurrency_key="b", concurrency_limit=1)
    with pytest.raises(InvalidEnqueue, match="either lock_key or a concurrency key"):
        tasks.sync_account.enqueue(7, lock_key="a")  # @limits_concurrency gives it a key
    with pytest.raises(InvalidEnqueue, match="go together"):
        tasks.add.enqueue(1, 2, concurrency_key="b")
    with pytest.raises(InvalidEnqueue, match="int >= 0"):
        tasks.add.enqueue(1, 2, concurrency_key="b", concurrency_limit=-1)
    with pytest.raises(InvalidEnqueue, match="lock_key"):
        tasks.add.enqueue(1, 2, lock_key="")
    assert TaskRun.objects.count() == before  # nothing written

    for argv, message in [
        (("limit", "set", "bogus", "5"), "invalid rate limit key"),
        (("limit", "set", "global", "0"), "must be >= 1"),
        (("limit", "set", "global", "5", "--per", "0"), "must be a number of seconds > 0"),
        (("limit", "set", "global", "5", "--burst", "x"), "is not a whole number"),
        (("limit", "rm", "nope"), "invalid rate limit key"),
        (("limit", "rm", "queue:nothing"), "no rate limit"),
        (("pause-queue", "bad name"), "invalid queue name"),
        (("resume-queue", "x" * 65), "invalid queue name"),
        (("cancel", "--id", "-3"), "is not a run id"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("reproq", *argv)
    assert not RateLimit.objects.exists() and not QueueControl.objects.exists()
    for bad in [dict(rate=0), dict(rate=1, burst=0), dict(rate=1, period_seconds=0),
                dict(rate=1.5)]:
        with pytest.raises(ValueError):
            control.set_rate_limit("global", **bad)


# --------------------------------------------------------------------------- lost wake-ups


def test_a_ready_run_passed_over_while_locked_is_claimed_without_another_notify():
    """A statement that locks a READY row without changing it (e.g. a promoter whose FOR UPDATE
    followed the row to its new READY version, then found it no longer WAITING) makes the
    claims woken meanwhile skip it, and nothing announces it again. The claim reports that it
    passed over locked READY rows and the claimer looks again shortly."""
    import psycopg

    control.set_paused("default", True)
    r = tasks.flow_other.enqueue("locked")
    from reproq.db import conninfo

    holder = psycopg.connect(conninfo("default", application_name="flow-lock-holder"))
    try:
        holder.execute("SELECT id FROM reproq_task_runs WHERE id = %s FOR UPDATE", [int(r.id)])

        async def body(rt):
            await asyncio.sleep(0.3)
            await sync_to_async(control.set_paused)("default", False)  # NOTIFY q:default
            for _ in range(100):  # the claims woken by that NOTIFY pass over the locked row
                if rt.claimer.skipped_locked:
                    break
                await asyncio.sleep(0.02)
            skipped = rt.claimer.skipped_locked
            await asyncio.sleep(0.3)
            holder.rollback()  # the lock goes away; nothing is announced
            began = time.monotonic()
            done = await wait_for(r.id, timeout=10)
            return skipped, done, time.monotonic() - began, rt.claimer.rechecks

        skipped, done, latency, rechecks = run_with_runtime(body, poll_fallback_seconds=300)
    finally:
        holder.close()
    print(f"\nlocked READY row claimed {latency * 1000:.0f} ms after its lock went away "
          f"({rechecks} rechecks)")
    assert skipped and done.raw_status == "SUCCESSFUL"
    assert latency < 5 and rechecks >= 1
