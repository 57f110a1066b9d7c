"""`reproq.pooler.detect` against PostgreSQL directly and through a real PgBouncer in
transaction mode (the session's, with REPROQ_TEST_VIA_PGBOUNCER=1, or one started here), and
the doctor's "connection mode" line. No mocks: both sides are real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.db import connection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from reproq import pooler
from tests import pgbouncer

pytestmark = pytest.mark.django_db(transaction=True)


def _direct_conninfo() -> str:
    """The test database on PostgreSQL itself (DATABASE_URL of this process is always direct)."""
    url = os.environ.get(pgbouncer.DIRECT_URL_ENV) or os.environ["DATABASE_URL"]
    return make_conninfo(url, dbname=str(connection.settings_dict["NAME"]),
                         application_name="reproq-test-pooler")


@pytest.fixture(scope="module")
def bouncer() -> Iterator[pgbouncer.PgBouncer]:
    """The session's PgBouncer, or one of this module's own in front of the test server."""
    session = pgbouncer.session()
    if session is not None:
        yield session
        return
    own = pgbouncer.PgBouncer(pgbouncer.Upstream.from_url(os.environ["DATABASE_URL"]))
    try:
        own.start()
    except pgbouncer.Unavailable as exc:
        reason = f"!!! PGBOUNCER TESTS SKIPPED: {exc}"
        print(reason)
        pytest.skip(reason)
    try:
        yield own
    finally:
        own.stop()


def _through(bouncer: pgbouncer.PgBouncer) -> str:
    return make_conninfo(bouncer.url(str(connection.settings_dict["NAME"])),
                         application_name="reproq-test-pooler")


def test_postgresql_itself_is_detected_as_direct():
    found = pooler.detect(conninfo=_direct_conninfo(), notify_timeout=2.0)
    assert found.mode == pooler.DIRECT, found
    assert not found.transaction_pooled and found.evidence == ()
    assert found.rounds == 5  # every round kept its session state
    assert found.notify_delivered is True and found.startup_options_accepted is True
    assert "sessions are real" in found.summary


def test_pgbouncer_in_transaction_mode_is_detected_and_says_pgbouncer(bouncer):
    found = pooler.detect(conninfo=_through(bouncer))
    assert found.mode == pooler.PGBOUNCER, found
    assert found.transaction_pooled
    assert any("session setting" in e or "backend" in e for e in found.evidence), found.evidence
    assert found.notify_delivered is None  # not asked for: no wait
    assert found.startup_options_accepted is False  # PgBouncer 1.18 refuses options=-c
    assert "transaction pooler" in found.summary and "LISTEN" in found.hint


def test_a_notify_through_pgbouncer_never_reaches_the_listener(bouncer):
    found = pooler.detect(conninfo=_through(bouncer), notify_timeout=1.0,
                          check_startup_options=False)
    assert found.notify_delivered is False
    assert found.startup_options_accepted is None
    assert any("NOTIFY" in e for e in found.evidence)
    assert found.seconds >= 1.0


def test_the_alias_probe_matches_how_this_suite_connects():
    """detect(alias) reads the alias's connection settings: through the session's PgBouncer
    with REPROQ_TEST_VIA_PGBOUNCER=1, PostgreSQL directly otherwise."""
    found = pooler.detect("default")
    params = conninfo_to_dict(connection.get_connection_params().get("conninfo", "")) or \
        connection.get_connection_params()
    if pgbouncer.session() is not None:
        assert str(params.get("port")) == str(pgbouncer.session().port)
        assert found.mode == pooler.PGBOUNCER, found
    else:
        assert found.mode == pooler.DIRECT, found


def test_doctor_names_the_connection_mode_and_what_is_missing_for_it():
    from reproq.doctor import diagnose

    (found,) = [f for f in diagnose("default") if f.topic == "connection mode"]
    if pgbouncer.session() is None:
        assert found.level == "ok" and found.detail.startswith("direct: sessions are real")
    else:
        # tests.settings sets CONNECTION_MODE 'pgbouncer' but keeps the beat on.
        assert found.level == "warn" and found.detail.startswith("pgbouncer:"), found
        assert "REPROQ_RUNTIME['BEAT'] = False" in found.hint
        assert "CONNECTION_MODE" not in found.hint and "PREPARED_STATEMENTS" not in found.hint
