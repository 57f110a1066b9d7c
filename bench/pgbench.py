"""Where the limit is: commits per second of this PostgreSQL, measured with ``pgbench``.

``pgbench -i -s 1`` into a scratch database, then the built-in ``simple-update`` script (one
UPDATE + one INSERT + COMMIT per transaction) for 1 and 10 clients. Every queue here needs at
least one commit per claim batch and one per completion batch, so this bounds what any of them
can do on this server (with ``synchronous_commit`` as configured). The scratch database is
dropped afterwards. When no ``pgbench`` binary is found, the section says so.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess

from bench.common import ensure_database
from bench.config import Ctx
from bench.report import Section

SCRATCH = "reproq_bench_pgbench"


def find_pgbench() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"),
                        key=lambda p: int(re.findall(r"/(\d+)/bin", p)[0]))
    return candidates[-1] if candidates else None


def run(ctx: Ctx) -> None:
    s = ctx.sizes
    sec = Section("PostgreSQL commit ceiling (pgbench, built-in simple-update, "
                  f"{s.pgbench_seconds} s per run)", ["clients", "threads", "tps (commits/s)",
                                                      "mean latency ms"])
    binary = find_pgbench()
    if binary is None:
        sec.notes.append("pgbench was not found (neither on PATH nor in "
                         "/usr/lib/postgresql/*/bin): the commit ceiling was not measured.")
        ctx.sections.append(sec)
        return
    ctx.log(f"pgbench ({binary})")
    url = ensure_database(ctx.admin_url, SCRATCH, fresh=True)
    try:
        subprocess.run([binary, "-i", "-s", "1", "-q", url], check=True, timeout=300,
                       capture_output=True, text=True)
        for clients in (1, 10):
            threads = min(clients, 2)
            res = subprocess.run([binary, "-n", "-N", "-c", str(clients), "-j", str(threads),
                                  "-T", str(s.pgbench_seconds), url], capture_output=True,
                                 text=True, timeout=s.pgbench_seconds + 120)
            tps = re.search(r"tps = ([\d.]+)", res.stdout)
            lat = re.search(r"latency average = ([\d.]+) ms", res.stdout)
            sec.add(clients, threads, f"{float(tps.group(1)):,.0f}" if tps else "failed",
                    lat.group(1) if lat else "n/a")
            if tps:
                ctx.data.setdefault("pgbench", {})[clients] = float(tps.group(1))
    except (subprocess.SubprocessError, OSError) as exc:
        ctx.fail("postgresql", "pgbench", exc)
    finally:
        import psycopg

        with psycopg.connect(ctx.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{SCRATCH}" WITH (FORCE)')
    sec.notes.append(f"binary: {binary}")
    ctx.sections.append(sec)
