"""Connections outside Django's ORM: libpq conninfo from DATABASES, and per-event-loop async pools.

psycopg's async connections are bound to the event loop that made them, so pools are kept per
(loop, database alias). The runtime opens and closes its pool explicitly; `aenqueue` and
`aget_result` borrow a small one lazily when they run on a loop without a runtime.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from typing import Any

import psycopg
from django.db import connections
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from . import storedjson


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
    clean.update(extra)
    return make_conninfo(**{k: str(v) for k, v in clean.items()})


async def connect(alias: str = "default", **extra: Any) -> psycopg.AsyncConnection:
    """A dedicated autocommit connection (LISTEN, leadership), outside any pool."""
    return await CountingConnection.connect(
        conninfo(alias, **extra), autocommit=True, row_factory=dict_row
    )


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncConnectionPool]] = (
    weakref.WeakKeyDictionary()
)


def make_pool(alias: str, max_size: int, name: str) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        conninfo(alias, application_name=name),
        min_size=1,
        max_size=max_size,
        open=False,
        connection_class=CountingConnection,
        kwargs={"autocommit": True, "row_factory": dict_row},
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
        await pool.open(wait=True, timeout=10.0)
    return pool


async def close_pools() -> None:
    """Close every lazily opened pool of the running loop (tests, shutdown)."""
    by_alias = _pools.pop(asyncio.get_running_loop(), {})
    for pool in by_alias.values():
        await pool.close()
