"""Connections outside Django's ORM: libpq conninfo from DATABASES, and per-event-loop async pools.

psycopg's async connections are bound to the event loop that made them, so pools are kept per
(loop, database alias). The runtime opens and closes its pool explicitly; `aenqueue` and
`aget_result` borrow a small one lazily when they run on a loop without a runtime.

Outages (docs/operations.md, "Database outages"): reproq's own connections give up connecting
after ``connect_timeout`` (5 s unless DATABASES[alias]["OPTIONS"] sets it) and use TCP
keepalives, so that a dead or partitioned server is noticed in bounded time; a pool retries a
lost connection at least every RECONNECT_MAX_DELAY seconds (psycopg_pool alone doubles its delay
without bound: a 60 s outage could leave it waiting another 64 s); `client_timeout` bounds what
an enqueue waits for; `Outage` gives the runtime's services a short, capped backoff and one log
line per outage instead of a crash loop; `round_trip` bounds one round trip and drains the pool
when it times out (its idle connections may all be half-open).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from django.db import connections
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.pool_async import AddConnection

from . import storedjson

logger = logging.getLogger("reproq.runtime")

CONNECT_TIMEOUT = 5  # seconds: libpq connect_timeout of reproq's connections, unless set
# TCP keepalives of reproq's connections (unless DATABASES sets them): a peer that vanished is
# noticed after about 10 + 3 * 5 s of silence, unacknowledged writes after 30 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3, "tcp_user_timeout": 30_000}
RECONNECT_MAX_DELAY = 1.0  # seconds between a pool's attempts to replace a lost connection
# What a database that is down, restarting or unreachable raises at reproq's connections (to
# catch; `is_unavailable` then tells a lost database from, say, a deadlock, also an
# OperationalError).
UNAVAILABLE: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError,
                                                PoolTimeout, TimeoutError, OSError)
# SQLSTATE classes that mean the server is not there for us: connection exceptions, operator
# intervention (shutdown, crash, starting up), insufficient resources (too many connections).
_UNAVAILABLE_STATES = ("08", "57P", "53")


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached now (not an error of a statement)."""
    if isinstance(exc, PoolTimeout | TimeoutError | OSError | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        return state is None or state.startswith(_UNAVAILABLE_STATES)
    return False


class CountingConnection(psycopg.AsyncConnection):
    """An AsyncConnection that counts statements by name (see `reproq.sql.name_of`), so tests
    and metrics can state how many statements each operation costs. Its json/jsonb loader keeps
    JSON that Python cannot load as text (`reproq.storedjson`) instead of failing the fetch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        set_json_loads(storedjson.loads, self)

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        from .sql import name_of

        statement_counts[name_of(query)] += 1
        return await super().execute(query, params, **kwargs)


statement_counts: Counter[str] = Counter()

_NON_LIBPQ = {"cursor_factory", "context", "prepare_threshold", "server_side_binding", "pool",
              "isolation_level", "assume_role"}


def conninfo(alias: str = "default", **extra: Any) -> str:
    """A libpq connection string for a Django database alias."""
    params = connections[alias].get_connection_params()
    clean = {k: v for k, v in params.items() if k not in _NON_LIBPQ and v not in (None, "")}
    clean.setdefault("application_name", "reproq")
    clean.setdefault("connect_timeout", CONNECT_TIMEOUT)
    for key, value in KEEPALIVES.items():  # libpq ignores them on Unix sockets
        clean.setdefault(key, value)
    clean.update(extra)
    return make_conninfo(**{k: str(v) for k, v in clean.items()})


def session_state_allowed() -> bool:
    """False in CONNECTION_MODE "pgbouncer": a transaction pooler hands each transaction to
    any server connection, so nothing may outlive one (prepared statements, LISTEN, session
    advisory locks, SET)."""
    from .conf import current_runtime_settings

    return current_runtime_settings().connection_mode != "pgbouncer"


def _prepare_threshold() -> int | None:
    """psycopg's automatic server-side prepared statements (after 5 runs of a query, psycopg's
    default), or None (never) when session state is not allowed."""
    return 5 if session_state_allowed() else None


async def connect(alias: str = "default", **extra: Any) -> psycopg.AsyncConnection:
    """A dedicated autocommit connection (LISTEN, leadership), outside any pool."""
    return await CountingConnection.connect(
        conninfo(alias, **extra), autocommit=True, row_factory=dict_row,
        prepare_threshold=_prepare_threshold(),
    )


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncConnectionPool]] = (
    weakref.WeakKeyDictionary()
)


def client_timeout(alias: str = "default") -> float:
    """Seconds an enqueue or result look-up waits for the database before it raises
    `reproq.exceptions.DatabaseUnavailable`: the alias's ``connect_timeout`` (5 by default)."""
    options = connections.settings[alias].get("OPTIONS", {}) or {}
    try:
        value = float(options.get("connect_timeout", CONNECT_TIMEOUT))
    except (TypeError, ValueError):
        value = float(CONNECT_TIMEOUT)
    return value if value > 0 else float(CONNECT_TIMEOUT)


class ReproqPool(AsyncConnectionPool):
    """An AsyncConnectionPool that retries a lost connection at least every RECONNECT_MAX_DELAY
    seconds (psycopg_pool's own delay doubles for as long as the outage lasts)."""

    async def schedule_task(self, task: Any, delay: float) -> None:
        if isinstance(task, AddConnection):
            delay = min(delay, RECONNECT_MAX_DELAY)
        await super().schedule_task(task, delay)


