"""Who may see reproq's HTTP endpoints: a staff session or an API token, closed by default.

The token comes from ``settings.REPROQ_API_TOKEN`` or the ``REPROQ_API_TOKEN`` environment
variable, sent as ``Authorization: Bearer <token>`` or ``X-Reproq-Token: <token>`` and compared in
constant time. ``REPROQ_HEALTHZ_PUBLIC = True`` opens /healthz alone (for load balancers).

``REPROQ_ALLOWED_CIDRS`` (a list, or a comma-separated env value) restricts every endpoint to
clients whose address (``REMOTE_ADDR``) is in one of the networks. Wrong tokens are counted per
client address: after ``REPROQ_AUTH_FAILURE_LIMIT`` (10) within
``REPROQ_AUTH_FAILURE_WINDOW_SECONDS`` (60) that address gets 429 with ``Retry-After`` for every
token it presents (right or wrong) until the window has passed. Session-authenticated unsafe
requests must pass Django's CSRF check; token-authenticated ones need no CSRF token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse


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


# --------------------------------------------------------------------------- network allow-list

_cidr_cache: tuple[Any, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = (None, [])


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """REPROQ_ALLOWED_CIDRS parsed (env overrides settings); empty = no restriction."""
    global _cidr_cache
    from .dashboard.conf import setting

    raw = setting("REPROQ_ALLOWED_CIDRS", [])
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    key = tuple(raw or ())
    if _cidr_cache[0] != key:
        # An invalid entry raises ValueError here: a typo must not open the endpoints.
        _cidr_cache = (key, [ipaddress.ip_network(str(c), strict=False) for c in key])
    return _cidr_cache[1]


def client_ip(request: HttpRequest) -> str:
    """The peer address as the ASGI server saw it (put a trusted proxy's rewrite before us)."""
    return str(request.META.get("REMOTE_ADDR") or "")


def ip_allowed(request: HttpRequest) -> bool:
    networks = allowed_networks()
    if not networks:
        return True
    try:
        addr = ipaddress.ip_address(client_ip(request))
    except ValueError:
        return False
    return any(addr in net for net in networks)


# --------------------------------------------------------------------------- failure limiter


class FailureLimiter:
    """Wrong-token attempts per client address in a sliding window (memory-bounded)."""

    MAX_ADDRESSES = 10_000

    def __init__(self) -> None:
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def limits() -> tuple[int, float]:
        from .dashboard.conf import integer, number

        return (integer("REPROQ_AUTH_FAILURE_LIMIT", 10),
                number("REPROQ_AUTH_FAILURE_WINDOW_SECONDS", 60.0, minimum=0.001))

    def _recent(self, ip: str, now: float, window: float) -> deque[float] | None:
        hits = self._hits.get(ip)
        if hits is None:
            return None
        while hits and hits[0] <= now - window:
            hits.popleft()
        if not hits:
            del self._hits[ip]
            return None
        return hits

    def retry_after(self, ip: str) -> float:
        """Seconds until `ip` may try a token again (0 = now)."""
        limit, window = self.limits()
        now = time.monotonic()
        with self._lock:
            hits = self._recent(ip, now, window)
            if hits is None or len(hits) < limit:
                return 0.0
            return max(hits[-limit] + window - now, 0.001)

    def fail(self, ip: str) -> None:
        limit, window = self.limits()
        now = time.monotonic()
        with self._lock:
            hits = self._recent(ip, now, window) or deque(maxlen=limit)
            hits.append(now)
            self._hits[ip] = hits
            self._hits.move_to_end(ip)
            while len(self._hits) > self.MAX_ADDRESSES:
                self._hits.popitem(last=False)

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()


failures = FailureLimiter()


# --------------------------------------------------------------------------- the decorator


def _forbidden(message: str) -> JsonResponse:
    return JsonResponse({"error": f"forbidden: {message}"}, status=403)


def _login_redirect(request: HttpRequest) -> HttpResponse | None:
    from django.urls import NoReverseMatch, reverse
    from django.utils.http import urlencode

    try:
        login = reverse("admin:login")
    except NoReverseMatch:
        return None
    return HttpResponseRedirect(f"{login}?{urlencode({'next': request.get_full_path()})}")


def csrf_failure(request: HttpRequest) -> HttpResponse | None:
    """Django's CSRF check for a session-authenticated request (sync: may read the session)."""
    from django.middleware.csrf import CsrfViewMiddleware

    return CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, None, (), {})


async def authenticate(request: HttpRequest) -> tuple[str, HttpResponse | None]:
    """("token" | "session", None) when allowed, else ("", the refusal)."""
    if not ip_allowed(request):
        return "", _forbidden("client address not in REPROQ_ALLOWED_CIDRS")
    if presented_token(request):
        ip = client_ip(request)
        wait = failures.retry_after(ip)
        if wait > 0:
            return "", JsonResponse(
                {"error": "too many wrong tokens from this address; retry later",
                 "retry_after": round(wait, 3)},
                status=429, headers={"Retry-After": str(max(int(wait + 0.999), 1))})
        if token_ok(request):
            return "token", None
        failures.fail(ip)
        return "", _forbidden("invalid API token")
    auser = getattr(request, "auser", None)
    if auser is not None and _is_staff(await auser()):
        return "session", None
    return "", _forbidden("staff session or API token required")


def staff_or_token(*, public_setting: str = "", login_redirect: bool = False
                   ) -> Callable[..., Any]:
    """Decorate an async view: 403 JSON unless staff or a valid token (or the public setting).

    ``login_redirect``: anonymous browsers are sent to the admin login instead (HTML pages).
    The view can read ``request.reproq_auth`` ("token", "session" or "public").
    """

    def decorate(view: Callable[..., Awaitable[HttpResponse]]) -> Callable[..., Any]:
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if public_setting and getattr(settings, public_setting, False):
                request.reproq_auth = "public"  # type: ignore[attr-defined]
                return await view(request, *args, **kwargs)
            via, refusal = await authenticate(request)
            if refusal is not None:
                if (login_redirect and refusal.status_code == 403 and ip_allowed(request)
                        and not presented_token(request)):
                    return _login_redirect(request) or refusal
                return refusal
            request.reproq_auth = via  # type: ignore[attr-defined]
            return await view(request, *args, **kwargs)

        return wrapper

    return decorate
