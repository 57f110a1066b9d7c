"""Publishes this process's state changes for the live dashboard, coalesced.

Starts and successes are aggregated per (kind, task, queue) between flushes, with a count, up to
20 run ids and the mean duration; failures, retries, cancellations, expiries and worker changes
are one event each. A flush is one INSERT plus one NOTIFY, at most every FLUSH_SECONDS, never
one per task. Losing a buffer in a crash loses dashboard events only, never task state.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import anyio

from .. import sql

if TYPE_CHECKING:
    from .outcome import Completion
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
FLUSH_SECONDS = 0.25
MAX_IDS = 20
KIND_BY_STATUS = {"SUCCESSFUL": "succeeded", "FAILED": "failed", "READY": "retried",
                  "WAITING": "retried", "CANCELLED": "cancelled", "EXPIRED": "expired"}


class EventPublisher:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._aggregated: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
            lambda: {"count": 0, "run_ids": [], "duration_total": 0.0})
        self._single: list[tuple[str, int | None, str, str, dict[str, Any]]] = []
        self._wake = anyio.Event()
        self.published = 0

    def _aggregate(self, kind: str, task: str, queue: str, run_id: int, duration: float) -> None:
        agg = self._aggregated[(kind, task, queue)]
        agg["count"] += 1
        agg["duration_total"] += duration
        if len(agg["run_ids"]) < MAX_IDS:
            agg["run_ids"].append(run_id)
        self._wake.set()

    def started(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["status"] == "RUNNING":
                self._aggregate("started", row["task_path"], row["queue_name"], int(row["id"]),
                                0.0)
            elif row["status"] == "EXPIRED":
                self.single("expired", int(row["id"]), row["task_path"], row["queue_name"], {})

    def finished(self, c: Completion) -> None:
        kind = KIND_BY_STATUS.get(c.status, c.status.lower())
        if kind == "succeeded":
            self._aggregate(kind, c.task_path, c.queue_name, c.id, c.duration)
        else:
            self.single(kind, c.id, c.task_path, c.queue_name,
                        {"reason": c.reason[:500], "duration_ms": round(c.duration * 1000, 3)})

    def single(self, kind: str, run_id: int | None, task: str = "", queue: str = "",
               data: dict[str, Any] | None = None) -> None:
        self._single.append((kind, run_id, task, queue, data or {}))
        self._wake.set()

    def _drain(self) -> list[tuple[str, int | None, str, str, dict[str, Any]]]:
        """Buffered events in causal order: starts, then single events, then successes."""
        aggregated: dict[str, list[tuple[str, int | None, str, str, dict[str, Any]]]] = {
            "started": [], "succeeded": []}
        for (kind, task, queue), agg in self._aggregated.items():
            count = agg["count"]
            aggregated.setdefault(kind, []).append(
                (kind, agg["run_ids"][0] if agg["run_ids"] else None, task, queue,
                 {"count": count, "run_ids": agg["run_ids"],
                  "duration_ms_avg": round(agg["duration_total"] / count * 1000, 3)
                  if kind == "succeeded" else None}))
        rows = [*aggregated.pop("started"), *self._single, *aggregated.pop("succeeded")]
        for rest in aggregated.values():
            rows.extend(rest)
        self._single.clear()
        self._aggregated.clear()
        return rows

    async def flush(self) -> None:
        rows = self._drain()
        if not rows:
            return
        params = {
            "kind": [r[0] for r in rows], "run_id": [r[1] for r in rows],
            "task_path": [r[2] for r in rows], "queue_name": [r[3] for r in rows],
            "data": [json.dumps(r[4], default=str) for r in rows],
            "worker": self.runtime.worker_id,
        }
        async with self.runtime.pool.connection() as conn:
            await conn.execute(sql.PUBLISH_EVENTS, params)
        self.published += len(rows)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.flush()
            except Exception as exc:
                logger.warning("reproq: publishing dashboard events failed (%s); dropped",
                               type(exc).__name__)
            await anyio.sleep(FLUSH_SECONDS)