def make_pool(alias: str, max_size: int, name: str) -> AsyncConnectionPool:
    return ReproqPool(
        conninfo(alias, application_name=name),
        min_size=1,
        max_size=max_size,
        open=False,
        connection_class=CountingConnection,
        kwargs={"autocommit": True, "row_factory": dict_row,
                "prepare_threshold": _prepare_threshold()},
        name=name,
        timeout=10.0,
        max_idle=300.0,
    )


def register_pool(alias: str, pool: AsyncConnectionPool) -> None:
    """Make `pool` the one `get_pool` returns for this loop and alias (the runtime's)."""
    _pools.setdefault(asyncio.get_running_loop(), {})[alias] = pool


def unregister_pool(alias: str, pool: AsyncConnectionPool) -> None:
    by_alias = _pools.get(asyncio.get_running_loop(), {})
    if by_alias.get(alias) is pool:
        del by_alias[alias]


async def get_pool(alias: str = "default") -> AsyncConnectionPool:
    """The open pool of this event loop for `alias`, opening a small one on first use."""
    loop = asyncio.get_running_loop()
    by_alias = _pools.setdefault(loop, {})
    pool = by_alias.get(alias)
    if pool is None or pool.closed:
        pool = make_pool(alias, max_size=4, name="reproq-client")
        by_alias[alias] = pool
        await pool.open(wait=False)  # a caller waits for its connection (`client_timeout`)
    return pool


async def close_pools() -> None:
    """Close every lazily opened pool of the running loop (tests, shutdown)."""
    by_alias = _pools.pop(asyncio.get_running_loop(), {})
    for pool in by_alias.values():
        await pool.close()


# --------------------------------------------------------------------------- outages

_drained: weakref.WeakKeyDictionary[AsyncConnectionPool, float] = weakref.WeakKeyDictionary()


async def drain(pool: AsyncConnectionPool) -> None:
    """Replace every connection of `pool` (idle ones now, busy ones when returned), at most once
    a second: after a round trip timed out its other connections may be half-open too."""
    now = time.monotonic()
    if now - _drained.get(pool, 0.0) < 1.0 or pool.closed:
        return
    _drained[pool] = now
    try:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await pool.drain()
    except Exception as exc:  # pragma: no cover - depends on psycopg_pool internals
        logger.debug("reproq: draining pool %s failed: %s", pool.name, exc)


@asynccontextmanager
async def round_trip(pool: AsyncConnectionPool, seconds: float
                     ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of `pool` within `seconds` (else PoolTimeout), and TimeoutError when what
    runs on it takes longer than `seconds` (a statement on a half-open connection would wait
    for ever); then `pool` is drained, since its other connections may be half-open too."""
    timed_out = False
    try:
        async with pool.connection(timeout=seconds) as conn:
            try:
                with anyio.fail_after(seconds):
                    yield conn
            except TimeoutError:
                timed_out = True
                raise
    finally:
        if timed_out:
            await drain(pool)


def round_trip_bound(lease_seconds: float) -> float:
    """How long one runtime statement may take before it counts as lost: half a lease, between
    2 and 10 seconds (statements that renew leases must fail well before the lease ends)."""
    return min(max(lease_seconds / 2, 2.0), 10.0)


def describe(exc: BaseException) -> str:
    """One line about a database error, without its parameters (never payloads)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


class Outage:
    """What one service does while its database is unreachable: back off a little (0.1 s,
    doubling, at most `cap`), log the first failure as a warning and the recovery with its
    duration, instead of crashing (a crash loop would back off up to 10 s and delay recovery)."""

    def __init__(self, service: str, cap: float = RECONNECT_MAX_DELAY) -> None:
        self.service = service
        self.cap = cap
        self.since: float | None = None
        self.failures = 0
        self.last_error = ""
        self.delay = 0.1

    @property
    def down(self) -> bool:
        return self.since is not None

    async def failed(self, exc: BaseException, wake: anyio.Event | None = None) -> None:
        """Back off after `exc`; an error that is not about reaching the database (a deadlock,
        a bug) is raised again, for the service's supervisor."""
        if not is_unavailable(exc):
            raise exc
        self.failures += 1
        self.last_error = describe(exc)
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("reproq: %s cannot reach the database (%s); retrying every %.1fs at "
                           "most", self.service, self.last_error, self.cap)
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        with anyio.move_on_after(delay):
            if wake is not None:
                await wake.wait()
            else:
                await anyio.sleep_forever()

    def ok(self) -> None:
        if self.since is not None:
            logger.info("reproq: %s reached the database again after %.1fs", self.service,
                        time.monotonic() - self.since)
        self.since = None
        self.delay = 0.1


def unavailable(alias: str, waited: float, exc: BaseException, *, sent: bool,
                what: str = "the task was not enqueued",
                unsure: str = "the task may or may not have been enqueued") -> Exception:
    """The `reproq.exceptions.DatabaseUnavailable` an API call raises for `exc`: `sent` tells
    whether a statement may have reached the server (then its effect is unknown)."""
    from .exceptions import DatabaseUnavailable

    if sent:
        return DatabaseUnavailable(
            f"reproq lost database {alias!r} during the statement or it did not answer within "
            f"{waited:g}s ({describe(exc)}): {unsure}")
    return DatabaseUnavailable(
        f"reproq could not reach database {alias!r} within {waited:g}s ({describe(exc)}): "
        f"{what}")
