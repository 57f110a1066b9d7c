"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def servers(tmp_path: Any) -> Iterator[Any]:
    """Real ASGI servers and commands on loopback (tests.servers.Servers), stopped at the end;
    their logs are printed (pytest shows them when the test failed)."""
    from tests.servers import Servers

    harness = Servers(tmp_path)
    try:
        yield harness
    finally:
        harness.close()
        print(harness.logs())


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Any]:
    """`manage.py reproq worker` processes on the test database (tests.test_flow.Cluster),
    stopped at the end; their logs are printed (pytest shows them when the test failed)."""
    from tests.test_flow import Cluster

    harness = Cluster(tmp_path)
    try:
        yield harness
    finally:
        harness.stop_all()
        print(harness.logs())


@pytest.fixture(scope="session", autouse=True)
def _through_pgbouncer(request: Any) -> Iterator[None]:
    """With REPROQ_TEST_VIA_PGBOUNCER=1: once the test database is created and migrated (on
    PostgreSQL directly), point this process's Django connection at the session's PgBouncer;
    at the end point it back and stop PgBouncer (its server connections would keep the test
    database from being dropped)."""
    from tests import pgbouncer

    if not pgbouncer.enabled():
        yield
        return
    bouncer = pgbouncer.session()
    if bouncer is None:
        pytest.skip(pgbouncer.skip_reason())
    request.getfixturevalue("django_db_setup")
    from django.db import connections

    settings_dict = connections["default"].settings_dict
    direct = {"HOST": settings_dict["HOST"], "PORT": settings_dict["PORT"]}
    connections.close_all()
    settings_dict.update(HOST="127.0.0.1", PORT=str(bouncer.port))
    try:
        yield
    finally:
        connections.close_all()
        settings_dict.update(direct)
        bouncer.stop()


@pytest.fixture(autouse=True)
def _fresh_connection_after_a_killed_backend() -> Iterator[None]:
    """Through PgBouncer a test that kills a backend by pid may kill the one serving this
    process's own connection: close a broken connection after the test, so that the next
    test connects anew instead of failing on "the connection is closed"."""
    yield
    from tests import pgbouncer

    if pgbouncer.session() is None:
        return
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and (conn.connection.closed or conn.connection.broken):
            conn.close()
