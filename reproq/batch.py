"""One enqueue batch on the wire: `EnqueueSpec` in, ENQUEUE parameters out, statement rows back
into `ReproqTaskResult` objects, and the `task_enqueued` signal for the new ones.

This is the hot path of `bulk_enqueue` (tens of thousands of tasks per call), so it works a
column at a time: a column the whole batch shares is sent as one value instead of an array (see
`reproq.sql.ENQUEUE`), results are assembled without re-running dataclass validation, and
`task_enqueued` is skipped when its only receiver is Django's own DEBUG log line and that logger
would drop it anyway.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any

from django.tasks import Task, TaskResultStatus
from django.tasks.signals import task_enqueued

from . import sql
from .results import ReproqTaskResult, copy_task_unvalidated


@dataclass(slots=True)
class EnqueueSpec:
    """One validated, encoded task call, ready for the ENQUEUE statement."""

    task: Task
    args: list[Any]
    kwargs: dict[str, Any]
    enc_args: str
    enc_kwargs: str
    spec_hash: str | None
    priority: int
    run_after: datetime | None
    delay: float | None
    lock_key: str | None
    concurrency_key: str | None
    concurrency_limit: int | None
    max_attempts: int
    timeout: int
    expires_in: float | None

    @property
    def task_path(self) -> str:
        return self.task.module_path

    @property
    def queue_name(self) -> str:
        return self.task.queue_name


# ENQUEUE column -> EnqueueSpec attribute.
_SOURCES = {"kwargs": "enc_kwargs"}
_GETTERS = [(name, attrgetter(_SOURCES.get(name, name))) for name, _ in sql.ENQUEUE_COLUMNS]


def column_params(specs: list[EnqueueSpec]) -> dict[str, Any]:
    """The per-task columns of ENQUEUE: an array each, or one shared value (``<name>_1``)."""
    params: dict[str, Any] = {"args": [s.enc_args for s in specs]}
    n = len(specs)
    for name, get in _GETTERS:
        values = [get(s) for s in specs]
        first = values[0]
        if values.count(first) == n:
            params[name], params[name + "_1"] = None, first
        else:
            params[name], params[name + "_1"] = values, None
    return params


# Building tens of thousands of results through the frozen dataclass __init__ (one
# object.__setattr__ per field, then __post_init__) costs about as much as the insert itself, so
# new results are filled through their slot descriptors. The fields are the same; only the
# validation is skipped, as the values come from a spec that `prepare` validated.
_set = {f.name: getattr(ReproqTaskResult, f.name).__set__
        for f in dataclasses.fields(ReproqTaskResult)}
if set(_set) != {"task", "id", "status", "enqueued_at", "started_at", "finished_at",
                 "last_attempted_at", "args", "kwargs", "backend", "errors", "worker_ids",
                 "_return_value", "raw_status", "status_reason", "metadata"}:
    raise ImportError("reproq.batch does not know every field of ReproqTaskResult")
(_task, _id, _status, _enqueued_at, _started_at, _finished_at, _last_attempted_at, _args,
 _kwargs, _backend, _errors, _worker_ids, _return_value, _raw_status, _status_reason,
 _metadata) = (_set[name] for name in (
    "task", "id", "status", "enqueued_at", "started_at", "finished_at", "last_attempted_at",
    "args", "kwargs", "backend", "errors", "worker_ids", "_return_value", "raw_status",
    "status_reason", "metadata"))
_READY = TaskResultStatus.READY
_new = object.__new__


def new_result(spec: EnqueueSpec, run_id: int, enqueued_at: datetime, run_after: datetime | None,
               waiting: bool, backend: str) -> ReproqTaskResult:
    """The result of a freshly inserted run, as `get_result` would return it."""
    task = spec.task
    if run_after is not None and task.run_after != run_after:
        task = copy_task_unvalidated(task, run_after=run_after)
    r = _new(ReproqTaskResult)
    _task(r, task)
    _id(r, str(run_id))
    _status(r, _READY)
    _enqueued_at(r, enqueued_at)
    _started_at(r, None)
    _finished_at(r, None)
    _last_attempted_at(r, None)
    _args(r, list(spec.args))
    _kwargs(r, dict(spec.kwargs))
    _backend(r, backend)
    _errors(r, [])
    _worker_ids(r, [])
    _return_value(r, None)
    _raw_status(r, "WAITING" if waiting else "READY")
    _status_reason(r, "")
    _metadata(r, {})
    return r


@dataclass(slots=True)
class Inserted:
    """What ENQUEUE reports for one input task (run_id None: skipped as an active duplicate)."""

    run_id: int | None
    waiting: bool
    run_after: datetime | None


def read_rows(rows: list[tuple[Any, ...]]) -> tuple[list[Inserted], datetime | None]:
    """ENQUEUE's rows (id, waiting, run_after, enqueued_at, notified) in input order, and the
    batch's enqueued_at (sent on the first row only)."""
    enqueued_at = rows[0][3] if rows else None
    return [Inserted(r[0], r[1], r[2]) for r in rows], enqueued_at


_django_log = logging.getLogger("django.tasks")
_DJANGO_RECEIVERS_MODULE = "django.tasks.signals"


def enqueued_signal_needed(sender: type) -> bool:
    """False when `task_enqueued` would do nothing: its only receivers are Django's own log
    receiver (a DEBUG line) and the ``django.tasks`` logger drops DEBUG."""
    sync_receivers, async_receivers = task_enqueued._live_receivers(sender)
    if async_receivers:
        return True
    if any(getattr(r, "__module__", "") != _DJANGO_RECEIVERS_MODULE for r in sync_receivers):
        return True
    return bool(sync_receivers) and _django_log.isEnabledFor(logging.DEBUG)


GC_PAUSE_FROM = 1000  # tasks per batch


@contextmanager
def gc_paused(size: int) -> Iterator[None]:
    """Hold the cyclic garbage collector while a large batch builds its objects.

    Every task of a batch allocates a handful of containers that all stay alive, so the
    collector would run again and again over a growing heap (about half the Python time of a
    10,000-task batch). Nothing built here forms a cycle; collection resumes right after.
    """
    if size < GC_PAUSE_FROM or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
