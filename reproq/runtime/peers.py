"""Leadership among the processes of one database: two implementations of `ports.Peer`.

Chosen by ``REPROQ_RUNTIME["LEADER"]`` (`make_peer`); whoever leads runs the beat (cron ticks)
and the maintenance sweeps (`reproq.runtime.reclaim`). Both peers keep the leader's
``reproq_workers.leader_since`` set while it leads and clear it on every other row when a new
leader takes over; both trust their leadership only until a *local* deadline
(``LEADER_TIMEOUT_SECONDS`` after the last successful check was *sent*, less 10%), give it up
on any doubt, and tell their subscribers when leadership is gained or lost. A process that just
lost leadership waits twice as long as a standby before competing again, so that a healthy
standby, not a flapping leader, takes over.

`AdvisoryLockPeer` (``LEADER = "advisory"``, the default)
    One dedicated, non-pooled connection (a session advisory lock on a pooled connection would
    outlive its user). Standbys try ``pg_try_advisory_lock(key)`` every
    ``BEAT_INTERVAL_SECONDS``; the key is fixed and derived from the database name. The leader
    acquires once and then proves the connection alive every interval (`PEER_CHECK`, bounded by
    a timeout). The server enforces the bound from its side: the connection runs with
    ``idle_session_timeout = LEADER_TIMEOUT_SECONDS`` (and half that as statement_timeout), so a
    hung or partitioned leader's session, and with it the lock, ends within the timeout. A dead
    process or a killed backend releases the lock at once; a standby takes it at its next try.
    `leading()` yields the lock connection: what runs on it can only run while that session
    holds the lock.

`LeasePeer` (``LEADER = "lease"``)
    A row in ``reproq_leaders`` with an expiry, on pool connections, with no session state at
    all (no advisory lock, no ``options`` startup parameter, no LISTEN, no prepared statement
    that outlives a transaction): it works through a transaction pooler (PgBouncer). Standbys
    try `LEASE_ELECT` every interval — one statement that takes the row if it is free, expired
    or already ours — the leader renews it every interval (`LEASE_RENEW`, TTL
    ``LEADER_TIMEOUT_SECONDS``) and deletes it at shutdown (`LEASE_RESIGN`). A dead or hung
    leader's lease runs out after the TTL: failover takes up to ``LEADER_TIMEOUT_SECONDS`` +
    ``BEAT_INTERVAL_SECONDS`` whatever happened (a shutdown: one interval). `leading()` yields a
    pool connection inside a transaction whose first statement (`LEASE_FENCE`) checks that the
    lease is still ours and share-locks its row: no other process can take the lease before that
    transaction ends, so what it writes commits only while this process leads.

Either way a leader's belief can be stale for a moment; exactly-once cron ticks do not rest on
leadership but on the unique tick row (`reproq.runtime.beat`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import psycopg

from .. import db, sql
from .ports import NotLeader, Peer, Unsubscribe
from .stoploop import StopLoop

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from ..conf import RuntimeSettings

logger = logging.getLogger("reproq.beat")

LEASE_NAME = "reproq"  # the row of reproq_leaders this database's leadership is
# Maintenance without a live leader: any process runs it after this many LEADER_TIMEOUTs.
FALLBACK_TIMEOUTS = 3

# --------------------------------------------------------------------------- advisory lock

# A standby's attempt (every interval) to take the leader lock on its dedicated connection.
TRY_LOCK = "SELECT pg_try_advisory_lock(%(key)s::bigint) AS locked"

# Became leader: register (or refresh) this worker's row with leader_since = now and clear the
# flag on every other row (their holder lost the lock, or they would still hold it).
MARK_LEADER = """
WITH me AS (
    INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                                started_at, last_seen_at, leader_since)
    VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
            %(version)s, %(started_at)s, now(), now())
    ON CONFLICT (id) DO UPDATE SET leader_since = now(), last_seen_at = now()
    RETURNING leader_since
), deposed AS (
    UPDATE reproq_workers SET leader_since = NULL
    WHERE id <> %(worker)s AND leader_since IS NOT NULL
    RETURNING id
)
SELECT (SELECT leader_since FROM me) AS leader_since, (SELECT count(*) FROM deposed) AS deposed,
       pg_backend_pid() AS backend_pid
