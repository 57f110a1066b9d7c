"""Cron schedules and the leader-elected beat, against real PostgreSQL.

The long test (`test_three_runtimes_failover_every_tick_once`) runs three worker processes for
over 100 seconds-resolution ticks while leaders are SIGKILLed and their lock connections
terminated; everything else is short.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from reproq import db, recurring
from reproq.conf import load_runtime_settings
from reproq.models import PeriodicTask, ScheduleTick, TaskRun, Worker
from reproq.recurring import CronSchedule, InvalidSchedule, plan
from tests.beat_helpers import (
    BEAT_OVERRIDES,
    ago,
    beat_env,
    beat_once,
    holder,
    make_schedule,
    runs_of,
    set_next,
    ticks,
    wait_holder,
)
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.servers import REPO_ROOT, child_env, wait_until
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

BERLIN = ZoneInfo("Europe/Berlin")
YEARLY = "0 0 1 1 *"
REPORT = Path(os.environ.get("REPROQ_BEAT_REPORT", "/tmp/reproq_beat_report.json"))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _report(key: str, value: object) -> None:
    """Measurements for the final note (failover times, statement counts)."""
    try:
        data = json.loads(REPORT.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = value
    REPORT.write_text(json.dumps(data, indent=2, default=str))




@pytest.fixture(params=["advisory", "lease"])
def leader(request, monkeypatch):
    """Run the test with each peer (REPROQ_LEADER, also passed to children by `beat_env`)."""
    from reproq import conf
    from tests import pgbouncer

    if request.param == "advisory" and pgbouncer.enabled():
        pytest.skip("the advisory lock peer needs a direct connection (a session advisory lock "
                    "and the options startup parameter); through PgBouncer LEADER is 'lease'")
    monkeypatch.setenv("REPROQ_LEADER", request.param)
    conf.reset_cache()
    yield request.param
    monkeypatch.delenv("REPROQ_LEADER")
    conf.reset_cache()


# --------------------------------------------------------------------------- cron semantics


def test_cron_forms_and_utc_storage():
    start = utc(2025, 1, 1, 1, 50, 0)
    assert CronSchedule.parse("*/15 * * * *", "UTC").next_after(start) == utc(2025, 1, 1, 2, 0)
    # six fields: seconds are the LAST field (croniter's convention)
    assert CronSchedule.parse("* * * * * 30", "UTC").next_after(start) == utc(2025, 1, 1, 1, 50,
                                                                               30)
    assert CronSchedule.parse("* * * * * *", "UTC").next_after(start) == utc(2025, 1, 1, 1, 50, 1)
    assert CronSchedule.parse("@hourly", "UTC").next_after(start) == utc(2025, 1, 1, 2, 0)
    assert CronSchedule.parse("@daily", "UTC").next_after(start) == utc(2025, 1, 2)
    # computed in the schedule's zone, returned in UTC
    paris = CronSchedule.parse("0 9 * * *", "Europe/Paris").next_after(start)
    assert paris == utc(2025, 1, 1, 8, 0) and paris.tzinfo is UTC
    assert CronSchedule.parse("* * * * *", "UTC").latest_at_or_before(
        utc(2025, 1, 1, 1, 50, 30)) == utc(2025, 1, 1, 1, 50)


def test_dst_transitions_follow_croniter_semantics():
    """Europe/Berlin: 2025-03-30 02:00 -> 03:00 (spring), 2025-10-26 03:00 -> 02:00 (autumn)."""
    daily = CronSchedule.parse("30 2 * * *", "Europe/Berlin")
    spring = daily.fires_between(utc(2025, 3, 28, 12), utc(2025, 4, 1, 12))
    # 02:30 does not exist on 30 March: croniter fires at the first instant after the gap
    # (03:00 CEST), the other days at 02:30 local.
    assert [f.astimezone(BERLIN).strftime("%d %H:%M %Z") for f in spring] == [
        "29 02:30 CET", "30 03:00 CEST", "31 02:30 CEST", "01 02:30 CEST"]
    autumn = daily.fires_between(utc(2025, 10, 24, 12), utc(2025, 10, 27, 12))
    # 02:30 happens twice on 26 October: croniter fires at both (an hour apart in UTC).
    assert [f.astimezone(BERLIN).strftime("%d %H:%M %Z") for f in autumn] == [
        "25 02:30 CEST", "26 02:30 CEST", "26 02:30 CET", "27 02:30 CET"]
    assert autumn[2] - autumn[1] == timedelta(hours=1)
    # Hourly schedules keep one fire per real hour across both transitions.
    hourly = CronSchedule.parse("0 * * * *", "Europe/Berlin")
    spring_h = hourly.fires_between(utc(2025, 3, 29, 23, 30), utc(2025, 3, 30, 3, 30))
    autumn_h = hourly.fires_between(utc(2025, 10, 25, 22, 30), utc(2025, 10, 26, 2, 30))
    for fires in (spring_h, autumn_h):
        assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(fires))
    assert [f.astimezone(BERLIN).strftime("%H %Z") for f in autumn_h] == [
        "01 CEST", "02 CEST", "02 CET", "03 CET"]
    # Computing each fire afresh from the previous one (what the beat does) gives the same.
    step, fresh = utc(2025, 10, 24, 12), []
    for _ in range(len(autumn)):
        step = daily.next_after(step)
        fresh.append(step)
    assert fresh == autumn
    # and the beat's plan moves from the first 02:30 to the second one
    p = plan(1, daily, autumn[1], "run_once", autumn[1] + timedelta(seconds=1), 60)
    assert (p.fire, p.scheduled_for, p.next_run_at) == (True, autumn[1], autumn[2])


def test_plan_catch_up_and_misfire_policies():
    every_minute = CronSchedule.parse("* * * * *", "UTC")
    now = utc(2025, 1, 1, 12, 10, 30)
    # on time or late within the grace: fire that very tick, then the one after it
    p = plan(1, every_minute, utc(2025, 1, 1, 12, 10), "run_once", now, 60)
    assert (p.fire, p.scheduled_for, p.next_run_at) == (True, utc(2025, 1, 1, 12, 10),
                                                        utc(2025, 1, 1, 12, 11))
    # ten minutes of downtime: run once for the most recent missed fire, or skip them all
    outage = utc(2025, 1, 1, 12, 0)
    p = plan(1, every_minute, outage, "run_once", now, 60)
    assert (p.fire, p.scheduled_for, p.next_run_at) == (True, utc(2025, 1, 1, 12, 10),
                                                        utc(2025, 1, 1, 12, 11))
    p = plan(1, every_minute, outage, "skip", now, 60)
    assert (p.fire, p.scheduled_for, p.next_run_at) == (False, None, utc(2025, 1, 1, 12, 11))
    # unset next_run_at: initialised, nothing fires
    p = plan(1, every_minute, None, "run_once", now, 60)
    assert (p.fire, p.next_run_at) == (False, utc(2025, 1, 1, 12, 11))


# --------------------------------------------------------------------------- validation


def test_invalid_schedules_are_refused_with_clear_messages():
    cases = [
        ({"cron_expr": "61 * * * *"}, "cron_expr", "not a valid cron expression"),
        ({"cron_expr": "every minute"}, "cron_expr", "5 fields"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone", "unknown time zone 'Mars/Olympus_Mons'"),
        ({"task_path": "tests.testapp.tasks.no_such_task"}, "task_path", "cannot be imported"),
        ({"task_path": "os.path.join"}, "task_path", "is not a task"),
        ({"queue_name": "nope"}, "queue_name", "not one of the backend's QUEUES"),
        ({"args": {"a": 1}}, "args", "JSON array"),
        ({"misfire_policy": "sometimes"}, "misfire_policy", "run_once, skip"),
    ]
    for change, field, text in cases:
        values = {"name": f"bad-{field}", "cron_expr": "* * * * *",
                  "task_path": "tests.testapp.tasks.add", **change}
        with pytest.raises(ValidationError) as info:
            PeriodicTask(**values).save()
        assert field in info.value.message_dict, (change, info.value)
        assert text in " ".join(info.value.message_dict[field]), info.value.message_dict
        with pytest.raises(ValidationError):
            PeriodicTask(**values).full_clean()
    assert not PeriodicTask.objects.exists()
    # an existing row stays as it was when an edit is refused
    good = make_schedule("good", "*/5 * * * *")
    before = PeriodicTask.objects.values().get(pk=good.pk)
    good.cron_expr = "99 * * * *"
    with pytest.raises(ValidationError):
        good.save()
    assert PeriodicTask.objects.values().get(pk=good.pk) == before
    with pytest.raises(InvalidSchedule, match="unknown time zone"):
        recurring.recurring("* * * * *", timezone="Nowhere/Land")
    with pytest.raises(InvalidSchedule, match="not a valid cron"):
        recurring.recurring("* * * 13 *")
    with pytest.raises(TypeError, match="above @task"):
        recurring.recurring("* * * * *")(lambda: None)


@pytest.mark.parametrize("name", ["Europe", "America/Argentina", "x" * 300, "Europe/" + "y" * 300])
def test_zone_names_that_are_directories_or_too_long_are_unknown_time_zones(name):
    """ZoneInfo raises OSError for these (IsADirectoryError, ENAMETOOLONG): found by the fuzz
    suite; they are refused like any unknown zone, in the form and by @recurring."""
    with pytest.raises(InvalidSchedule, match="unknown time zone"):
        CronSchedule.parse("* * * * *", name)
    with pytest.raises(InvalidSchedule, match="unknown time zone"):
        recurring.recurring("* * * * *", timezone=name)
    obj = PeriodicTask(name="tz", cron_expr="* * * * *", timezone=name,
                       task_path="tests.testapp.tasks.add")
    with pytest.raises(ValidationError) as info:
        obj.full_clean()
    assert "unknown time zone" in " ".join(info.value.message_dict["timezone"])


def test_defaults_timezone_and_first_fire_on_save():
    s = make_schedule("defaults", "0 3 * * *", timezone="")
    assert s.timezone == "UTC"  # settings.TIME_ZONE
    assert s.next_run_at > timezone.now() and (s.next_run_at.hour, s.next_run_at.minute) == (3, 0)
    assert (s.misfire_policy, s.overlap_policy) == ("run_once", "allow")
    # a new expression moves a future next_run_at; a due one is never moved
    s.cron_expr = "0 4 * * *"
    s.save()
    assert s.next_run_at.hour == 4
    due = ago(30)
    set_next(s, due)
    s.refresh_from_db()
    s.cron_expr = "0 5 * * *"
    s.save()
    s.refresh_from_db()
    assert s.next_run_at == due


def test_runtime_settings_for_the_beat_are_validated():
    rs, problems = load_runtime_settings({"beat_interval_seconds": 5.0,
                                          "leader_timeout_seconds": 6.0})
    assert any("BEAT_INTERVAL_SECONDS" in p.setting for p in problems)
    rs, problems = load_runtime_settings({"misfire_grace_seconds": 5.0})
    assert any("MISFIRE_GRACE_SECONDS" in p.setting for p in problems)
    rs, problems = load_runtime_settings({"beat": "maybe"})
    assert any("BEAT" in p.setting for p in problems)
    rs, problems = load_runtime_settings(environ={"REPROQ_LEADER_TIMEOUT_SECONDS": "20",
                                                  "REPROQ_BEAT": "0"})
    assert not problems and rs.leader_timeout_seconds == 20.0 and rs.beat is False
    rs, problems = load_runtime_settings({"leader": "zookeeper"})
    [bad] = [p for p in problems if "LEADER" in p.setting]
    assert "'zookeeper' is not valid" in bad.message and '"lease"' in bad.hint
    rs, problems = load_runtime_settings(environ={"REPROQ_LEADER": "lease"})
    assert rs.leader == "lease" and rs.sources["leader"] == "env REPROQ_LEADER"
    assert load_runtime_settings(environ={})[0].leader in {"advisory", "lease"}


# --------------------------------------------------------------------------- firing (one process)


def test_due_tick_is_enqueued_once_with_its_schedule_and_statement_count(leader):
    # yearly: after the due fire the next one is far away, so exactly one tick each
    a = make_schedule("count-a", YEARLY, args=[1, 1])
    b = make_schedule("count-b", YEARLY, args=[2, 2], queue_name="emails", priority=7,
                      max_attempts=5)
    c = make_schedule("count-c", YEARLY, args=[3, 3])
    due = ago(5).replace(microsecond=0)
    for s in (a, b, c):
        set_next(s, due)
    before = dict(db.statement_counts)
    outcome = beat_once()
    delta = {k: v - before.get(k, 0) for k, v in db.statement_counts.items()
             if v != before.get(k, 0)}
    assert outcome.led and outcome.fired == 3
    # three due ticks: one poll (also the liveness check) and ONE fire statement for all three
    assert delta.get("BEAT_FIRE") == 1 and delta.get("BEAT_POLL") == 1, delta
    _report(f"statements_three_ticks_once_{leader}", delta)
    for s in (a, b, c):
        [tick] = ticks(s)
        assert tick.scheduled_for == due and tick.run_id is not None
        run = TaskRun.objects.get(pk=tick.run_id)
        s.refresh_from_db()
        assert (s.last_run_id, s.last_run_at) == (run.pk, due)
        assert s.next_run_at > timezone.now() - timedelta(seconds=1)
        assert run.metadata == {"schedule": s.name, "scheduled_for": due.isoformat()}
        assert (run.task_path, run.status) == ("tests.testapp.tasks.add", "READY")
        assert (run.queue_name, run.priority) == (s.queue_name, s.priority)
        assert run.args == s.args and run.max_attempts == (s.max_attempts or 3)
    # nothing due any more: nothing happens
    assert beat_once().fired == 0
    assert ScheduleTick.objects.count() == 3 and TaskRun.objects.count() == 3


def test_tick_runs_have_the_same_columns_as_enqueued_runs():
    """Guards the beat's INSERT against drift from the backend's ENQUEUE statement."""
    enqueued = tasks.add.using(dedup=False).enqueue(1, 2)
    s = make_schedule("parity", YEARLY, args=[1, 2])
    set_next(s, ago(1))
    assert beat_once().fired == 1
    [tick] = ticks(s)
    cols = {f.column for f in TaskRun._meta.concrete_fields}
    by_enqueue = TaskRun.objects.filter(pk=enqueued.id).values(*cols).get()
    by_tick = TaskRun.objects.filter(pk=tick.run_id).values(*cols).get()
    differ = {c for c in cols if by_enqueue[c] != by_tick[c]}
    assert differ <= {"id", "enqueued_at", "run_after", "sort_key", "metadata"}, {
        c: (by_enqueue[c], by_tick[c]) for c in differ}


def test_misfire_policies_after_a_ten_minute_outage():
    once = make_schedule("outage-once", "* * * * *", misfire_policy="run_once")
    skip = make_schedule("outage-skip", "* * * * *", misfire_policy="skip")
    outage = ago(600).replace(second=0, microsecond=0)
    set_next(once, outage)
    set_next(skip, outage)
    started = timezone.now()
    outcome = beat_once()
    assert (outcome.fired, outcome.skipped) == (1, 1)
    [tick] = ticks(once)
    # run once, for the most recent missed minute (not ten runs, not the oldest one)
    assert started - timedelta(minutes=1) < tick.scheduled_for <= timezone.now()
    assert tick.scheduled_for.second == 0 and len(runs_of(once)) == 1
    assert ticks(skip) == [] and runs_of(skip) == []
    for s in (once, skip):
        s.refresh_from_db()
        assert started < s.next_run_at <= timezone.now() + timedelta(minutes=1)
    assert beat_once().fired == 0


def test_fires_missed_within_the_grace_are_caught_up_one_by_one():
    s = make_schedule("catch-up", "* * * * * *")
    start = ago(5).replace(microsecond=0)
    set_next(s, start)
    outcome = beat_once()
    got = [t.scheduled_for for t in ticks(s)]
    assert outcome.fired == len(got) >= 5
    assert got == [start + timedelta(seconds=i) for i in range(len(got))]
    assert sorted(r.metadata["scheduled_for"] for r in runs_of(s)) == [g.isoformat() for g in got]


def test_overlap_policy_skip_and_allow():
    skip = make_schedule("overlap-skip", YEARLY, overlap_policy="skip")
    allow = make_schedule("overlap-allow", YEARLY, overlap_policy="allow")
    busy = tasks.async_sleep.using(dedup=False).enqueue(60)
    TaskRun.objects.filter(pk=busy.id).update(status="RUNNING", lease_owner="someone",
                                              leased_until=timezone.now() + timedelta(hours=1))
    PeriodicTask.objects.filter(pk__in=[skip.pk, allow.pk]).update(last_run_id=busy.id)
    due = timezone.now().replace(microsecond=0)
    set_next(skip, due)
    set_next(allow, due)
    outcome = beat_once()
    assert (outcome.fired, outcome.skipped) == (1, 1)
    [st] = ticks(skip)
    [at] = ticks(allow)
    assert st.scheduled_for == due and st.run_id is None  # recorded as skipped: no run
    assert at.run_id is not None
    skip.refresh_from_db()
    assert skip.last_run_id == int(busy.id)  # still pointing at the active run
    # once the previous run is over, the next fire runs
    TaskRun.objects.filter(pk=busy.id).update(status="SUCCESSFUL", finished_at=timezone.now(),
                                              lease_owner=None, leased_until=None)
    set_next(skip, ago(0.1))
    set_next(allow, timezone.now() + timedelta(hours=1))
    assert beat_once().fired == 1
    [new] = [t for t in ticks(skip) if t.pk != st.pk]  # by pk: the fire may sort before `due`
    assert new.run_id is not None


def test_two_beats_that_both_think_they_lead_enqueue_a_tick_once(leader):
    """No lock, no lease fence involved: two connections of the kind each peer leads on (the
    advisory peer's dedicated lock connection, the lease peer's pool connection) run the same
    FIRE at the same moment. Only the unique tick row keeps the tick single."""
    from reproq.runtime.beat import BEAT_FIRE, standalone
    from reproq.runtime.runtime import build_settings

    s = make_schedule("split-brain", "* * * * * *")
    due = timezone.now().replace(microsecond=0)
    set_next(s, due)
    beats = [standalone(build_settings(BEAT_OVERRIDES), f"brain-{i}") for i in (1, 2)]
    assert {b.peer.kind for b in beats} == {leader}

    async def connect(beat):
        if leader == "advisory":
            return await beat.peer._connect()
        return await db.connect(application_name=f"reproq-{beat.worker_id}")

    async def main():
        conns = [await connect(b) for b in beats]
        try:
            d = beats[0]._due({"id": s.pk, "name": s.name, "cron_expr": s.cron_expr,
                               "timezone": s.timezone, "task_path": s.task_path,
                               "args": s.args, "kwargs": s.kwargs, "max_attempts": None,
                               "misfire_policy": "run_once", "next_run_at": due})
            p = beats[0]._plan(d, timezone.now())
            # hold a transaction in a third session so both FIREs queue up on the row lock
            async with await db.connect() as blocker:
                await blocker.execute("BEGIN")
                await blocker.execute("SELECT 1 FROM reproq_periodic_tasks WHERE id = %s "
                                      "FOR UPDATE", [s.pk])
                both = asyncio.gather(*(b._fire(c, [(d, p)]) for b, c in zip(beats, conns,
                                                                            strict=True)))
                await asyncio.sleep(0.3)
                await blocker.execute("COMMIT")
                results = await both
            # a tick row written earlier also stops a fire whose compare-and-set passes
            await conns[0].execute("UPDATE reproq_periodic_tasks SET next_run_at = %s "
                                   "WHERE id = %s", [due, s.pk])
            again = await beats[0]._fire(conns[0], [(d, p)])
            return [r[0] for r in results], again[0], db.statement_counts["BEAT_FIRE"]
        finally:
            for c in conns:
                await c.close()

    (first, second), again, _ = asyncio.run(main())
    assert sorted([first["applied"], second["applied"]]) == [False, True]
    assert again["applied"] and not again["ticked"] and again["run_id"] is None
    assert len(ticks(s)) == 1 and len(runs_of(s)) == 1
    assert BEAT_FIRE  # the statement under test
    with pytest.raises(IntegrityError), transaction.atomic():
        ScheduleTick.objects.create(schedule=s, scheduled_for=due)


def test_run_now_and_a_broken_row_do_not_stop_the_beat():
    s = make_schedule("run-now", "0 0 1 1 *")  # yearly: far away
    broken = make_schedule("broken", "* * * * *")
    PeriodicTask.objects.filter(pk=broken.pk).update(cron_expr="not a cron",
                                                     next_run_at=ago(1))
    gone = make_schedule("task-gone", YEARLY)
    PeriodicTask.objects.filter(pk=gone.pk).update(task_path="tests.testapp.tasks.vanished",
                                                   next_run_at=ago(1))
    assert recurring.run_now("run-now") == 1
    s.refresh_from_db()
    marked = s.next_run_at
    outcome = beat_once()
    assert outcome.fired == 2  # run-now and task-gone; the broken row is skipped and logged
    [tick] = ticks(s)
    assert tick.scheduled_for == marked
    s.refresh_from_db()
    assert s.next_run_at.year == timezone.now().year + 1  # back on its cron
    assert ticks(broken) == []
    # the run of a task that no longer imports fails readably in the worker (invariant 5)
    [run] = runs_of(gone)

    async def body(rt):
        return await wait_for(str(run.pk))

    done = run_with_runtime(body, beat=False)
    assert done.raw_status == "FAILED" and "vanished" in done.errors[0].traceback


# --------------------------------------------------------------------------- @recurring + sync


@pytest.fixture
def declared():
    keys: list[str] = []

    def declare(schedule: str, key: str, **kwargs):
        recurring.unregister(key)
        recurring.recurring(schedule, key=key, **kwargs)(tasks.add)
        keys.append(key)

    yield declare
    for key in keys:
        recurring.unregister(key)


def test_sync_recurring_creates_updates_and_never_delays_a_due_fire(declared, monkeypatch):
    declared("*/5 * * * *", "code-report", args=[2, 3], misfire="skip")
    call_command("reproq", "sync-recurring")
    s = PeriodicTask.objects.get(name="code-report")
    assert (s.source, s.cron_expr, s.args, s.misfire_policy) == ("code", "*/5 * * * *", [2, 3],
                                                                  "skip")
    assert s.next_run_at > timezone.now()
    # the fire is due (the beat has not fired it yet) when a deploy syncs a new expression
    due = ago(3).replace(microsecond=0)
    set_next(s, due)
    declared(YEARLY, "code-report", args=[2, 3], misfire="skip")
    report = recurring.sync_recurring()
    assert report.updated == ["code-report"]
    s.refresh_from_db()
    assert s.cron_expr == YEARLY and s.next_run_at == due  # not pushed into the future
    assert recurring.sync_recurring().unchanged == ["code-report"]
    assert beat_once().fired == 1
    [tick] = ticks(s)
    assert tick.scheduled_for == due and tick.run_id is not None
    s.refresh_from_db()
    assert (s.next_run_at.month, s.next_run_at.day) == (1, 1)  # then the new expression
    # not declared any more: disabled, history kept
    recurring.unregister("code-report")
    assert recurring.sync_recurring().disabled == ["code-report"]
    s.refresh_from_db()
    assert not s.enabled and len(ticks(s)) == 1
    # an admin-made schedule with the same name is reported, not overwritten
    make_schedule("admin-made", "0 * * * *")
    declared("* * * * *", "admin-made")
    with pytest.raises(CommandError, match="clash"):
        call_command("reproq", "sync-recurring")
    assert PeriodicTask.objects.get(name="admin-made").cron_expr == "0 * * * *"


def test_sync_after_migrate_and_its_switch(declared, monkeypatch):
    from reproq import conf

    declared("0 6 * * *", "after-migrate")
    monkeypatch.setenv("REPROQ_SYNC_RECURRING_ON_MIGRATE", "0")
    conf.reset_cache()
    try:
        recurring.sync_after_migrate(using="default")
        assert not PeriodicTask.objects.filter(name="after-migrate").exists()
        monkeypatch.delenv("REPROQ_SYNC_RECURRING_ON_MIGRATE")
        conf.reset_cache()
        # the post_migrate receiver is connected to the reproq app
        from django.apps import apps
        from django.db.models.signals import post_migrate

        post_migrate.send(sender=apps.get_app_config("reproq"),
                          app_config=apps.get_app_config("reproq"), verbosity=0,
                          interactive=False, using="default", apps=apps, plan=[])
        assert PeriodicTask.objects.get(name="after-migrate").source == "code"
    finally:
        conf.reset_cache()


# --------------------------------------------------------------------------- commands


def test_bad_cli_flags_and_pg_cron_without_the_extension_change_nothing(capsys):
    s = make_schedule("cli", "*/5 * * * *")
    state = PeriodicTask.objects.values().get(pk=s.pk)
    for argv, text in [
        (["pg-cron"], "one of the arguments --install --remove is required"),
        (["pg-cron", "--install", "--remove"], "not allowed with argument"),
        (["beat", "--every", "5"], "unrecognized arguments"),
        (["schedule", "--once"], "unrecognized arguments"),
        (["sync-recurring", "--database", "nope"], "not in DATABASES"),
        (["pg-cron", "--install"], "pg_cron extension is not installed"),
        (["beat", "--once", "--worker-id", "x" * 65], "1 to 64 characters"),
    ]:
        with pytest.raises(CommandError, match=text):
            call_command("reproq", *argv)
    call_command("reproq", "pg-cron", "--install", "--if-supported")
    assert "not installed" in capsys.readouterr().out
    call_command("reproq", "pg-cron", "--install", "--dry-run")
    out = capsys.readouterr().out
    assert "job 'reproq:cli' at '*/5 * * * *'" in out and "INSERT INTO reproq_schedule_ticks" in out
    call_command("reproq", "pg-cron", "--remove", "--if-supported")
    assert PeriodicTask.objects.values().get(pk=s.pk) == state
    assert not ScheduleTick.objects.exists() and not TaskRun.objects.exists()
    # a real command line: argparse's exit status and message
    done = subprocess.run([sys.executable, "-m", "django", "reproq", "pg-cron", "--dry-run"],
                          cwd=REPO_ROOT, env=child_env("t"), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "--install --remove is required" in done.stderr


def test_pg_cron_job_command_enqueues_this_minute_once():
    """What pg_cron would run each minute, executed directly (no pg_cron here)."""
    from reproq.cli.pg_cron import pg_cron_expression, plan_jobs, same_zone

    s = make_schedule("pg", "@hourly", args=[4, 4], overlap_policy="skip")
    make_schedule("pg-seconds", "* * * * * *")
    make_schedule("pg-paris", "0 * * * *", timezone="Europe/Paris")
    jobs, left = plan_jobs(connection, "GMT")
    assert [(j.name, j.cron) for j in jobs] == [("reproq:pg", "0 * * * *")]
    assert len(left) == 2 and "seconds" in left[0] + left[1] and "Europe/Paris" in left[0] + left[1]
    assert pg_cron_expression("@daily") == "0 0 * * *" and pg_cron_expression("@reboot") is None
    assert same_zone("UTC", "GMT") and not same_zone("Europe/Paris", "GMT")
    with connection.cursor() as cur:
        cur.execute(jobs[0].command)
        cur.execute(jobs[0].command)  # the same minute again: nothing new
    [tick] = ticks(s)
    assert tick.scheduled_for == timezone.now().replace(second=0, microsecond=0) or (
        timezone.now() - tick.scheduled_for < timedelta(minutes=1))
    [run] = runs_of(s)
    assert run.pk == tick.run_id and run.args == [4, 4] and run.metadata["via"] == "pg_cron"
    # and the beat firing the same minute does not double it
    set_next(s, tick.scheduled_for)
    assert beat_once().fired == 0 and len(runs_of(s)) == 1


def test_admin_validates_and_runs_now(client):
    from django.contrib.auth.models import User

    User.objects.create_superuser("admin", "a@example.com", "pw")
    client.login(username="admin", password="pw")
    form = {"name": "from-admin", "cron_expr": "61 * * * *", "timezone": "Mars/Base",
            "task_path": "tests.testapp.tasks.nope", "args": "[]", "kwargs": "{}",
            "queue_name": "default", "priority": "0", "misfire_policy": "run_once",
            "overlap_policy": "allow", "enabled": "on"}
    page = client.post("/admin/reproq/periodictask/add/", form)
    assert page.status_code == 200
    text = page.content.decode()
    assert "unknown time zone" in text and "cannot be imported" in text
    assert not PeriodicTask.objects.exists()
    page = client.post("/admin/reproq/periodictask/add/",
                       {**form, "cron_expr": "0 0 1 1 *", "timezone": "",
                        "task_path": "tests.testapp.tasks.add"})
    assert page.status_code == 302, page.content.decode()[:2000]
    s = PeriodicTask.objects.get(name="from-admin")
    assert s.timezone == "UTC" and s.next_run_at > timezone.now() + timedelta(days=1)
    page = client.post("/admin/reproq/periodictask/",
                       {"action": "run_now", "_selected_action": [s.pk]})
    assert page.status_code == 302
    s.refresh_from_db()
    assert s.next_run_at <= timezone.now()
    assert client.get("/admin/reproq/periodictask/").status_code == 200


# --------------------------------------------------------------------------- runtimes


def test_runtime_leads_shows_it_and_releases_leadership_on_shutdown(leader):
    async def body(rt):
        for _ in range(200):
            if rt.peer.is_leader:
                break
            await asyncio.sleep(0.05)
        status = rt.status()["leader"]
        row = await Worker.objects.aget(pk=rt.worker_id)
        return status, row.leader_since, await asyncio.to_thread(holder)

    status, since, lock = run_with_runtime(body, **BEAT_OVERRIDES)
    assert status["is_leader"] and status["role"] == "leader" and status["since"]
    assert status["kind"] == leader
    assert since is not None and since.isoformat() == status["since"]
    assert lock["worker_id"] == status["worker_id"]
    if leader == "advisory":
        assert lock["pid"] == status["lock_backend_pid"]
    else:
        assert status["lease_expires_at"]
    assert holder() is None  # released at shutdown
    assert not Worker.objects.exists()
    assert recurring.current_leader() is None


def test_overlap_skip_with_a_long_running_task():
    s = make_schedule("long-runner", "* * * * * *", task_path="tests.testapp.tasks.async_sleep",
                      args=[1.6], overlap_policy="skip")

    async def body(rt):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = await TaskRun.objects.filter(metadata__schedule=s.name,
                                                status="SUCCESSFUL").acount()
            if done >= 2:
                break
            await asyncio.sleep(0.1)

    run_with_runtime(body, **BEAT_OVERRIDES)
    runs = [r for r in runs_of(s) if r.started_at]
    finished = [r for r in runs if r.status == "SUCCESSFUL"]
    assert len(finished) >= 2
    spans = sorted((r.started_at, r.finished_at or timezone.now()) for r in runs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # no overlap
    skipped = [t for t in ticks(s) if t.run_id is None]
    assert skipped, "fires during a run are recorded as skipped"
    assert len(runs_of(s)) + len(skipped) == len(ticks(s))


def test_once_from_two_processes_at_the_same_time(leader):
    s = make_schedule("crontab", "* * * * * *")
    start = ago(4).replace(microsecond=0)
    set_next(s, start)
    env = child_env("t", {**beat_env(), "REPROQ_AUTOSTART": "0"})
    procs = [subprocess.Popen([sys.executable, "-m", "django", "reproq", *argv], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for argv in (["beat", "--once"], ["schedule"])]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=60)
            outs.append(out)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    got = [t.scheduled_for for t in ticks(s)]
    assert len(got) >= 4 and got == [start + timedelta(seconds=i) for i in range(len(got))], outs
    assert len(runs_of(s)) == len(got) and all(t.run_id for t in ticks(s))
    assert any("enqueued" in o for o in outs), outs
    assert holder() is None and not Worker.objects.exists()


def test_standalone_beat_command_leads_and_once_defers_to_it(servers, leader):
    s = make_schedule("standalone", "* * * * * *")
    env = {**beat_env(), "REPROQ_AUTOSTART": "0"}
    beat = servers.command("beat", ["django", "reproq", "beat", "--worker-id", "the-beat"], env)
    lead, _ = wait_holder(timeout=30)
    assert lead["worker_id"] == "the-beat"
    wait_until(lambda: len(ticks(s)) >= 2, timeout=10, what="ticks", describe=servers.logs)
    assert Worker.objects.get(pk="the-beat").leader_since is not None
    done = subprocess.run([sys.executable, "-m", "django", "reproq", "schedule"], cwd=REPO_ROOT,
                          env=child_env("t", env), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and "the-beat" in done.stdout, done
    assert f"holds the beat leader {'lock' if leader == 'advisory' else 'lease'}" in done.stdout
    if leader == "advisory":
        assert "reproq-beat-the-beat" in done.stdout
    beat.signal(signal.SIGTERM)
    assert beat.wait_exit(15) == 0
    assert holder() is None and not Worker.objects.filter(pk="the-beat").exists()
    got = [t.scheduled_for for t in ticks(s)]
    assert got == [got[0] + timedelta(seconds=i) for i in range(len(got))]
    assert len(runs_of(s)) == len(got)


def test_three_runtimes_failover_every_tick_once(servers, leader):
    """Three worker processes, one leader; every ~8 s the leader is SIGKILLed, loses its lock
    connection to pg_terminate_backend (advisory only: the lease has no connection of its
    own), or hangs (SIGSTOP). Over the seconds-resolution ticks of all these failovers (40 at
    least) every tick is enqueued exactly once. Advisory: a standby takes over within
    LEADER_TIMEOUT_SECONDS (3 s) - a hung leader's
    session is ended by the server's idle_session_timeout. Lease: a dead or hung leader's lease
    runs out after LEADER_TIMEOUT_SECONDS, a standby takes it at its next try. Once resumed, a
    hung leader gives up leadership by its local trust deadline."""
    env = beat_env()
    bound = float(env["REPROQ_LEADER_TIMEOUT_SECONDS"])
    interval = float(env["REPROQ_BEAT_INTERVAL_SECONDS"])
    s = make_schedule("every-second", "* * * * * *", args=[1, 1])
    first_fire = s.next_run_at
    children = [servers.command(f"worker{i}", ["django", "reproq", "worker"], env)
                for i in range(3)]
    by_worker = {}

    def child_of(worker_id):
        if worker_id not in by_worker:
            row = Worker.objects.filter(pk=worker_id).first()
            by_worker[worker_id] = next((c for c in children if row and c.pid == row.pid), None)
        return by_worker[worker_id]

    def one_leader():
        lock = holder()
        leaders = list(Worker.objects.filter(leader_since__isnull=False))
        if lock and [w.id for w in leaders] == [lock["worker_id"]]:
            return lock
        return None

    wait_until(lambda: Worker.objects.count() >= 3, timeout=40, what="three workers",
               describe=servers.logs)
    lead = wait_until(one_leader, timeout=10, what="exactly one leader", describe=servers.logs)
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'reproq-beat-%%'")
        # advisory: one leader, two standbys polling the lock; lease: no connection of its own
        assert cur.fetchone()[0] == (3 if leader == "advisory" else 0)

    failovers = []
    kinds = (["SIGKILL", "pg_terminate_backend", "SIGSTOP", "SIGKILL", "pg_terminate_backend"]
             if leader == "advisory" else ["SIGKILL", "SIGSTOP", "SIGKILL", "SIGSTOP"])
    kinds_tried = list(kinds)
    next_kill = time.monotonic() + 6
    deadline = time.monotonic() + 150
    while kinds or ScheduleTick.objects.filter(schedule=s).count() < 40:
        assert time.monotonic() < deadline, servers.logs()
        if kinds and time.monotonic() >= next_kill:
            kind = kinds.pop(0)
            lead = wait_until(one_leader, timeout=10, what="one leader", describe=servers.logs)
            old_child = child_of(lead["worker_id"])
            if kind in {"SIGKILL", "SIGSTOP"}:
                os.kill(old_child.pid, getattr(signal, kind))
            else:
                with connection.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(%s)", [lead["pid"]])
            new, took = wait_holder(other_than=lead["token"], timeout=bound + 10)
            assert new["worker_id"] != lead["worker_id"], (kind, lead, new)
            failovers.append({"kind": kind, "seconds": round(took, 3),
                              "from": lead["worker_id"], "to": new["worker_id"]})
            if kind == "SIGKILL":
                old_child.proc.wait(timeout=10)
                old_child.stopped = True
                children.append(servers.command(f"worker{len(children)}",
                                                ["django", "reproq", "worker"], env))
            if kind == "SIGSTOP":
                os.kill(old_child.pid, signal.SIGCONT)  # wakes up past its trust deadline
                log = old_child.log_path
                wait_until(lambda log=log: "gave up beat leadership" in log.read_text(),
                           timeout=10, what="the resumed leader to step down",
                           describe=old_child.log_tail)
                assert holder()["token"] == new["token"]
            wait_until(one_leader, timeout=5, what="one leader after failover",
                       describe=servers.logs)
            next_kill = time.monotonic() + 8
        time.sleep(0.1)
    PeriodicTask.objects.filter(pk=s.pk).update(enabled=False)
    time.sleep(1.5)  # a fire in flight when the schedule was disabled lands now

    got = [t.scheduled_for for t in ticks(s)]
    expected = [first_fire + timedelta(seconds=i) for i in range(len(got))]
    missing = sorted(set(expected) - set(got))
    assert got == expected, f"missing {missing[:10]}, {len(got)} ticks\n{servers.logs()}"
    assert len(got) >= 40
    runs = runs_of(s)
    labels = [r.metadata["scheduled_for"] for r in runs]
    assert sorted(labels) == [g.isoformat() for g in got]  # one run per tick, none doubled
    assert sorted(r.pk for r in runs) == sorted(t.run_id for t in ticks(s))
    assert {f["kind"] for f in failovers} == set(kinds_tried)
    # advisory: a dead process or a killed backend within one standby interval; a hung leader
    # within LEADER_TIMEOUT (the server ends its idle session) plus one standby interval.
    # lease: dead or hung, the lease runs out: LEADER_TIMEOUT plus one standby interval.
    # (+1 s of slack for the timeout cases on a loaded machine: measured 3.01 s)
    for f in failovers:
        slow = f["kind"] == "SIGSTOP" or leader == "lease"
        assert f["seconds"] <= (bound + interval + 1 if slow else bound), failovers
    _report(f"failovers_{leader}", failovers)
    _report(f"ticks_checked_{leader}", len(got))
    for kind in set(kinds_tried):
        times = [f["seconds"] for f in failovers if f["kind"] == kind]
        _report(f"failover_{leader}_{kind}_max_seconds", max(times))


# --------------------------------------------------------------------------- the lease's fence


def test_a_stale_lease_leader_cannot_commit_through_its_fence():
    """A leader whose lease was taken over while it still trusts itself (a pause shorter than
    its trust deadline, a clock jump): its `leading()` block raises NotLeader and nothing it
    wrote there commits; the new leader's block works."""
    from reproq.runtime.beat import standalone
    from reproq.runtime.ports import NotLeader
    from reproq.runtime.runtime import build_settings

    s = make_schedule("fenced", YEARLY)
    rs = build_settings({**BEAT_OVERRIDES, "leader": "lease"})
    old, new = (standalone(rs, f"fence-{i}").peer for i in (1, 2))

    async def main():
        async with old.once() as led:
            assert led and old.is_leader
            async with old.leading() as conn:  # while the lease is ours, writes commit
                await conn.execute("UPDATE reproq_periodic_tasks SET priority = 1 "
                                   "WHERE id = %s", [s.pk])
            async with await db.connect() as other:  # the lease runs out; another takes it
                await other.execute("UPDATE reproq_leaders SET expires_at = now() - "
                                    "interval '1 second'")
            async with new.once() as took:
                assert took and old.is_leader  # the old leader's local trust has not run out
                with pytest.raises(NotLeader):
                    async with old.leading() as conn:
                        await conn.execute("UPDATE reproq_periodic_tasks SET priority = 2 "
                                           "WHERE id = %s", [s.pk])
                assert not old.is_leader  # the failed fence ended its belief at once
                async with new.leading() as conn:
                    await conn.execute("UPDATE reproq_periodic_tasks SET priority = 3 "
                                       "WHERE id = %s AND priority = 1", [s.pk])
        await db.close_pools()

    asyncio.run(main())
    s.refresh_from_db()
    assert s.priority == 3  # 1 by the old leader while leading, never 2, then 3 by the new one
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM reproq_leaders")
        assert cur.fetchone()[0] == 0  # both resigned


