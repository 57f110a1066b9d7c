"""``manage.py reproq schedule``: enqueue the cron ticks due now and exit (``beat --once``).

Meant for crontab (``* * * * * python manage.py reproq schedule``) where no long-running
process runs the beat; safe to run from several machines at once (leader lock + unique ticks).
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from .argtypes import worker_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-id", type=worker_id,
                        help="id shown as the leader (default host-pid-random)")


def handle(command: BaseCommand, **options: Any) -> None:
    from .beat import handle as beat

    beat(command, **{**options, "once": True})
