"""ASGI entry points: `get_asgi_application()` and `lifespan(app)` run the reproq runtime inside
the web server process (uvicorn, hypercorn, granian, gunicorn's uvicorn workers, daphne)."""

from __future__ import annotations

from typing import Any

from .lifespan import ReproqLifespan, lifespan

__all__ = ["ReproqLifespan", "get_asgi_application", "lifespan"]


def get_asgi_application(*, autostart: bool | None = None) -> ReproqLifespan:
    """Drop-in for `django.core.asgi.get_asgi_application` with the runtime attached."""
    from django.core.asgi import get_asgi_application as django_asgi

    app: Any = django_asgi()
    return lifespan(app, autostart=autostart)
