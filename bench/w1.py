"""W1 enqueue rate: one by one (sync and async) and bulk, each system with its own API.

reproq's figures use the functions of `bench.enqueue` unchanged (sync ``enqueue``, native
``aenqueue`` with the pool opened outside the timing, one ``bulk_enqueue`` call); each peer's
driver mirrors them with its own API (see bench/peers/*_peer.py). The table is truncated before
every repetition.
"""

from __future__ import annotations

from bench.common import Stat
from bench.config import Ctx
from bench.report import Section, Target, cell

MODES = (("sync", "one by one, sync"), ("async", "one by one, async"), ("bulk", "bulk"))


def run(ctx: Ctx) -> None:
    s = ctx.sizes
    sec = Section(f"W1 enqueue rate (tasks/s; one by one: {s.w1_count:,} per repetition, "
                  f"bulk: {s.w1_bulk:,} in one call; median (min-max) of {s.repeat})",
                  ["system", "sync one by one", "async one by one", "bulk", "bulk API"])
    results: dict[str, dict[str, Stat]] = {}
    for system in ctx.systems:
        stats: dict[str, Stat] = {}
        cells = []
        for mode, _ in MODES:
            n = s.w1_bulk if mode == "bulk" else s.w1_count
            stat = Stat()
            ctx.log(f"W1 {system.name} {mode} x {s.repeat}")
            try:
                for _ in range(s.repeat):
                    system.reset()
                    stat.values.append(system.enqueue_rate(mode, n, system.task_kinds[0]))
                cells.append(cell(stat))
            except Exception as exc:
                cells.append(ctx.fail(system.name, f"W1 {mode}", exc))
            stats[mode] = stat
        results[system.name] = stats
        sec.add(system.name, *cells, system.fill_label)
        try:
            system.reset()
        except Exception as exc:
            ctx.fail(system.name, "W1 reset", exc)
    sec.notes.append("async one by one: reproq's native psycopg `aenqueue`, procrastinate "
                     "`defer_async`, pgqueuer `Queries.enqueue` (asyncpg), django-tasks-db "
                     "`aenqueue` (Django's async ORM, i.e. sync_to_async).")
    ctx.sections.append(sec)
    ctx.data["w1"] = results
    mine = results.get("reproq", {})
    for mode, label in MODES:
        stat = mine.get(mode)
        goal = 40_000 if mode == "bulk" else 1_500
        med = stat.median if stat and stat.values else None
        ctx.targets.append(Target("W1", f"reproq {label} ≥ {goal:,}/s",
                                  cell(stat) + "/s" if med is not None else "n/a",
                                  None if med is None else med >= goal))
