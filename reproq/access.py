"""Who may see reproq's HTTP endpoints: a staff session or an API token, closed by default.

The token comes from ``REPROQ_API_TOKEN`` (environment variable, else setting), sent as
``Authorization: Bearer <token>`` or ``X-Reproq-Token: <token>`` and compared in constant time.
``REPROQ_HEALTHZ_PUBLIC = True`` opens /healthz alone (for load balancers).

Client addresses. ``REPROQ_ALLOWED_CIDRS`` restricts every endpoint to clients in those networks,
and wrong tokens are counted per client address. The client address is the **socket peer**: what
the TCP connection came from, not what the ASGI server reports — uvicorn (and gunicorn's uvicorn
workers) rewrite ``scope["client"]`` from ``X-Forwarded-For`` whenever the peer is 127.0.0.1,
so any local process, tunnel or header-passing proxy could pick its own address. `stamp_peer`
(called by `reproq.asgi`'s wrapper) records the peer before Django sees the request. Only when
that peer is in ``REPROQ_TRUSTED_PROXIES`` is ``X-Forwarded-For`` read, right to left, skipping
trusted hops: the first untrusted hop is the client (a hop that is no address makes the client
unknown — refused by the CIDR rule, counted against the proxy that reported it).

Failures. After ``REPROQ_AUTH_FAILURE_LIMIT`` (10) wrong tokens within
``REPROQ_AUTH_FAILURE_WINDOW_SECONDS`` (60), further wrong tokens from that address get 429 with
``Retry-After`` (and keep it limited while they go on). The right token is always let through:
a scraper behind the same proxy as a guesser is never locked out. So the limit slows noise down;
what keeps the token safe is its length (system check reproq.W031 wants 20+ random
characters).

Invalid access settings fail closed: every endpoint answers 500 JSON naming the setting (and
``manage.py check`` / ``reproq doctor`` report it). Session-authenticated unsafe requests must pass
Django's CSRF check; token-authenticated ones need no CSRF token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse

from .conf import Problem

logger = logging.getLogger("reproq.access")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PEER_KEY = "reproq.peer"  # scope key: the socket peer's host ("" for a Unix socket)
PEER_PORT_KEY = "reproq.peer_port"  # ... and its port (None when unknown)
UNIX = "unix"  # in REPROQ_TRUSTED_PROXIES: a peer on a Unix socket is a trusted proxy
MAX_HOPS = 32  # X-Forwarded-For entries looked at, right to left
MIN_TOKEN_LENGTH = 20

CIDR_SETTINGS = ("REPROQ_ALLOWED_CIDRS", "REPROQ_TRUSTED_PROXIES")


class AccessMisconfigured(Exception):
    """An access setting is invalid: every endpoint refuses (fail closed)."""


def api_token() -> str:
    from .dashboard.conf import setting

    value = setting("REPROQ_API_TOKEN", "")
    return value if isinstance(value, str) else ""


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


def flag(name: str) -> bool:
    """A boolean access setting (env 1/true/yes/on overrides); anything but True is False."""
    from .dashboard.conf import setting

    return setting(name, False) is True


async def allowed(request: HttpRequest) -> bool:
    if token_ok(request):
        return True
    auser = getattr(request, "auser", None)
    if auser is None:
        return False
    return _is_staff(await auser())


# --------------------------------------------------------------------------- settings


def _raw_list(name: str) -> Any:
    from .dashboard.conf import setting

    raw = setting(name, [])
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def _parse_networks(name: str, raw: Any) -> tuple[list[IPNetwork], bool, list[str]]:
    """(networks, unix socket trusted, problems) of a CIDR list setting."""
    if not isinstance(raw, list | tuple):
        return [], False, [f"must be a list of networks, got {type(raw).__name__}"]
    networks: list[IPNetwork] = []
    unix = False
    bad: list[str] = []
    for entry in raw:
        if name == "REPROQ_TRUSTED_PROXIES" and entry == UNIX:
            unix = True
            continue
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            bad.append(repr(entry)[:80])
    return networks, unix, ([f"invalid network {', '.join(bad)}"] if bad else [])


_net_cache: dict[str, tuple[Any, list[IPNetwork], bool]] = {}
_logged_problems: set[tuple[str, str]] = set()


def _networks(name: str) -> tuple[list[IPNetwork], bool]:
    raw = _raw_list(name)
    key = repr(raw)
    cached = _net_cache.get(name)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    networks, unix, problems = _parse_networks(name, raw)
    if problems:
        # Fail closed: a typo must not open the endpoints (nor trust a proxy by accident).
        if (name, key) not in _logged_problems:
            _logged_problems.add((name, key))
            logger.error("reproq: %s %s: every reproq endpoint refuses requests until it is "
                         "fixed (manage.py check)", name, problems[0])
        raise AccessMisconfigured(name)
    _net_cache[name] = (key, networks, unix)
    return networks, unix


def allowed_networks() -> list[IPNetwork]:
    """REPROQ_ALLOWED_CIDRS parsed (env overrides settings); empty = no restriction.
    Raises `AccessMisconfigured` when an entry is invalid."""
    return _networks("REPROQ_ALLOWED_CIDRS")[0]


def trusted_proxies() -> tuple[list[IPNetwork], bool]:
    """REPROQ_TRUSTED_PROXIES parsed: (networks, whether a Unix-socket peer is trusted)."""
    return _networks("REPROQ_TRUSTED_PROXIES")


def settings_problems() -> list[Problem]:
    """Every invalid access setting (the system check and `reproq doctor` report them)."""
    problems: list[Problem] = []
    for name in CIDR_SETTINGS:
        hint = ('a list of networks, e.g. ["10.0.0.0/8", "2001:db8::/32"] (env: '
                "comma-separated)")
        if name == "REPROQ_TRUSTED_PROXIES":
            hint += '; "unix" trusts a peer on a Unix socket'
        for message in _parse_networks(name, _raw_list(name))[2]:
            problems.append(Problem(f"{name}{_source(name)}", message, f"write {hint}"))
    for name, whole, hint in (
            ("REPROQ_AUTH_FAILURE_LIMIT", True, "a whole number >= 1, e.g. 10"),
            ("REPROQ_AUTH_FAILURE_WINDOW_SECONDS", False, "a number of seconds > 0, e.g. 60")):
        value = _given(name, int if whole else float)
        if value is not _UNSET and not (
                isinstance(value, int if whole else int | float)
                and not isinstance(value, bool) and value > 0):
            problems.append(Problem(f"{name}{_source(name)}", f"{value!r} is not valid",
                                    f"write {hint}"))
    value = _given("REPROQ_HEALTHZ_PUBLIC", _env_bool)
    if value is not _UNSET and not isinstance(value, bool):
        problems.append(Problem(f"REPROQ_HEALTHZ_PUBLIC{_source('REPROQ_HEALTHZ_PUBLIC')}",
                                f"{value!r} is not True or False",
                                "write True or False (env: 1/0, true/false, yes/no); anything "
                                "else keeps /healthz closed"))
    value = _given("REPROQ_API_TOKEN", str)
    if value is not _UNSET and not isinstance(value, str):
        problems.append(Problem("REPROQ_API_TOKEN", f"must be a string, got "
                                f"{type(value).__name__}", "no token is accepted until it is"))
    return problems


def token_warnings() -> list[str]:
    token = api_token()
    if token and len(token) < MIN_TOKEN_LENGTH:
        return [f"REPROQ_API_TOKEN{_source('REPROQ_API_TOKEN')} has only {len(token)} "
                "characters: the right token is never locked out by wrong ones, so the failure "
                "limit cannot make a short token safe"]
    return []


_UNSET = object()


def _env_bool(text: str) -> Any:
    from .dashboard.conf import FALSE, TRUE

    low = text.lower()
    return True if low in TRUE else False if low in FALSE else text


def _given(name: str, parse: Callable[[str], Any]) -> Any:
    """What the environment (parsed) or settings give for `name`, or `_UNSET`."""
    raw = os.environ.get(name, "").strip()
    if raw:
        try:
            return parse(raw)
        except ValueError:
            return raw
    return getattr(settings, name, _UNSET)


def _source(name: str) -> str:
    return f" (from env {name})" if os.environ.get(name, "").strip() else ""


def explain() -> list[tuple[str, Any, str]]:
    """(SETTING, value, source) rows of the access settings for `reproq config --explain`
    (the token is never shown, only whether and how long it is set)."""
    from .dashboard.conf import setting

    rows: list[tuple[str, Any, str]] = []
    defaults: dict[str, Any] = {"REPROQ_API_TOKEN": "", "REPROQ_ALLOWED_CIDRS": [],
                                "REPROQ_TRUSTED_PROXIES": [], "REPROQ_AUTH_FAILURE_LIMIT": 10,
                                "REPROQ_AUTH_FAILURE_WINDOW_SECONDS": 60.0,
                                "REPROQ_HEALTHZ_PUBLIC": False}
    for name, default in defaults.items():
        if os.environ.get(name, "").strip():
            source = f"env {name}"
        elif hasattr(settings, name):
            source = f"settings.{name}"
        else:
            source = "default"
        value = setting(name, default)
        if name == "REPROQ_API_TOKEN":
            value = f"(set, {len(value)} characters)" if value else "(not set)"
        rows.append((name, value, source))
    return rows


# --------------------------------------------------------------------------- client address


def stamp_peer(scope: dict[str, Any], send: Any) -> None:
    """Record the socket peer of an ASGI connection in ``scope["reproq.peer"]`` before any
    server rewrite is believed: uvicorn's ProxyHeadersMiddleware replaces ``scope["client"]``
    but not the transport behind its ``send``; daphne's ``--proxy-headers`` leaves Twisted's
    ``client`` on the request passed to its ``send``. Other servers (hypercorn, granian) report
    the peer itself in ``scope["client"]``."""
    if PEER_KEY in scope:
        return
    peer: Any = None
    port: Any = None
    owner = getattr(send, "__self__", None)  # uvicorn: the request-response cycle
    transport = getattr(owner, "transport", None)
    if transport is not None and callable(getattr(transport, "get_extra_info", None)):
        name = transport.get_extra_info("peername")
        peer = str(name[0]) if isinstance(name, tuple | list) and name else ""
        port = name[1] if isinstance(name, tuple | list) and len(name) > 1 else None
    elif isinstance(send, partial) and send.args:  # daphne: partial(handle_reply, protocol)
        client = getattr(send.args[0], "client", None)
        host = getattr(client, "host", None)
        if isinstance(host, str):
            peer, port = host, getattr(client, "port", None)
    if peer is None:
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        port = client[1] if client and len(client) > 1 else None
    scope[PEER_KEY] = peer
    scope[PEER_PORT_KEY] = port if isinstance(port, int) else None


def peer_address(request: HttpRequest) -> str:
    """The socket peer's host ("" when not an IP connection, e.g. a Unix socket)."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, dict):
        if PEER_KEY in scope:
            return str(scope[PEER_KEY])
        client = scope.get("client")  # not served through reproq.asgi: what the server says
        return str(client[0]) if client else ""
    return str(request.META.get("REMOTE_ADDR") or "")


