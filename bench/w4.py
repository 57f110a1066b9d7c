"""W4 embedded impact: HTTP latency of a trivial view under a fixed request rate, with the
worker idle versus draining a backlog of no-op tasks.

One web process per system on 127.0.0.1 (uvicorn, one worker process, the same async Django
view ``/ping``): reproq's runtime runs inside it (``bench/asgi.py``), as do procrastinate's and
pgqueuer's workers (their documented lifespan patterns); django-tasks-db has no in-process
worker, so its web process serves only and separate ``db_worker`` processes drain on the same
machine (marked in the table). The load generator (``bench/loadgen.py``) runs in a separate
process at a fixed rate. Phase 1 (idle): ``w4_idle_seconds`` of load, no tasks. Phase 2
(draining): load runs while the backlog is enqueued in one bulk call and drained; only the
requests sent between the first task start and the last task finish are counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from bench import common
from bench.common import Stat, pct
from bench.config import Ctx
from bench.report import Section, Target, cell


def _wait_http(url: str, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("web process exited during start-up (see its log in "
                               f"{tempfile.gettempdir()}/reproq-bench-logs)")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _loadgen(url: str, rate: float, seconds: float, out: str) -> subprocess.Popen:
    with open(out + ".log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "bench.loadgen", "--url", url, "--rate",
                                 str(rate), "--seconds", str(seconds), "--out", out],
                                cwd=common_repo(), stdout=log, stderr=log)


def common_repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(out: str) -> list[tuple[float, float, bool]]:
    try:
        with open(out) as f:
            return [tuple(r) for r in json.load(f)]
    except (OSError, ValueError):
        return []


def once(ctx: Ctx, system: Any) -> dict[str, float]:
    s = ctx.sizes
    port = common.free_port()
    url = f"http://127.0.0.1:{port}/ping"
    system.reset()
    procs = system.serve(port)
    tmp = tempfile.mkdtemp(prefix="reproq-bench-w4-")
    try:
        _wait_http(url, procs)
        common.wait_quiescent([p.pid for p in procs], min_wait=s.quiet_min_wait, timeout=60)
        # phase 1: idle
        idle_out = os.path.join(tmp, "idle.json")
        gen = _loadgen(url, s.w4_rate, s.w4_idle_seconds, idle_out)
        gen.wait(s.w4_idle_seconds + 30)
        idle = _read(idle_out)
        # phase 2: draining
        busy_out = os.path.join(tmp, "busy.json")
        gen = _loadgen(url, s.w4_rate, s.w4_max_seconds, busy_out)
        try:
            time.sleep(0.5)
            system.fill(s.w4_tasks, system.task_kinds[0])
            common.poll_until(lambda: system.done_count() >= s.w4_tasks,
                              timeout=s.w4_max_seconds, interval=0.1,
                              what=f"{system.name} drain under load")
            time.sleep(0.3)
        finally:
            common.stop_process(gen, timeout=60)
        t0, t1 = system.span()
        # every request sent while tasks were running, answered or not (a failed or
        # unanswered one counts with the time it was waited for)
        busy_all = _read(busy_out)
        busy = [r for r in busy_all if t0 <= r[0] <= t1]
    finally:
        common.stop_all(procs)
    if not idle or not busy:
        sent = (f"{min(r[0] for r in busy_all):.1f}-{max(r[0] for r in busy_all):.1f}"
                if busy_all else "none")
        raise RuntimeError(f"no requests measured (idle {len(idle)}, draining {len(busy)}; "
                           f"load sent {sent}, tasks ran {t0:.1f}-{t1:.1f}; files in {tmp})")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when the repetition failed
    i_ms = [r[1] for r in idle]
    b_ms = [r[1] for r in busy]
    return {"idle_p50": pct(i_ms, .5), "idle_p99": pct(i_ms, .99),
            "busy_p50": pct(b_ms, .5), "busy_p99": pct(b_ms, .99),
            "ratio_p99": pct(b_ms, .99) / pct(i_ms, .99), "busy_n": len(b_ms),
            "idle_n": len(i_ms), "drain_s": t1 - t0,
            "failed": sum(1 for r in busy if not r[2]) + sum(1 for r in idle if not r[2])}


def run(ctx: Ctx) -> None:
    s = ctx.sizes
    sec = Section(f"W4 web latency of a trivial view at {s.w4_rate:g} req/s: worker idle vs "
                  f"draining {s.w4_tasks:,} no-op tasks (ms; median (min-max) of {s.repeat})",
                  ["system", "where the worker runs", "idle p50", "idle p99", "draining p50",
                   "draining p99", "p99 draining / idle", "requests while draining",
                   "failed / unanswered", "drain s"])
    results: dict[str, dict[str, Stat]] = {}
    for system in ctx.systems:
        ctx.log(f"W4 {system.name} x {s.repeat}")
        runs = []
        for rep in range(s.repeat):
            try:
                runs.append(once(ctx, system))
            except Exception as exc:  # the other repetitions still count
                ctx.fail(system.name, f"W4 repetition {rep + 1}", exc)
        if not runs:
            sec.add(system.name, system.embedding_note(), "failed (see notes)", "", "", "", "",
                    "", "", "")
            continue
        st = {k: common.stats_of(runs, k) for k in runs[0]}
        results[system.name] = st
        sec.add(system.name, system.embedding_note(), cell(st["idle_p50"], 2),
                cell(st["idle_p99"], 2), cell(st["busy_p50"], 2), cell(st["busy_p99"], 2),
                cell(st["ratio_p99"], 2), cell(st["busy_n"]), cell(st["failed"]),
                cell(st["drain_s"], 1))
    sec.notes.append("Latency is measured by the client (send to full response) on loopback; "
                     "the load generator shares the machine's cores with the server, the "
                     "workers and PostgreSQL. Requests that fail or get no answer (client "
                     "timeout 10 s) count in the percentiles with the time waited.")
    ctx.sections.append(sec)
    ctx.data["w4"] = results
    st = results.get("reproq")
    if st is None:
        ctx.targets.append(Target("W4", "reproq p99 draining ≤ 1.25x idle", "n/a", None))
    else:
        ctx.targets.append(Target(
            "W4", "reproq p99 while draining ≤ 1.25x idle p99",
            f"{cell(st['ratio_p99'], 2)}x (median of the repetitions' ratios; p99 idle "
            f"{st['idle_p99'].median:.1f} ms, draining {st['busy_p99'].median:.1f} ms)",
            st["ratio_p99"].median <= 1.25))
