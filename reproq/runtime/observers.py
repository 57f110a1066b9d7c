"""Run observers: who hears about the attempts this process claims and finishes.

The runtime publishes (`claimed`, `finished`) and knows nothing of who listens. The Prometheus
instruments of `reproq.asgi.metrics` register here (`reproq.asgi.metrics.install`, called where
a process starts its runtime), so that nothing under `reproq.runtime` imports the web layer.

Observers are called on the runtime's event loop, in the middle of claiming and completing:
they must be quick and must not block. One that raises is logged (once per observer and
exception type) and never affects a run or the other observers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..conf import RuntimeSettings
    from .outcome import Completion

logger = logging.getLogger("reproq.runtime")


class Source(Protocol):
    """What an observer may read of the runtime that publishes (`Runtime` is one)."""

    @property
    def worker_id(self) -> str: ...

    @property
    def settings(self) -> RuntimeSettings: ...


class RunObserver(Protocol):
    def claimed(self, source: Source, rows: list[dict[str, Any]]) -> None:
        """Rows of one claim (status RUNNING: started; EXPIRED: expired before it started;
        others: deferred by flow control)."""

    def finished(self, source: Source, completion: Completion) -> None:
        """One finished attempt, as the completer records it."""


_observers: list[RunObserver] = []
_reported: set[tuple[int, type[BaseException]]] = set()


def register(observer: RunObserver) -> Callable[[], None]:
    """Add `observer` (once, however often it is registered); returns its removal."""
    if not any(o is observer for o in _observers):
        _observers.append(observer)

    def unregister() -> None:
        _observers[:] = [o for o in _observers if o is not observer]

    return unregister


def registered() -> tuple[RunObserver, ...]:
    return tuple(_observers)


def _failed(observer: RunObserver, exc: Exception) -> None:
    key = (id(observer), type(exc))
    if key not in _reported:
        _reported.add(key)
        logger.error("reproq: run observer %r failed (logged once): %s", observer, exc,
                     exc_info=exc)


def claimed(source: Source, rows: list[dict[str, Any]]) -> None:
    for observer in tuple(_observers):
        try:
            observer.claimed(source, rows)
        except Exception as exc:
            _failed(observer, exc)


def finished(source: Source, completion: Completion) -> None:
    for observer in tuple(_observers):
        try:
            observer.finished(source, completion)
        except Exception as exc:
            _failed(observer, exc)
