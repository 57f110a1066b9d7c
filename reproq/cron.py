"""Cron schedules without a database: parsing, next fires, and what the beat does with a due one.

A `PeriodicTask` row (`reproq.models`) is a cron expression in a time zone plus a task call; the
beat leader (`reproq.runtime.beat`) enqueues each due fire exactly once. This module holds
everything about *when* a schedule fires. It uses no model and no database; the only Django it
reads is ``settings.TIME_ZONE``, the zone of a schedule that names none.

- `CronSchedule`: croniter over a zoneinfo time zone. Five fields (minute hour day month
  weekday), six with **seconds as the last field**, seven with a year, and the ``@hourly`` style
  aliases - whatever croniter accepts. Fires are computed in the schedule's zone and stored in
  UTC; across DST transitions croniter's semantics apply (docs/schedules.md).
- `plan()`: what the beat does with one due schedule - fire it, catch up, or apply the misfire
  policy after downtime.
- The misfire (`RUN_ONCE`, `SKIP`) and overlap (`ALLOW`, `SKIP`) policies.

Validation of whole schedules, ``@recurring`` and the sync of code schedules to the database
are `reproq.schedules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

RUN_ONCE = "run_once"
SKIP = "skip"
ALLOW = "allow"
MISFIRE_POLICIES = (RUN_ONCE, SKIP)
OVERLAP_POLICIES = (ALLOW, SKIP)
DEFAULT_MISFIRE = RUN_ONCE
DEFAULT_OVERLAP = ALLOW

CRON_HINT = ("use 5 fields (minute hour day month weekday), 6 with seconds as the last field, "
             "or an alias such as @hourly, @daily, @weekly, @monthly, @yearly")


class InvalidSchedule(ValueError):
    """A cron expression or time zone that cannot be used."""


# --------------------------------------------------------------------------- time zones, cron


def default_timezone_name() -> str:
    """The zone of a schedule that names none: settings.TIME_ZONE, else UTC."""
    from django.conf import settings

    return getattr(settings, "TIME_ZONE", None) or "UTC"


def resolve_timezone(name: str | None) -> ZoneInfo:
    """The zone called `name` ('' or None: settings.TIME_ZONE); InvalidSchedule if unknown."""
    name = name or default_timezone_name()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        # OSError: a name that is a directory of the tz database ("Europe") or longer than the
        # file system allows.
        raise InvalidSchedule(f"unknown time zone {name!r}: use an IANA name such as "
                              "'Europe/Paris', 'America/New_York' or 'UTC'") from None


@dataclass(frozen=True)
class CronSchedule:
    """A validated cron expression in a time zone; fires come back as aware UTC datetimes."""

    expr: str
    tz: ZoneInfo

    @classmethod
    def parse(cls, expr: str, tz_name: str | None = None) -> CronSchedule:
        tz = resolve_timezone(tz_name)
        if not isinstance(expr, str) or not expr.strip():
            raise InvalidSchedule(f"an empty cron expression is not valid: {CRON_HINT}")
        expr = " ".join(expr.split())
        schedule = cls(expr, tz)
        try:
            schedule.next_after(datetime.now(UTC))
        except InvalidSchedule:
            raise
        except Exception as exc:  # croniter raises ValueError subclasses and a few others
            raise InvalidSchedule(f"{expr!r} is not a valid cron expression ({exc}): "
                                  f"{CRON_HINT}") from None
        return schedule

    def _iter(self, start: datetime) -> Any:
        from croniter import croniter

        return croniter(self.expr, start.astimezone(self.tz))

    def next_after(self, moment: datetime) -> datetime:
        """The first fire strictly after `moment` (an aware datetime)."""
        from croniter import CroniterBadDateError

        try:
            fire = self._iter(moment).get_next(datetime)
        except CroniterBadDateError as exc:
            raise InvalidSchedule(f"{self.expr!r} never fires ({exc})") from None
        return fire.astimezone(UTC)

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last fire at or before `moment`, or None if the expression never fired before."""
        from croniter import CroniterBadDateError

        probe = moment + timedelta(microseconds=1)
        try:
            fire = self._iter(probe).get_prev(datetime)
        except (CroniterBadDateError, ValueError):
            return None
        fire = fire.astimezone(UTC)
        return fire if fire <= moment else None

    def fires_between(self, start: datetime, end: datetime, limit: int = 10_000) -> list[datetime]:
        """Fires in (start, end], at most `limit` of them (for docs, tests and dry runs)."""
        out: list[datetime] = []
        it = self._iter(start)
        while len(out) < limit:
            fire = it.get_next(datetime).astimezone(UTC)
            if fire > end:
                break
            out.append(fire)
        return out


# --------------------------------------------------------------------------- the beat's plan


@dataclass(frozen=True)
class Plan:
    """What to do with one due schedule in one FIRE statement.

    `expected` is the next_run_at that was read (the statement only applies if it is still
    there: a compare-and-set that keeps two beats from acting on the same state); `fire` says
    whether a tick is recorded for `scheduled_for`; `next_run_at` is written either way.
    """

    schedule_id: int
    expected: datetime | None
    fire: bool
    scheduled_for: datetime | None
    next_run_at: datetime
    reason: str = "due"


def plan(schedule_id: int, schedule: CronSchedule, next_run_at: datetime | None,
         misfire_policy: str, now: datetime, grace_seconds: float) -> Plan:
    """Decide what happens to a schedule whose next_run_at is due (or unset) at `now`.

    - unset next_run_at: no fire, set it to the next fire after now;
    - due by at most `grace_seconds`: fire it (``scheduled_for = next_run_at``) and move to the
      fire after it - fires missed during a leader failover are caught up one by one;
    - due by more (downtime): ``run_once`` fires once, for the most recent missed fire, and
      ``skip`` fires nothing; both move next_run_at to the first fire after now.
    """
    if next_run_at is None:
        return Plan(schedule_id, None, False, None, schedule.next_after(now), "initialised")
    late = (now - next_run_at).total_seconds()
    if late <= grace_seconds:
        return Plan(schedule_id, next_run_at, True, next_run_at,
                    schedule.next_after(next_run_at), "due")
    latest = schedule.latest_at_or_before(now)
    if latest is None or latest < next_run_at:
        latest = next_run_at  # a "run now" time, or a schedule edited since
    following = schedule.next_after(max(latest, now))
    if misfire_policy == SKIP:
        return Plan(schedule_id, next_run_at, False, None, following,
                    f"misfire skipped: {late:.0f}s late")
    return Plan(schedule_id, next_run_at, True, latest, following,
                f"misfire run once: {late:.0f}s late")
