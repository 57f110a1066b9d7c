"""`lifespan(app)`: wrap any ASGI app so the server's lifespan starts and stops the runtime.

Django's ASGIHandler (and channels' ProtocolTypeRouter without a "lifespan" entry) raise on
lifespan scopes; servers then run without lifespan. This wrapper answers lifespan itself:
startup starts the runtime (or sends ``lifespan.startup.failed`` with the reason, which makes
uvicorn, gunicorn and granian exit instead of serving without tasks), shutdown stops it
gracefully. Servers that send no lifespan (daphne, ``--lifespan off``) start it lazily on the
first request, and daphne through its reactor hooks (`reproq.asgi.daphne`).

It also counts HTTP requests in flight for the runtime's "requests first" gate
(`reproq.runtime.gate`): from the scope's arrival until the response is complete, or until it
turns out to be a stream (SSE, chunked bodies), which stops counting. WebSockets never count.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from ..access import stamp_peer
from ..runtime import host
from ..runtime.gate import REQUESTS

logger = logging.getLogger("reproq.asgi")

Scope = dict[str, Any]


class ReproqLifespan:
    """ASGI middleware owning the runtime's lifecycle in this process."""

    def __init__(self, app: Any, *, autostart: bool | None = None) -> None:
        self.app = app
        self._autostart = autostart
        self._warned = False
        self._shutdown = False
        from .metrics import install

        install()  # whichever trigger starts the runtime here, its runs feed the metrics
        if self.autostart:
            from .daphne import install_reactor_hooks

            if "daphne.server" in sys.modules:
                install_reactor_hooks()
            _start_watchdog()

    @property
    def autostart(self) -> bool:
        if self._autostart is not None:
            return self._autostart
        from ..conf import current_runtime_settings

        return current_runtime_settings().autostart

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind in {"http", "websocket"}:
            # The socket peer, before anything believes a rewritten scope["client"].
            stamp_peer(scope, send)
            if not self._shutdown and host.current() is None:
                await self._lazy_start()
        if kind != "http":
            await self.app(scope, receive, send)
            return
        token = REQUESTS.enter()

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await send(message)  # complete: the client has it, the runtime may go on
                    REQUESTS.leave(token)
                    return
                REQUESTS.leave(token)  # a streamed body (SSE, chunks): may last for ever
            elif message["type"] == "http.response.start" and _is_event_stream(message):
                REQUESTS.leave(token)
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            REQUESTS.leave(token)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                from .sse import reset_shutdown

                reset_shutdown()
                if self.autostart:
                    try:
                        await host.start("lifespan")
                    except Exception as exc:
                        logger.error("reproq: runtime failed to start: %s", exc)
                        await send({"type": "lifespan.startup.failed",
                                    "message": f"reproq runtime failed to start: {exc}"})
                        return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._shutdown = True
                from .sse import request_shutdown

                request_shutdown()  # end open event streams before the runtime stops
                try:
                    await host.stop()
                except Exception:
                    logger.exception("reproq: error while stopping the runtime")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _lazy_start(self) -> None:
        from ..conf import current_runtime_settings

        rs = current_runtime_settings()
        if not rs.autostart or host.stopping():
            return
        if not rs.lazy_start:
            if not self._warned:
                self._warned = True
                logger.error("reproq: the runtime is not running in this process (no lifespan "
                             "startup, LAZY_START off): tasks will not run here")
            return
        try:
            await host.start("first request")
        except Exception as exc:
            if not self._warned:
                self._warned = True
                logger.error("reproq: runtime failed to start on first request: %s", exc)


def _is_event_stream(message: dict[str, Any]) -> bool:
    for name, value in message.get("headers", ()):
        if name.lower() == b"content-type":
            return value.lower().startswith(b"text/event-stream")
    return False


_watchdog_started = False


def _start_watchdog() -> None:
    """Log an error if no trigger started the runtime within NOT_STARTED_WARNING_SECONDS
    (0: no watchdog; the test settings turn it off)."""
    global _watchdog_started
    if _watchdog_started:
        return
    from ..conf import current_runtime_settings

    delay = current_runtime_settings().not_started_warning_seconds
    if not delay:
        return
    _watchdog_started = True

    def check() -> None:
        if host.current() is None and not host.stopping():
            logger.error(
                "reproq: the runtime has not started %.0fs after the ASGI app was loaded: no "
                "lifespan startup and no request yet. Tasks do not run in this process until "
                "one arrives (or run `manage.py reproq worker`). /reproq/healthz reports 503.",
                delay)

    timer = threading.Timer(delay, check)
    timer.daemon = True
    timer.start()


def lifespan(app: Any, *, autostart: bool | None = None) -> ReproqLifespan:
    """Wrap an ASGI app (Django's handler, a channels router) so it runs the reproq runtime."""
    return ReproqLifespan(app, autostart=autostart)
