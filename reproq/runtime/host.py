"""The process-wide runtime host: starts at most one `Runtime` per process, from any trigger.

Triggers: ASGI lifespan startup, daphne's reactor hook, the first HTTP request (lazy start) or
`manage.py reproq worker`. The runtime runs in its own asyncio task with a fresh
`contextvars.Context`, so it never inherits a request's context. `status()` tells /healthz and
the logs whether the runtime is up in this process, and if not, why.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass
from typing import Any

import anyio

from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")


@dataclass
class HostState:
    runtime: Runtime | None = None
    task: asyncio.Task[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    via: str = ""
    error: str = ""
    lock: asyncio.Lock | None = None
    stopping: bool = False


_state = HostState()


def current() -> Runtime | None:
    """The runtime running in this process, if any."""
    rt = _state.runtime
    if rt is not None and rt.state in {"starting", "running", "stopping"}:
        return rt
    return None


def stopping() -> bool:
    """True once this process began shutting its runtime down (no lazy restart then)."""
    return _state.stopping


def status() -> dict[str, Any]:
    rt = _state.runtime
    if rt is None:
        return {"state": "not-started", "via": "", "error": _state.error}
    return {**rt.status(), "via": _state.via, "error": _state.error}


async def start(via: str, overrides: dict[str, Any] | None = None,
                server: str | None = None) -> Runtime:
    """Start this process's runtime (idempotent); raise if its settings are invalid."""
    loop = asyncio.get_running_loop()
    if _state.loop is not loop or _state.lock is None:
        _state.lock, _state.loop = asyncio.Lock(), loop
        _state.runtime, _state.task, _state.stopping = None, None, False
    async with _state.lock:
        _state.stopping = False
        if _state.runtime is not None and _state.task is not None and not _state.task.done():
            return _state.runtime
        try:
            runtime = Runtime(overrides=overrides, server=server)
        except Exception as exc:
            _state.error = f"{type(exc).__name__}: {exc}"
            raise
        started: asyncio.Future[None] = loop.create_future()

        async def main() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(runtime.run)
                    started.set_result(None)
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                elif not isinstance(exc, asyncio.CancelledError):
                    _state.error = f"{type(exc).__name__}: {exc}"
                    logger.exception("reproq: runtime ended with an error")
                if isinstance(exc, asyncio.CancelledError):
                    raise

        _state.runtime, _state.via, _state.error = runtime, via, ""
        _state.task = loop.create_task(main(), name="reproq-runtime",
                                       context=contextvars.Context())
        await started
        return runtime


async def stop() -> None:
    """Graceful stop of this process's runtime, if it runs on this loop."""
    _state.stopping = True
    runtime, task = _state.runtime, _state.task
    if runtime is None or task is None:
        return
    if _state.loop is not asyncio.get_running_loop():
        return
    await runtime.stop()
    await task
    _state.task = None  # the stopped runtime stays visible in status()


def reset_for_tests() -> None:
    """Forget a stopped runtime so a test can start another in the same process."""
    _state.stopping = False
    _state.runtime = None
