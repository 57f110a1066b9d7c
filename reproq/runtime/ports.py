"""The runtime's seams: the notification wire protocol (`Topic`) and the small protocols its
parts are built against (`Notifier`, `Peer`, `Service`).

Every NOTIFY reproq sends is ``<topic>:<value>`` on one channel (`reproq.sql.CHANNEL`); the
statements in `reproq.sql` and the triggers of the migrations write them, and `decode` below is
the one reader. A subscriber's callback gets the value, or ``None`` meaning "something may have
changed: look for yourself" — what a `PollNotifier` sends every interval, and what a
`PostgresNotifier` sends to everyone after it (re)connects, since notifications sent while it was
not listening are lost.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from enum import StrEnum
from typing import Any, Protocol

from ..sql import CHANNEL

__all__ = [
    "CHANNEL",
    "Callback",
    "NotLeader",
    "Notifier",
    "Peer",
    "Service",
    "Topic",
    "decode",
    "encode",
]


class Topic(StrEnum):
    """What a notification announces (its value in brackets)."""

    READY = "r"  # runs became READY in a queue [queue name]
    DUE = "w"  # a WAITING run comes due [epoch seconds]
    CANCEL = "c"  # cancel a running run [run id]
    QUEUE = "q"  # a queue was paused, resumed or its limits changed [queue name]
    EVENTS = "e"  # dashboard events were written [newest reproq_events id]


def encode(topic: Topic, value: object) -> str:
    return f"{topic.value}:{value}"


def decode(payload: str) -> tuple[Topic, str] | None:
    """(topic, value) of a notification; None for a payload of no known topic."""
    kind, sep, value = payload.partition(":")
    if not sep:
        return None
    try:
        return Topic(kind), value
    except ValueError:
        return None


Callback = Callable[[str | None], None]
Unsubscribe = Callable[[], None]


class Notifier(Protocol):
    """Delivers notifications of one database to this process's subscribers."""

    @property
    def connected(self) -> bool:
        """True while notifications arrive (a PollNotifier is always "connected")."""
        ...

    def subscribe(self, topic: Topic, callback: Callback) -> Unsubscribe:
        """Call `callback` (on the event loop, never blocking) for each notification of
        `topic`, and with None after a reconnect or at each poll tick."""
        ...

    async def run(self) -> None:
        """Deliver until cancelled (reconnecting as needed; never raises for a lost server)."""
        ...

    def status(self) -> dict[str, Any]: ...


class Peer(Protocol):
    """Leadership among the processes of one database: at most one leads at a time."""

    @property
    def is_leader(self) -> bool: ...

    def subscribe(self, callback: Callable[[bool], None]) -> Unsubscribe:
        """Call `callback(is_leader)` whenever leadership is gained or lost here."""
        ...

    def leading(self) -> AbstractAsyncContextManager[Any]:
        """A fence: a connection on which statements only take effect while this process
        leads (raises `NotLeader` when it does not)."""
        ...

    async def run(self) -> None: ...

    async def stop(self) -> None:
        """Give leadership up (at once, for a standby to take over)."""
        ...

    def status(self) -> dict[str, Any]: ...


class NotLeader(RuntimeError):
    """`Peer.leading()` was entered by a process that does not (or no longer) lead."""


class Service(Protocol):
    """One long-running part of the runtime, supervised by `reproq.runtime.runtime.Runtime`."""

    name: str

    async def run(self) -> None:
        """Work until stopped or cancelled; an exception is a crash (logged, restarted)."""
        ...

    async def stop(self) -> None:
        """Finish gracefully: return once `run` has returned."""
        ...

    def status(self) -> dict[str, Any]: ...
