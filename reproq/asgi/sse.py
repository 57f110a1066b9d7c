"""Server-Sent Events: ``GET /reproq/events/`` streams the deployment's state changes.

Producers (every process, see `reproq.runtime.events` and the ENQUEUE / SET_PAUSED
statements) write coalesced rows to ``reproq_events`` and NOTIFY the ``reproq`` channel. Here,
one `EventHub` per process (per event loop), started by the first subscriber and stopped when
nobody has listened for a while, subscribes to the process's notifier
(`reproq.runtime.notifier`: the one LISTEN connection it shares with the runtime, or a poll
timer in poll-only mode) and reads with the process's pool. Any notification (or a poll every
``REPROQ_SSE_POLL_SECONDS`` as a fallback) makes it read the new rows once —
``WHERE id > cursor ORDER BY id LIMIT 500`` — and fan them out to its subscribers. Each event
is serialized once and shared by every subscriber; a ``data`` larger than ``DATA_MAX_BYTES``
is replaced by ``{"truncated": true, "bytes": n}`` in SQL, so a huge hand-written row never
leaves PostgreSQL. Each subscriber's queue is bounded in bytes (``REPROQ_SSE_BUFFER_BYTES``):
a slow client loses its oldest events and gets a ``gap`` event instead. Ids are allocated
before commit, so a row can become visible after a higher id was read: skipped ids are
re-checked for ``GAP_SECONDS`` and delivered late (without an SSE ``id:``, so the client's
Last-Event-ID never goes backwards).

The stream: ``id: <reproq_events.id>`` + ``data: <json>`` per event, ``: keep-alive`` comments
every ``REPROQ_SSE_HEARTBEAT_SECONDS``, ``Last-Event-ID`` (header, or ``?last_event_id=``)
replays up to ``REPROQ_SSE_REPLAY_MAX`` stored events, filters ``?queue=a,b&task=path&status=
failed,succeeded``. Every stream ends by itself — after ``REPROQ_SSE_MAX_SECONDS``, at once when
the process shuts down (lifespan shutdown, the runtime stopping, or SIGTERM/SIGINT reaching the
server's own handler), and within ``ACCESS_CHECK_SECONDS`` of its staff user or token losing
access — with a ``retry:`` hint and a ``bye`` event, because uvicorn waits for open connections
to close before it even starts the lifespan shutdown.

A client that does not read cannot be ended by sending it ``bye``: the server's send blocks
(or its write buffer never drains, and servers wait for that before closing). The hub's
watchdog therefore aborts the TCP connection of a stream whose send has been blocked for
``REPROQ_SSE_WRITE_TIMEOUT_SECONDS``, and of every stream still open ``END_GRACE_SECONDS``
after the shutdown began or after its end was decided: the socket is found among the
process's file descriptors by the client's address and shut down with ``SO_LINGER`` 0, which
every server sees as a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from .. import db, sql
from ..access import staff_or_token
from ..dashboard.conf import backend_database, integer, number, setting
from ..runtime import host

logger = logging.getLogger("reproq.sse")

FETCH_LIMIT = 500
GAP_SECONDS = 10.0
MAX_TRACKED_GAPS = 2000
COALESCE_SECONDS = 0.05
IDLE_CLOSE_SECONDS = 30.0
# A bigger ``data`` is replaced by {"truncated": true, "bytes": n} before it leaves PostgreSQL
# (reproq's own events stay below 4 KiB); task paths are cut to TASK_MAX_CHARS.
DATA_MAX_BYTES = 16_384
TASK_MAX_CHARS = 1000
BUFFER_BYTES = 1_048_576  # REPROQ_SSE_BUFFER_BYTES: queued bytes per client
BUFFER_MIN_BYTES = 65_536  # bigger than any one event, so every event fits an empty queue
DRAIN_BYTES = 65_536  # handed to the server per send
REPLAY_PAGE = 100
WRITE_TIMEOUT_SECONDS = 10.0  # REPROQ_SSE_WRITE_TIMEOUT_SECONDS
END_GRACE_SECONDS = 0.5  # for a bye to get through before the connection is aborted
ACCESS_CHECK_SECONDS = 2.0
WATCH_SECONDS = 0.1

# Raw statuses a client may filter on, mapped to the event kinds that carry them.
STATUS_KINDS: dict[str, set[str]] = {
    "READY": {"enqueued", "retried"}, "WAITING": {"retried"}, "RUNNING": {"started"},
    "SUCCESSFUL": {"succeeded"}, "FAILED": {"failed"}, "CANCELLED": {"cancelled"},
    "EXPIRED": {"expired"},
}
KIND_STATUS = {"enqueued": "READY", "started": "RUNNING", "succeeded": "SUCCESSFUL",
               "failed": "FAILED", "retried": "WAITING", "cancelled": "CANCELLED",
               "expired": "EXPIRED"}
KNOWN_KINDS = {*KIND_STATUS, "worker_joined", "worker_left", "leader_changed", "queue_paused",
               "queue_resumed"}

# Large ``data`` (measured as JSON text) and task paths are cut here, in SQL: a huge row is
# neither fetched into this process nor copied to every client.
COLUMNS = f"""
SELECT e.id, e.created_at, e.kind, e.run_id, left(e.task_path, {TASK_MAX_CHARS}) AS task_path,
       e.queue_name, e.worker_id,
       CASE WHEN size.n > {DATA_MAX_BYTES}
            THEN jsonb_build_object('truncated', true, 'bytes', size.n)
            ELSE e.data END AS data"""
FETCH = COLUMNS + """
FROM reproq_events e CROSS JOIN LATERAL (SELECT octet_length(e.data::text) AS n) size
WHERE e.id > %(cursor)s OR e.id = ANY(%(gaps)s::bigint[])
ORDER BY e.id
LIMIT %(limit)s
"""
REPLAY = COLUMNS + """,
       (SELECT min(id) FROM reproq_events) AS oldest
