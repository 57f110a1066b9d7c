"""Fuzz: cron strings (reproq.recurring, croniter) wherever schedules are parsed: arbitrary text
gives InvalidSchedule / ValidationError with a message, never another exception, never a hang;
a schedule that parses fires strictly after any moment, and the beat's plan never fails."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.exceptions import ValidationError
from hypothesis import given
from hypothesis import strategies as st

from reproq.cli.pg_cron import pg_cron_expression
from reproq.models import PeriodicTask
from reproq.recurring import (
    CronSchedule,
    InvalidSchedule,
    plan,
    recurring,
    validate_schedule,
)
from tests.fuzz.strategies import bounded, text

BOUND = 2.0  # seconds: any parse, plan or validation slower than this counts as a hang

NAMES = ["jan", "feb", "dec", "JAN", "mon", "sun", "SAT", "fri", "xyz"]


def field() -> Any:
    number = st.one_of(st.integers(min_value=0, max_value=61).map(str),
                       st.integers(min_value=-5, max_value=10**6).map(str),
                       st.sampled_from(NAMES), st.just("99999999999999999999"))
    atom = st.one_of(
        st.just("*"), st.just("?"), st.just("L"), st.just("H"), number,
        st.builds(lambda a, b: f"{a}-{b}", number, number),
        st.builds(lambda a, s: f"{a}/{s}", st.sampled_from(["*", "0", "5", "1-30", "H"]),
                  number),
        st.builds(lambda a, b: f"{a}#{b}", number, number),
        st.builds(lambda a: f"{a}W", number), st.builds(lambda a: f"{a}L", number),
        st.builds(lambda a, b: f"H({a}-{b})", number, number),
    )
    return st.lists(atom, min_size=1, max_size=4).map(",".join)


def cron_text() -> Any:
    """Cron-shaped text (4 to 8 fields of cron atoms), the aliases, and arbitrary text."""
    shaped = st.lists(field(), min_size=4, max_size=8).map(" ".join)
    aliases = st.sampled_from(["@yearly", "@annually", "@monthly", "@weekly", "@daily",
                               "@midnight", "@hourly", "@reboot", "@every 5m", "@HOURLY",
                               "@", "@@daily"])
    return st.one_of(shaped, aliases, text(max_size=40),
                     st.builds(lambda a, b: f"{a} {b}", shaped, text(max_size=8)))


def timezone_text() -> Any:
    return st.one_of(st.none(), st.just(""), st.timezone_keys(),
                     st.sampled_from(["UTC", "Europe/Paris", "America/Mazatlan",
                                      "Australia/Lord_Howe", "Pacific/Chatham", "Etc/GMT+14",
                                      "../../etc/passwd", "/etc/localtime", "Europe/../UTC",
                                      "nope/zone", "\x00", "UTC\x00"]),
                     text(max_size=20))


moments = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                       timezones=st.just(dt.UTC))


@given(cron_text(), timezone_text())
def test_any_cron_string_parses_or_is_refused_with_invalid_schedule(expr, tz):
    with bounded(BOUND, f"CronSchedule.parse({expr!r}, {tz!r})"):
        try:
            schedule = CronSchedule.parse(expr, tz)
        except InvalidSchedule as exc:
            assert str(exc)
            return
    assert isinstance(schedule, CronSchedule)


@given(cron_text(), timezone_text(), moments, moments,
       st.sampled_from(["run_once", "skip"]), st.floats(min_value=0, max_value=10**6))
def test_a_parsed_schedule_fires_after_any_moment_and_plans_without_error(
        expr, tz, moment, now, misfire, grace):
    """What the beat does with a schedule that passed validation: next_after is strictly
    later, latest_at_or_before is not later, and plan() decides (or raises InvalidSchedule)."""
    try:
        schedule = CronSchedule.parse(expr, tz)
    except InvalidSchedule:
        return
    with bounded(BOUND, f"schedule {expr!r} in {tz!r}"):
        try:
            fire = schedule.next_after(moment)
        except InvalidSchedule:
            return
        assert fire > moment and fire.utcoffset() == dt.timedelta(0)
        latest = schedule.latest_at_or_before(moment)
        assert latest is None or latest <= moment
        try:
            decided = plan(1, schedule, moment, misfire, now, grace)
        except InvalidSchedule:
            return
        assert decided.next_run_at > min(moment, now)


@given(cron_text(), timezone_text(), text(max_size=30), text(max_size=20))
def test_the_schedule_form_refuses_any_bad_field_with_a_validation_error(expr, tz, name, queue):
    """PeriodicTask.clean() (the admin form) and save(): a ValidationError by field."""
    obj = PeriodicTask(name=name, cron_expr=expr, timezone=tz or "",
                       task_path="tests.testapp.tasks.add", args=[1, 2], kwargs={},
                       queue_name=queue)
    with bounded(BOUND, f"validate_schedule({expr!r}, {tz!r})"):
        try:
            validate_schedule(obj)
        except ValidationError as exc:
            assert exc.message_dict
            assert all(msgs for msgs in exc.message_dict.values())


@given(cron_text(), timezone_text())
def test_recurring_refuses_a_bad_schedule_at_declaration(expr, tz):
    with bounded(BOUND, f"@recurring({expr!r})"):
        try:
            decorate = recurring(expr, key="fuzz", timezone=tz or None)
        except InvalidSchedule:
            return
    assert callable(decorate)


@given(cron_text())
def test_pg_cron_expression_accepts_any_text(expr):
    out = pg_cron_expression(expr)
    assert out is None or len(out.split(" ")) == 5
