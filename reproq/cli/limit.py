"""``manage.py reproq limit set KEY RATE [--per SECONDS] [--burst N] | ls | rm KEY``.

KEY is ``global``, ``queue:<name>`` or ``task:<module.path>``; the most specific bucket that
exists governs a run. RATE tokens are added every ``--per`` seconds (default 1), up to
``--burst`` (default RATE).
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .argtypes import positive_int


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    kwargs = {"called_from_command_line": getattr(parser, "called_from_command_line", None)}
    s = sub.add_parser("set", help="create or change a bucket", **kwargs)
    s.add_argument("key", help="global | queue:<name> | task:<module.path>")
    s.add_argument("rate", type=positive_int, help="tokens per period")
    s.add_argument("--per", type=_positive_float, default=1.0, help="period in seconds")
    s.add_argument("--burst", type=positive_int, help="bucket size (default: rate)")
    sub.add_parser("ls", help="list buckets", **kwargs)
    r = sub.add_parser("rm", help="remove a bucket", **kwargs)
    r.add_argument("key")


def handle(command: BaseCommand, **options: Any) -> None:
    from ..control import remove_rate_limit, set_rate_limit
    from ..models import RateLimit

    action = options["action"]
    try:
        if action == "set":
            obj = set_rate_limit(options["key"], options["rate"], options["per"],
                                 options.get("burst"))
            command.stdout.write(f"{obj.key}: {obj.rate} per {obj.period_seconds:g}s, "
                                 f"burst {obj.burst}")
        elif action == "rm":
            if not remove_rate_limit(options["key"]):
                raise CommandError(f"no rate limit {options['key']!r}")
            command.stdout.write(f"removed {options['key']}")
        else:
            rows = list(RateLimit.objects.order_by("key"))
            if not rows:
                command.stdout.write("no rate limits")
            for obj in rows:
                command.stdout.write(f"{obj.key:<40} {obj.rate} per {obj.period_seconds:g}s "
                                     f"burst {obj.burst} (tokens {obj.tokens:.1f})")
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