"""

# The advisory leader's liveness check, once per interval on the lock connection: proves the
# session alive (the trust deadline restarts from when it was sent) and keeps the worker row
# and its leader_since current (a standalone beat has no heartbeat that would).
PEER_CHECK = """
INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                            started_at, last_seen_at, leader_since)
VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
        %(version)s, %(started_at)s, now(), %(leader_since)s)
ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), leader_since = EXCLUDED.leader_since
"""

# Leaving leadership (shutdown) or clearing a stale flag after a reconnect.
RESIGN = """
WITH me AS (
    UPDATE reproq_workers SET leader_since = NULL
    WHERE id = %(worker)s AND leader_since IS NOT NULL
    RETURNING id
)
SELECT CASE WHEN %(unlock)s THEN pg_advisory_unlock(%(key)s::bigint) END AS unlocked,
       (SELECT count(*) FROM me) AS cleared
"""

# Who holds the leader lock now (pg_locks splits a bigint key into classid/objid, objsubid 1).
LOCK_HOLDER = """
SELECT l.pid, a.application_name, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(hi)s::bigint::oid AND l.objid = %(lo)s::bigint::oid
"""

# --------------------------------------------------------------------------- lease

# A standby's attempt (every interval): take the lease row if there is none, it expired or it
# is already ours - one statement - and, only if taken, mark this worker the leader and clear
# leader_since on every other row (like MARK_LEADER). `holder`/`holder_expires` are the row as
# it was before this statement (who leads, when this one lost).
LEASE_ELECT = """
WITH won AS (
    INSERT INTO reproq_leaders AS l (name, worker_id, elected_at, expires_at)
    VALUES (%(name)s, %(worker)s, now(), now() + make_interval(secs => %(ttl)s))
    ON CONFLICT (name) DO UPDATE
        SET worker_id = EXCLUDED.worker_id, elected_at = EXCLUDED.elected_at,
            expires_at = EXCLUDED.expires_at
        WHERE l.expires_at < now() OR l.worker_id = EXCLUDED.worker_id
    RETURNING l.expires_at
), me AS (
    INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                                started_at, last_seen_at, leader_since)
    SELECT %(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
           %(version)s, %(started_at)s, now(), now()
    FROM won
    ON CONFLICT (id) DO UPDATE SET leader_since = now(), last_seen_at = now()
    RETURNING leader_since
), deposed AS (
    UPDATE reproq_workers SET leader_since = NULL
    WHERE id <> %(worker)s AND leader_since IS NOT NULL AND EXISTS (SELECT 1 FROM won)
    RETURNING id
)
SELECT (SELECT leader_since FROM me) AS leader_since, (SELECT count(*) FROM deposed) AS deposed,
       (SELECT expires_at FROM won) AS expires_at,
       o.worker_id AS holder, o.expires_at AS holder_expires
FROM (SELECT 1) AS one LEFT JOIN reproq_leaders o ON o.name = %(name)s
"""

# The lease leader's renewal, once per interval: extend the lease if it is still ours (a lease
# that ran out but nobody took is still ours: nobody led meanwhile) and keep the worker row and
# its leader_since current. No row back: the lease is gone.
LEASE_RENEW = """
WITH lease AS (
    UPDATE reproq_leaders SET expires_at = now() + make_interval(secs => %(ttl)s)
    WHERE name = %(name)s AND worker_id = %(worker)s
    RETURNING expires_at
), me AS (
    INSERT INTO reproq_workers (id, hostname, pid, queues, concurrency, server, version,
                                started_at, last_seen_at, leader_since)
    SELECT %(worker)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(server)s,
           %(version)s, %(started_at)s, now(), %(leader_since)s
    FROM lease
    ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), leader_since = EXCLUDED.leader_since
    RETURNING id
)
SELECT expires_at, (SELECT count(*) FROM me) AS marked FROM lease
"""

# First statement of every `LeasePeer.leading()` transaction: the lease is ours and unexpired,
# and its row stays share-locked until the transaction ends, so an election (an UPDATE of that
# row) by another process waits until then: what the transaction writes commits while we lead.
# The transaction's own timeouts (SET LOCAL: nothing outlives it, pooler-safe) bound how long a
# hung leader can hold that lock: the server ends a transaction idle for `idle_ms`.
LEASE_FENCE = """
SELECT expires_at,
       set_config('idle_in_transaction_session_timeout', %(idle_ms)s, true) AS idle_timeout,
       set_config('statement_timeout', %(statement_ms)s, true) AS statement_timeout
