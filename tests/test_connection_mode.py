"""CONNECTION_MODE: "pgbouncer" is one switch for running behind a transaction pooler (no
LISTEN, no prepared statements anywhere reproq connects, Django's server-side cursors
flagged), "direct" keeps today's behaviour; bad values are clear errors."""

from __future__ import annotations

import asyncio

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from reproq import db
from reproq.backend import ReproqBackend
from reproq.conf import load_runtime_settings


def _load(runtime: dict, environ: dict | None = None):
    from django.test import override_settings

    with override_settings(REPROQ_RUNTIME=runtime):
        return load_runtime_settings(environ=environ or {})


def test_pgbouncer_mode_turns_listen_off_and_says_why():
    rs, problems = _load({"CONNECTION_MODE": "pgbouncer"})
    assert problems == []
    assert rs.connection_mode == "pgbouncer" and rs.listen is False
    assert rs.sources["listen"].startswith("CONNECTION_MODE 'pgbouncer'")


def test_pgbouncer_mode_from_the_environment():
    rs, problems = _load({}, {"REPROQ_CONNECTION_MODE": "pgbouncer"})
    assert problems == [] and rs.listen is False
    assert rs.sources["connection_mode"] == "env REPROQ_CONNECTION_MODE"


def test_direct_mode_is_the_default_and_keeps_listen():
    rs, problems = _load({})
    assert problems == [] and rs.connection_mode == "direct" and rs.listen is True


@pytest.mark.parametrize("value", ["PgBouncer", "transaction", "", None, 1, True])
def test_an_unknown_connection_mode_is_a_clear_error(value):
    _, problems = _load({"CONNECTION_MODE": value})
    if value is None:  # None in settings means "not set" for every runtime setting
        return
    assert any("CONNECTION_MODE" in p.setting and '"pgbouncer"' in p.hint for p in problems)


def test_listen_on_with_pgbouncer_mode_is_a_contradiction():
    _, problems = _load({"CONNECTION_MODE": "pgbouncer", "LISTEN": True})
    assert [p.setting for p in problems] == [
        "REPROQ_RUNTIME['LISTEN'] (from settings.REPROQ_RUNTIME)"]
    assert "contradicts CONNECTION_MODE 'pgbouncer'" in problems[0].message


def test_a_bad_connection_mode_fails_manage_py_check(settings):
    settings.REPROQ_RUNTIME = {"CONNECTION_MODE": "bouncer"}
    with pytest.raises(SystemCheckError, match="CONNECTION_MODE"):
        call_command("check")


def test_pgbouncer_mode_warns_without_djangos_server_side_cursor_switch(settings, monkeypatch):
    from django.db import connections

    from reproq.checks import check_connection_mode

    settings.REPROQ_RUNTIME = {"CONNECTION_MODE": "pgbouncer"}
    db_settings = connections["default"].settings_dict
    monkeypatch.setitem(db_settings, "DISABLE_SERVER_SIDE_CURSORS", False)
    assert [m.id for m in check_connection_mode()] == ["reproq.W040"]
    monkeypatch.setitem(db_settings, "DISABLE_SERVER_SIDE_CURSORS", True)
    assert check_connection_mode() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode, threshold", [("direct", 5), ("pgbouncer", None)])
def test_reproqs_own_connections_prepare_statements_only_in_direct_mode(settings, mode,
                                                                        threshold):
    settings.REPROQ_RUNTIME = {"CONNECTION_MODE": mode}

    async def main():
        pool = db.make_pool("default", max_size=1, name="reproq-mode-test")
        await pool.open(wait=True)
        try:
            async with pool.connection() as conn:
                pooled = conn.prepare_threshold
        finally:
            await pool.close()
        dedicated = await db.connect("default")
        try:
            return pooled, dedicated.prepare_threshold
        finally:
            await dedicated.close()

    assert asyncio.run(main()) == (threshold, threshold)
    backend = ReproqBackend("default", {"QUEUES": ["default"], "OPTIONS": {}})
    assert backend.reproq_options.prepared_statements is (mode == "direct")