FROM reproq_events e CROSS JOIN LATERAL (SELECT octet_length(e.data::text) AS n) size
WHERE e.id > %(after)s
ORDER BY e.id
LIMIT %(limit)s
"""
LAST_ID = "SELECT coalesce(max(id), 0) AS last FROM reproq_events"
sql.name_statements(globals(), ("FETCH", "REPLAY", "LAST_ID"), prefix="SSE_")


# --------------------------------------------------------------------------- shutdown flag

_shutdown = False  # a plain bool: set from signal handlers, where locks are unsafe
_hooked = False


def shutting_down() -> bool:
    """True when streams must end: process shutdown began, or this runtime is stopping."""
    return _shutdown or host.stopping()


def request_shutdown() -> None:
    """End every stream of this process now (lifespan shutdown, SIGTERM, tests)."""
    global _shutdown
    _shutdown = True
    for loop, hub in list(_hubs.items()):
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(hub.on_shutdown)


def reset_shutdown() -> None:
    """A new serving period (lifespan startup, tests): streams may run again."""
    global _shutdown
    _shutdown = False


def install_signal_hook() -> None:
    """Chain SIGTERM/SIGINT: set the shutdown flag, then run the server's own handler.

    Only Python handlers that a server installed are wrapped (uvicorn and gunicorn workers use
    ``signal.signal``; asyncio's ``add_signal_handler`` leaves a no-op Python handler and its
    wake-up fd, which still fires). Must run in the main thread, after the server installed its
    handlers: the first stream does it. ``REPROQ_SSE_SIGNAL_HOOK = False`` turns this off.
    """
    global _hooked
    if _hooked or threading.current_thread() is not threading.main_thread():
        return
    if not setting("REPROQ_SSE_SIGNAL_HOOK", True):
        return
    _hooked = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous) or getattr(previous, "_reproq_hook", False):
            continue

        def handler(signo: int, frame: Any, _previous: Any = previous) -> None:
            request_shutdown()
            _previous(signo, frame)

        handler._reproq_hook = True  # type: ignore[attr-defined]
        signal.signal(signum, handler)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    kind: str
    task: str
    queue: str
    payload: bytes  # the serialized `data:` JSON

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Event:
        created = row["created_at"]
        body = {
            "id": int(row["id"]), "kind": row["kind"], "status": KIND_STATUS.get(row["kind"]),
            "at": created.isoformat() if isinstance(created, datetime) else created,
            "run_id": row["run_id"], "task": row["task_path"] or "",
            "queue": row["queue_name"] or "", "worker": row["worker_id"] or "",
            "data": row["data"] if isinstance(row["data"], dict) else {},
        }
        text = json.dumps(body, separators=(",", ":"), default=str, ensure_ascii=False)
        return cls(int(row["id"]), row["kind"], body["task"], body["queue"], text.encode())

    def chunk(self, *, with_id: bool = True) -> bytes:
        head = f"id: {self.id}\n".encode() if with_id else b""
        return head + b"data: " + self.payload + b"\n\n"


def _split(values: Iterable[str]) -> set[str]:
    return {p.strip() for v in values for p in v.split(",") if p.strip()}


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Per-subscriber filter; None = no restriction. A filter on queue (or task) lets through
    only events that have that queue (or task): worker and leader events carry neither."""

    queues: frozenset[str] | None = None
    tasks: frozenset[str] | None = None  # exact paths; "prefix.*" matches a prefix
    kinds: frozenset[str] | None = None

    @classmethod
    def from_query(cls, query: Any) -> EventFilter:
        queues = _split(query.getlist("queue"))
        tasks = _split(query.getlist("task"))
        kinds: set[str] = set()
        for value in _split(query.getlist("status")) | _split(query.getlist("kind")):
            if value.upper() in STATUS_KINDS:
                kinds |= STATUS_KINDS[value.upper()]
            elif value.lower() in KNOWN_KINDS:
                kinds.add(value.lower())
            else:
                raise ValueError(f"unknown status or kind {value!r}: use one of "
                                 + ", ".join(sorted(STATUS_KINDS) + sorted(KNOWN_KINDS)))
        return cls(frozenset(queues) or None, frozenset(tasks) or None, frozenset(kinds) or None)

    def matches(self, event: Event) -> bool:
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if self.queues is not None and event.queue not in self.queues:
            return False
        if self.tasks is not None and event.task not in self.tasks:
            return any(t.endswith("*") and event.task.startswith(t[:-1]) for t in self.tasks)
        return True


