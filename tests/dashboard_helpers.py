"""Helpers shared by the dashboard, metrics and access tests: rows, users, SSE reading."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
from django.contrib.auth import get_user_model
from django.utils import timezone

from reproq.models import TaskRun

XSS = "<script>window.__xss=1</script>"


def make_run(status: str = "READY", queue: str = "default",
             task: str = "tests.testapp.tasks.add", **fields: Any) -> TaskRun:
    """Insert one run in any state (inserts bypass the state-machine trigger)."""
    now = timezone.now()
    values: dict[str, Any] = {
        "task_path": task, "queue_name": queue, "status": status, "sort_key": 0,
        "enqueued_at": now - timedelta(seconds=5), "run_after": now - timedelta(seconds=5),
        "args": [1, 2], "kwargs": {},
    }
    if status in {"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"}:
        values["finished_at"] = now
        values["attempts"] = 1
    if status == "RUNNING":
        values.update(attempts=1, started_at=now, last_attempted_at=now,
                      lease_owner="w-test", leased_until=now + timedelta(minutes=5))
    if status == "FAILED":
        values["errors"] = [{"exception_class_path": "builtins.ValueError",
                             "traceback": "Traceback (most recent call last):\nValueError: boom",
                             "attempt": 1, "worker_id": "w-test"}]
        values["status_reason"] = "ValueError on attempt 1 of 1"
    values.update(fields)
    return TaskRun.objects.create(**values)


def staff_user(username: str = "staff", password: str = "pw-staff-123", *,
               superuser: bool = True) -> Any:
    User = get_user_model()
    user = User.objects.filter(username=username).first()
    if user is None:
        create = User.objects.create_superuser if superuser else User.objects.create_user
        user = create(username=username, email=f"{username}@example.com", password=password)
        if not superuser:
            user.is_staff = True
            user.save()
    return user


def read_sse(response: httpx.Response, *, until: Any, timeout: float
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """Read SSE messages from a streaming httpx response until `until(events, raw)` is true or
    the stream ends; bounded by `timeout` seconds (the client's read timeout bounds each read).
    Returns (messages as dicts with "event", "id", "data", "retry") and raw lines."""
    messages: list[dict[str, Any]] = []
    raw: list[str] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    # One line iterator per response, so that a stream can be read in several steps.
    lines: Iterator[str] | None = getattr(response, "_sse_lines", None)
    if lines is None:
        lines = response.iter_lines()
        response._sse_lines = lines  # type: ignore[attr-defined]
    for line in lines:
        raw.append(line)
        if line == "":
            if current:
                if "data" in current:
                    with contextlib.suppress(ValueError):
                        current["json"] = json.loads(current["data"])
                messages.append(current)
                current = {}
                if until(messages, raw):
                    break
        elif line.startswith(":"):
            current.setdefault("comments", []).append(line[1:].strip())
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                current["data"] = (current["data"] + "\n" + value) if "data" in current \
                    else value
            else:
                current[field] = value
        if time.monotonic() > deadline:
            raise AssertionError(f"SSE: condition not met within {timeout}s; got "
                                 f"{[m.get('json', m) for m in messages]!r}")
    return messages, raw


def events_of(messages: list[dict[str, Any]], kind: str | None = None) -> list[dict[str, Any]]:
    out = [m["json"] for m in messages if "json" in m and m.get("event", "message") == "message"]
    return [e for e in out if kind is None or e["kind"] == kind]
