"""``manage.py reproq worker``: the embedded runtime as a standalone process.

SIGTERM or SIGINT stops it gracefully (stop claiming, finish within the grace period, release
the rest to READY, remove the worker row); a second signal exits at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import anyio
from django.core.management.base import BaseCommand, CommandError

from .argtypes import positive_int, worker_id


def _queue_list(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    if not queues:
        raise argparse.ArgumentTypeError("give at least one queue name, e.g. default,emails")
    return queues



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", type=_queue_list, help="comma-separated queue names")
    parser.add_argument("--concurrency", type=positive_int, help="tasks run at once")
    parser.add_argument("--worker-id", type=worker_id,
                        help="stable id for this worker (default host-pid-random)")
    parser.add_argument("--process-queues", type=_queue_list,
                        help="queues whose sync tasks run in killable child processes")
    parser.add_argument("--poll-only", action="store_true",
                        help="no LISTEN (for PgBouncer transaction pooling): poll instead")


def handle(command: BaseCommand, **options: Any) -> None:
    from ..asgi.metrics import install as install_metrics
    from ..runtime import host
    from ..runtime.runtime import build_settings

    overrides = {
        "queues": options.get("queues"),
        "concurrency": options.get("concurrency"),
        "worker_id": options.get("worker_id"),
        "process_queues": options.get("process_queues"),
        "listen": False if options.get("poll_only") else None,
    }
    if overrides["worker_id"] is not None and not (0 < len(overrides["worker_id"]) <= 64):
        raise CommandError("--worker-id must be 1 to 64 characters")
    try:
        build_settings(overrides)
    except Exception as exc:
        raise CommandError(str(exc)) from exc

    install_metrics()  # its runs count in the per-process metrics (PROMETHEUS_MULTIPROC_DIR)

    async def main() -> None:
        runtime = await host.start("worker", overrides=overrides, server="worker")
        command.stdout.write(f"reproq worker {runtime.worker_id} running queues "
                             f"{','.join(runtime.queues)} (Ctrl-C to stop)")
        sys.stdout.flush()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                command.stdout.write("reproq worker stopping (signal again to exit at once)")
                break
        async with anyio.create_task_group() as tg:
            async def second_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as again:
                    async for _ in again:
                        command.stderr.write("reproq worker: exiting at once")
                        import os

                        os._exit(1)

            tg.start_soon(second_signal)
            await host.stop()
            tg.cancel_scope.cancel()

    anyio.run(main)
