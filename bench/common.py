"""Shared helpers of the benchmark harness: databases, statistics, CPU accounting, processes.

Only the standard library and psycopg are imported at module level: the peers' driver scripts
(run in their own virtualenv) use `bench.peers._driver`, not this module, but the orchestrator
imports this before Django is configured.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------- databases

def admin_url() -> str:
    """The server's URL (DATABASE_URL, or reproq's embedded PostgreSQL when it is unset)."""
    from reproq.devdb import database_url

    return database_url()


def url_for_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def ensure_database(url: str, name: str, *, fresh: bool = False) -> str:
    """Create database ``name`` on the server of ``url`` (dropped first if ``fresh``)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return url_for_db(url, name)


def server_info(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        info = {"version": conn.execute("SHOW server_version").fetchone()[0]}
        for setting in ("synchronous_commit", "fsync", "shared_buffers", "max_connections",
                        "wal_level", "data_directory"):
            try:
                info[setting] = str(conn.execute(f"SHOW {setting}").fetchone()[0])
            except psycopg.Error:
                info[setting] = "?"
        info["backend_pid"] = str(conn.info.backend_pid)
    return info


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server's pid when it runs on this host (parent of our backend)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        pid = conn.info.backend_pid
    stat = _read_stat(pid)
    return int(stat[1]) if stat else None


# --------------------------------------------------------------------------- statistics

def pct(values: Sequence[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


@dataclass
class Stat:
    """Median, min and max of one figure over the repetitions."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        vals = [v for v in self.values if v == v]
        return statistics.median(vals) if vals else float("nan")

    @property
    def min(self) -> float:
        vals = [v for v in self.values if v == v]
        return min(vals) if vals else float("nan")

    @property
    def max(self) -> float:
        vals = [v for v in self.values if v == v]
        return max(vals) if vals else float("nan")


def stats_of(rows: Iterable[dict[str, float]], key: str) -> Stat:
    return Stat([float(r[key]) for r in rows if key in r])


# --------------------------------------------------------------------------- CPU accounting

def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state, 1 = ppid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """user+system CPU seconds of a process (plus its reaped children with ``children``)."""
    fields = _read_stat(pid)
    if not fields:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def process_start_ticks(pid: int) -> int | None:
    fields = _read_stat(pid)
    return int(fields[19]) if fields else None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


SHARED_PG_PROCESSES = ("walwriter", "wal writer", "checkpointer", "background writer")


class PgProcesses:
    """The PostgreSQL processes that work for one database, found under the postmaster.

    Backends show ``postgres: [cluster:] user dbname host(port) state`` as their title; the
    WAL writer, checkpointer and background writer are shared by all databases and counted
    too (commits are what they work for). Backends listed in ``exclude`` (the harness's own
    polling connection) are left out.
    """

    def __init__(self, postmaster: int | None, dbname: str, exclude: Iterable[int] = ()):
        self.postmaster = postmaster
        self.dbname = dbname
        self.exclude = set(exclude)
        self._titles: dict[int, bool] = {}

    def pids(self) -> list[int]:
        if not self.postmaster:
            return []
        out = []
        for pid in _children(self.postmaster):
            if pid in self.exclude:
                continue
            keep = self._titles.get(pid)
            if keep is None:
                title = _cmdline(pid)
                words = title.replace(":", " ").split()
                keep = self.dbname in words or any(s in title for s in SHARED_PG_PROCESSES)
                if keep or title.startswith("postgres:"):  # else: not yet past its startup
                    self._titles[pid] = keep
            if keep:
                out.append(pid)
        return out


class CpuSampler:
    """Samples the summed CPU seconds of a changing set of processes in a background thread.

    ``pids`` is called at every sample; a process seen once keeps counting with its last
    value after it exits (so the sum never drops). A process started after the sampler
    counts from zero, one already running from its first sample. `between(t0, t1)` gives the
    CPU seconds spent between two wall-clock times (linear interpolation between samples).
    """

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.05):
        self._pids = pids
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._base: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")
        self._boot_ticks = _uptime_ticks()

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now = time.time()
        for pid in list(self._pids()):
            fields = _read_stat(pid)
            if not fields:
                continue
            key = (pid, int(fields[19]))
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            if key not in self._base:
                started_after = int(fields[19]) >= self._boot_ticks
                self._base[key] = 0.0 if started_after else cpu
            self._last[key] = cpu
        total = sum(self._last[k] - self._base[k] for k in self._last)
        self.samples.append((now, total))

    def at(self, t: float) -> float:
        s = self.samples
        if not s:
            return float("nan")
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return s[-1][1]

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)


def _uptime_ticks() -> int:
    """Now, in the clock of /proc/<pid>/stat's starttime (ticks since boot)."""
    try:
        with open("/proc/uptime") as f:
            return int(float(f.read().split()[0]) * CLK_TCK)
    except OSError:
        return 0


def wait_quiescent(pids: Sequence[int], *, min_wait: float = 1.0, window: float = 0.5,
                   threshold: float = 0.03, timeout: float = 60.0) -> bool:
    """Wait until processes have started and gone idle: less than ``threshold`` CPU seconds
    (summed) over ``window`` seconds, after at least ``min_wait``. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    time.sleep(min_wait)
    prev = sum(cpu_seconds(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(window)
        cur = sum(cpu_seconds(p) for p in pids)
        if cur == cur and cur - prev < threshold * max(1, len(pids) / 4):
            return True
        prev = cur
    return False


# --------------------------------------------------------------------------- processes

def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL: every process the harness starts ends here."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    except ProcessLookupError:
        pass


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 20.0) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def poll_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)
