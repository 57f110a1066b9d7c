"""Settings of the HTTP side (dashboard, SSE, metrics, access): ``REPROQ_*`` Django settings,
overridden by environment variables of the same name (as for the runtime settings)."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def setting(name: str, default: Any) -> Any:
    """``os.environ[name]`` (coerced to the default's type) > ``settings.<name>`` > default."""
    raw = os.environ.get(name)
    if raw is not None and raw.strip() != "":
        return _coerce(raw.strip(), default)
    return getattr(settings, name, default)


def _coerce(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        return default
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            return default
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            return default
    if isinstance(default, list | tuple):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def number(name: str, default: float, minimum: float = 0.0) -> float:
    value = setting(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        return default
    return float(value)


def integer(name: str, default: int, minimum: int = 1) -> int:
    value = setting(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        return default
    return value


def backend_database() -> str:
    """The database alias of the runtime's task backend (where reproq's tables live)."""
    from django.tasks import task_backends

    from ..conf import current_runtime_settings

    try:
        return str(task_backends[current_runtime_settings().backend].reproq_options.database)
    except Exception:
        return "default"


def configured_queues() -> list[str]:
    """Queue names of every reproq backend in settings.TASKS (no database access)."""
    names: set[str] = set()
    for params in (getattr(settings, "TASKS", {}) or {}).values():
        if params.get("BACKEND") == "reproq.backend.ReproqBackend":
            names.update(q for q in params.get("QUEUES") or [] if isinstance(q, str))
    return sorted(names or {"default"})
