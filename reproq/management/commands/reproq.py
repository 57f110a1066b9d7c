"""``manage.py reproq <subcommand>``: dispatches to the modules of `reproq.cli`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ...cli import SUBCOMMANDS, load, run


class Command(BaseCommand):
    help = "reproq operations: " + ", ".join(sorted(SUBCOMMANDS))
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND",
                                    parser_class=type(parser))
        for name, summary in sorted(SUBCOMMANDS.items()):
            sp = sub.add_parser(name, help=summary, description=summary,
                                called_from_command_line=getattr(parser,
                                                                 "called_from_command_line",
                                                                 None))
            load(name).add_arguments(sp)

    def handle(self, *args: Any, **options: Any) -> None:
        name = options.pop("subcommand")
        run(name, self, options)