# --------------------------------------------------------------------------- maintenance


def _expired_run() -> str:
    """A RUNNING run whose lease ran out an hour ago (its worker is gone): reclaim's work."""
    run = tasks.add.using(dedup=False).enqueue(2, 3)
    TaskRun.objects.filter(pk=run.id).update(
        status="RUNNING", lease_owner="gone-worker", attempts=1,
        leased_until=timezone.now() - timedelta(hours=1))
    return str(run.id)


def _hold_leadership_elsewhere(kind: str):
    """Make someone else lead (a held leader lock, or a live lease row of another worker);
    returns a function that gives it up."""
    from reproq.runtime.peers import LEASE_NAME, lock_key_for_alias

    if kind == "lease":
        with connection.cursor() as cur:
            cur.execute("INSERT INTO reproq_leaders (name, worker_id, elected_at, expires_at) "
                        "VALUES (%s, 'elsewhere', now(), now() + interval '1 hour')",
                        [LEASE_NAME])

        def release():  # called in a worker thread: close the connection it opens there
            try:
                with connection.cursor() as cur:
                    cur.execute("DELETE FROM reproq_leaders WHERE worker_id = 'elsewhere'")
            finally:
                connection.close()

        return release
    import psycopg

    lock = psycopg.connect(db.conninfo(application_name="reproq-beat-elsewhere"),
                           autocommit=True)
    lock.execute("SELECT pg_advisory_lock(%s)", [lock_key_for_alias("default")])
    return lock.close


