"""W5 scale: the cost of one claim statement with 1,000,000 rows in the table (finished and
ready) against a near-empty table (ready rows only), for every system's own claim.

Rows are copied from one real enqueued row with ``INSERT ... SELECT ... generate_series`` (the
finished ones as SUCCESSFUL / succeeded / successful, where the system keeps them: pgqueuer
moves finished jobs to its log table), then ``VACUUM ANALYZE``. Each repetition times
``w5_k`` claims, committed one after the other as a worker would issue them (the claimed rows
become running; there are enough ready rows for all of them). reproq's statement is
``reproq.sql.claim_fast`` with limit 10 (the runtime's first claim); procrastinate and
django-tasks-db claim one job per statement, pgqueuer a batch of 10.
"""

from __future__ import annotations

from typing import Any

from bench.common import Stat
from bench.config import Ctx
from bench.report import Section, Target, cell


def run(ctx: Ctx) -> None:
    s = ctx.sizes
    finished = s.w5_rows - s.w5_ready
    sec = Section(f"W5 claim cost: near-empty table ({s.w5_base_ready:,} ready rows) vs "
                  f"{s.w5_rows:,} rows ({finished:,} finished + {s.w5_ready:,} ready); "
                  f"server time of one claim statement (EXPLAIN ANALYZE: planning + execution, "
                  f"no commit), p50 of {s.w5_k} claims, median (min-max) of {s.repeat}",
                  ["system", "claim statement", "rows per claim", "near-empty ms",
                   f"{s.w5_rows:,} rows ms", f"{s.w5_rows:,} rows p95 ms", "ratio",
                   "of which planning ms (full)",
                   "buffers near-empty / full", "round trip + commit ms (full)",
                   "rows in the tables (full)"])
    results: dict[str, dict[str, Any]] = {}
    for system in ctx.systems:
        ctx.log(f"W5 {system.name}: near-empty, then {s.w5_rows:,} rows")
        try:
            base = _scale_reps(ctx, system, 0, s.w5_base_ready)
            big = _scale_reps(ctx, system, finished, s.w5_ready)
            system.reset()
        except Exception as exc:
            sec.add(system.name, ctx.fail(system.name, "W5", exc), "", "", "", "", "", "", "",
                    "", "")
            continue
        ratio = big["p50"].median / base["p50"].median
        results[system.name] = {"base": base, "big": big, "ratio": ratio}
        info = big["info"]
        sec.add(system.name, info.get("statement", ""), f"{info.get('rows_per_claim', 0):.1f}",
                cell(base["p50"], 3), cell(big["p50"], 3), cell(big["p95"], 3),
                f"{ratio:.2f}x", f"{info.get('planning_ms_p50', 0):.3f}",
                f"{base['info'].get('buffers', 0):.0f} / "
                f"{info.get('buffers', 0):.0f}", cell(big["rtt"], 2),
                f"{info.get('table_rows', 0):,}")
    sec.notes.append("Server time includes planning: EXPLAIN plans every time, where a worker "
                     "with prepared statements (psycopg after 5 runs, asyncpg always, plpgsql "
                     "inside procrastinate's function) plans once. Buffers: shared buffers "
                     "(hit + read) of the top plan node, median per claim. The round trip "
                     "includes the commit (a WAL flush with synchronous_commit on), which "
                     "dominates on a busy machine.")
    ctx.sections.append(sec)
    ctx.data["w5"] = results
    r = results.get("reproq")
    ctx.targets.append(Target(
        "W5", f"reproq claim flat at {s.w5_rows:,} rows (server time ≤ 1.5x near-empty)",
        "n/a" if r is None else f"{r['big']['p50'].median:.3f} vs "
        f"{r['base']['p50'].median:.3f} ms = {r['ratio']:.2f}x",
        None if r is None else r["ratio"] <= 1.5))


def _scale_reps(ctx: Ctx, system: Any, finished: int, ready: int) -> dict[str, Any]:
    s = ctx.sizes
    out = system.scale(finished, ready, s.w5_k, reps=s.repeat)
    reps = out["reps"]
    return {"p50": Stat([r["claim_ms_p50"] for r in reps]),
            "p95": Stat([r["claim_ms_p95"] for r in reps]),
            "rtt": Stat([r["rtt_ms_p50"] for r in reps]), "info": {**reps[-1], **out}}
