"""Subcommands of ``manage.py reproq``: one module each, with `add_arguments` and `handle`."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

SUBCOMMANDS = {
    "worker": "Run the reproq runtime without a web server (same runtime as in ASGI).",
    "config": "Print the effective runtime settings and where each value comes from.",
}


def load(name: str) -> ModuleType:
    return import_module(f"reproq.cli.{name.replace('-', '_')}")
