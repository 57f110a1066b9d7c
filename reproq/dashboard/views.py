"""The dashboard's HTTP side: the page, its JSON snapshot, its actions and its two assets.

Everything is behind `reproq.access.staff_or_token` (anonymous browsers are sent to the admin
login). Actions are POSTs: a session must pass Django's CSRF check, a token needs none. The
page works without JavaScript (server-rendered tables, plain forms that redirect back); with
it, `dashboard.js` keeps the numbers live from ``/reproq/events/`` and re-reads the snapshot.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.core.serializers.json import DjangoJSONEncoder
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotModified,
    HttpResponseRedirect,
    JsonResponse,
)
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from .. import stats
from ..access import csrf_failure, staff_or_token

STATIC = Path(__file__).resolve().parent.parent / "static" / "reproq"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
ACTIONS = ("retry", "replay", "cancel", "discard", "pause", "resume")


def snapshot() -> dict[str, Any]:
    """Everything the page shows (the stats document plus running runs and recent failures)."""
    return stats.collect(lists=True)


@cache
def _asset(name: str) -> tuple[bytes, str]:
    data = (STATIC / name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def asset_version() -> str:
    return "".join(_asset(n)[1].strip('"')[:6] for n in sorted(ASSETS))


def _render_page(request: HttpRequest) -> HttpResponse:
    snap = snapshot()
    context = {
        "snap": snap,
        "version": asset_version(),
        "auth": getattr(request, "reproq_auth", ""),
        "urls": {
            "events": reverse("reproq:events"), "snapshot": reverse("reproq:snapshot"),
            "action": reverse("reproq:action"), "stats": reverse("reproq:stats"),
            "metrics": reverse("reproq:metrics"), "healthz": reverse("reproq:healthz"),
            "admin_runs": _admin_url("admin:reproq_taskrun_changelist"),
        },
    }
    response = render(request, "reproq/dashboard.html", context)
    response["Cache-Control"] = "no-store"
    return response


def _admin_url(name: str) -> str:
    from django.urls import NoReverseMatch

    try:
        return reverse(name)
    except NoReverseMatch:
        return ""


@staff_or_token(login_redirect=True)
async def dashboard(request: HttpRequest) -> HttpResponse:
    """GET /reproq/: the live dashboard."""
    return await sync_to_async(_render_page)(request)


@staff_or_token()
async def snapshot_view(request: HttpRequest) -> JsonResponse:
    """GET /reproq/snapshot/: what the page shows, as JSON (re-read when events arrive)."""
    data = await sync_to_async(snapshot)()
    return JsonResponse(data, encoder=DjangoJSONEncoder, headers={"Cache-Control": "no-store"})


@staff_or_token()
async def asset(request: HttpRequest, name: str) -> HttpResponse:
    if name not in ASSETS:
        raise Http404(name)
    data, etag = _asset(name)
    if request.headers.get("If-None-Match") == etag:
        return HttpResponseNotModified(headers={"ETag": etag})
    return HttpResponse(data, content_type=ASSETS[name],
                        headers={"ETag": etag, "Cache-Control": "private, max-age=3600",
                                 "X-Content-Type-Options": "nosniff"})


def _ids(request: HttpRequest) -> list[int]:
    from ..ids import parse_ids, split_ids

    ids = parse_ids(split_ids(request.POST.getlist("id")))
    if not ids:
        raise ValueError("no run id given")
    return ids


def _perform(action: str, request: HttpRequest) -> dict[str, Any]:
    from ..control import cancel_runs, set_paused
    from .ops import discard_runs, replay_runs, retry_runs

    if action in {"pause", "resume"}:
        queue = request.POST.get("queue", "").strip()
        user = getattr(request, "user", None)
        by = (user.get_username() if request.reproq_auth == "session" and user  # type: ignore[attr-defined]
              else "api-token")
        set_paused(queue, action == "pause", reason=request.POST.get("reason", "")[:1000],
                   by=by)
        return {"queue": queue, "message": f"queue {queue} {action}d"}
    ids = _ids(request)
    if action == "cancel":
        changed = cancel_runs(ids)
        return {"changed": changed, "message": f"cancellation requested for {changed} of "
                f"{len(ids)} runs"}
    if action == "discard":
        deleted = discard_runs(ids)
        return {"changed": deleted, "message": f"{deleted} of {len(ids)} runs discarded"}
    outcome = retry_runs(ids) if action == "retry" else replay_runs(ids)
    verb = "retried as new runs" if action == "retry" else "replayed"
    return {"changed": len(outcome.created),
            "created": {str(k): v for k, v in outcome.created.items()},
            "message": outcome.summary(verb)}


def _act(request: HttpRequest) -> HttpResponse:
    if getattr(request, "reproq_auth", "") == "session":
        refusal = csrf_failure(request)
        if refusal is not None:
            return refusal
    action = request.POST.get("action", "")
    wants_json = "application/json" in request.headers.get("Accept", "")
    status = 200
    if action not in ACTIONS:
        body: dict[str, Any] = {"ok": False, "error": f"unknown action {action!r}: use one of "
                                + ", ".join(ACTIONS)}
        status = 400
    else:
        try:
            body = {"ok": True, "action": action, **_perform(action, request)}
        except ValueError as exc:
            body, status = {"ok": False, "action": action, "error": str(exc)}, 400
    if wants_json or getattr(request, "reproq_auth", "") == "token":
        return JsonResponse(body, status=status)
    _flash(request, body)
    return HttpResponseRedirect(reverse("reproq:dashboard"))


def _flash(request: HttpRequest, body: dict[str, Any]) -> None:
    from django.conf import settings

    if "django.contrib.messages" not in settings.INSTALLED_APPS:
        return
    from django.contrib import messages

    try:
        if body.get("ok"):
            messages.success(request, body.get("message", "done"))
        else:
            messages.error(request, body.get("error", "failed"))
    except messages.MessageFailure:
        pass


@csrf_exempt  # checked in _act for sessions; token clients need no CSRF token
@staff_or_token()
async def action(request: HttpRequest) -> HttpResponse:
    """POST /reproq/action/: action=retry|replay|cancel|discard (id=...), pause|resume
    (queue=..., reason=...)."""
    if request.method != "POST":
        return JsonResponse({"error": "POST only"}, status=405, headers={"Allow": "POST"})
    return await sync_to_async(_act)(request)
