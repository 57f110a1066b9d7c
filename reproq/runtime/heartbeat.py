"""Renews the leases of every run this process holds and its worker row, in one statement.

Runs missing from the answer were reclaimed elsewhere (this process stalled past its lease): they
are stopped here so the same run never executes twice at once. Runs marked cancel_requested are
cancelled (a NOTIFY usually gets there first).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import anyio

from .. import sql

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")


class Heartbeat:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.beats = 0

    async def beat(self) -> None:
        rt = self.runtime
        held = list(rt.executor.running)
        async with rt.pool.connection() as conn:
            cur = await conn.execute(sql.HEARTBEAT, {
                "ids": held, "worker": rt.worker_id, "lease": rt.settings.lease_seconds,
                **rt.worker_row(),
            })
            rows = await cur.fetchall()
        self.beats += 1
        renewed = {int(r["id"]) for r in rows}
        for run_id in held:
            if run_id not in renewed and run_id in rt.executor.running:
                logger.warning("reproq: lost the lease of run %s; stopping it here", run_id)
                rt.executor.cancel(run_id, lost=True)
        for r in rows:
            if r["cancel_requested"]:
                rt.executor.cancel(int(r["id"]))

    async def run(self) -> None:
        while True:
            await self.beat()
            await anyio.sleep(self.runtime.settings.heartbeat_seconds)


def queues_json(queues: tuple[str, ...]) -> str:
    return json.dumps(list(queues))
