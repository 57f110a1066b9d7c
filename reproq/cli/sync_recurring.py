"""``manage.py reproq sync-recurring``: write the ``@recurring`` schedules to the database.

Imports every installed app's ``tasks`` module, creates or updates one `PeriodicTask` per key
(``source = "code"``) and disables code schedules that are no longer declared. A due fire is
never pushed into the future. ``migrate`` runs the same sync unless
``SYNC_RECURRING_ON_MIGRATE`` is off.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", default=None,
                        help="database alias (default: where PeriodicTask is written)")


def handle(command: BaseCommand, **options: Any) -> None:
    from django.conf import settings
    from django.core.exceptions import ValidationError

    from ..schedules import sync_recurring

    database = options.get("database")
    if database is not None and database not in settings.DATABASES:
        raise CommandError(f"--database {database!r} is not in DATABASES")
    try:
        report = sync_recurring(database)
    except ValidationError as exc:
        raise CommandError("a @recurring schedule is invalid (nothing was changed): "
                           + "; ".join(exc.messages)) from exc
    command.stdout.write(report.summary())
    if report.conflicts:
        raise CommandError(f"{len(report.conflicts)} @recurring keys clash with schedules made "
                           "in the admin (see above)")