def _address(text: str) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For hop (``1.2.3.4``, ``1.2.3.4:80``,
    ``2001:db8::1``, ``[2001:db8::1]:80``); None when it is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
    return addr


def _limit_key(addr: IPAddress) -> str:
    # One IPv6 host usually owns a whole /64: count its failures together.
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who the client is for reproq's address rules."""

    address: IPAddress | None  # None: unknown (refused by REPROQ_ALLOWED_CIDRS)
    key: str  # what wrong tokens are counted against


_hint_logged = False


def client_address(request: HttpRequest) -> ClientAddress:
    cached = getattr(request, "_reproq_client", None)
    if isinstance(cached, ClientAddress):
        return cached
    peer_text = peer_address(request)
    peer = _address(peer_text)
    result = ClientAddress(peer, _limit_key(peer) if peer else f"peer:{peer_text[:64]}")
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded:
        networks, unix = trusted_proxies()
        if (peer is None and peer_text == "" and unix) or (
                peer is not None and any(peer in net for net in networks)):
            result = _walk(forwarded, result, networks)
        else:
            _hint_untrusted(peer_text)
    request._reproq_client = result  # type: ignore[attr-defined]
    return result


def _walk(forwarded: str, proxy: ClientAddress, networks: list[IPNetwork]) -> ClientAddress:
    """X-Forwarded-For right to left from a trusted proxy: the first hop that is not a trusted
    proxy is the client. Hops left of it were written by the client and are ignored."""
    hops = forwarded.split(",")[-MAX_HOPS:]
    current = proxy
    for hop in reversed(hops):
        addr = _address(hop)
        if addr is None:
            # Not an address: the client is unknown; count failures against the proxy that
            # reported it (a client cannot vary that).
            return ClientAddress(None, current.key)
        current = ClientAddress(addr, _limit_key(addr))
        if not any(addr in net for net in networks):
            return current
    return current


