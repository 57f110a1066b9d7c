"""Sizes of the workloads (full and ``--smoke``) and the context passed to each workload."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bench.report import Section, Target


@dataclass(frozen=True)
class Sizes:
    repeat: int = 3
    concurrency: int = 10
    w1_count: int = 2000          # one-by-one enqueues per repetition
    w1_bulk: int = 50_000         # tasks per bulk call
    w2_tasks: int = 10_000        # backlog drained per repetition
    w2_timeout: float = 300.0     # per drain, seconds
    w3_tasks: int = 200
    w3_gap_ms: float = 20.0
    w4_rate: float = 100.0        # requests per second, fixed (well below saturation)
    w4_idle_seconds: float = 10.0
    w4_tasks: int = 5000
    w4_max_seconds: float = 180.0  # bound of the draining phase
    w5_rows: int = 1_000_000      # total rows: finished + ready
    w5_ready: int = 100_000       # of which READY
    w5_base_ready: int = 10_000   # the near-empty table: READY rows only
    w5_k: int = 200               # claims timed per repetition
    pgbench_seconds: int = 10
    quiet_min_wait: float = 1.0


SMOKE = Sizes(repeat=1, w1_count=50, w1_bulk=500, w2_tasks=200, w2_timeout=60, w3_tasks=20,
              w4_rate=50, w4_idle_seconds=1.0, w4_tasks=200, w4_max_seconds=30,
              w5_rows=5000, w5_ready=500, w5_base_ready=300, w5_k=20, pgbench_seconds=2,
              quiet_min_wait=0.3)


def sizes_for(smoke: bool, **overrides: Any) -> Sizes:
    base = SMOKE if smoke else Sizes()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Ctx:
    sizes: Sizes
    systems: list[Any]
    admin_url: str
    postmaster: int | None
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def log(self, msg: str) -> None:
        print(f"[bench {time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def fail(self, system: str, workload: str, exc: BaseException) -> str:
        text = f"{workload} / {system}: {type(exc).__name__}: {str(exc).strip()[:400]}"
        self.failures.append(text)
        self.log("FAILED " + text)
        return "failed (see notes)"
