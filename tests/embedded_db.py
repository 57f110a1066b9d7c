"""Pytest plugin loaded first: use DATABASE_URL, or start a throwaway embedded PostgreSQL.

With ``REPROQ_TEST_VIA_PGBOUNCER=1`` it also starts a real PgBouncer in transaction pooling mode
in front of that server (`tests.pgbouncer`); `tests.conftest` points the tests at it.
"""

from __future__ import annotations

from typing import Any

import pytest

from reproq.devdb import database_url
from tests import pgbouncer

_url = database_url(temporary=True)
if pgbouncer.enabled():
    pgbouncer.start_for_session(_url)


def pytest_report_header(config: Any) -> str | None:
    if not pgbouncer.enabled():
        return None
    bouncer = pgbouncer.session()
    if bouncer is None:
        return pgbouncer.skip_reason()
    return (f"reproq: through PgBouncer (transaction pooling) on 127.0.0.1:{bouncer.port}; "
            "migrations go to PostgreSQL directly")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if pgbouncer.enabled() and pgbouncer.session() is None:
        marker = pytest.mark.skip(reason=pgbouncer.skip_reason())
        for item in items:
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if pgbouncer.enabled() and pgbouncer.session() is None:
        terminalreporter.write_line(pgbouncer.skip_reason(), red=True, bold=True)
