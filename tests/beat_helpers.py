"""Helpers for the beat tests: who leads (lock or lease), schedules, ticks, a one-shot beat."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from reproq import db
from reproq.conf import current_runtime_settings
from reproq.models import PeriodicTask, ScheduleTick, TaskRun
from reproq.runtime.beat import OnceOutcome, standalone
from reproq.runtime.peers import LEASE_HOLDER, LEASE_NAME, LOCK_HOLDER, lock_key, lock_key_parts

# Fast leadership for tests: failover bound (LEADER_TIMEOUT) 3 s, checks every 0.5 s.
BEAT_ENV = {
    "REPROQ_BEAT": "1",
    "REPROQ_BEAT_INTERVAL_SECONDS": "0.5",
    "REPROQ_LEADER_TIMEOUT_SECONDS": "3",
    "REPROQ_CONCURRENCY": "20",
}
BEAT_OVERRIDES: dict[str, Any] = {"beat": True, "beat_interval_seconds": 0.5,
                                  "leader_timeout_seconds": 3.0}


def leader_kind() -> str:
    """The peer under test: REPROQ_LEADER (set by the `leader` fixture), else the settings'."""
    return os.environ.get("REPROQ_LEADER") or current_runtime_settings().leader


def beat_env() -> dict[str, str]:
    """BEAT_ENV for child processes, with the peer under test (children get no REPROQ_*)."""
    return {**BEAT_ENV, "REPROQ_LEADER": leader_kind()}


def holder() -> dict[str, Any] | None:
    """Who leads now: worker_id, pid (advisory: the lock connection's backend) and a `token`
    that changes with every new leadership (the pid, or the lease's holder and election)."""
    if leader_kind() == "lease":
        with connection.cursor() as cur:
            cur.execute(LEASE_HOLDER, {"name": LEASE_NAME})
            rows = cur.fetchall()
        if not rows or not rows[0][3]:
            return None
        worker_id, elected_at, _expires, _live = rows[0]
        return {"pid": None, "worker_id": worker_id, "token": (worker_id, elected_at)}
    key = lock_key(str(connection.settings_dict["NAME"]))
    with connection.cursor() as cur:
        cur.execute(LOCK_HOLDER, lock_key_parts(key))
        rows = cur.fetchall()
    if not rows:
        return None
    assert len(rows) == 1, rows  # a session advisory lock has one holder
    pid, app, _ = rows[0]
    return {"pid": pid, "worker_id": app.removeprefix("reproq-beat-"), "token": pid}


def wait_holder(*, other_than: Any = None, timeout: float = 10.0,
                interval: float = 0.02) -> tuple[dict[str, Any], float]:
    """Wait until someone (other than the leadership `other_than`, a holder's token) leads;
    (holder, seconds)."""
    began = time.monotonic()
    last = None
    while time.monotonic() - began < timeout:
        last = holder()
        if last is not None and last["token"] != other_than:
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

    beat = standalone(build_settings({**BEAT_OVERRIDES, **overrides}), "test-once")

    async def main() -> OnceOutcome:
        try:
            return await beat.run_once()
        finally:
            await db.close_pools()

    return asyncio.run(main())
