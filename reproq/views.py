"""HTTP views served by the same ASGI process: /healthz (more in the dashboard modules)."""

from __future__ import annotations

import anyio
from django.http import HttpRequest, JsonResponse

from .access import staff_or_token
from .runtime import host


async def _database_ok(alias: str) -> tuple[bool, str]:
    from .db import get_pool

    try:
        with anyio.fail_after(3):
            pool = await get_pool(alias)
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        return True, ""
    except Exception as exc:
        return False, f"database: {type(exc).__name__}"


@staff_or_token(public_setting="REPROQ_HEALTHZ_PUBLIC")
async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database answers and the runtime runs in this process; else 503 + reason."""
    from .conf import current_runtime_settings

    rs = current_runtime_settings()
    from django.tasks import task_backends

    alias = task_backends[rs.backend].reproq_options.database
    db_ok, db_reason = await _database_ok(alias)
    runtime = host.status()
    reasons = []
    if not db_ok:
        reasons.append(db_reason)
    if rs.autostart and runtime["state"] != "running":
        why = runtime.get("error") or ("AUTOSTART is off" if not rs.autostart
                                       else "no lifespan startup or request has started it")
        reasons.append(f"runtime {runtime['state']} in this process: {why}")
    reasons.extend(f"degraded: {why}" for why in runtime.get("degraded_reasons") or ())
    body = {"ok": not reasons, "reasons": reasons, "database": db_ok,
            "runtime": {k: runtime.get(k) for k in ("state", "via", "worker_id", "queues",
                                                    "running", "crashes", "degraded",
                                                    "listening")}}
    return JsonResponse(body, status=200 if not reasons else 503)
