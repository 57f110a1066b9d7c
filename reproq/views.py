"""HTTP views served by the same ASGI process: /healthz (more in the dashboard modules)."""

from __future__ import annotations

import anyio
from django.http import HttpRequest, JsonResponse

from .access import staff_or_token
from .runtime import host

HEALTHZ_DATABASE_SECONDS = 3.0  # the database check of /healthz gives up after this


async def _database_ok(alias: str) -> tuple[bool, str]:
    """Whether `alias` answers a SELECT 1 within HEALTHZ_DATABASE_SECONDS, and if not why (the
    error's first line: no parameters, no password)."""
    from .db import describe, drain, get_pool

    pool = None
    try:
        with anyio.fail_after(HEALTHZ_DATABASE_SECONDS):
            pool = await get_pool(alias)
            async with pool.connection(timeout=HEALTHZ_DATABASE_SECONDS) as conn:
                await conn.execute("SELECT 1")
        return True, ""
    except TimeoutError:
        if pool is not None:
            await drain(pool)  # its connections may be half-open (a network partition)
        return False, (f"database: no answer within {HEALTHZ_DATABASE_SECONDS:g}s "
                       "(down or unreachable)")
    except Exception as exc:
        return False, f"database: unreachable ({describe(exc)})"


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