def _hint_untrusted(peer: str) -> None:
    global _hint_logged
    if not _hint_logged:
        _hint_logged = True
        logger.info("reproq: a request from %s carries X-Forwarded-For, but %s is not in "
                    "REPROQ_TRUSTED_PROXIES: reproq's address rules use %s itself (list your "
                    "proxy there if it is one)", peer or "a Unix socket", peer or "it",
                    peer or "it")


def client_ip(request: HttpRequest) -> str:
    """The client address reproq's rules use ("" when unknown)."""
    addr = client_address(request).address
    return str(addr) if addr is not None else ""


def ip_allowed(request: HttpRequest) -> bool:
    networks = allowed_networks()
    if not networks:
        return True
    addr = client_address(request).address
    return addr is not None and any(addr in net for net in networks)


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
        """Seconds until wrong tokens from `ip` are answered 403 again instead of 429."""
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
            hits = self._recent(ip, now, window)
            if hits is None or hits.maxlen != limit:
                hits = deque(hits or (), maxlen=limit)
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
    """("token" | "session", None) when allowed, else ("", the refusal). Raises
    `AccessMisconfigured` when an address setting is invalid."""
    trusted_proxies()  # invalid: refuse every request, not only those with X-Forwarded-For
    if not ip_allowed(request):
        return "", _forbidden("client address not in REPROQ_ALLOWED_CIDRS")
    if presented_token(request):
        # Always compared (in constant time), even from a limited address: someone else's
        # wrong guesses from a shared address must not lock the right token out.
        if token_ok(request):
            return "token", None
        key = client_address(request).key
        limited = failures.retry_after(key) > 0
        failures.fail(key)  # counted while limited too: a guesser that goes on stays limited
        if limited:
            wait = failures.retry_after(key)
            return "", JsonResponse(
                {"error": "too many wrong tokens from this address; retry later",
                 "retry_after": round(wait, 3)},
                status=429, headers={"Retry-After": str(max(int(wait + 0.999), 1))})
        return "", _forbidden("invalid API token")
    auser = getattr(request, "auser", None)
    if auser is not None and _is_staff(await auser()):
        return "session", None
    refusal = _forbidden("staff session or API token required")
    refusal.reproq_anonymous = True  # type: ignore[attr-defined]
    return "", refusal


