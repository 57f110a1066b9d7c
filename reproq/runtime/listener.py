"""The LISTEN connection: one dedicated autocommit connection per process, outside the pool.

Payloads (see `reproq.sql`) wake the claimer, tell the promoter about deferred rows and pass
cancellations to the executor. When the connection dies it reconnects with backoff (at most
`db.RECONNECT_MAX_DELAY` apart: the database may be back any moment), re-LISTENs and then wakes
everything for a catch-up sweep (notifications sent meanwhile are lost). A quiet connection is
pinged every PING_SECONDS (bounded in time): a connection that went half-open in a network
partition would otherwise wait for notifications for ever.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import anyio
import psycopg

from .. import db, sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
PING_SECONDS = 5.0  # a LISTEN connection quiet this long is checked with a bounded round trip


class Listener:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.connected = anyio.Event()
        self.connections = 0
        self.received = 0
        self.conn: psycopg.AsyncConnection | None = None
        self.backend_pid: int | None = None

    async def run(self) -> None:
        rt = self.runtime
        delay = 0.1
        cap = db.RECONNECT_MAX_DELAY
        while True:
            try:
                conn = await db.connect(rt.backend.database,
                                        application_name=f"reproq-listen-{rt.worker_id}"[:63])
            except psycopg.OperationalError as exc:
                logger.warning("reproq: LISTEN connection failed (%s); retrying in %.1fs",
                               exc.__class__.__name__, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            self.conn = conn
            try:
                bound = db.round_trip_bound(rt.settings.lease_seconds)
                with anyio.fail_after(bound):
                    await conn.execute(f"LISTEN {sql.CHANNEL}")
                self.backend_pid = conn.info.backend_pid
                self.connections += 1
                if self.connections > 1:
                    logger.info("reproq: LISTEN connection re-established; sweeping for work")
                self.connected.set()
                delay = 0.1
                rt.wake_all()  # catch up on anything sent while we were not listening
                quiet = min(rt.settings.poll_fallback_seconds, PING_SECONDS)
                while True:
                    heard = False
                    async for note in conn.notifies(timeout=quiet):
                        heard = True
                        self.received += 1
                        self.dispatch(note.payload)
                    if not heard:
                        with anyio.fail_after(bound):  # still there? (half-open otherwise)
                            await conn.execute("SELECT 1")
            except (psycopg.OperationalError, TimeoutError) as exc:
                logger.warning("reproq: LISTEN connection lost (%s); reconnecting",
                               exc.__class__.__name__)
                self.connected = anyio.Event()
            finally:
                self.conn = None
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await conn.close()
            await anyio.sleep(delay)

    def dispatch(self, payload: str) -> None:
        kind, _, value = payload.partition(":")
        rt = self.runtime
        if kind == "r":
            if value in rt.queues:
                rt.claimer.wake()
        elif kind == "w":
            with contextlib.suppress(ValueError):
                rt.promoter.note_due(float(value))
        elif kind == "c":
            if value.isdigit():
                rt.executor.cancel(int(value))
        elif kind == "q":
            rt.claimer.wake()
