"""Daphne (and `runserver` with daphne) send no lifespan: start the runtime from Twisted's
reactor instead (`callWhenRunning`) and stop it from a before-shutdown trigger, which Twisted
waits for. Under runserver's autoreloader no shutdown hook runs; leases recover those runs."""

from __future__ import annotations

import asyncio
import logging

from ..runtime import host

logger = logging.getLogger("reproq.asgi")
_installed = False


def install_reactor_hooks() -> bool:
    """Register start/stop with the running process's Twisted reactor (once per process)."""
    global _installed
    if _installed:
        return True
    try:
        from twisted.internet import reactor
    except ImportError:  # pragma: no cover - daphne always brings twisted
        return False
    _installed = True

    def start() -> None:
        async def go() -> None:
            try:
                await host.start("daphne")
            except Exception as exc:
                logger.error("reproq: runtime failed to start under daphne: %s", exc)

        asyncio.get_event_loop().create_task(go())

    def stop() -> object:
        from twisted.internet.defer import Deferred

        return Deferred.fromFuture(asyncio.ensure_future(host.stop()))

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    return True