def misconfigured(exc: AccessMisconfigured) -> JsonResponse:
    return JsonResponse({"error": f"reproq access settings are invalid ({exc}): every endpoint "
                         "refuses until they are fixed; run `manage.py check`"}, status=500)


def bad_request(request: HttpRequest, exc: SuspiciousOperation) -> JsonResponse:
    """What Django would answer with an HTML page (too many fields, too large a body), as
    JSON; logged to ``django.security.*`` like Django does."""
    status = 413 if isinstance(exc, RequestDataTooBig) else 400
    logging.getLogger(f"django.security.{type(exc).__name__}").error(
        str(exc), extra={"status_code": status, "request": request})
    return JsonResponse({"error": str(exc) or type(exc).__name__}, status=status)


def staff_or_token(*, public_setting: str = "", login_redirect: bool = False
                   ) -> Callable[..., Any]:
    """Decorate an async view: 403 JSON unless staff or a valid token (or the public setting).

    ``login_redirect``: anonymous browsers are sent to the admin login instead (HTML pages).
    The view can read ``request.reproq_auth`` ("token", "session" or "public").
    """

    def decorate(view: Callable[..., Awaitable[HttpResponse]]) -> Callable[..., Any]:
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                if public_setting and flag(public_setting):
                    request.reproq_auth = "public"  # type: ignore[attr-defined]
                    return await view(request, *args, **kwargs)
                via, refusal = await authenticate(request)
                if refusal is not None:
                    if login_redirect and getattr(refusal, "reproq_anonymous", False):
                        return _login_redirect(request) or refusal
                    return refusal
                request.reproq_auth = via  # type: ignore[attr-defined]
                return await view(request, *args, **kwargs)
            except AccessMisconfigured as exc:
                return misconfigured(exc)
            except SuspiciousOperation as exc:
                return bad_request(request, exc)

        return wrapper

    return decorate