FROM reproq_leaders
WHERE name = %(name)s AND worker_id = %(worker)s AND expires_at > now()
FOR SHARE
"""

# Leaving leadership (shutdown): delete the lease if it is ours (a standby takes over at its
# next try) and clear this worker's leader_since.
LEASE_RESIGN = """
WITH gone AS (
    DELETE FROM reproq_leaders WHERE name = %(name)s AND worker_id = %(worker)s RETURNING 1
), me AS (
    UPDATE reproq_workers SET leader_since = NULL
    WHERE id = %(worker)s AND leader_since IS NOT NULL
    RETURNING id
)
SELECT (SELECT count(*) FROM gone) AS released, (SELECT count(*) FROM me) AS cleared
"""

# Who holds the lease (live or not).
LEASE_HOLDER = """
SELECT worker_id, elected_at, expires_at, expires_at > now() AS live
FROM reproq_leaders WHERE name = %(name)s
"""

# --------------------------------------------------------------------------- either

# Is anyone leading, by either peer (a live lease or a held leader lock)? Asked by processes
# that do not lead before they run leader-only maintenance themselves (`MaintenanceTurn`).
LEADER_ALIVE = """
SELECT EXISTS (SELECT 1 FROM reproq_leaders WHERE name = %(name)s AND expires_at > now())
       OR EXISTS (SELECT 1 FROM pg_locks l
                  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                    AND l.database = (SELECT oid FROM pg_database
                                      WHERE datname = current_database())
                    AND l.classid = %(hi)s::bigint::oid AND l.objid = %(lo)s::bigint::oid)
       AS alive
