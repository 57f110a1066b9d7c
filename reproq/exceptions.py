"""Exceptions raised by reproq's public API, and the ones it records in a run's errors."""

from __future__ import annotations

from django.db import OperationalError
from django.tasks.exceptions import InvalidTask


class InvalidEnqueue(InvalidTask, ValueError):
    """A reserved enqueue keyword (run_after, priority, lock_key, concurrency_*) is invalid."""


class LeaseExpired(Exception):
    """Recorded, never raised: the worker running an attempt stopped renewing its lease.

    The process was killed, stuck, or cut off from the database for longer than
    ``LEASE_SECONDS``, so a reclaim sweep (`reproq.sql.RECLAIM`) took the run back: READY again
    while attempts remain, FAILED once they are spent (CANCELLED if a cancel was requested).
    This class is the ``exception_class_path`` of that error record, so
    ``result.errors[i].exception_class`` resolves for it like for any other error.
    """


class DatabaseUnavailable(OperationalError):
    """reproq could not reach its database in bounded time (PostgreSQL down or unreachable).

    Raised by enqueue and result look-ups instead of waiting: the message says which database,
    how long it waited and why. When it is raised while a statement was already sent, that
    statement may or may not have been applied (the enqueue may have happened)."""
