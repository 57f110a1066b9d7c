"""Cursors on Django's own connection that send reproq's statements as prepared statements.

Django binds parameters client-side and disables prepared statements (for PgBouncer). reproq's
enqueue statement is large, so planning it on every call costs more than running it. These
wrappers run it server-side-bound with ``prepare=True`` on the *same* connection — so it still
joins the caller's ``transaction.atomic()`` — and keep Django's error wrapping, execute
wrappers and query logging. Set ``OPTIONS["PREPARED_STATEMENTS"] = False`` behind a pooler that
cannot keep prepared statements (PgBouncer < 1.22 in transaction mode).
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connections
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper


class _PreparedMixin:
    cursor: Any
    db: Any

    def _execute(self, sql: str, params: Any, *ignored_wrapper_args: Any) -> Any:
        self.db.validate_no_broken_transaction()
        with self.db.wrap_database_errors:
            return self.cursor.execute(sql, params, prepare=True)


class PreparedCursorWrapper(_PreparedMixin, CursorWrapper):
    pass


class PreparedDebugCursorWrapper(_PreparedMixin, CursorDebugWrapper):
    pass


def cursor(alias: str, prepared: bool = True) -> Any:
    """A cursor on Django's connection `alias` (prepared statements unless `prepared` is off)."""
    connection = connections[alias]
    if not prepared:
        return connection.cursor()
    connection.validate_thread_sharing()
    connection.ensure_connection()
    raw = psycopg.Cursor(connection.connection)
    if connection.queries_logged:
        return PreparedDebugCursorWrapper(raw, connection)
    return PreparedCursorWrapper(raw, connection)
