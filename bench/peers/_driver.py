"""Command line shared by the peer drivers; runs inside the peers' virtualenv.

    python -m bench.peers.<peer>_peer <command> [--n N] [--mode sync|async|bulk] ...

Each command prints one JSON object as its last line of output. Only the standard library and
psycopg are imported here; each driver imports its own library inside its commands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rate(n: int, seconds: float) -> dict[str, float]:
    return {"n": n, "seconds": seconds, "rate": n / seconds if seconds else float("inf")}


def claim_reps(claim: Callable[[], dict[str, Any]], k: int, reps: int) -> dict[str, Any]:
    """``reps`` repetitions of `time_claims` on the same table."""
    return {"reps": [time_claims(claim, k) for _ in range(max(1, reps))]}


def explain(execute: Callable[[str, Any], Any], sql: str, params: Any = None,
            rows_from_plan: bool = True) -> dict[str, Any]:
    """Run ``sql`` under ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` (it really runs: rows are
    claimed) and return its server-side time (planning + execution, no commit), the shared
    buffers it touched and, with ``rows_from_plan``, the rows of the top node."""
    cur = execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
    doc = cur.fetchone()[0]
    if isinstance(doc, str):
        doc = json.loads(doc)
    top = doc[0]
    plan = top["Plan"]
    out = {"server_ms": float(top.get("Planning Time", 0)) + float(top["Execution Time"]),
           "planning_ms": float(top.get("Planning Time", 0)),
           "buffers": int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks",
                                                                              0))}
    if rows_from_plan:
        out["rows"] = int(plan.get("Actual Rows", 0))
    return out


def time_claims(claim: Callable[[], dict[str, Any]], k: int) -> dict[str, float]:
    """Time ``k`` claims. ``claim`` runs one claim statement under EXPLAIN ANALYZE (see
    `explain`) and returns ``rows``, ``server_ms`` and ``buffers``; the round trip (with the
    commit that follows, as a worker's claim is committed) is timed here."""
    claim()  # warm the plan and the cache, not timed
    rtt, server, planning, buffers, rows = [], [], [], [], 0
    deadline = time.monotonic() + 120
    for _ in range(k):
        t0 = time.perf_counter()
        got = claim()
        rtt.append((time.perf_counter() - t0) * 1000)
        server.append(got["server_ms"])
        planning.append(got.get("planning_ms", 0.0))
        buffers.append(got["buffers"])
        rows += got["rows"]
        if time.monotonic() > deadline:
            break
    rtt.sort()
    server.sort()
    return {"claim_ms_p50": statistics.median(server),
            "claim_ms_p95": server[min(len(server) - 1, int(len(server) * 0.95))],
            "rtt_ms_p50": statistics.median(rtt), "buffers": statistics.median(buffers),
            "planning_ms_p50": statistics.median(planning),
            "rows_per_claim": rows / len(rtt), "claims": len(rtt)}


def fill_from_template(conn: Any, table: str, template_where: str, n: int,
                       overrides: dict[str, str], skip: tuple[str, ...] = ("id",)) -> None:
    """INSERT ``n`` copies of one template row of ``table`` with ``overrides`` (SQL expressions
    over ``t`` (the template) and ``g`` (1..n)); columns in ``skip`` take their defaults."""
    if n <= 0:
        return
    cols = [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
        "AND table_schema = current_schema() ORDER BY ordinal_position", [table]).fetchall()]
    cols = [c for c in cols if c not in skip or c in overrides]
    exprs = [overrides.get(c, f't."{c}"') for c in cols]
    conn.execute(
        f'INSERT INTO "{table}" ({", ".join(f"{chr(34)}{c}{chr(34)}" for c in cols)}) '
        f'SELECT {", ".join(exprs)} FROM "{table}" t, generate_series(1, {int(n)}) g '
        f"WHERE {template_where}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--url", default=os.environ.get("BENCH_DB_URL", ""))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--mode", default="sync")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--ready", type=int, default=0)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--embedded", action="store_true")
    return parser.parse_args(argv)


def main(namespace: dict[str, Any], argv: list[str] | None = None) -> None:
    args = parse(argv)
    func = namespace.get("cmd_" + args.command.replace("-", "_"))
    if func is None:
        raise SystemExit(f"unknown command {args.command!r}")
    result = func(args)
    if result is not None:
        emit(result)


def sigterm_event(loop: Any) -> Any:
    """An asyncio.Event set by SIGTERM/SIGINT (for drivers whose library has no handler)."""
    import asyncio

    event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
