"""The chaos load of issue 16 item 7, shared by bench/chaos.py (full size) and
tests/test_outages.py (a small version in the default test set).

N ``chaos_probe`` runs across S uvicorn servers on a PostgreSQL of its own (`OwnPostgres`); every
`kill_every` seconds one server (in turn) is SIGKILLed with its process group and started again
at once; at each time in `pg_stops` PostgreSQL is stopped for `pg_down` seconds (alternately
``immediate``, as a crash, and ``fast``). Then every run must end SUCCESSFUL, none may have run
twice at once (the probe log, `tests.outage.overlaps`, a SIGKILLed attempt ending at its kill),
and each result must come from the attempt that owned the run last. `run` returns the figures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.outage import OwnPostgres, overlaps, probe_attempts
from tests.servers import COMMANDS, Child, Servers, free_port

DB = "reproq_outage"
FINAL = ("SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED")
ENV = {"REPROQ_LEASE_SECONDS": "3", "REPROQ_HEARTBEAT_SECONDS": "0.5",
       "REPROQ_RECLAIM_SECONDS": "0.5", "REPROQ_POLL_FALLBACK_SECONDS": "60",
       "REPROQ_POOL_MAX_SIZE": "4"}


def prepare(pg: OwnPostgres, migrate: Callable[[dict[str, str]], Any]) -> None:
    """Create and migrate the chaos database on `pg` (`migrate(env)` runs manage.py migrate)."""
    pg.create_database(DB)
    done = migrate({"DATABASE_URL": pg.url(), "REPROQ_TEST_DB_NAME": DB})
    assert done.returncode == 0, done.stdout + done.stderr


def spawn(servers: Servers, pg: OwnPostgres, concurrency: int,
          port: int | None = None) -> Child:
    http_port = port or free_port()
    return servers._spawn("uvicorn", COMMANDS["uvicorn"](http_port), {
        **ENV, "REPROQ_CONCURRENCY": str(concurrency), "DATABASE_URL": pg.url(),
        "REPROQ_TEST_DB_NAME": DB}, port=http_port)


def healthy(child: Child) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=5) as client:
            r = client.get(child.url("/reproq/healthz"),
                           headers={"Authorization": f"Bearer {child.token}"})
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def enqueue(child: Child, log: Path, ms: int, count: int) -> list[int]:
    with httpx.Client(trust_env=False, timeout=120) as client:
        r = client.post(child.url("/enqueue/chaos_probe/"), content=json.dumps({
            "kwargs": {"path": str(log), "ms": ms}, "count": count,
            "using": {"max_attempts": 50, "dedup": False}}),
            headers={"Authorization": f"Bearer {child.token}",
                     "Content-Type": "application/json"})
    assert r.status_code == 200, (r.status_code, r.text[:300])
    return [int(i) for i in r.json()["ids"]]


def statuses(pg: OwnPostgres) -> Counter[str]:
    with pg.connect(DB) as conn:
        return Counter(dict(conn.execute(
            "SELECT status, count(*) FROM reproq_task_runs GROUP BY status").fetchall()))


@dataclass
class Figures:
    tasks: int = 0
    servers: int = 0
    concurrency: int = 0
    task_ms: int = 0
    duration_s: float = 0.0
    kills: int = 0
    pg_stops: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    overlapping: int = 0
    wrong_writer: int = 0
    attempts: dict[int, int] = field(default_factory=dict)  # attempts started per run -> runs
    kill_rerun_s: dict[str, float] = field(default_factory=dict)  # SIGKILL -> run again

    def lines(self) -> list[str]:
        stops = "; ".join(f"{s['mode']} stop at +{s['at']:.1f}s for {s['down']:.1f}s, claims "
                          f"again {s['recovery']:.2f}s after it was up" for s in self.pg_stops)
        return [
            f"chaos: {self.tasks} tasks ({self.task_ms} ms each) across {self.servers} uvicorn "
            f"servers (concurrency {self.concurrency}), {self.kills} SIGKILLs, "
            f"{len(self.pg_stops)} PostgreSQL stops, {self.duration_s:.1f}s from enqueue to "
            "the last run finished",
            f"  final statuses: {dict(self.statuses)}; lost {self.lost}; run twice at once "
            f"{self.overlapping}; result written by a process that had lost the run "
            f"{self.wrong_writer}",
            f"  attempts started per run: {dict(sorted(self.attempts.items()))}",
            f"  SIGKILL -> killed runs running again elsewhere: {self.kill_rerun_s}",
            f"  PostgreSQL: {stops}",
        ]


def run(pg: OwnPostgres, servers: Servers, log: Path, *, tasks: int, task_ms: int,
        count: int = 3, concurrency: int = 20, kill_every: float = 2.0,
        kills: int | None = None, pg_stops: tuple[float, ...] = (15.0, 40.0),
        pg_down: float = 5.0, finish_timeout: float = 600.0,
        progress: Callable[[str], None] = print) -> Figures:
    """The chaos load; raises AssertionError when a run is lost, ran twice at once or ended
    otherwise than SUCCESSFUL. `kills`: at most this many SIGKILLs (None: until the end)."""
    with pg.connect(DB) as conn:
        conn.execute("TRUNCATE reproq_task_runs, reproq_workers CASCADE")
    ports = [free_port() for _ in range(count)]
    procs = [spawn(servers, pg, concurrency, port) for port in ports]
    deadline = time.monotonic() + 90
    while not all(healthy(c) for c in procs):
        for c in procs:
            c.check_alive()
        assert time.monotonic() < deadline, servers.logs()
        time.sleep(0.2)

    ids: list[int] = []
    for start in range(0, tasks, 1000):
        ids += enqueue(procs[start // 1000 % count], log, task_ms, min(1000, tasks - start))
    began = time.time()
    progress(f"chaos: {len(ids)} runs enqueued; SIGKILL every {kill_every:g}s, PostgreSQL "
             f"down {pg_down:g}s at +{', +'.join(f'{t:g}' for t in pg_stops)}s")

    died: dict[int, float] = {}
    figures = Figures(tasks=len(ids), servers=count, concurrency=concurrency, task_ms=task_ms)
    stops = list(pg_stops)
    next_kill = began + kill_every
    victim = 0
    down_since: float | None = None
    mode = "immediate"
    ids_set = set(ids)

    def unfinished() -> int:
        with pg.connect(DB) as conn:
            return int(conn.execute("SELECT count(*) FROM reproq_task_runs WHERE status NOT IN "
                                    "('SUCCESSFUL', 'FAILED', 'CANCELLED', 'EXPIRED')"
                                    ).fetchone()[0])

    last_report = began
    while True:
        now = time.time()
        if down_since is None and stops and now - began >= stops[0]:
            stops.pop(0)
            pg.stop(mode)
            down_since = time.time()
            progress(f"chaos: +{down_since - began:.1f}s PostgreSQL stopped ({mode})")
        elif down_since is not None and now - down_since >= pg_down:
            pg.start()
            up = time.time()
            figures.pg_stops.append({"mode": mode, "at": down_since - began,
                                     "down": up - down_since, "up_at": up})
            progress(f"chaos: +{up - began:.1f}s PostgreSQL up again")
            down_since = None
            mode = "fast" if mode == "immediate" else "immediate"
        if now >= next_kill and (kills is None or figures.kills < kills):
            child = procs[victim]
            if child.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)
                died[child.pid] = time.time()
                child.proc.wait(timeout=10)
                child.stopped = True
                figures.kills += 1
            procs[victim] = spawn(servers, pg, concurrency, ports[victim])
            victim = (victim + 1) % count
            next_kill = time.time() + kill_every
        if down_since is None and not stops and (kills is None or figures.kills >= kills
                                                 or now - began > 5):
            try:
                if unfinished() == 0:
                    break
            except Exception:  # PostgreSQL restarting: look again
                pass
        if now - last_report > 10:
            last_report = now
            with contextlib.suppress(Exception):
                progress(f"chaos: +{now - began:.0f}s {dict(statuses(pg))}")
        assert now - began < finish_timeout, f"not finished after {finish_timeout}s"
        time.sleep(0.05)
    ended = time.time()

    # ---------------------------------------------------------------- checks and figures
    attempts = probe_attempts(log)
    with pg.connect(DB) as conn:
        cur = conn.execute("SELECT id, status, worker_ids, return_value FROM reproq_task_runs "
                           "WHERE id = ANY(%s)", [ids])
        rows = {r[0]: r for r in cur.fetchall()}
    last_end = max((a.end or 0.0) for runs in attempts.values() for a in runs)
    figures.duration_s = max(last_end, ended) - began if last_end else ended - began
    figures.statuses = dict(Counter(r[1] for r in rows.values()))
    figures.lost = len(ids_set - set(rows)) + sum(1 for r in rows.values()
                                                  if r[1] != "SUCCESSFUL")
    clash = overlaps({i: attempts.get(i, []) for i in ids}, died, now=ended)
    figures.overlapping = len({a.run_id for a, _ in clash})
    figures.wrong_writer = sum(1 for r in rows.values()
                               if r[1] == "SUCCESSFUL" and r[3]["worker"] != r[2][-1])
    figures.attempts = dict(Counter(len(attempts.get(i, [])) for i in ids))
    waits = []
    for runs in attempts.values():
        for earlier, later in itertools.pairwise(runs):
            if earlier.end is None and earlier.pid in died:
                waits.append(later.start - died[earlier.pid])
    if waits:
        figures.kill_rerun_s = {"runs": len(waits), "median": round(statistics.median(waits), 2),
                                "max": round(max(waits), 2)}
    for stop in figures.pg_stops:
        starts = [a.start for runs in attempts.values() for a in runs if a.start > stop["up_at"]]
        stop["recovery"] = (min(starts) - stop["up_at"]) if starts else float("nan")
    for line in figures.lines():
        progress(line)
    assert figures.lost == 0, (figures.statuses, servers.logs())
    assert not clash, clash[:5]
    assert figures.wrong_writer == 0
    return figures
