"""Runtime benchmark: enqueue→start latency of an idle runtime, and drain rate of one process.

    ./dev bench runtime [--tasks 5000] [--latency-tasks 200] [--concurrency 10]

The runtime runs as ``manage.py reproq worker`` in a separate process, as in production.
Latency is ``started_at - enqueued_at`` (both taken from PostgreSQL's clock). Drain rate is
tasks / (last finished_at - first started_at) over a backlog enqueued before the worker starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any


def setup(fresh: bool = False) -> None:
    """Create the benchmark database (dropped first with ``fresh``), migrate, set up Django."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    from reproq.devdb import database_url

    url = database_url()
    import psycopg

    name = os.environ.get("REPROQ_BENCH_DB", "reproq_bench")
    with psycopg.connect(url, autocommit=True) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def reset() -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("TRUNCATE reproq_task_runs, reproq_workers")


def start_worker(concurrency: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings", **(extra_env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "django", "reproq", "worker", "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_worker_ready(timeout: float = 30) -> None:
    from reproq.models import Worker

    deadline = time.monotonic() + timeout
    while not Worker.objects.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("worker did not register")
        time.sleep(0.05)
    time.sleep(0.3)


def stop(proc: subprocess.Popen) -> float:
    """SIGTERM and wait; return the worker's CPU seconds (user+sys) from /proc before exit."""
    cpu = cpu_seconds(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return cpu


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except OSError:
        return float("nan")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def wait_done(n: int, timeout: float) -> None:
    from reproq.models import TaskRun

    deadline = time.monotonic() + timeout
    while TaskRun.objects.filter(status="SUCCESSFUL").count() < n:
        if time.monotonic() > deadline:
            raise RuntimeError("tasks did not finish in time")
        time.sleep(0.1)


def latency(n: int, gap: float, task: Any) -> dict[str, float]:
    from django.db.models import F

    from reproq.models import TaskRun

    reset()
    proc = start_worker(10)
    try:
        wait_worker_ready()
        for i in range(n):
            task.enqueue(i)
            time.sleep(gap)
        wait_done(n, 60)
    finally:
        stop(proc)
    ms = [(d.total_seconds() * 1000) for d in TaskRun.objects.annotate(
        lat=F("started_at") - F("enqueued_at")).values_list("lat", flat=True)]
    return {"p50": pct(ms, .5), "p95": pct(ms, .95), "p99": pct(ms, .99), "max": max(ms)}


def drain(n: int, concurrency: int, task: Any) -> dict[str, float]:
    from django.db.models import Max, Min

    from reproq.models import TaskRun

    reset()
    backend = task.get_backend()
    backend.bulk_enqueue([(task, (i,), {}) for i in range(n)])
    proc = start_worker(concurrency)
    try:
        wait_done(n, 300)
    finally:
        cpu = stop(proc)
    span = TaskRun.objects.aggregate(a=Min("started_at"), b=Max("finished_at"))
    seconds = (span["b"] - span["a"]).total_seconds()
    return {"jobs_per_s": n / seconds, "seconds": seconds,
            "worker_cpu_s_per_1000": cpu / n * 1000}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench runtime")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    setup()
    from bench.tasks import anoop, noop

    rows = []
    for label, task in (("sync no-op", noop), ("async no-op", anoop)):
        lat = [latency(args.latency_tasks, args.gap_ms / 1000, task) for _ in range(args.repeat)]
        dr = [drain(args.tasks, args.concurrency, task) for _ in range(args.repeat)]
        rows.append((label, lat, dr))
    print(f"\n### reproq runtime, one worker process, concurrency {args.concurrency}\n")
    print("| task | latency p50 ms | p95 ms | p99 ms | drain jobs/s (median, min-max) | "
          "worker CPU s / 1000 jobs |")
    print("|---|---|---|---|---|---|")
    for label, lat, dr in rows:
        med = statistics.median
        jobs = [d["jobs_per_s"] for d in dr]
        print(f"| {label} | {med(x['p50'] for x in lat):.2f} | {med(x['p95'] for x in lat):.2f} "
              f"| {med(x['p99'] for x in lat):.2f} | {med(jobs):.0f} ({min(jobs):.0f}-"
              f"{max(jobs):.0f}) | {med(d['worker_cpu_s_per_1000'] for d in dr):.3f} |")


if __name__ == "__main__":
    main()