AccessCheck = Callable[[], Awaitable[bool]]


class Subscriber:
    """One stream: its queue of serialized events (bounded in bytes) and what the hub's
    watchdog needs to end it (its peer's address, whether a send is blocked, why it ends)."""

    __slots__ = ("aborted", "access_check", "buffered", "checking", "closed", "context", "dropped",
                 "dropped_bytes", "ended_at", "filter", "max_bytes", "next_check", "peer",
                 "queue", "seen", "sending_since", "stop_at", "stop_reason", "wake")

    def __init__(self, flt: EventFilter, max_bytes: int = BUFFER_BYTES,
                 peer: tuple[str, int, int] | None = None,
                 access_check: AccessCheck | None = None) -> None:
        self.filter = flt
        self.max_bytes = max_bytes
        self.queue: deque[tuple[int, bytes]] = deque()  # (event id, chunk)
        self.buffered = 0  # bytes in `queue`
        self.dropped = 0
        self.dropped_bytes = 0
        self.seen: set[int] = set()  # ids already sent by a replay
        self.wake = asyncio.Event()
        self.peer = peer  # (client host, client port, server port) of the TCP connection
        self.access_check = access_check
        self.context: contextvars.Context | None = None  # the request's, for access checks
        self.next_check = 0.0
        self.checking: asyncio.Task[None] | None = None
        self.sending_since: float | None = None  # loop time a send began, while it lasts
        self.stop_reason = ""
        self.stop_at = 0.0
        self.ended_at: float | None = None  # the generator finished (the final send follows)
        self.closed = False  # Django closed the response: the stream is over
        self.aborted = False  # its connection was aborted: nothing more to watch

    def offer(self, event: Event, chunk: bytes) -> None:
        if event.id in self.seen or not self.filter.matches(event):
            return
        size = len(chunk)
        while self.queue and self.buffered + size > self.max_bytes:
            lost = len(self.queue.popleft()[1])
            self.buffered -= lost
            self.dropped += 1
            self.dropped_bytes += lost
        if size > self.max_bytes:  # cannot happen with the SQL cut; never buffer it anyway
            self.dropped += 1
            self.dropped_bytes += size
        else:
            self.queue.append((event.id, chunk))
            self.buffered += size
        self.wake.set()

    def drain(self, limit: int = DRAIN_BYTES) -> bytes:
        """The gap notice (if events were dropped) and queued events up to `limit` bytes (at
        least one): what one send hands to the server."""
        parts = []
        size = 0
        if self.dropped:
            parts.append(b"event: gap\ndata: " + json.dumps(
                {"reason": "slow client: oldest events dropped", "dropped": self.dropped,
                 "bytes": self.dropped_bytes}).encode() + b"\n\n")
            self.dropped = 0
            self.dropped_bytes = 0
        while self.queue and (size < limit or not size):
            chunk = self.queue.popleft()[1]
            self.buffered -= len(chunk)
            size += len(chunk)
            parts.append(chunk)
        return b"".join(parts)

    def drop_replayed(self) -> None:
        """After a replay: drop the live events queued meanwhile that it already sent."""
        if self.seen:
            self.queue = deque(item for item in self.queue if item[0] not in self.seen)
            self.buffered = sum(len(chunk) for _, chunk in self.queue)

    def prune_seen(self, cursor: int, gaps: dict[int, float]) -> None:
        """Forget replayed ids the hub will never deliver (behind its cursor, not awaited)."""
        self.seen = {i for i in self.seen if i > cursor or i in gaps}

    def stop(self, reason: str, now: float) -> None:
        """End this stream (with a bye naming `reason`) as soon as its generator runs."""
        if not self.stop_reason:
            self.stop_reason = reason
            self.stop_at = now
        self.wake.set()


