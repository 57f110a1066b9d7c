"""Who may see reproq's HTTP endpoints: a staff session or an API token, closed by default.

The token comes from ``settings.REPROQ_API_TOKEN`` or the ``REPROQ_API_TOKEN`` environment
variable, sent as ``Authorization: Bearer <token>`` or ``X-Reproq-Token: <token>`` and compared in
constant time. ``REPROQ_HEALTHZ_PUBLIC = True`` opens /healthz alone (for load balancers).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


def api_token() -> str:
    return str(getattr(settings, "REPROQ_API_TOKEN", "") or os.environ.get("REPROQ_API_TOKEN", ""))


def presented_token(request: HttpRequest) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-Reproq-Token", "").strip()


def token_ok(request: HttpRequest) -> bool:
    expected = api_token()
    given = presented_token(request)
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def _is_staff(user: Any) -> bool:
    return bool(user is not None and user.is_active and user.is_staff)


async def allowed(request: HttpRequest) -> bool:
    if token_ok(request):
        return True
    auser = getattr(request, "auser", None)
    if auser is None:
        return False
    return _is_staff(await auser())


def staff_or_token(*, public_setting: str = "") -> Callable[..., Any]:
    """Decorate an async view: 403 JSON unless staff or a valid token (or the public setting)."""

    def decorate(view: Callable[..., Awaitable[HttpResponse]]) -> Callable[..., Any]:
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if public_setting and getattr(settings, public_setting, False):
                return await view(request, *args, **kwargs)
            if not await allowed(request):
                return JsonResponse({"error": "forbidden: staff session or API token required"},
                                    status=403)
            return await view(request, *args, **kwargs)

        return wrapper

    return decorate
