"""``manage.py reproq reclaim``: return runs whose lease expired now, instead of at the next
pass of a runtime's reclaim service (the same statement, `reproq.sql.RECLAIM`)."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from .argtypes import add_database_option, database_errors

BATCH = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_database_option(parser)


def handle(command: BaseCommand, **options: Any) -> None:
    from django.db import connections

    from .. import sql
    from ..conf import current_runtime_settings
    from ..control import _database

    database = _database(options.get("database"))
    ttl = current_runtime_settings().lease_seconds * 3
    requeued = failed = removed = 0
    while True:
        with database_errors("reclaim"), connections[database].cursor() as cursor:
            cursor.execute(sql.RECLAIM, {"limit": BATCH, "worker_ttl": ttl})
            back, dead, gone = (int(v) for v in cursor.fetchone()[:3])
        requeued, failed, removed = requeued + back, failed + dead, removed + gone
        if back + dead < BATCH:
            break
    command.stdout.write(f"{requeued + failed} runs with expired leases: {requeued} back to "
                         f"READY, {failed} failed (attempts spent); {removed} dead worker rows "
                         "removed")