class EventHub:
    """This process's reader of reproq_events (one LISTEN connection, shared by all streams)."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.subscribers: set[Subscriber] = set()
        self.ending: set[Subscriber] = set()  # finished generators, final send not done yet
        self.cursor = 0
        self.gaps: dict[int, float] = {}
        self.task: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.error = ""
        self.fetches = 0
        self.notifications = 0
        self.delivered = 0
        self.connections = 0
        self.dropped_total = 0
        self.aborted = 0  # connections aborted by the watchdog
        self.revoked = 0  # streams ended because access was withdrawn
        self._idle_since = time.monotonic()
        self._shutdown_at: float | None = None
        # Peers of streams that ended shortly before: their connection may still hold unsent
        # bytes, which would keep the server from closing it at shutdown.
        self._recent: deque[tuple[float, tuple[str, int, int]]] = deque(maxlen=10_000)
        # (fd, inode) of the sockets listening on each port that served a stream: a server
        # that closes them is shutting down, whether or not a signal handler told us.
        self._listeners: dict[int, list[tuple[int, int]]] = {}

    # ---------------------------------------------------------------- subscribers
    async def start(self, timeout: float = 5.0) -> None:
        """Make sure the reader runs and knows its cursor (raises if the DB is unreachable)."""
        if self.task is None or self.task.done():
            self.ready = asyncio.Event()
            self.error = ""
            self.task = asyncio.get_running_loop().create_task(self._run(), name="reproq-sse")
        if not self.ready.is_set():
            waiter = asyncio.ensure_future(self.ready.wait())
            done, _ = await asyncio.wait({waiter, self.task}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
                raise ConnectionError(self.error or "the event reader did not start in time")

    def subscribe(self, flt: EventFilter, max_bytes: int = BUFFER_BYTES, *,
                  peer: tuple[str, int, int] | None = None,
                  access_check: AccessCheck | None = None) -> Subscriber:
        sub = Subscriber(flt, max_bytes, peer, access_check)
        self.subscribers.add(sub)
        return sub

    def attach(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)
        port = sub.peer[2] if sub.peer is not None else 0
        if port and port not in self._listeners:
            self._listeners[port] = listening_sockets(port)
        self.watch()

    def unsubscribe(self, sub: Subscriber) -> None:
        self.dropped_total += sub.dropped
        self.subscribers.discard(sub)
        if not self.subscribers:
            self._idle_since = time.monotonic()

    def wake_all(self) -> None:
        for sub in list(self.subscribers):
            sub.wake.set()

    def on_shutdown(self) -> None:
        """Shutdown began (called on this hub's loop): end the streams, and let the watchdog
        see to the connections of streams that ended just before."""
        self.wake_all()
        if self.subscribers or self.ending or self._recent:
            self.watch()

    def buffered(self) -> list[int]:
        """Bytes queued for each open stream."""
        return [sub.buffered for sub in list(self.subscribers)]

    # ---------------------------------------------------------------- watchdog
    def watch(self) -> None:
        """Make sure the watchdog runs (the first stream of a loop starts it)."""
        if self.watchdog is None or self.watchdog.done():
            self.watchdog = asyncio.get_running_loop().create_task(self._watch(),
                                                                   name="reproq-sse-watchdog")

    def ended(self, sub: Subscriber, now: float) -> None:
        """`sub`'s generator finished: Django's final send (and close) follow."""
        sub.ended_at = now
        self.unsubscribe(sub)
        if not sub.closed:
            self.ending.add(sub)
        if sub.peer is not None:
            while self._recent and now - self._recent[0][0] > 60:
                self._recent.popleft()
            self._recent.append((now, sub.peer))

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        write_timeout = number("REPROQ_SSE_WRITE_TIMEOUT_SECONDS", WRITE_TIMEOUT_SECONDS,
                               minimum=0.05)
        # At shutdown it stays until the connections of streams that ended just before were
        # seen to (`_recent` is emptied then).
        while self.subscribers or self.ending or (shutting_down() and self._recent):
            await asyncio.sleep(WATCH_SECONDS)
            now = loop.time()
            if not shutting_down() and self._stopped_listening():
                # E.g. hypercorn's worker: its parent got the signal, and it stops listening
                # before it waits for open connections (ours) to close.
                logger.info("reproq: the server stopped listening; ending the event streams")
                request_shutdown()
            if not shutting_down():
                self._shutdown_at = None
            elif self._shutdown_at is None:
                self._shutdown_at = now
                for sub in list(self.subscribers):
                    sub.stop("shutdown", now)
            doomed = self._inspect(now, write_timeout)
            if self._shutdown_at is not None and now - self._shutdown_at >= END_GRACE_SECONDS:
                # Every stream connection still open now holds the server's shutdown back:
                # those of open streams, of streams in their final send, and of streams that
                # ended just before (their unsent bytes keep the server from closing them).
                doomed.extend(s for s in [*self.subscribers, *self.ending] if s not in doomed)
                peers = {s.peer for s in doomed if s.peer is not None}
                peers |= {p for t, p in self._recent if now - t < write_timeout + 1}
                self._recent.clear()
                self._abort(doomed, peers, "shutdown")
                self._shutdown_at = now  # streams that started since: next round
            elif doomed:
                why = ", ".join(sorted({s.stop_reason or "send blocked" for s in doomed}))
                self._abort(doomed, {s.peer for s in doomed if s.peer is not None},
                            f"{why}; the client does not read")
        self._shutdown_at = None

    def _stopped_listening(self) -> bool:
        for port, sockets in list(self._listeners.items()):
            if sockets and not any(_same_socket(fd, inode) for fd, inode in sockets):
                del self._listeners[port]
                return True
        return False

    def _inspect(self, now: float, write_timeout: float) -> list[Subscriber]:
        """Streams to abort now; starts the access checks that are due."""
        doomed = []
        for sub in list(self.subscribers):
            if sub.aborted:
                continue
            ending = bool(sub.stop_reason)
            limit = END_GRACE_SECONDS if ending else write_timeout
            if sub.sending_since is not None and now - sub.sending_since > limit:
                doomed.append(sub)  # a blocked send, or a bye that cannot get through
            elif ending and now - sub.stop_at > limit + WATCH_SECONDS * 5:
                doomed.append(sub)  # the generator never came back to notice
            elif (sub.access_check is not None and not ending and now >= sub.next_check
                  and sub.checking is None):
                sub.checking = asyncio.get_running_loop().create_task(
                    self._check_access(sub), context=sub.context)
        for sub in list(self.ending):
            if sub.closed:
                self.ending.discard(sub)
            elif sub.ended_at is not None and now - sub.ended_at > write_timeout:
                doomed.append(sub)  # the final send never completed
        return doomed

    async def _check_access(self, sub: Subscriber) -> None:
        loop = asyncio.get_running_loop()
        try:
            assert sub.access_check is not None
            ok = await sub.access_check()
            reason = "access-revoked"
        except Exception as exc:
            # Fail closed: the client reconnects and is authenticated again.
            logger.warning("reproq: SSE access check failed (%s); ending the stream",
                           type(exc).__name__)
            ok, reason = False, "access-unverified"
        finally:
            sub.checking = None
            sub.next_check = loop.time() + ACCESS_CHECK_SECONDS
        if not ok and sub in self.subscribers:
            self.revoked += 1
            sub.stop(reason, loop.time())

    def _abort(self, doomed: list[Subscriber], peers: set[tuple[str, int, int]],
               why: str) -> None:
        found = abort_connections(peers) if peers else 0
        for sub in doomed:
            sub.stop("aborted", asyncio.get_running_loop().time())
            # Not watched any more: Django unsubscribes it when the server reports the loss.
            sub.aborted = True
            self.ending.discard(sub)
        if found:
            self.aborted += found
            logger.info("reproq: aborted %d SSE connection(s) (%s)", found, why)

    # ---------------------------------------------------------------- reader
    def _live_gaps(self) -> list[int]:
        if not self.gaps:
            return []
        horizon = time.monotonic() - GAP_SECONDS
        for gid in [g for g, t in self.gaps.items() if t < horizon]:
            del self.gaps[gid]
        return list(self.gaps)

    def dispatch(self, rows: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for row in rows:
            eid = int(row["id"])
            late = eid <= self.cursor
            if late:
                if self.gaps.pop(eid, None) is None:
                    continue  # already delivered
            else:
                if self.cursor and eid > self.cursor + 1:
                    missing = eid - self.cursor - 1
                    if missing + len(self.gaps) <= MAX_TRACKED_GAPS:
                        for gid in range(self.cursor + 1, eid):
                            self.gaps[gid] = now
                self.cursor = eid
            event = Event.from_row(row)
            chunk = event.chunk(with_id=not late)
            for sub in list(self.subscribers):
                sub.offer(event, chunk)
            self.delivered += 1

    async def fetch(self, conn: Any) -> None:
        while True:
            cur = await conn.execute(FETCH, {"cursor": self.cursor, "gaps": self._live_gaps(),
                                             "limit": FETCH_LIMIT})
            rows = await cur.fetchall()
            self.fetches += 1
            self.dispatch(rows)
            if len(rows) < FETCH_LIMIT:
                return

    def _should_close(self) -> bool:
        if self.subscribers:
            return False
        return shutting_down() or time.monotonic() - self._idle_since > IDLE_CLOSE_SECONDS

    async def _run(self) -> None:
        """Read new events whenever the process's notifier announces some (`Topic.EVENTS`), or
        says to look anyway (a reconnect, a poll tick), and at least every poll interval. The
        reads borrow the process's pool: the hub holds no connection of its own."""
        from ..conf import current_runtime_settings
        from ..runtime import notifier as notifiers
        from ..runtime.ports import Topic

        delay = 0.2
        poll = number("REPROQ_SSE_POLL_SECONDS", 5.0, minimum=0.05)
        rs = current_runtime_settings()
        notifier = notifiers.shared(
            self.alias, poll_interval=None if rs.listen else rs.poll_interval_seconds,
            application_name=f"reproq-listen-{os.getpid()}")
        heard = asyncio.Event()

        def announced(value: str | None) -> None:
            if value is not None:
                self.notifications += 1
            heard.set()

        unsubscribe = notifier.subscribe(Topic.EVENTS, announced)
        try:
            while True:
                try:
                    pool = await db.get_pool(self.alias)
                    if not self.cursor:
                        async with pool.connection(timeout=db.client_timeout(self.alias)) as conn:
                            cur = await conn.execute(LAST_ID)
                            self.cursor = int((await cur.fetchone())["last"])
                    self.connections += 1
                    delay = 0.2
                    self.error = ""
                    self.ready.set()
                    while True:
                        heard.clear()
                        async with pool.connection(timeout=db.client_timeout(self.alias)) as conn:
                            await self.fetch(conn)
                        if self._should_close():
                            # A later start begins at the then-newest event, not here.
                            self.cursor = 0
                            self.gaps.clear()
                            return
                        await asyncio.sleep(COALESCE_SECONDS)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(heard.wait(), poll)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.error = db.describe(exc)
                    logger.warning("reproq: SSE event reader cannot read events (%s); retrying "
                                   "in %.1fs", self.error, delay)
                    if self._should_close():
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, db.RECONNECT_MAX_DELAY)
        finally:
            unsubscribe()


