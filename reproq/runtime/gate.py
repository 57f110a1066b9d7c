"""Requests first: the embedded runtime yields the event loop to in-flight HTTP requests.

This module owns two things:

* `REQUESTS`, the process-wide count of HTTP requests in flight. The ASGI wrapper
  (`reproq.asgi.lifespan`) enters a request when its ``http`` scope arrives and leaves it when
  the response is complete — or as soon as the response turns out to be a stream (an SSE
  ``text/event-stream`` response start, or a first body chunk with ``more_body``), so
  long-lived streams such as ``/reproq/events/`` never count. WebSockets never count, nor does
  anything in a process without an ASGI server (``manage.py reproq worker``: always 0).
* `RequestGate`, the runtime's side (``runtime.gate``): `RequestGate.wait` is awaited before
  the runtime *starts* new work — before each claim (`Claimer.run`) and before each claimed run
  begins (`Executor._run`). It returns at once when no request is in flight; otherwise it waits
  until none is, for at most ``YIELD_MAX_WAIT_SECONDS``. A wait that hits that bound opens the
  gate for the same time again (every wait then returns at once), so under continuous traffic
  the runtime still gets at least half the time and tasks are never starved. Requests older
  than the bound stop counting (a slow or long-polling view does not throttle the runtime for
  its whole life).

While requests keep arriving (one started within TRAFFIC_WINDOW_SECONDS), `claim_limit` also
caps each claim at ``YIELD_CLAIM_BATCH`` runs, and the claimer takes the next bite when a slot
frees or after ``YIELD_MAX_WAIT_SECONDS``: the event loop then runs a few tasks at a time between
requests instead of a whole batch, and a backlog is drained at a pace that leaves the cores
some room. Long-running tasks still reach full concurrency, a bite at a time.

Running tasks, result writes, heartbeats and the notifier are never held back: only the start
of new work is. Setting ``YIELD_TO_REQUESTS`` to False turns the gate off (wait() returns at
once, the count is still kept).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import anyio

TRAFFIC_WINDOW_SECONDS = 1.0  # requests this recent make claims smaller (`claim_limit`)


class RequestCounter:
    """HTTP requests in flight in this process, by start time (insertion order = start order).

    Everything runs on the server's event loop thread; `enter`/`leave` are O(1)."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._ids = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []
        self.total = 0  # requests entered since the process started
        self.last_started = float("-inf")  # monotonic time of the latest `enter`

    @property
    def inflight(self) -> int:
        return len(self._started)

    def enter(self) -> int:
        """Count a request as in flight; return its token for `leave`."""
        token = next(self._ids)
        self._started[token] = self.last_started = time.monotonic()
        self.total += 1
        return token

    def leave(self, token: int) -> None:
        """The request's response is complete (or streaming): stop counting it (idempotent)."""
        if self._started.pop(token, None) is not None and not self._started:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def newest(self) -> float | None:
        """Start time of the most recent request still in flight, if any."""
        if not self._started:
            return None
        return next(reversed(self._started.values()))

    def idle_future(self) -> asyncio.Future[None]:
        """A future on the running loop, resolved when no request is in flight any more."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def forget(self, fut: asyncio.Future[None]) -> None:
        if fut in self._waiters:
            self._waiters.remove(fut)

    def reset(self) -> None:
        """Forget every request (tests; a server that crashed mid-request)."""
        self._started.clear()
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)


REQUESTS = RequestCounter()


class RequestGate:
    """The runtime's "requests first" gate: hold back the start of new work while HTTP requests
    are in flight, at most `max_wait` seconds per wait."""

    def __init__(self, *, enabled: bool, max_wait: float, claim_batch: int = 4,
                 requests: RequestCounter = REQUESTS) -> None:
        self.enabled = enabled
        self.max_wait = max_wait
        self.claim_batch = claim_batch
        self.requests = requests
        self.capped = 0  # claims made smaller by `claim_limit`
        self.waits = 0  # waits that found a request in flight
        self.timeouts = 0  # of which ended at max_wait with requests still in flight
        self.waited_seconds = 0.0
        self._open_until = 0.0  # after a wait hit max_wait: the gate stays open until then

    def busy(self, now: float | None = None) -> bool:
        """True while a request younger than `max_wait` is in flight (and the gate is on)."""
        if not self.enabled:
            return False
        newest = self.requests.newest()
        if newest is None:
            return False
        return (time.monotonic() if now is None else now) - newest < self.max_wait

    def traffic(self, now: float | None = None) -> bool:
        """True while requests keep arriving: one in flight or one started within
        TRAFFIC_WINDOW_SECONDS (and the gate is on)."""
        if not self.enabled:
            return False
        if self.requests.inflight:
            return True
        now = time.monotonic() if now is None else now
        return now - self.requests.last_started < TRAFFIC_WINDOW_SECONDS

    def claim_limit(self, free: int) -> int:
        """How many of `free` slots the next claim may fill: all of them, or at most
        ``YIELD_CLAIM_BATCH`` while requests keep arriving."""
        if free > self.claim_batch and self.traffic():
            self.capped += 1
            return self.claim_batch
        return free

    async def wait(self) -> None:
        """Return once no request younger than `max_wait` is in flight, or after `max_wait`."""
        if not self.enabled or not self.requests.inflight:
            return  # the common case costs no loop turn
        began = time.monotonic()
        if began < self._open_until or not self.busy(began):
            return
        self.waits += 1
        deadline = began + self.max_wait
        try:
            while True:
                now = time.monotonic()
                newest = self.requests.newest()
                if newest is None or now - newest >= self.max_wait:
                    return
                if now >= deadline:
                    self.timeouts += 1
                    self._open_until = now + self.max_wait
                    return
                fut = self.requests.idle_future()
                try:
                    with anyio.move_on_after(min(deadline, newest + self.max_wait) - now):
                        await fut
                finally:
                    self.requests.forget(fut)
        finally:
            self.waited_seconds += time.monotonic() - began

    def status(self) -> dict[str, float | int | bool]:
        return {"enabled": self.enabled, "max_wait_seconds": self.max_wait,
                "claim_batch": self.claim_batch, "capped_claims": self.capped,
                "inflight": self.requests.inflight, "waits": self.waits,
                "timeouts": self.timeouts, "waited_seconds": round(self.waited_seconds, 3)}