"""

# Name the statements for `reproq.db.statement_counts` (the names live in `reproq.sql`).
sql.name_statements(globals(), ("TRY_LOCK", "MARK_LEADER", "PEER_CHECK", "RESIGN", "LOCK_HOLDER",
                                "LEASE_ELECT", "LEASE_RENEW", "LEASE_FENCE", "LEASE_RESIGN",
                                "LEASE_HOLDER", "LEADER_ALIVE"))


def lock_key(database_name: str) -> int:
    """The leader lock's key: a fixed signed 64-bit number derived from the database name."""
    digest = hashlib.sha256(f"reproq.beat:{database_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_key_parts(key: int) -> dict[str, int]:
    """The key as pg_locks shows it: classid (high 32 bits) and objid (low 32 bits)."""
    return {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}


def lock_key_for_alias(alias: str) -> int:
    from django.db import connections

    return lock_key(str(connections[alias].settings_dict["NAME"]))


class LeadershipLost(Exception):
    """Leadership is in doubt: the trust deadline passed or the connection misbehaved."""


WorkerRow = Callable[[], dict[str, Any]]
_DB_ERRORS = (psycopg.Error, OSError, TimeoutError)


class ElectedPeer(Peer, Protocol):
    """A `Peer` that can also lead for one pass (``reproq beat --once``)."""

    kind: str
    holder: str

    def once(self) -> AbstractAsyncContextManager[bool]:
        """Lead for the duration of the block if nobody else does (True), else False
        (`holder` then says who leads); leadership is given up at the end."""
        ...


class _PeerBase(StopLoop):
    """What both peers share: the trust deadline, subscribers, status, the stop signal."""

    kind = ""
    noun = ""

    def __init__(self, settings: RuntimeSettings, database: str, worker_id: str,
                 worker_row: WorkerRow, *, standalone: bool = False) -> None:
        self.settings = settings
        self.database = database
        self.worker_id = worker_id
        self.worker_row = worker_row
        self.standalone = standalone  # a `reproq beat` process: its worker row goes at resign
        self.role = "stopped"
        self.leader_since: datetime | None = None
        self.leaderships = 0
        self.last_check: float | None = None
        self.lost_reason = ""
        self.holder = ""
        self._leader = False
        self._trust_until = 0.0
        self._init_stop()
        self._doubt = ""
        self._subscribers: list[Callable[[bool], None]] = []

    # ------------------------------------------------------------------ settings
    @property
    def interval(self) -> float:
        return self.settings.beat_interval_seconds

    @property
    def timeout(self) -> float:
        return self.settings.leader_timeout_seconds

    @property
    def check_timeout(self) -> float:
        """Bound on one check (and on one statement inside `leading()`)."""
        return max(self.timeout / 3, 0.2)

    # ------------------------------------------------------------------ Peer
    @property
    def is_leader(self) -> bool:
        """Leading, and the last successful check is recent enough to trust it."""
        return self._leader and time.monotonic() <= self._trust_until

    def subscribe(self, callback: Callable[[bool], None]) -> Unsubscribe:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop competing; a leader gives leadership up (a standby takes over at its next
        try). Returns once `run` has returned (at most `timeout` seconds)."""
        await self._stop_and_wait(timeout)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.settings.beat, "kind": self.kind, "role": self.role,
            "is_leader": self.is_leader, "worker_id": self.worker_id,
            "since": self.leader_since.isoformat() if self.leader_since else None,
            "leaderships": self.leaderships,
            "last_check_age": (round(time.monotonic() - self.last_check, 3)
                               if self.last_check is not None and self.is_leader else None),
            "lost_reason": self.lost_reason,
        }

    # ------------------------------------------------------------------ internals
    def _trust(self, sent: float) -> None:
        # The lease (or the server's idle_session_timeout) runs LEADER_TIMEOUT from a moment
        # after `sent`: until sent + timeout nobody else can have taken over. 10% margin.
        self._trust_until = sent + self.timeout * 0.9
        self.last_check = sent

    def _check(self) -> None:
        if self._doubt:
            raise LeadershipLost(self._doubt)
        if time.monotonic() > self._trust_until:
            raise LeadershipLost("trust deadline passed without a successful check")

    def _gained(self, since: datetime | None, sent: float, where: str) -> None:
        self.leader_since = since
        self.leaderships += 1
        self.lost_reason = ""
        self._doubt = ""
        self._trust(sent)
        self._leader = True
        self.role = "leader"
        logger.info("reproq: %s is the beat leader (%s)", self.worker_id, where)
        self._tell(True)

    def _lose(self, reason: str) -> None:
        was = self._leader
        if was:
            logger.warning("reproq: %s gave up beat leadership (%s)", self.worker_id, reason)
            self.lost_reason = reason
        self._leader = False
        self.leader_since = None
        self.role = "standby"
        if was:
            self._tell(False)

    def _released(self) -> None:
        if self._leader:
            logger.info("reproq: %s released beat leadership", self.worker_id)
            self._leader = False
            self.leader_since = None
            self._tell(False)

    def _tell(self, leading: bool) -> None:
        for callback in list(self._subscribers):
            try:
                callback(leading)
            except Exception:
                logger.exception("reproq: a leadership subscriber failed")

    def _doubted(self, exc: BaseException) -> None:
        """A statement inside `leading()` failed: leadership is in doubt (the run loop gives
        it up at once and reconnects)."""
        self._doubt = f"{type(exc).__name__}: {exc}".strip()
        self._leader = False
        self._poke()

    async def _execute(self, conn: psycopg.AsyncConnection, query: str,
                       params: dict[str, Any]) -> list[dict[str, Any]]:
        with anyio.fail_after(self.check_timeout):
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    async def _compete_after(self, was_leader: bool) -> None:
        # A process that just lost leadership waits longer than a standby does, so that a
        # healthy standby, not a flapping leader, takes over.
        if not self._stopping:
            await self._sleep(2 * self.interval if was_leader else self.interval)


class AdvisoryLockPeer(_PeerBase):
    """Leadership = a session advisory lock on a dedicated connection (module docstring)."""

    kind = "advisory"
    noun = "lock"

    def __init__(self, settings: RuntimeSettings, database: str, worker_id: str,
                 worker_row: WorkerRow, *, standalone: bool = False) -> None:
        super().__init__(settings, database, worker_id, worker_row, standalone=standalone)
        self.key = lock_key_for_alias(database)
        self.backend_pid: int | None = None
        self._conn: psycopg.AsyncConnection | None = None

    def status(self) -> dict[str, Any]:
        return {**super().status(),
                "lock_backend_pid": self.backend_pid if self.is_leader else None}

    @asynccontextmanager
    async def leading(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """The lock connection, while this process holds the lock (else `NotLeader`); a
        statement that fails on it puts leadership in doubt (given up, reconnected)."""
        conn = self._conn
        if conn is None or not self.is_leader:
            raise NotLeader(f"{self.worker_id} does not hold the beat leader lock")
        try:
            yield conn
        except _DB_ERRORS as exc:
            self._doubted(exc)
            raise

    # ------------------------------------------------------------------ connection
    async def _connect(self) -> psycopg.AsyncConnection:
        from django.db import connections

        timeout = self.timeout
        base = str(connections[self.database].get_connection_params().get("options") or "")
        options = (f"{base} -c idle_session_timeout={int(timeout * 1000)} "
                   f"-c statement_timeout={int(timeout * 500)}").strip()
        with anyio.fail_after(timeout):
            conn = await db.connect(
                self.database, application_name=f"reproq-beat-{self.worker_id}"[:63],
                options=options, connect_timeout=max(2, int(timeout / 3)), keepalives=1,
                keepalives_idle=max(1, int(timeout / 3)), keepalives_interval=1,
                keepalives_count=3)
        self.backend_pid = conn.info.backend_pid
        return conn

    async def _close(self, conn: psycopg.AsyncConnection) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                contextlib.suppress(Exception):
            await conn.close()

    # ------------------------------------------------------------------ service
    async def run(self) -> None:
        """Compete for the lock until `stop()`; while holding it, check it every interval."""
        self._events()
        delay = self.interval
        try:
            while not self._stopping:
                self.role = "connecting"
                try:
                    conn = await self._connect()
                except _DB_ERRORS as exc:
                    logger.warning("reproq: beat connection failed (%s); retrying in %.1fs",
                                   db.describe(exc), delay)
                    await self._sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = self.interval
                was_leader = False
                try:
                    was_leader = await self._compete(conn)
                except (*_DB_ERRORS, LeadershipLost) as exc:
                    was_leader = self._leader or bool(self._doubt)
                    self._lose(f"{type(exc).__name__}: {exc}".strip())
                finally:
                    self._conn = None
                    await self._close(conn)
                    if self._leader:
                        self._lose("stopped")
                await self._compete_after(was_leader)
        finally:
            self.role = "stopped"
            self._ended()

    async def _compete(self, conn: psycopg.AsyncConnection) -> bool:
        """Standby loop on one connection; returns True if it led (then stopped)."""
        self.role = "standby"
        self._doubt = ""
        await self._execute(conn, RESIGN, {"worker": self.worker_id, "unlock": False,
                                           "key": self.key})
        while not self._stopping:
            rows = await self._execute(conn, TRY_LOCK, {"key": self.key})
            if rows[0]["locked"]:
                await self._become_leader(conn)
                await self._hold(conn)
                await self._resign(conn)
                return True
            await self._sleep(self.interval * random.uniform(0.75, 1.0))
        return False

    async def _become_leader(self, conn: psycopg.AsyncConnection) -> None:
        sent = time.monotonic()
        rows = await self._execute(conn, MARK_LEADER, {"worker": self.worker_id,
                                                       **self.worker_row()})
        self.backend_pid = rows[0]["backend_pid"]
        self._conn = conn
        self._gained(rows[0]["leader_since"], sent, f"lock connection pid {self.backend_pid}")

    async def _hold(self, conn: psycopg.AsyncConnection) -> None:
        """The leader's loop: a liveness check every interval until stopped or in doubt."""
        while True:
            await self._sleep(self.interval)
            if self._stopping:
                return
            self._check()
            sent = time.monotonic()
            await self._execute(conn, PEER_CHECK, {"worker": self.worker_id,
                                                   **self.worker_row(),
                                                   "leader_since": self.leader_since})
            self._trust(sent)

    async def _resign(self, conn: psycopg.AsyncConnection) -> None:
        self._conn = None
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._execute(conn, RESIGN, {"worker": self.worker_id, "unlock": True,
                                               "key": self.key})
            if self.standalone:
                await self._execute(conn, sql.DELETE_WORKER, {"worker": self.worker_id})
        self._released()

    @asynccontextmanager
    async def once(self) -> AsyncIterator[bool]:
        """Lead for the block if the lock is free (``reproq beat --once``)."""
        self._events()
        conn = await self._connect()
        try:
            rows = await self._execute(conn, TRY_LOCK, {"key": self.key})
            if not rows[0]["locked"]:
                self.holder = await self.holder_description(conn)
                yield False
                return
            await self._become_leader(conn)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._hold_quietly, conn)
                    try:
                        yield True
                    finally:
                        self._stopping = True
                        self._poke()
            finally:
                await self._resign(conn)
        finally:
            self._ended()
            await self._close(conn)

    async def _hold_quietly(self, conn: psycopg.AsyncConnection) -> None:
        try:
            await self._hold(conn)
        except (*_DB_ERRORS, LeadershipLost) as exc:
            self._lose(f"{type(exc).__name__}: {exc}".strip())

    async def holder_description(self, conn: psycopg.AsyncConnection) -> str:
        with contextlib.suppress(Exception):
            rows = await self._execute(conn, LOCK_HOLDER, lock_key_parts(self.key))
            if rows:
                return f"{rows[0]['application_name'] or '?'} (backend pid {rows[0]['pid']})"
        return "another process"


