"""Reproq's subclasses of Django's task dataclasses: Task options, TaskResult extras, TaskContext.

- `ReproqTask` adds per-task options (`max_attempts`, `timeout_seconds`, `dedup`, `expires_in`)
  settable with ``@task(max_attempts=5)`` on Django 6.1 and ``.using(max_attempts=5)`` on both;
  ``using(run_after=timedelta)`` works (Django core crashes on it).
- `ReproqTaskResult` is a Django `TaskResult` that also carries `raw_status` (READY, WAITING,
  RUNNING, SUCCESSFUL, FAILED, CANCELLED, EXPIRED), `status_reason`, `metadata` and `queue_name`.
  Its args keep the types reproq restores (datetime, Decimal, ...) instead of Django's
  JSON-normalised copies.
- `ReproqTaskContext` is the `TaskContext` passed to ``takes_context=True`` tasks, with
  `metadata`, `save_metadata()` / `asave_metadata()` and `cancel_requested`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.tasks import Task, TaskContext, TaskResult
from django.tasks.base import TASK_REFRESH_ATTRS
from django.utils import timezone

_NO_CHANGE: Any = object()
REPROQ_REFRESH_ATTRS = (*TASK_REFRESH_ATTRS, "raw_status", "status_reason", "metadata")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReproqTask(Task):
    """A Django Task with reproq's per-task options (None means the backend's OPTIONS)."""

    max_attempts: int | None = None
    timeout_seconds: int | None = None
    dedup: bool | None = None
    expires_in: timedelta | None = None

    def using(  # type: ignore[override]
        self,
        *,
        priority: int | None = None,
        queue_name: str | None = None,
        run_after: datetime | timedelta | None = None,
        backend: str | None = None,
        max_attempts: int | None = None,
        timeout_seconds: int | None = None,
        dedup: bool | None = None,
        expires_in: timedelta | None = None,
    ) -> ReproqTask:
        """Like `Task.using`; a timedelta `run_after` is counted from now."""
        if isinstance(run_after, timedelta):
            run_after = timezone.now() + run_after
        changes = {
            "priority": priority,
            "queue_name": queue_name,
            "run_after": run_after,
            "backend": backend,
            "max_attempts": max_attempts,
            "timeout_seconds": timeout_seconds,
            "dedup": dedup,
            "expires_in": expires_in,
        }
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def copy_task_unvalidated(task: Task, **changes: Any) -> Task:
    """A copy of `task` with `changes`, skipping validation (for rebuilding stored rows whose
    queue or priority is no longer allowed by today's settings)."""
    clone = object.__new__(type(task))
    for f in dataclasses.fields(task):
        value = changes.get(f.name, getattr(task, f.name))
        object.__setattr__(clone, f.name, value)
    return clone


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReproqTaskResult(TaskResult):
    """Django's TaskResult plus reproq's raw state, reason and metadata."""

    raw_status: str = "READY"
    status_reason: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # reproq validated and encoded the arguments strictly at enqueue; keep their real types.
        object.__setattr__(self, "args", list(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def queue_name(self) -> str:
        return self.task.queue_name

    @property
    def is_finished(self) -> bool:
        return self.raw_status in {"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"}

    def refresh(self) -> None:
        fresh = self.task.get_backend().get_result(self.id)
        for attr in REPROQ_REFRESH_ATTRS:
            object.__setattr__(self, attr, getattr(fresh, attr))

    async def arefresh(self) -> None:
        fresh = await self.task.get_backend().aget_result(self.id)
        for attr in REPROQ_REFRESH_ATTRS:
            object.__setattr__(self, attr, getattr(fresh, attr))


MetadataSaver = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReproqTaskContext(TaskContext):
    """The context given to ``takes_context=True`` tasks.

    `metadata` is a dict the task may change; it is saved when the run ends, or earlier with
    `save_metadata()` / `await asave_metadata()`, and shows up as `result.metadata`.
    `cancel_requested` turns True (within a second) once someone cancels the run.
    """

    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    _saver: Any = None
    _cancel_flag: Any = None

    @property
    def cancel_requested(self) -> bool:
        return bool(self._cancel_flag is not None and self._cancel_flag.is_set())

    def save_metadata(self) -> None:
        if self._saver is not None:
            self._saver.save(self.metadata)

    async def asave_metadata(self) -> None:
        if self._saver is not None:
            await self._saver.asave(self.metadata)
