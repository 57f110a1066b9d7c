"""Helpers for tests that run a real Runtime inside the test process (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections
from django.tasks import default_task_backend

from reproq import db
from reproq.runtime import host
from reproq.runtime.runtime import Runtime

FINAL = {"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"}


def run_with_runtime(body: Callable[[Runtime], Awaitable[Any]], **overrides: Any) -> Any:
    """Start a runtime, run `body(runtime)`, stop the runtime gracefully; return body's value."""

    async def main() -> Any:
        runtime = await host.start("test", overrides=overrides or None)
        try:
            return await body(runtime)
        finally:
            await host.stop()
            await db.close_pools()
            host.reset_for_tests()
            # aget_result loads model instances through Django's thread-sensitive executor;
            # close what that thread opened, as the end of a request would.
            await sync_to_async(connections.close_all)()

    return asyncio.run(main())


async def wait_for(run_id: str, states: set[str] = FINAL, timeout: float = 20.0) -> Any:
    """Poll a run until its raw status is in `states` (bounded); return its result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await default_task_backend.aget_result(run_id)
        if result.raw_status in states:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {result.raw_status} after {timeout}s "
                                 f"(reason: {result.status_reason!r})")
        await asyncio.sleep(0.05)
