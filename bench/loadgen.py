"""Fixed-rate HTTP load on loopback: ``python -m bench.loadgen --url URL --rate R --seconds S``.

Open loop: request i is sent at start + i/R whatever the earlier ones do (asyncio tasks, httpx
keep-alive connections), so a slow server shows up as latency rather than as a lower rate. It
stops after ``rate x seconds`` requests, after ``seconds`` (+15 s for the last answers), or on
SIGTERM (at once, without waiting for answers), then writes ``[[send_epoch, latency_ms, ok],
...]`` as JSON to ``--out``; a request that failed or got no answer counts with the time it
was waited for and ``ok`` false. Only 127.0.0.1 / localhost URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from urllib.parse import urlsplit


async def main(url: str, rate: float, seconds: float, out: str) -> None:
    import httpx

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    results: list[tuple[float, float, bool]] = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
        for _ in range(5):  # open a few connections before the measured requests
            try:
                await client.get(url)
            except httpx.HTTPError as exc:
                print(f"loadgen warm-up: {exc!r}", file=sys.stderr)

        inflight: dict[asyncio.Task, tuple[float, float]] = {}

        async def one() -> None:
            wall, t0 = time.time(), time.perf_counter()
            inflight[asyncio.current_task()] = (wall, t0)  # type: ignore[index]
            ok = False
            try:
                ok = (await client.get(url)).status_code == 200
            except httpx.HTTPError:
                pass
            finally:
                inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            results.append((wall, (time.perf_counter() - t0) * 1000, ok))

        def dump() -> None:
            # requests still waiting count as failed, with the time waited so far
            now = time.perf_counter()
            waiting = [(w, (now - t0) * 1000, False) for w, t0 in inflight.values()]
            with open(out, "w") as f:
                json.dump(results + waiting, f)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop.is_set():
                break
            tasks.append(asyncio.create_task(one()))
        if not stop.is_set() and tasks:  # the normal end: give the last ones 15 s
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([asyncio.gather(*tasks, return_exceptions=True), stopper],
                               timeout=15, return_when=asyncio.FIRST_COMPLETED)
        dump()  # at once after SIGTERM: the caller is waiting for the file
    os._exit(0)  # leave without waiting for sockets or cancelled requests


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("bench.loadgen only targets loopback addresses")
    asyncio.run(main(args.url, args.rate, args.seconds, args.out))


if __name__ == "__main__":
    cli()
