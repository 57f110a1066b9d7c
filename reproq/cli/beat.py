"""``manage.py reproq beat [--once]``: the leader-elected cron beat as a standalone process.

Without ``--once`` it competes for the leader lock like every runtime with ``BEAT`` on and, while
leading, enqueues each due tick exactly once; SIGTERM / SIGINT release the lock and exit. With
``--once`` it takes the lock if it is free, enqueues what is due now and exits - for crontab,
where no long-running process runs the beat. If another process holds the lock, ``--once``
exits 0 and says who leads: that process enqueues the ticks.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import anyio
from django.core.management.base import BaseCommand, CommandError

from .argtypes import worker_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true",
                        help="enqueue what is due now (if no other process leads) and exit")
    parser.add_argument("--worker-id", type=worker_id,
                        help="id shown as the leader (default host-pid-random)")


def _settings() -> Any:
    from ..runtime.runtime import build_settings

    try:
        return build_settings()
    except Exception as exc:
        raise CommandError(str(exc)) from exc


def handle(command: BaseCommand, **options: Any) -> None:
    from ..runtime.beat import Beat, StandaloneOwner

    worker_id = options.get("worker_id") or ""
    if options.get("worker_id") is not None and not (0 < len(worker_id) <= 64):
        raise CommandError("--worker-id must be 1 to 64 characters")
    owner = StandaloneOwner(_settings(), worker_id)
    beat = Beat(owner, standalone=True)
    if options.get("once"):
        run_once(command, beat)
        return

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat.run)
            command.stdout.write(f"reproq beat {owner.worker_id} running (leader-elected; "
                                 "Ctrl-C to stop)")
            sys.stdout.flush()
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    command.stdout.write("reproq beat stopping")
                    break
            with anyio.move_on_after(10):
                await beat.shutdown()
            tg.cancel_scope.cancel()

    anyio.run(main)


def run_once(command: BaseCommand, beat: Any) -> None:
    import psycopg

    try:
        outcome = anyio.run(beat.run_once)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        raise CommandError(f"reproq beat --once could not reach the database: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not outcome.led:
        command.stdout.write(f"reproq beat --once: {outcome.holder} holds the beat leader lock "
                             "and enqueues due ticks; nothing done here")
        return
    command.stdout.write(f"reproq beat --once: enqueued {outcome.fired} ticks"
                         + (f", skipped {outcome.skipped}" if outcome.skipped else ""))
