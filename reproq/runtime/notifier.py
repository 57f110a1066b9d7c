"""Notifiers: how this process hears about work, cancels and events (`reproq.runtime.ports`).

`PostgresNotifier` keeps ONE dedicated LISTEN connection per process and database, shared by
every subscriber: the runtime's wake-ups (claimer, promoter, executor) and the SSE hub of the
dashboard. When the connection is lost it reconnects (at most `db.RECONNECT_MAX_DELAY` apart:
the database may be back any moment), re-LISTENs, and tells every subscriber to look for
itself (callback value None), since notifications sent meanwhile are lost. A quiet connection
is pinged every PING_SECONDS with a bounded round trip: one gone half-open in a network
partition would otherwise wait for notifications for ever.

`PollNotifier` uses no LISTEN at all (a transaction pooler such as PgBouncer does not deliver
notifications): it tells every subscriber to look for itself every `interval` seconds.

`shared(alias)` is the process's notifier of a database on this event loop; it runs while
anything subscribes to it, so that a web process that only streams the dashboard, and one that
also runs the runtime, each hold one LISTEN connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import psycopg

from .. import db
from .ports import CHANNEL, Callback, Topic, Unsubscribe, decode

logger = logging.getLogger("reproq.runtime")
PING_SECONDS = 5.0  # a LISTEN connection quiet this long is checked with a bounded round trip
ROUND_TRIP_SECONDS = 5.0  # the longest LISTEN or ping may take before the connection is dropped
IDLE_STOP_SECONDS = 30.0  # a shared notifier nobody subscribes to stops after this long


class _Subscriptions:
    """Callbacks by topic; a callback that raises is logged, never breaks delivery."""

    def __init__(self) -> None:
        self.by_topic: dict[Topic, list[Callback]] = {t: [] for t in Topic}
        self.changed = anyio.Event()

    def add(self, topic: Topic, callback: Callback) -> Unsubscribe:
        entry = (callback,)  # identity of this subscription (the same callback may come twice)
        wrapped: Callback = lambda value: entry[0](value)  # noqa: E731
        self.by_topic[topic].append(wrapped)
        self.changed.set()

        def unsubscribe() -> None:
            if wrapped in self.by_topic[topic]:
                self.by_topic[topic].remove(wrapped)
                self.changed.set()

        return unsubscribe

    def count(self) -> int:
        return sum(len(cbs) for cbs in self.by_topic.values())

    def deliver(self, topic: Topic, value: str | None) -> None:
        for callback in list(self.by_topic[topic]):
            try:
                callback(value)
            except Exception:
                logger.exception("reproq: a %s subscriber failed", topic.name)

    def everyone(self) -> None:
        """Tell every subscriber to look for itself (after a reconnect, at a poll tick)."""
        for topic in Topic:
            self.deliver(topic, None)


class _Delivering:
    """What both notifiers share: their subscribers, and delivery of a payload to them."""

    def __init__(self) -> None:
        self.subs = _Subscriptions()

    def subscribe(self, topic: Topic, callback: Callback) -> Unsubscribe:
        return self.subs.add(topic, callback)

    def dispatch(self, payload: str) -> None:
        """Deliver one notification payload (unknown topics are ignored)."""
        parsed = decode(payload)
        if parsed is not None:
            self.subs.deliver(*parsed)


class PostgresNotifier(_Delivering):
    """One LISTEN connection for the process (see the module docstring)."""

    def __init__(self, alias: str, *, application_name: str = "reproq-listen") -> None:
        super().__init__()
        self.alias = alias
        self.application_name = application_name[:63]
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.backend_pid: int | None = None
        self.connections = 0
        self.received = 0
        self.error = ""
        self._connected = anyio.Event()

    @property
    def connected(self) -> bool:
        return self.conn is not None and self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await db.connect(self.alias, application_name=self.application_name)
            except (psycopg.OperationalError, OSError) as exc:
                self.error = db.describe(exc)
                logger.warning("reproq: LISTEN connection failed (%s); retrying in %.1fs",
                               self.error, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, db.RECONNECT_MAX_DELAY)
                continue
            self.conn = conn
            try:
                with anyio.fail_after(ROUND_TRIP_SECONDS):
                    await conn.execute(f"LISTEN {CHANNEL}")
                self.backend_pid = conn.info.backend_pid
                self.connections += 1
                self.error = ""
                if self.connections > 1:
                    logger.info("reproq: LISTEN connection re-established; sweeping for work")
                self._connected.set()
                delay = 0.1
                self.subs.everyone()  # catch up on anything sent while nobody listened
                while True:
                    heard = False
                    async for note in conn.notifies(timeout=PING_SECONDS):
                        heard = True
                        self.received += 1
                        self.dispatch(note.payload)
                    if not heard:
                        with anyio.fail_after(ROUND_TRIP_SECONDS):  # half-open otherwise
                            await conn.execute("SELECT 1")
            except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError,
                    OSError) as exc:
                self.error = db.describe(exc)
                logger.warning("reproq: LISTEN connection lost (%s); reconnecting", self.error)
            finally:
                self._connected = anyio.Event()
                self.conn = None
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await conn.close()
            await anyio.sleep(delay)

    def status(self) -> dict[str, Any]:
        return {"kind": "listen", "connected": self.connected, "connections": self.connections,
                "received": self.received, "backend_pid": self.backend_pid,
                "subscribers": self.subs.count(), "error": self.error}


class PollNotifier(_Delivering):
    """No LISTEN: every `interval` seconds, every subscriber is told to look for itself (a
    payload handed to `dispatch` is still delivered)."""

    def __init__(self, interval: float = 1.0) -> None:
        if not interval > 0:
            raise ValueError(f"a poll interval must be > 0 seconds, got {interval!r}")
        super().__init__()
        self.interval = float(interval)
        self.ticks = 0

    @property
    def connected(self) -> bool:
        return True

    async def wait_connected(self) -> None:
        return None

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            self.ticks += 1
            self.subs.everyone()

    def status(self) -> dict[str, Any]:
        return {"kind": "poll", "connected": True, "interval": self.interval,
                "ticks": self.ticks, "subscribers": self.subs.count()}


AnyNotifier = PostgresNotifier | PollNotifier


class _Shared:
    """A notifier of this loop and database that runs while anything subscribes to it."""

    def __init__(self, notifier: AnyNotifier) -> None:
        self.notifier = notifier
        self.task: asyncio.Task[None] | None = None
        self._idle_since: float | None = None

    def ensure_running(self) -> None:
        if self.task is None or self.task.done():
            # a fresh context: never a request's (the notifier outlives the request)
            self.task = asyncio.get_running_loop().create_task(
                self._main(), name="reproq-notifier", context=contextvars.Context())

    async def _main(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.notifier.run)
            while True:
                subs = self.notifier.subs
                subs.changed = anyio.Event()
                if subs.count():
                    self._idle_since = None
                    await subs.changed.wait()
                    continue
                self._idle_since = self._idle_since or time.monotonic()
                with anyio.move_on_after(IDLE_STOP_SECONDS):
                    await subs.changed.wait()
                if not subs.count():
                    tg.cancel_scope.cancel()
                    return


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Shared]] = (
    weakref.WeakKeyDictionary())


def shared(alias: str, *, poll_interval: float | None = None,
           application_name: str = "reproq-listen") -> AnyNotifier:
    """This process's notifier of database `alias` on the running loop, started now if it is
    not running (a `PollNotifier` with `poll_interval` seconds when given, else LISTEN). It
    stops IDLE_STOP_SECONDS after its last subscriber left."""
    loop = asyncio.get_running_loop()
    by_alias = _shared.setdefault(loop, {})
    entry = by_alias.get(alias)
    wanted: Callable[[], AnyNotifier] = (
        (lambda: PollNotifier(poll_interval)) if poll_interval is not None
        else (lambda: PostgresNotifier(alias, application_name=application_name)))
    if entry is None or (entry.task is not None and entry.task.done()):
        entry = by_alias[alias] = _Shared(wanted())
    entry.ensure_running()
    return entry.notifier


async def stop_if_unused(alias: str) -> None:
    """Stop this loop's notifier of `alias` now if nothing subscribes to it (a runtime that
    stops does not leave its LISTEN connection open for IDLE_STOP_SECONDS)."""
    entry = _shared.get(asyncio.get_running_loop(), {}).get(alias)
    if entry is None or entry.notifier.subs.count() or entry.task is None:
        return
    entry.task.cancel()
    with (anyio.CancelScope(shield=True), anyio.move_on_after(3),
          contextlib.suppress(asyncio.CancelledError, Exception)):
        await entry.task


def running() -> list[AnyNotifier]:
    """The shared notifiers of the running loop (status pages, tests)."""
    loop = asyncio.get_running_loop()
    return [e.notifier for e in _shared.get(loop, {}).values()
            if e.task is not None and not e.task.done()]


async def close_all() -> None:
    """Stop this loop's shared notifiers (tests, shutdown)."""
    by_alias = _shared.pop(asyncio.get_running_loop(), {})
    for entry in by_alias.values():
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
            with (anyio.CancelScope(shield=True), anyio.move_on_after(3),
                  contextlib.suppress(asyncio.CancelledError, Exception)):
                await entry.task