class LeasePeer(_PeerBase):
    """Leadership = an expiring row in ``reproq_leaders``, on pool connections (module
    docstring). `pool` is the runtime's; without one (``reproq beat``) it opens its own."""

    kind = "lease"
    noun = "lease"

    def __init__(self, settings: RuntimeSettings, database: str, worker_id: str,
                 worker_row: WorkerRow, *, standalone: bool = False,
                 pool: AsyncConnectionPool | None = None) -> None:
        super().__init__(settings, database, worker_id, worker_row, standalone=standalone)
        self.pool = pool
        self.expires_at: datetime | None = None
        self._own_pool = False

    def status(self) -> dict[str, Any]:
        return {**super().status(),
                "lease_expires_at": (self.expires_at.isoformat()
                                     if self.expires_at and self.is_leader else None)}

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {"name": LEASE_NAME, "worker": self.worker_id, "ttl": float(self.timeout),
                **extra}

    async def _open_pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            self.pool = db.make_pool(self.database, max_size=2,
                                     name=f"reproq-beat-{self.worker_id}"[:63])
            self._own_pool = True
            await self.pool.open(wait=False)
        return self.pool

    async def _close_pool(self) -> None:
        if self._own_pool and self.pool is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.pool.close()
            self.pool, self._own_pool = None, False

    async def _statement(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        pool = await self._open_pool()
        async with db.round_trip(pool, self.check_timeout) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    @asynccontextmanager
    async def leading(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pool connection in a transaction that first checks (and share-locks) the lease:
        `NotLeader` if it is not ours; the block's statements commit only while it is."""
        if not self.is_leader or self.pool is None:
            raise NotLeader(f"{self.worker_id} does not hold the beat leader lease")
        try:
            async with self.pool.connection(timeout=self.check_timeout) as conn, \
                    conn.transaction():
                with anyio.fail_after(self.check_timeout):
                    cur = await conn.execute(LEASE_FENCE, self._params(
                        idle_ms=str(max(int(self.check_timeout * 500), 100)),
                        statement_ms=str(int(self.check_timeout * 1000))))
                    held = await cur.fetchone()
                if held is None:
                    self._doubted(NotLeader("the lease is not ours any more"))
                    raise NotLeader(f"{self.worker_id} lost the beat leader lease")
                yield conn
        except _DB_ERRORS as exc:
            self._doubted(exc)
            raise

    # ------------------------------------------------------------------ service
    async def run(self) -> None:
        """Try to take the lease every interval until `stop()`; renew it while leading."""
        self._events()
        try:
            while not self._stopping:
                was_leader = False
                try:
                    self.role = "standby"
                    self._doubt = ""
                    if await self._elect():
                        was_leader = True
                        await self._hold()
                        await self._resign()
                        continue
                except (*_DB_ERRORS, LeadershipLost) as exc:
                    if not was_leader:
                        logger.warning("reproq: beat lease election failed (%s); retrying",
                                       db.describe(exc))
                    self._lose(f"{type(exc).__name__}: {exc}".strip())
                    if was_leader:  # best effort: let a standby take over without waiting
                        await self._resign()
                await self._compete_after(was_leader)
        finally:
            if self._leader:
                with anyio.CancelScope(shield=True):
                    await self._resign()
            self.role = "stopped"
            await self._close_pool()
            self._ended()

    async def _elect(self) -> bool:
        sent = time.monotonic()
        rows = await self._statement(LEASE_ELECT, self._params(**self.worker_row()))
        row = rows[0]
        if row["leader_since"] is None:
            live = row["holder_expires"] is not None
            self.holder = (f"{row['holder']} (lease until {row['holder_expires'].isoformat()})"
                           if live else "another process")
            return False
        self.expires_at = row["expires_at"]
        self._gained(row["leader_since"], sent, f"lease {LEASE_NAME!r}")
        return True

    async def _hold(self) -> None:
        while True:
            await self._sleep(self.interval)
            if self._stopping:
                return
            self._check()
            sent = time.monotonic()
            rows = await self._statement(LEASE_RENEW, self._params(
                **self.worker_row(), leader_since=self.leader_since))
            if not rows:
                raise LeadershipLost("the lease was taken over or deleted")
            self.expires_at = rows[0]["expires_at"]
            self._trust(sent)

    async def _resign(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._statement(LEASE_RESIGN, self._params())
            if self.standalone:
                await self._statement(sql.DELETE_WORKER, {"worker": self.worker_id})
        self._released()

    @asynccontextmanager
    async def once(self) -> AsyncIterator[bool]:
        """Lead for the block if the lease is free (``reproq beat --once``)."""
        self._events()
        try:
            if not await self._elect():
                yield False
                return
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._hold_quietly)
                    try:
                        yield True
                    finally:
                        self._stopping = True
                        self._poke()
            finally:
                await self._resign()
        finally:
            self._ended()
            await self._close_pool()

    async def _hold_quietly(self) -> None:
        try:
            await self._hold()
        except (*_DB_ERRORS, LeadershipLost) as exc:
            self._lose(f"{type(exc).__name__}: {exc}".strip())


def make_peer(settings: RuntimeSettings, database: str, worker_id: str, worker_row: WorkerRow,
              *, standalone: bool = False,
              pool: AsyncConnectionPool | None = None) -> AdvisoryLockPeer | LeasePeer:
    """The peer ``REPROQ_RUNTIME["LEADER"]`` names ("advisory" or "lease")."""
    if settings.leader == "lease":
        return LeasePeer(settings, database, worker_id, worker_row, standalone=standalone,
                         pool=pool)
    return AdvisoryLockPeer(settings, database, worker_id, worker_row, standalone=standalone)


class MaintenanceTurn:
    """Whether this process runs the leader-only maintenance (reclaim sweeps, retention and
    event pruning) now: yes while its peer leads; otherwise only once no live leader (by either
    peer: `LEADER_ALIVE`) has been seen for FALLBACK_TIMEOUTS x LEADER_TIMEOUT_SECONDS -
    counted from this process's start, so a fresh process first gives a leader time to be
    elected. `peer` is None in a process that does not compete (``BEAT = False``): it only ever
    runs maintenance as the fallback."""

    def __init__(self, peer: Peer | None, database: str, leader_timeout: float) -> None:
        self.peer = peer
        self.key_parts = lock_key_parts(lock_key_for_alias(database))
        self.fallback_after = FALLBACK_TIMEOUTS * leader_timeout
        self.leader_seen = time.monotonic()
        self.reason = "starting"

    async def mine(self, conn: psycopg.AsyncConnection) -> bool:
        """True if this process should run maintenance now (`conn`: any connection)."""
        if self.peer is not None and self.peer.is_leader:
            self.reason = "leader"
            return True
        cur = await conn.execute(LEADER_ALIVE, {"name": LEASE_NAME, **self.key_parts})
        row = await cur.fetchone()
        alive = bool(row["alive"] if isinstance(row, dict) else row[0])
        now = time.monotonic()
        if alive:
            self.leader_seen = now
            self.reason = "another process leads"
            return False
        if now - self.leader_seen >= self.fallback_after:
            if self.reason != "fallback":
                logger.warning("reproq: no beat leader for %.0fs: this process runs the "
                               "maintenance sweeps until one is elected", now - self.leader_seen)
            self.reason = "fallback"
            return True
        self.reason = "waiting for a leader"
        return False

    def status(self) -> dict[str, Any]:
        return {"mine": self.reason in {"leader", "fallback"}, "reason": self.reason,
                "fallback_after_seconds": self.fallback_after}
