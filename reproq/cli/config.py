"""``manage.py reproq config --explain``: effective runtime and access settings and their
sources."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--explain", action="store_true", help="show where each value comes from")


def handle(command: BaseCommand, **options: Any) -> None:
    from ..access import explain, settings_problems
    from ..conf import explain_runtime, load_runtime_settings

    rs, problems = load_runtime_settings()
    problems += settings_problems()
    for name, value, source in explain_runtime(rs):
        line = f"{name:<28} {value!r}"
        if options.get("explain"):
            line = f"{line:<60} ({source})"
        command.stdout.write(line)
    for name, value, source in explain():  # HTTP access (the token only as "set, N chars")
        line = f"{name:<36} {value if name == 'REPROQ_API_TOKEN' else repr(value)}"
        if options.get("explain"):
            line = f"{line:<60} ({source})"
        command.stdout.write(line)
    if problems:
        raise CommandError("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))
