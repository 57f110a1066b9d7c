"""Exceptions raised by reproq's public API."""

from __future__ import annotations

from django.db import OperationalError
from django.tasks.exceptions import InvalidTask


class InvalidEnqueue(InvalidTask, ValueError):
    """A reserved enqueue keyword (run_after, priority, lock_key, concurrency_*) is invalid."""


class RuntimeNotStarted(RuntimeError):
    """The embedded runtime was expected in this process but is not running."""


class DatabaseUnavailable(OperationalError):
    """reproq could not reach its database in bounded time (PostgreSQL down or unreachable).

    Raised by enqueue and result look-ups instead of waiting: the message says which database,
    how long it waited and why. When it is raised while a statement was already sent, that
    statement may or may not have been applied (the enqueue may have happened)."""
