"""Operations from the command line against a real PostgreSQL: prune (and the runtime's
automatic retention), status, replay and reclaim — with their bad input."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from reproq import db, retention
from reproq.models import TaskRun, Worker
from tests.dashboard_helpers import make_run
from tests.runtime_helpers import run_with_runtime

pytestmark = pytest.mark.django_db(transaction=True)


def call(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("reproq", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def finished(status: str, age: timedelta, **fields) -> TaskRun:
    return make_run(status, finished_at=timezone.now() - age, **fields)


def ids() -> set[int]:
    return set(TaskRun.objects.values_list("pk", flat=True))


@pytest.fixture
def history() -> dict[str, TaskRun]:
    """Old finished runs in every final state, recent ones, active ones and a hand-written
    finished row without finished_at."""
    old = timedelta(days=3)
    runs = {
        "old_ok": finished("SUCCESSFUL", old),
        "old_failed": finished("FAILED", old),
        "old_cancelled": finished("CANCELLED", old),
        "old_expired": finished("EXPIRED", old),
        "old_other_queue": finished("SUCCESSFUL", old, queue="emails"),
        "old_other_task": finished("SUCCESSFUL", old, task="tests.testapp.tasks.boom"),
        "recent_ok": finished("SUCCESSFUL", timedelta(hours=1)),
        "ready": make_run("READY", enqueued_at=timezone.now() - timedelta(days=10)),
        "waiting": make_run("WAITING", run_after=timezone.now() + timedelta(days=1)),
        "running": make_run("RUNNING"),
        "no_finish_time": make_run("SUCCESSFUL", finished_at=None),
    }
    return runs


def test_prune_deletes_only_finished_runs_past_the_cutoff(history):
    h = {k: v.pk for k, v in history.items()}
    before = ids()

    out, _ = call("prune", "--older-than", "2d", "--dry-run")
    assert "would delete 6 " in out and "nothing deleted" in out
    assert ids() == before

    out, _ = call("prune", "--older-than", "2d", "--status", "successful", "--queue", "emails")
    assert out.startswith("deleted 1 SUCCESSFUL runs") and "in queue emails" in out
    assert ids() == before - {h["old_other_queue"]}

    out, _ = call("prune", "--older-than", "48h", "--task", "tests.testapp.tasks.boom")
    assert out.startswith("deleted 1 ")
    out, _ = call("prune", "--older-than", "2d", "--status", "FAILED", "--status", "EXPIRED")
    assert out.startswith("deleted 2 FAILED/EXPIRED runs")

    # Batches of one: every batch its own statement and transaction, progress on stderr.
    out, err = call("prune", "--older-than", str(2 * 86400), "--batch", "1")
    assert out.startswith("deleted 2 ") and "... 1 deleted" in err and "... 2 deleted" in err
    kept = {"recent_ok", "ready", "waiting", "running", "no_finish_time"}
    assert ids() == {h[k] for k in kept}

    out, _ = call("prune", "--older-than", "2d")
    assert out.startswith("deleted 0 ")
    out, _ = call("prune", "--older-than", "0")  # everything finished, now
    assert out.startswith("deleted 1 ")
    assert ids() == {h[k] for k in kept - {"recent_ok"}}


@pytest.mark.parametrize(("argv", "message"), [
    (["--older-than", "abc"], "is not a duration"),
    (["--older-than", "7x"], "is not a duration"),
    (["--older-than", ""], "is not a duration"),
    (["--older-than=-1d"], "must be a finite duration >= 0"),
    (["--older-than", "inf"], "must be a finite duration >= 0"),
    (["--older-than", "nan"], "must be a finite duration >= 0"),
    (["--older-than", "1e400"], "must be a finite duration >= 0"),
    (["--older-than", "1d", "--status", "RUNNING"], "is not a finished state"),
    (["--older-than", "1d", "--status", "ready"], "is not a finished state"),
    (["--older-than", "1d", "--batch", "0"], "must be >= 1"),
    (["--older-than", "1d", "--batch", "many"], "is not a whole number"),
    (["--older-than", "1d", "--queue", "bad name"], "invalid queue name"),
    (["--older-than", "1d", "--task", "x" * 600], "invalid task paths"),
    (["--status", "FAILED"], "--older-than"),
], ids=lambda v: repr(v)[:50])
def test_prune_rejects_bad_input_and_deletes_nothing(history, argv, message):
    before = ids()
    with pytest.raises(CommandError, match=message):
        call("prune", *argv)
    assert ids() == before


def test_prune_filter_rejects_bad_values_from_code():
    for bad in (-1, float("nan"), float("inf"), "7", True, None):
        with pytest.raises(ValueError, match="keep_seconds"):
            retention.PruneFilter(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only finished states"):
        retention.PruneFilter(60, states=())
    with pytest.raises(ValueError, match="batch"):
        retention.prune(retention.PruneFilter(60), batch=0)


def test_the_runtime_deletes_finished_runs_past_their_retention():
    old = finished("SUCCESSFUL", timedelta(hours=3))
    old_failed = finished("FAILED", timedelta(hours=2))
    young = finished("SUCCESSFUL", timedelta(minutes=30))
    ready = make_run("READY", enqueued_at=timezone.now() - timedelta(days=30))

    async def pruned_by_its_reclaim_service(rt):
        # Its first pass runs at start; a pass of our own races it (SKIP LOCKED): wait.
        for _ in range(200):
            if rt.reclaimer.pruned >= 2:
                break
            await asyncio.sleep(0.05)
        return rt.reclaimer.pruned

    assert run_with_runtime(pruned_by_its_reclaim_service, finished_retention_seconds=3600) == 2
    assert ids() == {young.pk, ready.pk}
    assert old.pk not in ids() and old_failed.pk not in ids()

    # 0 keeps finished runs forever.
    ancient = finished("SUCCESSFUL", timedelta(days=400))

    async def one_pass(rt):
        await rt.reclaimer.reclaim_once()
        return rt.reclaimer.pruned

    assert run_with_runtime(one_pass, finished_retention_seconds=0) == 0
    assert ids() == {young.pk, ready.pk, ancient.pk}


def test_the_runtime_catches_up_on_a_backlog_sooner_than_its_reclaim_interval(monkeypatch):
    for hours in range(2, 25):
        finished("SUCCESSFUL", timedelta(hours=hours))
    young = finished("SUCCESSFUL", timedelta(minutes=1))
    monkeypatch.setattr(retention, "DEFAULT_BATCH", 5)  # 10 per pass

    async def until_pruned(rt):
        for _ in range(300):  # passes every second while full: 23 rows in 3 passes
            if rt.reclaimer.pruned >= 23 and not rt.reclaimer.prune_backlog:
                break
            await asyncio.sleep(0.05)
        return rt.reclaimer.pruned, rt.reclaimer.prune_backlog

    # With a 60 s reclaim interval, three passes within 15 s are the catch-up cadence.
    assert run_with_runtime(until_pruned, finished_retention_seconds=3600,
                            reclaim_seconds=60) == (23, False)
    assert ids() == {young.pk}


def old_copies_of_the_run(run_id: int, n: int) -> None:
    """`n` copies of one run, finished 2 days ago plus 1..n seconds (one INSERT ... SELECT)."""
    from django.db import connection

    columns = ("task_path, queue_name, priority, status, sort_key, args, kwargs, enqueued_at, "
               "run_after, attempts, max_attempts, timeout_seconds, worker_ids, errors, "
               "metadata, blocked, cancel_requested, status_reason, backend_alias, code_ref, "
               "pip_lock_hash")
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO reproq_task_runs ({columns}, finished_at) "
            f"SELECT {columns}, now() - interval '2 days' - g * interval '1 second' "
            "FROM reproq_task_runs, generate_series(1, %s) g WHERE id = %s", [n, run_id])


def test_async_prune_goes_oldest_first_in_bounded_steps():
    keep = make_run("SUCCESSFUL")  # finished now: a template row, copied in SQL below
    old_copies_of_the_run(keep.pk, 100)
    by_age = list(TaskRun.objects.exclude(pk=keep.pk).order_by("finished_at")
                  .values_list("pk", flat=True))

    async def passes():
        pool = db.make_pool("default", 2, "test-prune")
        await pool.open()
        try:
            which = retention.PruneFilter(86400)
            steps = []
            for _ in range(4):
                n = await retention.aprune(pool, which, batch=20, max_batches=2)
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT id FROM reproq_task_runs")
                    steps.append((n, {int(r["id"]) for r in await cur.fetchall()}))
            return steps
        finally:
            await pool.close()

    steps = asyncio.run(passes())
    # 40 per call (2 statements of 20), oldest first, then the last 20; the young row stays.
    assert [n for n, _ in steps] == [40, 40, 20, 0]
    assert steps[0][1] == set(by_age[40:]) | {keep.pk}
    assert steps[1][1] == set(by_age[80:]) | {keep.pk}
    assert steps[3][1] == {keep.pk}


def test_concurrent_prunes_share_the_work_without_waiting_on_each_other():
    keep = make_run("SUCCESSFUL")  # finished now: a template row, kept
    old_copies_of_the_run(keep.pk, 3000)

    async def four_processes():
        pools = [db.make_pool("default", 1, f"test-prune-{i}") for i in range(4)]
        for pool in pools:
            await pool.open()
        try:
            which = retention.PruneFilter(86400)
            return await asyncio.gather(*(
                retention.aprune(pool, which, batch=50, max_batches=100) for pool in pools))
        finally:
            for pool in pools:
                await pool.close()

    counts = asyncio.run(four_processes())
    assert sum(counts) == 3000  # each row deleted once, none left, no deadlock or error
    assert TaskRun.objects.count() == 1


def test_status_shows_queues_workers_and_failing_tasks(history):
    now = timezone.now()
    Worker.objects.create(id="web-1-abc", hostname="web-1", pid=42, queues=["default"],
                          concurrency=10, started_at=now, last_seen_at=now)
    finished("FAILED", timedelta(minutes=5), task="tests.testapp.tasks.boom")
    out, _ = call("status")
    lines = out.splitlines()
    assert lines[0].startswith("database default: ") and "READY 1" in lines[0]
    header = next(line for line in lines if line.startswith("queue "))
    assert header.split() == ["queue", "ready", "waiting", "blocked", "running", "state",
                              "done", "5m", "failed", "5m"]
    default = next(line for line in lines if line.startswith("default "))
    assert default.split()[:5] == ["default", "1", "1", "0", "1"]
    assert any(line.startswith("emails ") for line in lines)
    assert "workers: 1 (no beat leader)" in out and "web-1-abc" in out
    assert "tests.testapp.tasks.boom" in out and "failing in the last 24 h:" in out

    doc = json.loads(call("status", "--json")[0])
    assert {q["name"] for q in doc["queues"]} >= {"default", "emails"}
    assert doc["workers"]["count"] == 1
    with pytest.raises(CommandError, match="unrecognized arguments"):
        call("status", "--nope")


def test_replay_copies_runs_by_id_and_the_recent_failures():
    failed = finished("FAILED", timedelta(minutes=10), args=[3, 4])
    cancelled = finished("CANCELLED", timedelta(minutes=20), args=[5, 6], queue="emails")
    old_failed = finished("FAILED", timedelta(days=2), args=[7, 8])
    ok = finished("SUCCESSFUL", timedelta(minutes=1), args=[9, 9])

    out, _ = call("replay", "--failed-since", "1h", "--dry-run")
    assert out.startswith("would copy 2 runs") and str(failed.pk) in out
    assert TaskRun.objects.count() == 4

    out, _ = call("replay", "--failed-since", "1h", "--queue", "emails")
    new = TaskRun.objects.exclude(pk__in=[failed.pk, cancelled.pk, old_failed.pk, ok.pk])
    assert [(r.parent_id, r.status, r.queue_name, r.args) for r in new] == [
        (cancelled.pk, "READY", "emails", [5, 6])]
    assert f"{cancelled.pk} -> {new[0].pk}" in out and "1 of 1 runs copied" in out

    # By id, any state; --failed-only refuses the successful one and says so.
    out, _ = call("replay", "--id", str(ok.pk))
    assert "1 of 1 runs copied" in out
    with pytest.raises(CommandError, match="1 of the given runs do not exist or did not fail"):
        call("replay", "--id", str(ok.pk), "--id", str(old_failed.pk), "--failed-only")
    assert TaskRun.objects.filter(parent_id=old_failed.pk, status="READY").count() == 1


@pytest.mark.parametrize(("argv", "message"), [
    ([], "one of the arguments --id --failed-since is required"),
    (["--id", "abc"], "is not a run id"),
    (["--id", "0"], "is not a run id"),
    (["--id", "1", "--failed-since", "1h"], "not allowed with argument"),
    (["--failed-since", "soon"], "is not a duration"),
    (["--failed-since", "1h", "--queue", "bad name"], "invalid queue name"),
    (["--failed-since", "1h", "--limit", "0"], "must be >= 1"),
    (["--failed-since", "1h", "--limit", "20000"], "--limit is at most 10000"),
    (["--id", "1", "--task", "tests.testapp.tasks.add"], "with --failed-since, not with --id"),
    (["--id", "987654321"], "1 of the given runs do not exist"),
], ids=repr)
def test_replay_rejects_bad_input_and_copies_nothing(argv, message):
    finished("FAILED", timedelta(minutes=10))
    before = ids()
    with pytest.raises(CommandError, match=message):
        call("replay", *argv)
    assert ids() == before


def test_reclaim_returns_expired_leases_now():
    past = timezone.now() - timedelta(minutes=5)
    stuck = make_run("RUNNING", leased_until=past, lease_owner="w-dead", max_attempts=3)
    spent = make_run("RUNNING", leased_until=past, lease_owner="w-dead", max_attempts=1)
    live = make_run("RUNNING")
    Worker.objects.create(id="w-dead", hostname="h", pid=1, queues=["default"], concurrency=1,
                          started_at=past, last_seen_at=timezone.now() - timedelta(hours=1))

    out, _ = call("reclaim")
    assert out.startswith("2 runs with expired leases: 1 back to READY, 1 failed")
    assert "1 dead worker rows removed" in out
    states = dict(TaskRun.objects.values_list("pk", "status"))
    assert states == {stuck.pk: "READY", spent.pk: "FAILED", live.pk: "RUNNING"}
    out, _ = call("reclaim")
    assert out.startswith("0 runs with expired leases")
    with pytest.raises(CommandError, match="unrecognized arguments"):
        call("reclaim", "--all")


def doctor_lines(*argv: str) -> dict[str, tuple[str, str]]:
    """{topic: (level, detail + hint)} of a doctor run that must not fail."""
    out, _ = call("doctor", *argv)
    assert out.rstrip().splitlines()[-1].startswith("doctor: no failures")
    return _parse_doctor(out)


def _parse_doctor(out: str) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    topic = ""
    for line in out.splitlines():
        if line.startswith(("ok ", "warn ", "FAIL ")):
            level, rest = line.split(None, 1)
            words = rest.split("  ", 1)
            topic = words[0].strip()
            found[topic] = (level, words[1].strip() if len(words) > 1 else "")
        elif "-> " in line and topic:
            level, text = found[topic]
            found[topic] = (level, text + " " + line.split("-> ", 1)[1])
    return found


def test_doctor_passes_on_a_healthy_installation():
    found = doctor_lines()
    assert {k: v[0] for k, v in found.items()} == {
        "settings": "ok", "database": "ok", "migrations": "ok", "tables": "ok", "run ids": "ok",
        "runtimes": "ok", "leases": "ok", "backlog": "ok", "beat": "ok", "queues": "ok",
        "listen/notify": "ok", "connection mode": "ok", "clock": "ok"}
    assert "PostgreSQL" in found["database"][1]


def test_doctor_warns_about_what_keeps_tasks_from_running():
    from reproq import control
    from reproq.models import PeriodicTask

    long_ago = timezone.now() - timedelta(minutes=20)
    make_run("READY", run_after=long_ago)
    make_run("RUNNING", leased_until=long_ago, lease_owner="w-gone")
    control.set_paused("emails", True, reason="maintenance")
    PeriodicTask.objects.create(name="nightly", cron_expr="0 3 * * *",
                                task_path="tests.testapp.tasks.add")
    found = doctor_lines()
    warned = {k: v[1] for k, v in found.items() if v[0] == "warn"}
    assert set(warned) == {"runtimes", "leases", "backlog", "beat", "queues"}
    assert "nothing runs them" in warned["runtimes"]
    assert "1 running runs hold leases that expired" in warned["leases"]
    assert "manage.py reproq reclaim" in warned["leases"]
    assert "has waited 1,2" in warned["backlog"]
    assert "1 enabled schedules and no live beat leader" in warned["beat"]
    assert "paused: emails" in warned["queues"] and "resume-queue" in warned["queues"]
    with pytest.raises(CommandError, match="doctor: 0 failed, 5 warnings"):
        call("doctor", "--strict")


def test_doctor_warns_about_ready_runs_in_queues_no_live_runtime_serves():
    now = timezone.now()
    Worker.objects.create(id="w-live", hostname="h", pid=1, queues=["default", "emails"],
                          concurrency=1, started_at=now, last_seen_at=now)
    Worker.objects.create(id="w-stale", hostname="h", pid=2, queues=["reports", "lost-queue"],
                          concurrency=1, started_at=now - timedelta(hours=2),
                          last_seen_at=now - timedelta(hours=1))
    Worker.objects.create(id="w-odd", hostname="h", pid=3, queues={"not": "a list"},
                          concurrency=1, started_at=now, last_seen_at=now)
    for _ in range(3):
        make_run("READY", "default")
    make_run("READY", "emails")
    for _ in range(2):
        make_run("READY", "reports")
    make_run("READY", "lost-queue", "hand.written.task")
    make_run("WAITING", "elsewhere")  # not READY: not reported
    make_run("FAILED", "gone")
    found = doctor_lines()
    level, text = found["served queues"]
    assert level == "warn"
    assert "3 READY runs in 2 queues that no live runtime serves" in text, text
    assert "reports (2), lost-queue (1)" in text, text
    assert "default" not in text and "emails" not in text and "elsewhere" not in text
    assert "--queues" in text  # says what to do
    assert found["backlog"][0] == "ok"  # the backlog alone does not see it
    with pytest.raises(CommandError, match="warnings"):
        call("doctor", "--strict")

    Worker.objects.filter(pk="w-live").update(queues=["default", "emails", "reports",
                                                      "lost-queue"])
    found = doctor_lines()
    assert found["served queues"][0] == "ok"


def test_doctor_fails_on_a_renamed_run_sequence_and_on_bad_input():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ALTER SEQUENCE reproq_task_runs_id_seq RENAME TO renamed_by_hand")
    try:
        out = StringIO()
        with pytest.raises(CommandError, match="doctor: 1 failed"):
            call_command("reproq", "doctor", stdout=out)
        found = _parse_doctor(out.getvalue())
        assert found["run ids"][0] == "FAIL"
        assert "every enqueue fails" in found["run ids"][1]
        assert "RENAME TO reproq_task_runs_id_seq" in found["run ids"][1]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER SEQUENCE renamed_by_hand RENAME TO reproq_task_runs_id_seq")
    for command in ("doctor", "status", "reclaim", "prune", "replay"):
        with pytest.raises(CommandError, match="'nope' is not a database alias"):
            call(command, "--database", "nope", *(
                ["--older-than", "1d"] if command == "prune" else
                ["--id", "1"] if command == "replay" else []))


def test_doctor_fails_on_invalid_address_settings(settings, monkeypatch):
    settings.REPROQ_ALLOWED_CIDRS = ["10.0.0.0/8", "10.0.0.300/32"]
    monkeypatch.setenv("REPROQ_TRUSTED_PROXIES", "127.0.0.1,proxy.internal")
    out = StringIO()
    with pytest.raises(CommandError, match="doctor: 2 failed"):
        call_command("reproq", "doctor", stdout=out)
    text = out.getvalue()
    assert "FAIL  settings" in text
    assert "REPROQ_ALLOWED_CIDRS: invalid network '10.0.0.300/32'" in text
    assert "REPROQ_TRUSTED_PROXIES (from env REPROQ_TRUSTED_PROXIES): invalid network " \
           "'proxy.internal'" in text


def test_cli_cancel_reads_run_ids_strictly():
    run = make_run("READY")
    for raw in ("\u0661", "\u00b2", "0", "9223372036854775808", "1_0"):
        with pytest.raises(CommandError, match="run id"):
            call("cancel", "--id", raw)
    assert TaskRun.objects.get(pk=run.pk).status == "READY"
    out, _ = call("cancel", "--id", str(run.pk), "--id", str(run.pk))
    assert "1 of 1 runs were active" in out


def test_triage_groups_recent_failures_by_task_and_error():
    def failure(task: str, error: str, message: str, age: timedelta) -> TaskRun:
        return finished("FAILED", age, task=task, errors=[{
            "exception_class_path": error, "attempt": 1, "worker_id": "w",
            "traceback": f"Traceback (most recent call last):\n  File x\n{message}\n"}])

    add, boom = "tests.testapp.tasks.add", "tests.testapp.tasks.boom"
    for minutes in (5, 6, 7):
        failure(boom, "builtins.ValueError", f"ValueError: bad {minutes}",
                timedelta(minutes=minutes))
    newest = failure(boom, "builtins.KeyError", "KeyError: 'x'", timedelta(minutes=1))
    failure(add, "builtins.ValueError", "ValueError: add", timedelta(minutes=2))
    finished("CANCELLED", timedelta(minutes=3), task=add)
    finished("FAILED", timedelta(minutes=4), task=add, errors={"by": "hand"})  # not an array
    failure(boom, "builtins.ValueError", "ValueError: old", timedelta(days=3))

    out, _ = call("triage")
    blocks = [b.strip().splitlines() for b in out.split("\n\n")[1:]]
    heads = [b[0].split() for b in blocks]
    assert heads[0] == ["3", boom, "builtins.ValueError"]
    assert sorted(map(tuple, heads[1:])) == sorted([
        ("1", boom, "builtins.KeyError"), ("1", add, "builtins.ValueError"),
        ("1", add, "CANCELLED"), ("1", add, "(no", "error", "recorded)")])
    assert blocks[0][2].strip() == "ValueError: bad 5"  # the newest example's last line
    keyerror = next(b for b in blocks if "builtins.KeyError" in b[0])
    assert f"(newest: run {newest.pk})" in keyerror[1] and keyerror[2].strip() == "KeyError: 'x'"
    assert blocks[0][-1].strip() == (
        f"replay: python manage.py reproq replay --failed-since 86400s --task {boom}")

    out, _ = call("triage", "--task", add, "--since", "150s", "--limit", "5")
    assert [line.split()[:3] for line in out.splitlines() if line[:6].strip().isdigit()] == [
        ["1", add, "builtins.ValueError"]]
    out, _ = call("triage", "--since", "30s")
    assert out.startswith("no failed, cancelled or expired runs in the last 30s")


@pytest.mark.parametrize(("argv", "message"), [
    (["--since", "yesterday"], "is not a duration"),
    (["--limit", "0"], "must be >= 1"),
    (["--queue", "bad name"], "invalid queue name"),
    (["--database", "nope"], "is not a database alias"),
], ids=repr)
def test_triage_rejects_bad_input(argv, message):
    with pytest.raises(CommandError, match=message):
        call("triage", *argv)


def test_commands_on_a_database_without_the_runs_table_say_so_without_a_traceback():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE reproq_task_runs RENAME TO reproq_task_runs_away")
    try:
        for argv in (["status"], ["triage"], ["prune", "--older-than", "1d"],
                     ["prune", "--older-than", "1d", "--dry-run"], ["reclaim"],
                     ["replay", "--id", "1"], ["replay", "--failed-since", "1h"]):
            with pytest.raises(CommandError, match=r'relation "reproq_task_runs" does not '
                               r"exist.*manage.py reproq doctor"):
                call(*argv)
        out = StringIO()
        with pytest.raises(CommandError, match="doctor: 1 failed"):
            call_command("reproq", "doctor", stdout=out)
        found = _parse_doctor(out.getvalue())
        assert found["tables"][0] == "FAIL" and "reproq_task_runs" in found["tables"][1]
        assert "run ids" not in found and "runtimes" not in found  # they need the table
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE reproq_task_runs_away RENAME TO reproq_task_runs")


def test_old_schedule_ticks_behind_their_schedule_are_deleted():
    from reproq.models import PeriodicTask, ScheduleTick

    now = timezone.now()
    moving = PeriodicTask.objects.create(name="hourly", cron_expr="0 * * * *",
                                         task_path="tests.testapp.tasks.add")
    stuck = PeriodicTask.objects.create(name="stuck", cron_expr="0 * * * *",
                                        task_path="tests.testapp.tasks.add")
    PeriodicTask.objects.filter(pk=stuck.pk).update(next_run_at=now - timedelta(days=30))

    def tick(schedule, age: timedelta) -> ScheduleTick:
        return ScheduleTick.objects.create(schedule=schedule, scheduled_for=now - age)

    old = [tick(moving, timedelta(days=d)) for d in (20, 21, 22)]
    recent = tick(moving, timedelta(hours=1))
    ahead_of_next = tick(stuck, timedelta(days=20))  # not behind its next_run_at: kept
    behind = tick(stuck, timedelta(days=40))

    async def prune_ticks():
        pool = db.make_pool("default", 1, "test-ticks")
        await pool.open()
        try:
            first = await retention.aprune_ticks(pool, 14 * 86400, batch=2)
            rest = await retention.aprune_ticks(pool, 14 * 86400, batch=100)
            return first, rest
        finally:
            await pool.close()

    first, rest = asyncio.run(prune_ticks())
    assert first == 2 and first + rest == 4
    left = set(ScheduleTick.objects.values_list("pk", flat=True))
    assert left == {recent.pk, ahead_of_next.pk}
    assert not {t.pk for t in old} & left and behind.pk not in left


@pytest.mark.parametrize("command", [["beat", "--once"], ["schedule"], ["worker"]], ids=repr)
@pytest.mark.parametrize("worker_id", ["\udcff", "a\udc80b", "a\x00b", "tab\there", "",
                                       "x" * 65], ids=repr)
def test_a_worker_id_that_no_database_can_store_is_a_usage_error(command, worker_id):
    """A lone surrogate (what a non-UTF-8 argv byte becomes), a control character or a wrong
    length: refused by the parser, before anything runs (the fuzz suite found a
    UnicodeEncodeError traceback from `schedule --worker-id $'\\xff'`)."""
    with pytest.raises(CommandError, match="--worker-id"):
        call_command("reproq", *command, "--worker-id", worker_id)
    assert not Worker.objects.exists()


@pytest.mark.parametrize("argv", [
    ["prune", "--older-than", "1d", "--task", "\udcff"],
    ["triage", "--task", "a\udc80"],
    ["replay", "--failed-since", "1h", "--task", "\udcff"],
    ["pause-queue", "default", "--reason", "caf\udce9"],
    ["limit", "rm", "queue:\udcff"],
], ids=repr)
def test_argv_text_that_is_not_utf8_is_a_usage_error_and_changes_nothing(argv):
    """Bytes of argv that are not UTF-8 arrive as lone surrogates, which no database driver
    can send (the fuzz suite found UnicodeEncodeError tracebacks)."""
    make_run("FAILED", finished_at=timezone.now() - timedelta(days=3))
    before = list(TaskRun.objects.order_by("pk").values_list("pk", "status"))
    with pytest.raises(CommandError, match="not valid UTF-8"):
        call_command("reproq", *argv)
    assert list(TaskRun.objects.order_by("pk").values_list("pk", "status")) == before
    from reproq.models import QueueControl

    assert not QueueControl.objects.filter(paused=True).exists()
