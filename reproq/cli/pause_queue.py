"""``manage.py reproq pause-queue NAME [--reason TEXT]``."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from django.core.management.base import BaseCommand, CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", help="queue name")
    parser.add_argument("--reason", default="", help="shown in the admin and dashboard")


def handle(command: BaseCommand, **options: Any) -> None:
    set_state(command, options["queue"], True, options.get("reason") or "")


def set_state(command: BaseCommand, queue: str, paused: bool, reason: str) -> None:
    from ..control import set_paused

    try:
        set_paused(queue, paused, reason=reason, by=f"cli:{_user()}")
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    command.stdout.write(f"queue {queue} {'paused' if paused else 'resumed'} in every process")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
