"""``manage.py reproq status [--json]``: queues, workers, schedules and failing tasks at a
glance, from the same reads as the stats API (`reproq.stats.collect`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.management.base import BaseCommand

from .argtypes import add_database_option, database_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the stats document (docs/stats.md) as JSON")
    add_database_option(parser)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in cells]


def _count(value: int, estimated: bool) -> str:
    return f"~{value:,}" if estimated else f"{value:,}"


def handle(command: BaseCommand, **options: Any) -> None:
    from ..control import _database
    from ..stats import collect

    with database_errors("reading the stats"):
        doc = collect(_database(options.get("database")), lists=False)
    out = command.stdout
    if options["json"]:
        out.write(json.dumps(doc, indent=2, default=str))
        return
    runs = doc["runs"]
    by = runs["by_status"]
    total = _count(runs["total"]["count"], runs["total"]["estimated"])
    parts = ", ".join(f"{s} {_count(v['count'], v['estimated'])}"
                      for s, v in by.items() if v["count"])
    out.write(f"database {doc['database']}: {total} runs" + (f" ({parts})" if parts else ""))
    out.write("")
    rows = []
    for q in doc["queues"]:
        est = set(q["estimated"])
        rows.append([q["name"], _count(q["ready"], "READY" in est),
                     _count(q["waiting"], "WAITING" in est),
                     _count(q["blocked"], "BLOCKED" in est),
                     _count(q["running"], "RUNNING" in est),
                     ("paused" + (f": {q['pause_reason']}" if q["pause_reason"] else ""))
                     if q["paused"] else "", q["succeeded_5m"], q["failed_5m"]])
    for line in _table(["queue", "ready", "waiting", "blocked", "running", "state",
                        "done 5m", "failed 5m"], rows):
        out.write(line)
    workers = doc["workers"]
    out.write("")
    out.write(f"workers: {workers['count']}" + (
        f" (beat leader {workers['leader']['id']})" if workers["leader"] else " (no beat leader)"))
    if workers["items"]:
        for line in _table(["id", "host", "pid", "queues", "slots", "running", "last seen"], [
                [w["id"], w["hostname"], w["pid"], ",".join(w["queues"] or []),
                 w["concurrency"], w["running"], f"{w['seen_ago']:.1f}s ago"]
                for w in workers["items"]]):
            out.write("  " + line)
    sched = doc["schedules"]
    out.write("")
    out.write(f"schedules: {sched['count']} ({sched['enabled']} enabled)")
    failing = doc["top_failing_tasks"]
    if failing:
        out.write("")
        out.write("failing in the last 24 h:")
        for line in _table(["task", "failures", "last"], [
                [f["task_path"], f["failures"], f["last_failed_at"]] for f in failing]):
            out.write("  " + line)
