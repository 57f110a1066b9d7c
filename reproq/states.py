"""Raw task-run states, which of them are active or final, and how they map to Django's status."""

from __future__ import annotations

from django.db import models
from django.tasks import TaskResultStatus


class RawStatus(models.TextChoices):
    READY = "READY", "Ready"  # due: may be claimed now
    WAITING = "WAITING", "Waiting"  # run_after in the future (deferred or retry backoff)
    RUNNING = "RUNNING", "Running"
    SUCCESSFUL = "SUCCESSFUL", "Successful"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"
    EXPIRED = "EXPIRED", "Expired"


ACTIVE = (RawStatus.READY, RawStatus.WAITING, RawStatus.RUNNING)
FINAL = (RawStatus.SUCCESSFUL, RawStatus.FAILED, RawStatus.CANCELLED, RawStatus.EXPIRED)

_TO_DJANGO = {
    RawStatus.READY: TaskResultStatus.READY,
    RawStatus.WAITING: TaskResultStatus.READY,
    RawStatus.RUNNING: TaskResultStatus.RUNNING,
    RawStatus.SUCCESSFUL: TaskResultStatus.SUCCESSFUL,
    RawStatus.FAILED: TaskResultStatus.FAILED,
    RawStatus.CANCELLED: TaskResultStatus.FAILED,
    RawStatus.EXPIRED: TaskResultStatus.FAILED,
}


def to_django_status(raw: str) -> TaskResultStatus:
    """Django status for a raw state; an unknown raw state (a hand-edited row) reads as FAILED."""
    try:
        return _TO_DJANGO[RawStatus(raw)]
    except ValueError:
        return TaskResultStatus.FAILED
