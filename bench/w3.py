"""W3 latency: an idle worker (one process, concurrency 10); tasks enqueued one by one, a fixed
gap apart; enqueue→start percentiles from the system's own timestamps.

reproq's figures come from `bench.runtime.latency` unchanged (the ``./dev bench runtime``
method: start ``reproq worker``, wait for its registration, enqueue with ``task.enqueue``,
``started_at - enqueued_at`` from PostgreSQL's clock). A peer's worker is started, waited for
until idle, then its driver enqueues the same number of tasks with the same gap through its
sync one-by-one API (one warm-up task first, left out of the percentiles).
"""

from __future__ import annotations

from typing import Any

from bench import common
from bench.common import Stat, pct
from bench.config import Ctx
from bench.report import Section, Target, cell


def peer_once(ctx: Ctx, system: Any) -> dict[str, float]:
    s = ctx.sizes
    system.reset()
    procs = system.start_workers(s.concurrency, 1, system.task_kinds[0])
    try:
        common.wait_quiescent([p.pid for p in procs], min_wait=s.quiet_min_wait, timeout=90)
        warm = system.latency_enqueue(s.w3_tasks, s.w3_gap_ms, system.task_kinds[0])
        common.poll_until(lambda: system.done_count() >= s.w3_tasks + warm, timeout=120,
                          interval=0.1, what=f"{system.name} latency tasks")
        ms = system.latencies(drop_first=warm)
    finally:
        common.stop_all(procs)
    return {"p50": pct(ms, .5), "p95": pct(ms, .95), "p99": pct(ms, .99), "max": max(ms)}


def run(ctx: Ctx) -> None:
    from bench import runtime

    s = ctx.sizes
    sec = Section(f"W3 enqueue→start latency, idle worker, {s.w3_tasks} tasks "
                  f"{s.w3_gap_ms:g} ms apart (ms; median (min-max) of {s.repeat})",
                  ["system", "task", "wakeup", "p50", "p95", "p99", "max"])
    results: dict[tuple[str, str], dict[str, Stat]] = {}
    for system in ctx.systems:
        for kind in system.task_kinds:
            ctx.log(f"W3 {system.name} {kind} x {s.repeat}")
            runs = []
            try:
                for _ in range(s.repeat):
                    if system.name == "reproq":
                        runs.append(runtime.latency(s.w3_tasks, s.w3_gap_ms / 1000,
                                                    system.task(kind)))
                    else:
                        runs.append(peer_once(ctx, system))
            except Exception as exc:
                sec.add(system.name, kind, "", ctx.fail(system.name, "W3", exc), "", "", "")
                continue
            st = {k: common.stats_of(runs, k) for k in ("p50", "p95", "p99", "max")}
            results[(system.name, kind)] = st
            wake = getattr(getattr(system, "peer", None), "mod", None)
            wake = getattr(wake, "WAKEUP", "LISTEN/NOTIFY")
            sec.add(system.name, kind, wake, *(cell(st[k], 2) for k in ("p50", "p95", "p99",
                                                                        "max")))
    if any(k[0] == "reproq" for k in results):
        try:
            system = next(x for x in ctx.systems if x.name == "reproq")
            system.reset()
        except Exception as exc:
            ctx.fail("reproq", "W3 reset", exc)
    ctx.sections.append(sec)
    ctx.data["w3"] = results
    for kind in ("sync", "async"):
        st = results.get(("reproq", kind))
        for q, goal in (("p50", 2.5), ("p99", 6.0)):
            if st is None:
                ctx.targets.append(Target("W3", f"reproq {kind} {q} ≤ {goal} ms", "n/a", None))
                continue
            ctx.targets.append(Target("W3", f"reproq {kind} no-op {q} ≤ {goal} ms",
                                      cell(st[q], 2) + " ms", st[q].median <= goal))
