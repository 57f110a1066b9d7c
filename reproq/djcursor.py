"""Cursors on Django's own connection that send reproq's statements as prepared statements.

Django binds parameters client-side and disables prepared statements (for PgBouncer). reproq's
enqueue statement is large, so planning it on every call costs more than running it. These
wrappers run it server-side-bound with ``prepare=True`` on the *same* connection — so it still
joins the caller's ``transaction.atomic()`` — and keep Django's error wrapping, execute
wrappers and query logging. Set ``OPTIONS["PREPARED_STATEMENTS"] = False`` behind a pooler that
cannot keep prepared statements (PgBouncer < 1.22 in transaction mode).

Django opens its connections with ``prepare_threshold=None``, and psycopg then ignores
``prepare=True`` as well. `cursor` sets the threshold to a number never reached instead: Django's
own queries are still never prepared (a client-side cursor cannot be; a server-binding one would
need that many runs), reproq's are, on request.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connections
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

# Runs of one query before psycopg prepares it by itself: never, in practice.
NEVER_AUTOMATIC = 2**62


class _PreparedMixin:
    cursor: Any
    db: Any
    binary: bool = False

    def _execute(self, sql: str, params: Any, *ignored_wrapper_args: Any) -> Any:
        self.db.validate_no_broken_transaction()
        with self.db.wrap_database_errors:
            return self.cursor.execute(sql, params, prepare=True, binary=self.binary)


class PreparedCursorWrapper(_PreparedMixin, CursorWrapper):
    pass


class PreparedDebugCursorWrapper(_PreparedMixin, CursorDebugWrapper):
    def execute(self, sql: str, params: Any = None) -> Any:
        try:
            return super().execute(sql, params)
        finally:
            # In pipeline mode the query text is not known until its reply is read, and
            # Django 6.0 then logs None: log the statement itself instead.
            log = self.db.queries_log
            if log and log[-1].get("sql") is None:
                log[-1]["sql"] = sql


def cursor(alias: str, prepared: bool = True, *, binary: bool = False) -> Any:
    """A cursor on Django's connection `alias` (prepared statements unless `prepared` is off).

    `binary` asks for parameters and results in PostgreSQL's binary format (no quoting of large
    text arrays; results then come back through psycopg's own loaders, not Django's: jsonb as
    parsed JSON, timestamptz in the session's time zone). Without prepared statements the
    cursor is Django's own, whose results are always text — read rows by position.
    """
    connection = connections[alias]
    if not prepared:
        return connection.cursor()
    connection.validate_thread_sharing()
    connection.ensure_connection()
    allow_prepare(connection.connection)
    raw = psycopg.Cursor(connection.connection)
    wrapper = (PreparedDebugCursorWrapper(raw, connection) if connection.queries_logged
               else PreparedCursorWrapper(raw, connection))
    wrapper.binary = binary
    return wrapper


def allow_prepare(conn: psycopg.Connection) -> None:
    """Let `conn` prepare the statements sent with ``prepare=True`` (and no others)."""
    if conn.prepare_threshold is None:
        conn.prepare_threshold = NEVER_AUTOMATIC


def pipeline(alias: str) -> Any:
    """psycopg pipeline mode on Django's connection `alias`: statements are sent without
    waiting for each reply (read them with ``fetchall`` later, in order)."""
    connection = connections[alias]
    connection.validate_thread_sharing()
    connection.ensure_connection()
    return connection.connection.pipeline()
