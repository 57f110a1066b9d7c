"""Subcommands of ``manage.py reproq``: one module each, with `add_arguments` and `handle`."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

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