# --------------------------------------------------------------------------- aborting connections


def _host(address: str) -> str:
    return address.removeprefix("::ffff:")  # an IPv4 client of a dual-stack listener


def _socket_fds() -> list[int]:
    for base in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        fds = []
        for name in names:
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                        fds.append(int(name))
        return fds
    return []


def _stream_socket(fd: int) -> socket.socket | None:
    """A duplicate of `fd` if it is a TCP socket (the caller closes it)."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if dup.type != socket.SOCK_STREAM or dup.family not in (socket.AF_INET, socket.AF_INET6):
        dup.close()
        return None
    return dup


def _same_socket(fd: int, inode: int) -> bool:
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


def listening_sockets(port: int) -> list[tuple[int, int]]:
    """(fd, inode) of this process's TCP sockets listening on `port`."""
    found = []
    for fd in _socket_fds():
        dup = _stream_socket(fd)
        if dup is None:
            continue
        with dup, contextlib.suppress(OSError):
            if (dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and dup.getsockname()[1] == port):
                found.append((fd, os.fstat(fd).st_ino))
    return found


def abort_connections(peers: set[tuple[str, int, int]]) -> int:
    """Abort this process's TCP connections to `peers` ((client host, client port, server
    port) as the ASGI scope gave them); returns how many were found.

    ASGI gives an application no way to drop a connection, and a server closing one politely
    first waits for its unsent bytes — for ever when the client stopped reading. So the socket
    is found by its addresses and shut down with SO_LINGER 0: the server's next write fails,
    it sees the connection as lost (and frees it), and its close sends a reset instead of
    keeping the unsent bytes. Only sockets whose both ends match are touched.
    """
    wanted = {(_host(h), cport, sport) for h, cport, sport in peers if cport}
    if not wanted:
        return 0
    found = 0
    for fd in _socket_fds():
        dup = _stream_socket(fd)
        if dup is None:
            continue
        with dup:
            try:
                remote = dup.getpeername()
                local = dup.getsockname()
            except OSError:
                continue  # a listening or unconnected socket
            key = (_host(remote[0]), remote[1], local[1])
            if key not in wanted and (key[0], key[1], 0) not in wanted:
                continue
            with contextlib.suppress(OSError):
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                dup.shutdown(socket.SHUT_RDWR)
                found += 1
    return found


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventHub] = (
    weakref.WeakKeyDictionary())


