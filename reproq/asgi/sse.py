"""Server-Sent Events: ``GET /reproq/events/`` streams the deployment's state changes.

Producers (every process, see `reproq.runtime.events` and the ENQUEUE / SET_PAUSED
statements) write coalesced rows to ``reproq_events`` and NOTIFY the ``reproq`` channel. Here,
one `EventHub` per process (per event loop) keeps ONE dedicated LISTEN connection, started by
the first subscriber and closed when nobody has listened for a while. Any notification (or a
poll every ``REPROQ_SSE_POLL_SECONDS`` as a fallback) makes it read the new rows once —
``WHERE id > cursor ORDER BY id LIMIT 500`` — and fan them out to its subscribers, each with a
bounded queue: a slow client loses its oldest events and gets a ``gap`` event instead, so
memory per client is bounded. Ids are allocated before commit, so a row can become visible
after a higher id was read: skipped ids are re-checked for ``GAP_SECONDS`` and delivered late
(without an SSE ``id:``, so the client's Last-Event-ID never goes backwards).

The stream: ``id: <reproq_events.id>`` + ``data: <json>`` per event, ``: keep-alive`` comments
every ``REPROQ_SSE_HEARTBEAT_SECONDS``, ``Last-Event-ID`` (header, or ``?last_event_id=``)
replays up to ``REPROQ_SSE_REPLAY_MAX`` stored events, filters ``?queue=a,b&task=path&status=
failed,succeeded``. Every stream ends by itself — after ``REPROQ_SSE_MAX_SECONDS``, at once when
the process shuts down (lifespan shutdown, the runtime stopping, or SIGTERM/SIGINT reaching the
server's own handler) — with a ``retry:`` hint and a ``bye`` event, because uvicorn waits for
open connections to close before it even starts the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable
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

FETCH = """
SELECT id, created_at, kind, run_id, task_path, queue_name, worker_id, data
FROM reproq_events
WHERE id > %(cursor)s OR id = ANY(%(gaps)s::bigint[])
ORDER BY id
LIMIT %(limit)s
"""
REPLAY = """
SELECT id, created_at, kind, run_id, task_path, queue_name, worker_id, data,
       (SELECT min(id) FROM reproq_events) AS oldest
FROM reproq_events
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s
"""
LAST_ID = "SELECT coalesce(max(id), 0) AS last FROM reproq_events"
for _name in ("FETCH", "REPLAY", "LAST_ID"):
    sql._NAMES[id(globals()[_name])] = f"SSE_{_name}"


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
                loop.call_soon_threadsafe(hub.wake_all)


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


class Subscriber:
    """One stream's bounded queue of serialized events."""

    __slots__ = ("dropped", "filter", "maxlen", "queue", "seen", "wake")

    def __init__(self, flt: EventFilter, maxlen: int) -> None:
        self.filter = flt
        self.maxlen = maxlen
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self.seen: set[int] = set()  # ids already sent by a replay
        self.wake = asyncio.Event()

    def offer(self, event: Event, chunk: bytes) -> None:
        if event.id in self.seen or not self.filter.matches(event):
            return
        if len(self.queue) >= self.maxlen:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(chunk)
        self.wake.set()

    def drain(self, limit: int = 500) -> bytes:
        parts = []
        if self.dropped:
            parts.append(b"event: gap\ndata: " + json.dumps(
                {"reason": "slow client: oldest events dropped", "dropped": self.dropped}
            ).encode() + b"\n\n")
            self.dropped = 0
        while self.queue and len(parts) < limit:
            parts.append(self.queue.popleft())
        return b"".join(parts)


