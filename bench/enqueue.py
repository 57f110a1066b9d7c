"""Enqueue benchmark: sync ``enqueue``, native async ``aenqueue``, ``aenqueue`` through Django's
default ``sync_to_async`` path, and ``bulk_enqueue``.

    ./dev bench enqueue [--count 2000] [--bulk 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from asgiref.sync import sync_to_async


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds else float("inf")


def sync_one_by_one(task, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        task.enqueue(i)
    return _rate(n, time.perf_counter() - t0)


def async_native(task, n: int) -> float:
    from reproq import db

    async def main() -> float:
        await task.aenqueue(-1)  # open the pool outside the timing
        t0 = time.perf_counter()
        for i in range(n):
            await task.aenqueue(i)
        rate = _rate(n, time.perf_counter() - t0)
        await db.close_pools()
        return rate

    return asyncio.run(main())


def async_via_sync_to_async(task, n: int) -> float:
    backend = task.get_backend()

    async def main() -> float:
        enqueue = sync_to_async(backend.enqueue, thread_sensitive=True)
        t0 = time.perf_counter()
        for i in range(n):
            await enqueue(task, (i,), {})
        return _rate(n, time.perf_counter() - t0)

    return asyncio.run(main())


def bulk(task, n: int) -> float:
    backend = task.get_backend()
    calls = [(task, (i,), {}) for i in range(n)]
    t0 = time.perf_counter()
    backend.bulk_enqueue(calls)
    return _rate(n, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench enqueue")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from bench.runtime import reset, setup

    setup()
    from bench.tasks import noop

    rows = []
    for label, fn, n in (("enqueue (sync, one by one)", sync_one_by_one, args.count),
                         ("aenqueue (native psycopg async)", async_native, args.count),
                         ("aenqueue via sync_to_async (Django default)", async_via_sync_to_async,
                          args.count),
                         (f"bulk_enqueue ({args.bulk:,} per call)", bulk, args.bulk)):
        rates = []
        for _ in range(args.repeat):
            reset()
            rates.append(fn(noop, n))
        rows.append((label, rates))
    reset()
    print("\n### reproq enqueue rate (tasks/s)\n")
    print("| path | median | min | max |")
    print("|---|---|---|---|")
    for label, rates in rows:
        print(f"| {label} | {statistics.median(rates):,.0f} | {min(rates):,.0f} | "
              f"{max(rates):,.0f} |")


if __name__ == "__main__":
    main()