def test_a_standby_leaves_maintenance_to_the_leader_until_it_leads(leader):
    run_id = _expired_run()
    release = _hold_leadership_elsewhere(leader)

    async def body(rt):
        await asyncio.sleep(2.5)  # RECLAIM_SECONDS is 1 in the tests: two or three passes
        standby = (rt.peer.is_leader, rt.reclaimer.passes, rt.reclaimer.skipped,
                   rt.status()["maintenance"]["reason"],
                   await TaskRun.objects.filter(pk=run_id).values_list("status", flat=True)
                   .aget())
        await asyncio.to_thread(release)
        began = time.monotonic()
        done = await wait_for(run_id, timeout=20)  # the new leader reclaims it, then runs it
        return standby, done.raw_status, time.monotonic() - began, rt.reclaimer.passes

    standby, status, took, passes = run_with_runtime(body, **BEAT_OVERRIDES)
    assert standby == (False, 0, standby[2], "another process leads", "RUNNING")
    assert standby[2] >= 2
    assert status == "SUCCESSFUL" and passes >= 1
    _report(f"maintenance_takeover_{leader}_seconds", round(took, 3))


def test_without_a_leader_every_process_runs_maintenance_after_the_fallback():
    """BEAT off everywhere: nobody competes. After 3 x LEADER_TIMEOUT_SECONDS without a live
    leader (counted from the process's start) the runtime runs the sweeps itself."""
    run_id = _expired_run()
    timeout = 1.0
    fallback = 3 * timeout

    async def body(rt):
        began = time.monotonic()
        assert rt.peer is None and rt.status()["leader"]["is_leader"] is False
        await asyncio.sleep(fallback / 2)
        early = await TaskRun.objects.filter(pk=run_id).values_list("status", flat=True).aget()
        reason = rt.status()["maintenance"]["reason"]
        done = await wait_for(run_id, timeout=20)
        return early, reason, done.raw_status, time.monotonic() - began, rt.status()

    early, reason, status, took, final = run_with_runtime(
        body, beat=False, leader_timeout_seconds=timeout, beat_interval_seconds=0.5)
    assert (early, reason) == ("RUNNING", "waiting for a leader")
    assert status == "SUCCESSFUL" and final["maintenance"]["reason"] == "fallback"
    # reclaimed at the first pass past the fallback (RECLAIM_SECONDS = 1 in the tests)
    assert fallback <= took <= fallback + 1 + 5, took
    _report("maintenance_fallback_seconds", round(took, 3))
