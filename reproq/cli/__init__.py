"""Subcommands of ``manage.py reproq``: one module each, with `add_arguments` and `handle`."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType
from typing import Any

SUBCOMMANDS = {
    "worker": "Run the reproq runtime without a web server (same runtime as in ASGI).",
    "config": "Print the effective runtime settings and where each value comes from.",
    "cancel": "Cancel runs by id (waiting ones at once, running ones within a second).",
    "pause-queue": "Pause a queue in every process (running tasks finish; nothing new starts).",
    "resume-queue": "Resume a paused queue in every process.",
    "limit": "Manage rate limits: limit set KEY RATE [--per SECONDS] [--burst N] | ls | rm KEY.",
    "beat": "Run the leader-elected cron beat standalone; --once enqueues what is due and exits.",
    "schedule": "Enqueue the cron ticks that are due now and exit (alias of beat --once).",
    "sync-recurring": "Write the @recurring schedules declared in code to the database.",
    "doctor": "Check settings, database, migrations, LISTEN/NOTIFY, clocks, runtimes and leases.",
    "status": "Queues (ready, waiting, blocked, running, paused), workers, failing tasks.",
    "replay": "Enqueue new copies of runs by id, or of the runs that failed within a duration.",
    "triage": "Recent failures grouped by task and error class, with a replay command for each.",
    "reclaim": "Return runs whose lease expired now (what every runtime does periodically).",
    "prune": "Delete finished runs older than a duration (filters: state, queue, task; --dry-run).",
    "systemd": "Print or write systemd units: worker processes or the uvicorn web service.",
    "pg-cron": "Install or remove pg_cron jobs that enqueue the schedules inside PostgreSQL.",
}


def load(name: str) -> ModuleType:
    return import_module(f"reproq.cli.{name.replace('-', '_')}")


def unencodable(options: dict[str, Any]) -> str | None:
    """The first option holding text that is not valid UTF-8 (a lone surrogate: what a byte of
    argv that is not UTF-8 becomes), as ``name 'value'``; None if every value is fine."""
    for name, value in options.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{name} {item!r}"
    return None


def run(name: str, command: Any, options: dict[str, Any]) -> None:
    """Run subcommand `name` with parsed `options`; text no database can take is a usage
    error here, not a UnicodeEncodeError traceback from the driver."""
    from django.core.management.base import CommandError

    bad = unencodable(options)
    if bad is not None:
        raise CommandError(f"{bad} is not valid UTF-8 text")
    load(name).handle(command, **options)
