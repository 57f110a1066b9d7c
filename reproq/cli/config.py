"""``manage.py reproq config --explain``: effective runtime settings and their sources."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--explain", action="store_true", help="show where each value comes from")


def handle(command: BaseCommand, **options: Any) -> None:
    from ..conf import explain_runtime, load_runtime_settings

    rs, problems = load_runtime_settings()
    for name, value, source in explain_runtime(rs):
        line = f"{name:<28} {value!r}"
        if options.get("explain"):
            line = f"{line:<60} ({source})"
        command.stdout.write(line)
    if problems:
        raise CommandError("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))