class EventHub:
    """This process's reader of reproq_events (one LISTEN connection, shared by all streams)."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.subscribers: set[Subscriber] = set()
        self.cursor = 0
        self.gaps: dict[int, float] = {}
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.error = ""
        self.fetches = 0
        self.notifications = 0
        self.delivered = 0
        self.connections = 0
        self.dropped_total = 0
        self._idle_since = time.monotonic()

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

    def subscribe(self, flt: EventFilter, maxlen: int) -> Subscriber:
        sub = Subscriber(flt, maxlen)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.dropped_total += sub.dropped
        self.subscribers.discard(sub)
        if not self.subscribers:
            self._idle_since = time.monotonic()

    def wake_all(self) -> None:
        for sub in list(self.subscribers):
            sub.wake.set()

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
        delay = 0.2
        poll = number("REPROQ_SSE_POLL_SECONDS", 5.0, minimum=0.05)
        while True:
            try:
                conn = await db.connect(self.alias,
                                        application_name=f"reproq-sse-{os.getpid()}"[:63])
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("reproq: SSE event reader cannot connect (%s); retrying in %.1fs",
                               self.error, delay)
                if self._should_close():
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            try:
                await conn.execute(f"LISTEN {sql.CHANNEL}")
                if not self.cursor:
                    cur = await conn.execute(LAST_ID)
                    self.cursor = int((await cur.fetchone())["last"])
                self.connections += 1
                delay = 0.2
                self.ready.set()
                while True:
                    await self.fetch(conn)  # first pass: catch up after a reconnect
                    if self._should_close():
                        # A later start begins at the then-newest event, not here.
                        self.cursor = 0
                        self.gaps.clear()
                        return
                    await asyncio.sleep(COALESCE_SECONDS)
                    async for _ in conn.notifies(timeout=poll, stop_after=1):
                        self.notifications += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("reproq: SSE event reader lost its connection (%s); reconnecting",
                               self.error)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close())
            await asyncio.sleep(delay)


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
    hub = _hubs.pop(asyncio.get_running_loop(), None)
    if hub is not None and hub.task is not None:
        hub.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await hub.task


# --------------------------------------------------------------------------- the stream


def _bye(reason: str, retry_ms: int) -> bytes:
    return (f"retry: {retry_ms}\nevent: bye\ndata: "
            + json.dumps({"reason": reason, "retry_ms": retry_ms}) + "\n\n").encode()


async def _replay(after: int, sub: Subscriber, limit: int) -> AsyncIterator[bytes]:
    """Stored events with id > after (bounded), then a gap event if some could not be sent."""
    from .. import db as dbmod

    pool = await dbmod.get_pool(get_hub().alias)
    async with pool.connection() as conn:
        cur = await conn.execute(REPLAY, {"after": after, "limit": limit + 1})
        rows = await cur.fetchall()
        oldest = rows[0]["oldest"] if rows else None
        if oldest is None:
            cur = await conn.execute("SELECT min(id) AS oldest FROM reproq_events")
            oldest = (await cur.fetchone())["oldest"]
    if oldest is not None and after + 1 < int(oldest):
        yield (b"event: gap\ndata: " + json.dumps(
            {"reason": "events after the given id were pruned", "after": after,
             "oldest": int(oldest)}).encode() + b"\n\n")
    parts = []
    for row in rows[:limit]:
        event = Event.from_row(row)
        sub.seen.add(event.id)
        if sub.filter.matches(event):
            parts.append(event.chunk())
    if parts:
        yield b"".join(parts)
    if len(rows) > limit:
        yield (b"event: gap\ndata: " + json.dumps(
            {"reason": f"more than {limit} events to replay; reload the state",
             "after": after}).encode() + b"\n\n")


async def stream(hub: EventHub, flt: EventFilter, last_id: int | None) -> AsyncIterator[bytes]:
    max_seconds = number("REPROQ_SSE_MAX_SECONDS", 300.0, minimum=0.1)
    heartbeat = number("REPROQ_SSE_HEARTBEAT_SECONDS", 15.0, minimum=0.05)
    retry_ms = integer("REPROQ_SSE_RETRY_MS", 2000, minimum=0)
    sub = hub.subscribe(flt, integer("REPROQ_SSE_QUEUE_SIZE", 1000))
    loop = asyncio.get_running_loop()
    reason = "closed"
    try:
        yield f"retry: {retry_ms}\n: reproq events from id {hub.cursor}\n\n".encode()
        if last_id is not None:
            async for chunk in _replay(last_id, sub, integer("REPROQ_SSE_REPLAY_MAX", 1000)):
                yield chunk
        deadline = loop.time() + max_seconds
        next_beat = loop.time() + heartbeat
        while True:
            if shutting_down():
                reason = "shutdown"
                break
            now = loop.time()
            if now >= deadline:
                reason = "max-age"
                break
            sub.wake.clear()
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
    finally:
        hub.unsubscribe(sub)


def _last_event_id(request: HttpRequest) -> int | None:
    raw = (request.headers.get("Last-Event-ID") or request.GET.get("last_event_id")
           or request.GET.get("since") or "").strip()
    if not raw:
        return None
    from ..ids import parse_id

    return parse_id(raw, "Last-Event-ID", minimum=0)  # ASCII digits within bigint, or 400


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
    response = StreamingHttpResponse(stream(hub, flt, last_id),
                                     content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache, no-store"
    response["X-Accel-Buffering"] = "no"
    return response