def get_hub(alias: str | None = None) -> EventHub:
    """The hub of the running event loop (psycopg connections belong to one loop)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = EventHub(alias or backend_database())
    return hub


def hubs() -> list[EventHub]:
    return list(_hubs.values())


async def close_hub() -> None:
    """Stop this loop's hub (tests, shutdown)."""
    from ..runtime import notifier as notifiers

    hub = _hubs.pop(asyncio.get_running_loop(), None)
    for task in (hub.task, hub.watchdog) if hub is not None else ():
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if hub is not None:  # its notifier too, unless the runtime still listens on it
        await notifiers.stop_if_unused(hub.alias)


# --------------------------------------------------------------------------- the stream


def _bye(reason: str, retry_ms: int) -> bytes:
    return (f"retry: {retry_ms}\nevent: bye\ndata: "
            + json.dumps({"reason": reason, "retry_ms": retry_ms}) + "\n\n").encode()


def _gap(info: dict[str, Any]) -> bytes:
    return b"event: gap\ndata: " + json.dumps(info).encode() + b"\n\n"


async def _replay(alias: str, after: int, sub: Subscriber, limit: int) -> AsyncIterator[bytes]:
    """Stored events with id > after, a page at a time (no connection is held while the client
    reads): at most `limit` events and the client's buffer size in bytes, then a gap event if
    some could not be sent."""
    pool = await db.get_pool(alias)
    cursor, rows_seen, sent_bytes = after, 0, 0
    first = True
    while True:
        async with pool.connection() as conn:
            cur = await conn.execute(REPLAY, {"after": cursor, "limit": REPLAY_PAGE})
            rows = await cur.fetchall()
            if first:
                oldest = rows[0]["oldest"] if rows else None
                if oldest is None:
                    cur = await conn.execute("SELECT min(id) AS oldest FROM reproq_events")
                    oldest = (await cur.fetchone())["oldest"]
        if first:
            first = False
            if oldest is not None and after + 1 < int(oldest):
                yield _gap({"reason": "events after the given id were pruned", "after": after,
                            "oldest": int(oldest)})
        parts = []
        truncated = False
        for row in rows:
            if rows_seen >= limit or sent_bytes >= sub.max_bytes:
                truncated = True
                break
            event = Event.from_row(row)
            sub.seen.add(event.id)
            rows_seen += 1
            cursor = event.id
            if sub.filter.matches(event):
                chunk = event.chunk()
                sent_bytes += len(chunk)
                parts.append(chunk)
        if parts:
            yield b"".join(parts)
        if truncated:
            yield _gap({"reason": f"more than {rows_seen} events ({sent_bytes} bytes) to "
                                  "replay; reload the state", "after": cursor})
            return
        if len(rows) < REPLAY_PAGE:
            return


