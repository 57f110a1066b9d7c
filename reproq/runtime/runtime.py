"""`Runtime`: one supervised anyio task group per process running every reproq service.

Services, each supervised (a crash is logged, counted and restarted with backoff, and never
reaches the web server): heartbeat, completer, reclaim, promoter, events (`EventPublisher`),
claimer and, with BEAT on, the peer (leadership, ``LEADER``) and the beat. The runtime owns one
`Peer` and hands it to the beat (fires only while leading) and, through a `MaintenanceTurn`, to
the reclaim service (maintenance on the leader only, with a fallback when no leader exists for
a while). Notifications are not a service of the runtime: it subscribes to the process's shared
notifier (`reproq.runtime.notifier`: one LISTEN connection, or a timer in poll-only mode), which
the dashboard's SSE hub shares. Sync tasks of PROCESS_QUEUES run in child processes
(`reproq.runtime.processes`).

Each attempt is an asyncio task of its own (`Executor`), outside the services' task group, so
that shutdown can stop claiming, wait for running attempts up to the grace period, cancel the
rest and put them back to READY without burning an attempt, flush results, and remove the
worker row. Claims and finished attempts are published to the run observers
(`reproq.runtime.observers`; the Prometheus metrics are one).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from django.core.exceptions import ImproperlyConfigured
from django.tasks import task_backends

from .. import db, sql
from ..backend import ReproqBackend
from ..conf import RuntimeSettings, load_runtime_settings, parse_backend_options
from . import notifier as notifiers
from . import observers
from .beat import Beat
from .claimer import Claimer
from .completer import Completer
from .events import EventPublisher
from .executor import Executor
from .gate import RequestGate
from .heap import freeze_startup_heap, frozen_objects
from .heartbeat import Heartbeat
from .outcome import Completion, RetryPolicy
from .peers import AdvisoryLockPeer, LeasePeer, MaintenanceTurn, make_peer
from .ports import Topic, Unsubscribe
from .promoter import Promoter
from .reclaim import Reclaimer
from .registry import WorkerIdentity, detect_server, make_worker_id

logger = logging.getLogger("reproq.runtime")

# Runs whose sync thread is still busy at shutdown come back this long after release: the
# process (and its daemon threads) is gone by then, so the run never executes twice at once.
THREAD_EXIT_MARGIN_SECONDS = 5.0


def build_settings(overrides: dict[str, Any] | None = None) -> RuntimeSettings:
    """Validated settings, or ImproperlyConfigured listing every problem and its fix."""
    rs, problems = load_runtime_settings(overrides)
    if not problems:
        backend_params = task_backends.settings.get(rs.backend, {})
        _, problems = parse_backend_options(rs.backend, backend_params.get("OPTIONS", {}))
    if problems:
        raise ImproperlyConfigured("reproq settings are invalid:\n" +
                                   "\n".join(f"  - {p}" for p in problems))
    return rs


class Runtime:
    """Everything reproq runs inside one process. Create, then ``await run()`` (or use
    `reproq.runtime.host`, which the ASGI integrations and the worker command use)."""

    def __init__(self, settings: RuntimeSettings | None = None, *,
                 overrides: dict[str, Any] | None = None, server: str | None = None) -> None:
        self.settings = settings or build_settings(overrides)
        backend = task_backends[self.settings.backend]
        if not isinstance(backend, ReproqBackend):
            raise ImproperlyConfigured(f"TASKS[{self.settings.backend!r}] is not a reproq backend")
        self.backend = backend
        self.queues: tuple[str, ...] = (self.settings.queues or tuple(sorted(backend.queues))
                                        or ("default",))
        self.worker_id = make_worker_id(self.settings.worker_id)
        self.identity = WorkerIdentity(worker_id=self.worker_id, queues=self.queues,
                                       concurrency=self.settings.concurrency,
                                       server=server or detect_server())
        opts = backend.reproq_options
        self.retry_policy = RetryPolicy(opts.retry_base_seconds, opts.retry_max_seconds,
                                        opts.retry_jitter)
        self.poll_interval = self.settings.poll_fallback_seconds
        # requests first: claims and run starts wait while HTTP requests are in flight here
        self.gate = RequestGate(enabled=self.settings.yield_to_requests,
                                max_wait=self.settings.yield_max_wait_seconds,
                                claim_batch=self.settings.yield_claim_batch)
        self.draining = False
        self.state = "created"
        self.crashes: Counter[str] = Counter()
        self.recent_crashes: dict[str, deque[tuple[float, str]]] = {}  # name: (time, error)
        self.outcomes: Counter[str] = Counter()
        self.started_at: float | None = None
        self.processes: Any = None
        self.pool: Any = None
        self.peer: AdvisoryLockPeer | LeasePeer | None = None  # None: BEAT off, no competing
        self.beat: Beat | None = None
        self._services: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._done: anyio.Event | None = None

    # ------------------------------------------------------------------ hooks used by services
    def worker_row(self) -> dict[str, Any]:
        return self.identity.row()

    def _subscribe(self, notifier: notifiers.AnyNotifier) -> list[Unsubscribe]:
        """What each topic wakes here (value None: look anyway, after a reconnect or a poll)."""
        queues = set(self.queues)

        def ready(queue: str | None) -> None:
            if queue is None or queue in queues:
                self.claimer.wake()

        def due(value: str | None) -> None:
            if value is None:
                self.promoter.poke()
                return
            with contextlib.suppress(ValueError):
                self.promoter.note_due(float(value))

        def cancel(value: str | None) -> None:
            if value is None:  # a poll tick or a reconnect: the heartbeat reports cancels
                if self.executor.running:
                    self.heartbeat.poke()
            elif value.isascii() and value.isdigit():
                self.executor.cancel(int(value))

        return [notifier.subscribe(Topic.READY, ready),
                notifier.subscribe(Topic.QUEUE, lambda _queue: self.claimer.wake()),
                notifier.subscribe(Topic.DUE, due),
                notifier.subscribe(Topic.CANCEL, cancel)]

    def note_claimed(self, rows: list[dict[str, Any]]) -> None:
        self.events.started(rows)
        for row in rows:
            status = row["status"]
            if status == "RUNNING":
                self.outcomes["claimed"] += 1
            elif status == "EXPIRED":
                self.outcomes["EXPIRED"] += 1
            else:
                self.outcomes["deferred"] += 1
        observers.claimed(self, rows)

    def observe(self, completion: Completion) -> None:
        self.outcomes[completion.status] += 1
        self.events.finished(completion)
        observers.finished(self, completion)

    def leadership_changed(self, leading: bool) -> None:
        """Publish a 'leader_changed' event when this process gains or loses leadership (a
        peer subscriber; the event goes out with the next events flush)."""
        peer = self.peer
        if peer is None:
            return
        since = peer.leader_since
        self.events.single("leader_changed", None, data={
            "leader": leading, "since": since.isoformat() if since else None,
            "reason": "" if leading else peer.lost_reason})

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        rs = self.settings
        self._stop, self._done = anyio.Event(), anyio.Event()
        self.executor = Executor(self)
        self.completer = Completer(self)
        self.claimer = Claimer(self)
        self.promoter = Promoter(self)
        self.heartbeat = Heartbeat(self)
        self.events = EventPublisher(self)
        if rs.process_queues:
            from .processes import ProcessPool

            self.processes = ProcessPool(self, rs.process_queues, rs.process_workers)
        self.pool = db.make_pool(self.backend.database, max_size=rs.pool_max_size,
                                 name=f"reproq-{self.worker_id}"[:63])
        await self.pool.open(wait=False)
        db.register_pool(self.backend.database, self.pool)
        database = self.backend.database
        if rs.beat:  # compete for leadership; BEAT off: never lead (maintenance: the fallback)
            self.peer = make_peer(rs, database, self.worker_id, self.worker_row, pool=self.pool)
            self.beat = Beat(rs, self.backend, self.worker_id, self.peer)
        self.reclaimer = Reclaimer(rs, self.pool,
                                   MaintenanceTurn(self.peer, database, rs.leader_timeout_seconds),
                                   wake=self.claimer.wake)
        # One notifier per process and database, shared with the dashboard's SSE hub: LISTEN,
        # or in poll-only mode a timer that tells every subscriber to look for itself.
        self.notifier = notifiers.shared(
            self.backend.database, poll_interval=None if rs.listen else rs.poll_interval_seconds,
            application_name=f"reproq-listen-{self.worker_id}")
        subscriptions = self._subscribe(self.notifier)
        if self.peer is not None:
            subscriptions.append(self.peer.subscribe(self.leadership_changed))
        self.state = "starting"
        try:
            if self.processes is not None:
                await self.processes.start()
            async with anyio.create_task_group() as services:
                self._services = services
                services.start_soon(self._supervise, "heartbeat", self.heartbeat.run)
                services.start_soon(self._supervise, "completer", self.completer.run)
                services.start_soon(self._supervise, "reclaim", self.reclaimer.run)
                services.start_soon(self._supervise, "promoter", self.promoter.run)
                services.start_soon(self._supervise, "events", self.events.run)
                if self.peer is not None and self.beat is not None:
                    services.start_soon(self._supervise, "leader", self.peer.run)
                    services.start_soon(self._supervise, "beat", self.beat.run)
                services.start_soon(self._supervise, "claimer", self.claimer.run)
                frozen = freeze_startup_heap() if rs.gc_freeze else 0
                self.state = "running"
                self.started_at = time.time()
                logger.info("reproq: runtime %s started (queues=%s, concurrency=%d, %s, "
                            "%d startup objects frozen for the GC)",
                            self.worker_id, ",".join(self.queues), rs.concurrency,
                            "LISTEN/NOTIFY" if rs.listen else "poll-only", frozen)
                self.events.single("worker_joined", None, data={
                    "queues": list(self.queues), "concurrency": rs.concurrency,
                    "server": self.identity.server})
                task_status.started()
                await self._stop.wait()
                leftover = await self._drain()
                await self.executor.cancel_all()
                await self._finish(leftover)
                services.cancel_scope.cancel()
        finally:
            self.state = "stopped"
            for unsubscribe in subscriptions:
                unsubscribe()
            with anyio.CancelScope(shield=True):
                await notifiers.stop_if_unused(self.backend.database)
                if hasattr(self, "executor"):
                    await self.executor.cancel_all()  # when cancelled from outside
                    self.executor.threads.close()
                if self.processes is not None:
                    await self.processes.close()
                db.unregister_pool(self.backend.database, self.pool)
                await self.pool.close()
            self._done.set()
            logger.info("reproq: runtime %s stopped", self.worker_id)

    async def _drain(self) -> tuple[list[int], list[int]]:
        """Stop claiming and wait for running jobs up to the grace period; return the rest
        (runs that can be stopped, runs whose sync thread is still busy)."""
        self.state = "stopping"
        self.draining = True
        self.claimer.stopping = True
        self.claimer.wake()
        with anyio.move_on_after(10):
            await self.claimer.exited.wait()
        with anyio.move_on_after(self.settings.shutdown_grace_seconds):
            while self.executor.running:
                await self.executor.slot_freed.wait()
        jobs = list(self.executor.running.values())
        busy_threads = [job.id for job in jobs if job.in_thread]
        leftover = [job.id for job in jobs if not job.in_thread]
        if jobs:
            logger.warning("reproq: %d runs still running after the %.0fs grace period; "
                           "putting them back (%d sync threads: after %.0fs, once this process "
                           "has exited)", len(jobs), self.settings.shutdown_grace_seconds,
                           len(busy_threads), THREAD_EXIT_MARGIN_SECONDS)
        return leftover, busy_threads

    async def _finish(self, leftover: tuple[list[int], list[int]]) -> None:
        stoppable, busy_threads = leftover
        with anyio.CancelScope(shield=True), anyio.move_on_after(10) as bounded:
            try:
                if self.beat is not None:
                    await self.beat.stop()
                if self.peer is not None:  # give leadership up before the worker row goes
                    await self.peer.stop()
                await self.completer.flush()
                await self.release(stoppable)
                await self.release(busy_threads, delay=THREAD_EXIT_MARGIN_SECONDS)
                async with self.pool.connection() as conn:
                    await conn.execute(sql.DELETE_WORKER, {"worker": self.worker_id})
                self.events.single("worker_left", None,
                                   data={"released": len(stoppable) + len(busy_threads)})
                await self.events.flush()
            except db.UNAVAILABLE as exc:  # the database is away: leases cover what is left
                logger.warning("reproq: database unreachable at shutdown (%s); %d results not "
                               "written, runs still held here come back when their lease ends",
                               db.describe(exc), len(self.completer.unwritten()))
        if bounded.cancelled_caught:
            logger.warning("reproq: shutdown writes gave up after 10s (database unreachable?); "
                           "runs still held here come back when their lease ends")

    async def release(self, ids: list[int], delay: float = 0.0) -> None:
        """Put runs this process holds back to READY without burning their attempt (after
        `delay` seconds, for runs whose thread this process cannot stop)."""
        if not ids:
            return
        with anyio.CancelScope(shield=True):
            async with self.pool.connection() as conn:
                await conn.execute(sql.RELEASE, {"ids": ids, "worker": self.worker_id,
                                                 "delay": delay})

    def spawn_background(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Run a one-off coroutine in the services group (e.g. replacing a killed child)."""
        if self._services is not None:
            self._services.start_soon(self._supervise, "background", fn)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def stop(self) -> None:
        """Graceful stop; returns when the runtime has finished."""
        self.request_stop()
        if self._done is not None:
            await self._done.wait()

    async def _supervise(self, name: str, service: Callable[[], Awaitable[Any]]) -> None:
        delay = 0.1
        while True:
            began = time.monotonic()
            try:
                await service()
                return
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                self.crashes[name] += 1
                self._note_crash(name, exc)
                if time.monotonic() - began > 10:
                    delay = 0.1  # it had been healthy: a one-off error restarts it at once
                logger.exception("reproq: %s crashed (%d so far); restarting in %.1fs",
                                 name, self.crashes[name], delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _note_crash(self, name: str, exc: BaseException) -> None:
        window = self.recent_crashes.setdefault(
            name, deque(maxlen=self.settings.crash_loop_restarts))
        window.append((time.monotonic(), type(exc).__name__))

    def degraded(self) -> dict[str, str]:
        """Services that keep crashing: CRASH_LOOP_RESTARTS restarts within CRASH_LOOP_SECONDS
        (name: reason). The exception's class is named, never its message (it may quote data)."""
        rs, now = self.settings, time.monotonic()
        out: dict[str, str] = {}
        for name, window in self.recent_crashes.items():
            span = now - window[0][0]
            if len(window) >= rs.crash_loop_restarts and span <= rs.crash_loop_seconds:
                out[name] = (f"{name} restarted {len(window)} times in the last "
                             f"{span:.0f}s (last error: {window[-1][1]})")
        return out

    def status(self) -> dict[str, Any]:
        """A small health summary for /healthz and the worker command."""
        degraded = self.degraded()
        return {
            "degraded": sorted(degraded), "degraded_reasons": [degraded[k] for k in
                                                               sorted(degraded)],
            "worker_id": self.worker_id, "state": self.state, "queues": list(self.queues),
            "running": len(self.executor.running) if hasattr(self, "executor") else 0,
            "crashes": dict(self.crashes), "outcomes": dict(self.outcomes),
            "listening": bool(getattr(self, "notifier", None) and self.notifier.connected),
            "notifier": self.notifier.status() if hasattr(self, "notifier") else None,
            "leader": (self.beat.status() if self.beat is not None
                       else {"enabled": False, "role": "off", "is_leader": False}),
            "maintenance": self.reclaimer.status() if hasattr(self, "reclaimer") else None,
            "gate": self.gate.status(),
            "gc_frozen_objects": frozen_objects(),
        }
