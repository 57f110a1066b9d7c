"""Exceptions raised by reproq's public API."""

from __future__ import annotations

from django.tasks.exceptions import InvalidTask


class InvalidEnqueue(InvalidTask, ValueError):
    """A reserved enqueue keyword (run_after, priority, lock_key, concurrency_*) is invalid."""


class RuntimeNotStarted(RuntimeError):
    """The embedded runtime was expected in this process but is not running."""