async def stream(hub: EventHub, sub: Subscriber, last_id: int | None) -> AsyncIterator[bytes]:
    max_seconds = number("REPROQ_SSE_MAX_SECONDS", 300.0, minimum=0.1)
    heartbeat = number("REPROQ_SSE_HEARTBEAT_SECONDS", 15.0, minimum=0.05)
    retry_ms = integer("REPROQ_SSE_RETRY_MS", 2000, minimum=0)
    loop = asyncio.get_running_loop()
    reason = "closed"
    yield f"retry: {retry_ms}\n: reproq events from id {hub.cursor}\n\n".encode()
    if last_id is not None:
        async for chunk in _replay(hub.alias, last_id, sub,
                                   integer("REPROQ_SSE_REPLAY_MAX", 1000)):
            yield chunk
            if sub.stop_reason or shutting_down():
                break
        sub.drop_replayed()
    deadline = loop.time() + max_seconds
    next_beat = loop.time() + heartbeat
    while True:
        if sub.stop_reason:
            reason = sub.stop_reason
            break
        if shutting_down():
            reason = "shutdown"
            break
        now = loop.time()
        if now >= deadline:
            reason = "max-age"
            break
        sub.wake.clear()
        if sub.seen:
            sub.prune_seen(hub.cursor, hub.gaps)
        if sub.queue or sub.dropped:
            yield sub.drain()
            next_beat = loop.time() + heartbeat
            continue
        if now >= next_beat:
            yield b": keep-alive\n\n"
            next_beat = now + heartbeat
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(next_beat, deadline) - now):
                await sub.wake.wait()
    yield _bye(reason, 500 if reason == "max-age" else retry_ms)


