"""argparse value types shared by the ``manage.py reproq`` subcommands (clear errors, no I/O)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def run_id(text: str) -> int:
    from ..ids import parse_id

    try:
        return parse_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_id(text: str) -> str:
    """An id shown in the workers table and lease columns: 1-64 printable characters (no
    control characters, and no lone surrogates, which a non-UTF-8 argv byte becomes)."""
    if not 0 < len(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: a worker id is 1 to 64 characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8 text") from None
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} contains control characters")
    return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w`` as seconds (>= 0)."""
    raw = text.strip().lower()
    unit = _UNITS.get(raw[-1:]) if raw else None
    number = raw[:-1] if unit is not None else raw
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write seconds, or a number with s, m, h, d or w "
            "(e.g. 90, 15m, 12h, 7d)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite duration >= 0")
    return value


def database_alias(text: str) -> str:
    from django.db import connections

    if text not in connections.settings:
        known = ", ".join(sorted(connections.settings)) or "none"
        raise argparse.ArgumentTypeError(f"{text!r} is not a database alias (known: {known})")
    return text


@contextmanager
def database_errors(what: str) -> Iterator[None]:
    """A database error while `what` ran, as a CommandError with where to look next (instead of
    a traceback); the statement that failed changed nothing."""
    from django.core.management.base import CommandError
    from django.db import DatabaseError

    try:
        yield
    except DatabaseError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"{what} failed: {first} (python manage.py reproq doctor tells what "
                           "is missing)") from exc


def queue_name(text: str) -> str:
    from ..conf import QUEUE_NAME_RE

    if not QUEUE_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"invalid queue name {text!r}: use 1-64 characters "
                                         "from letters, digits, _ . : -")
    return text


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", default=None, type=database_alias,
                        help="database alias (default: the default task backend's)")


def add_run_filters(parser: argparse.ArgumentParser, when: str = "") -> None:
    """--task and --queue (repeatable): narrow a selection of runs."""
    parser.add_argument("--task", dest="tasks", action="append", default=[],
                        help=f"{when}only runs of this task path, module.function (repeatable)")
    parser.add_argument("--queue", dest="queues", action="append", default=[], type=queue_name,
                        help=f"{when}only runs of this queue (repeatable)")
