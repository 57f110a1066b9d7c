"""System checks: REPROQ_RUNTIME values, the access settings (reproq.access), and (with
``--database``) whether any runtime is alive.

Backend OPTIONS are checked by `ReproqBackend.check`, which Django runs for every TASKS entry.
"""

from __future__ import annotations

from typing import Any

from django.core import checks


def check_runtime_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import load_runtime_settings

    _, problems = load_runtime_settings()
    return [
        checks.Error(f"{p.setting}: {p.message}", hint=p.hint, id="reproq.E010")
        for p in problems
    ]


def check_connection_mode(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """CONNECTION_MODE "pgbouncer" needs Django's DISABLE_SERVER_SIDE_CURSORS on the database
    reproq uses (a server-side cursor outlives the transaction a pooler gives it)."""
    from django.db import connections
    from django.tasks import task_backends

    from .conf import load_runtime_settings

    rs, problems = load_runtime_settings()
    if problems or rs.connection_mode != "pgbouncer":
        return []
    try:
        alias = task_backends[rs.backend].reproq_options.database
    except Exception:  # an invalid backend is another check's finding
        return []
    if alias not in connections.settings or connections[alias].settings_dict.get(
            "DISABLE_SERVER_SIDE_CURSORS"):
        return []
    return [checks.Warning(
        f"CONNECTION_MODE is 'pgbouncer' but DATABASES[{alias!r}] has no "
        "DISABLE_SERVER_SIDE_CURSORS: Django's server-side cursors (QuerySet.iterator()) break "
        "behind a transaction pooler", hint=f"set DATABASES[{alias!r}]"
        "['DISABLE_SERVER_SIDE_CURSORS'] = True", id="reproq.W040")]


def check_access_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """REPROQ_ALLOWED_CIDRS, REPROQ_TRUSTED_PROXIES and the other access settings: an invalid
    one makes every reproq endpoint refuse (fail closed), so it is an error here."""
    from .access import settings_problems, token_warnings

    found: list[checks.CheckMessage] = [
        checks.Error(f"{p.setting}: {p.message}", hint=p.hint, id="reproq.E030")
        for p in settings_problems()
    ]
    found += [checks.Warning(w, hint="use a long random token, e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'", id="reproq.W031")
              for w in token_warnings()]
    return found


def check_runtime_alive(app_configs: Any = None, databases: Any = None,
                        **kwargs: Any) -> list[checks.CheckMessage]:
    """With `manage.py check --database default`: runs are due but no runtime renews its row."""
    if not databases:
        return []
    from django.db import DatabaseError, connections
    from django.tasks import task_backends

    from .conf import current_runtime_settings

    rs = current_runtime_settings()
    try:
        alias = task_backends[rs.backend].reproq_options.database
    except Exception:
        return []
    if alias not in databases:
        return []
    stale = max(rs.poll_fallback_seconds * 2, 60)
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT (SELECT count(*) FROM reproq_workers "
                "        WHERE last_seen_at > now() - make_interval(secs => %s)),"
                "       (SELECT count(*) FROM reproq_task_runs WHERE status = 'READY' "
                "        AND run_after < now() - make_interval(secs => %s))",
                [rs.lease_seconds * 3, stale])
            alive, waiting = cursor.fetchone()
    except DatabaseError:
        return []
    if waiting and not alive:
        return [checks.Warning(
            f"{waiting} task runs have been due for over {stale:.0f}s and no reproq runtime is "
            "alive: tasks are not running anywhere",
            hint="serve the app through reproq.asgi.get_asgi_application() / lifespan(app) with "
                 "AUTOSTART on, or run `python manage.py reproq worker`",
            id="reproq.W020")]
    return []


def register() -> None:
    checks.register(check_runtime_settings, "reproq")
    checks.register(check_connection_mode, "reproq")
    checks.register(check_access_settings, "reproq")
    checks.register(check_runtime_alive, "reproq", checks.Tags.database)
