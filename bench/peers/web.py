"""W4's web process for a peer: Django with the same trivial ``/ping`` view, and the peer's
worker inside the process (started from the ASGI lifespan as the peer documents it), or none
when the peer only has a separate worker process. Runs in the peers' virtualenv under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from django.http import HttpResponse
from django.urls import path


async def ping(request: Any) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [path("ping", ping)]

Worker = Callable[[asyncio.Event], Awaitable[None]]


def make_app(worker: Worker | None) -> Any:
    from django.conf import settings

    if not os.environ.get("DJANGO_SETTINGS_MODULE") and not settings.configured:
        settings.configure(DEBUG=False, SECRET_KEY="reproq-bench-web", ROOT_URLCONF=__name__,
                           ALLOWED_HOSTS=["127.0.0.1", "localhost"], USE_TZ=True,
                           INSTALLED_APPS=[], DATABASES={})
    from django.core.asgi import get_asgi_application

    django_app = get_asgi_application()
    state: dict[str, Any] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await django_app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if worker is not None:
                    state["stop"] = asyncio.Event()
                    state["task"] = asyncio.create_task(worker(state["stop"]))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if "task" in state:
                    state["stop"].set()
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                        await asyncio.wait_for(state["task"], timeout=15)
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def serve(port: int, worker: Worker | None) -> None:
    import uvicorn

    uvicorn.run(make_app(worker), host="127.0.0.1", port=port, lifespan="on",
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)