async def watched(hub: EventHub, sub: Subscriber, chunks: AsyncIterator[bytes]
                  ) -> AsyncIterator[bytes]:
    """`chunks` as the response body, `sub` subscribed meanwhile. Each yield is one send by
    the server: the watchdog sees how long it has been blocked."""
    loop = asyncio.get_running_loop()
    sub.context = contextvars.copy_context()  # the request's (access checks use its thread)
    sub.next_check = loop.time() + ACCESS_CHECK_SECONDS
    hub.attach(sub)
    try:
        async for chunk in chunks:
            sub.sending_since = loop.time()
            yield chunk
            sub.sending_since = None
    finally:
        sub.sending_since = None
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
        hub.ended(sub, loop.time())


class EventStreamResponse(StreamingHttpResponse):
    """Tells the hub when Django is done with the stream (after its final send)."""

    def __init__(self, chunks: AsyncIterator[bytes], sub: Subscriber) -> None:
        super().__init__(chunks, content_type="text/event-stream; charset=utf-8")
        self.subscriber = sub

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.subscriber.closed = True  # a plain flag: Django calls this from a thread


def _last_event_id(request: HttpRequest) -> int | None:
    raw = (request.headers.get("Last-Event-ID") or request.GET.get("last_event_id")
           or request.GET.get("since") or "").strip()
    if not raw:
        return None
    from ..ids import parse_id

    return parse_id(raw, "Last-Event-ID", minimum=0)  # ASCII digits within bigint, or 400


def _peer(request: HttpRequest) -> tuple[str, int, int] | None:
    """(client host, client port, server port) of the request's TCP connection, if known."""
    from ..access import PEER_KEY, PEER_PORT_KEY

    scope = getattr(request, "scope", None) or {}
    client, server = scope.get("client"), scope.get("server")
    if scope.get(PEER_PORT_KEY):  # the socket peer, before a proxy-header rewrite of "client"
        client = (scope[PEER_KEY], scope[PEER_PORT_KEY])
    try:
        host, port = str(client[0]), int(client[1])
        server_port = int(server[1]) if server and server[1] is not None else 0
    except (TypeError, IndexError, ValueError):
        return None
    return (host, port, server_port) if port else None


def _session_is_staff(session_key: str, user_pk: Any) -> bool:
    """The session still logs in `user_pk`, an active staff user (Django's own checks: the
    session exists, its backend is configured, its auth hash matches the password).
    Read-only: nothing is written to the session."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib import auth
    from django.utils.crypto import constant_time_compare

    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    try:
        user_id = auth.get_user_model()._meta.pk.to_python(store[auth.SESSION_KEY])
        backend_path = store[auth.BACKEND_SESSION_KEY]
    except KeyError:
        return False
    if user_id != user_pk or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return False
    user = auth.load_backend(backend_path).get_user(user_id)
    if user is None or not (user.is_active and user.is_staff):
        return False
    if hasattr(user, "get_session_auth_hash"):
        given = store.get(auth.HASH_SESSION_KEY)
        if not given:
            return False
        if not constant_time_compare(given, user.get_session_auth_hash()) and not any(
                constant_time_compare(given, h) for h in user.get_session_auth_fallback_hash()):
            return False
    return True


async def _access_check(request: HttpRequest) -> AccessCheck | None:
    """How the watchdog re-checks this stream's access (None: nothing to re-check)."""
    from asgiref.sync import sync_to_async

    from .. import access

    via = getattr(request, "reproq_auth", "")
    if via == "token":
        async def token_still_valid() -> bool:
            return access.ip_allowed(request) and access.token_ok(request)

        return token_still_valid
    if via == "session":
        session = getattr(request, "session", None)
        key = getattr(session, "session_key", None)
        user = await request.auser()  # cached: the one the decorator checked
        check = sync_to_async(_session_is_staff)

        async def session_still_staff() -> bool:
            return bool(key) and await check(key, user.pk)

        return session_still_staff
    return None


@staff_or_token()
async def events_view(request: HttpRequest) -> HttpResponse:
    """GET /reproq/events/: the event stream (see the module docstring)."""
    try:
        flt = EventFilter.from_query(request.GET)
        last_id = _last_event_id(request)
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    if shutting_down():
        return JsonResponse({"error": "shutting down"}, status=503, headers={"Retry-After": "1"})
    install_signal_hook()
    hub = get_hub()
    try:
        await hub.start()
    except Exception as exc:
        return JsonResponse({"error": f"event stream unavailable: {exc}"}, status=503,
                            headers={"Retry-After": "5"})
    sub = Subscriber(flt, integer("REPROQ_SSE_BUFFER_BYTES", BUFFER_BYTES,
                                  minimum=BUFFER_MIN_BYTES),
                     peer=_peer(request), access_check=await _access_check(request))
    response = EventStreamResponse(watched(hub, sub, stream(hub, sub, last_id)), sub)
    response["Cache-Control"] = "no-cache, no-store"
    response["X-Accel-Buffering"] = "no"
    return response
