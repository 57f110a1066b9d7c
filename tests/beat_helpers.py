"""Helpers for the beat tests: who holds the leader lock, schedules, ticks, a one-shot beat."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from reproq import db
from reproq.models import PeriodicTask, ScheduleTick, TaskRun
from reproq.runtime.beat import (
    LOCK_HOLDER,
    Beat,
    OnceOutcome,
    StandaloneOwner,
    lock_key,
    lock_key_parts,
)

# Fast leadership for tests: failover bound (LEADER_TIMEOUT) 3 s, checks every 0.5 s.
BEAT_ENV = {
    "REPROQ_BEAT": "1",
    "REPROQ_BEAT_INTERVAL_SECONDS": "0.5",
    "REPROQ_LEADER_TIMEOUT_SECONDS": "3",
    "REPROQ_CONCURRENCY": "20",
}
BEAT_OVERRIDES: dict[str, Any] = {"beat": True, "beat_interval_seconds": 0.5,
                                  "leader_timeout_seconds": 3.0}


def holder() -> dict[str, Any] | None:
    """The backend holding the leader lock of the test database: pid, application_name."""
    key = lock_key(str(connection.settings_dict["NAME"]))
    with connection.cursor() as cur:
        cur.execute(LOCK_HOLDER, lock_key_parts(key))
        rows = cur.fetchall()
    if not rows:
        return None
    assert len(rows) == 1, rows  # a session advisory lock has one holder
    pid, app, _ = rows[0]
    return {"pid": pid, "worker_id": app.removeprefix("reproq-beat-")}


def wait_holder(*, other_than: int | None = None, timeout: float = 10.0,
                interval: float = 0.02) -> tuple[dict[str, Any], float]:
    """Wait until a backend (other than pid `other_than`) holds the lock; (holder, seconds)."""
    began = time.monotonic()
    last = None
    while time.monotonic() - began < timeout:
        last = holder()
        if last is not None and last["pid"] != other_than:
            return last, time.monotonic() - began
        time.sleep(interval)
    raise AssertionError(f"no new leader within {timeout}s (last holder {last})")


def make_schedule(name: str, cron: str = "* * * * * *", **fields: Any) -> PeriodicTask:
    values = {"task_path": "tests.testapp.tasks.add", "args": [1, 2], **fields}
    return PeriodicTask.objects.create(name=name, cron_expr=cron, **values)


def ticks(schedule: PeriodicTask) -> list[ScheduleTick]:
    return list(ScheduleTick.objects.filter(schedule=schedule).order_by("scheduled_for"))


def runs_of(schedule: PeriodicTask) -> list[TaskRun]:
    return list(TaskRun.objects.filter(metadata__schedule=schedule.name).order_by("id"))


def set_next(schedule: PeriodicTask, when: datetime) -> None:
    PeriodicTask.objects.filter(pk=schedule.pk).update(next_run_at=when)


def ago(seconds: float) -> datetime:
    return timezone.now() - timedelta(seconds=seconds)


def beat_once(**overrides: Any) -> OnceOutcome:
    """`reproq beat --once` in this process (its own connections, like the command)."""
    from reproq.runtime.runtime import build_settings

    beat = Beat(StandaloneOwner(build_settings({**BEAT_OVERRIDES, **overrides}), "test-once"),
                standalone=True)

    async def main() -> OnceOutcome:
        try:
            return await beat.run_once()
        finally:
            await db.close_pools()

    return asyncio.run(main())
