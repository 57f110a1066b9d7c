"""``manage.py reproq resume-queue NAME``."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from .pause_queue import set_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", help="queue name")


def handle(command: BaseCommand, **options: Any) -> None:
    set_state(command, options["queue"], False, "")
