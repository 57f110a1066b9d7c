"""System checks for REPROQ_RUNTIME (backend OPTIONS are checked by `ReproqBackend.check`)."""

from __future__ import annotations

from typing import Any

from django.core import checks


def check_runtime_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import load_runtime_settings

    _, problems = load_runtime_settings()
    return [
        checks.Error(f"{p.setting}: {p.message}", hint=p.hint, id="reproq.E010")
        for p in problems
    ]


def register() -> None:
    checks.register(check_runtime_settings, "reproq")
