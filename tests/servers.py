"""Harness for tests that run the reproq runtime inside real ASGI servers (subprocesses).

Every server listens on 127.0.0.1 only, on a free port, and connects to the test database of the
running test (``REPROQ_TEST_DB_NAME``). Each child runs in its own session (process group), its
stdout/stderr go to a log file whose tail is printed when something fails, and `Servers.close()`
stops every child it started: SIGTERM to the main process, then SIGKILL to the group after a
bound. Every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from django.db import connection

from reproq.models import TaskRun, Worker
from tests import pgbouncer

REPO_ROOT = Path(__file__).resolve().parent.parent
FINAL = frozenset({"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"})
APP = "tests.asgi:application"


def _uvicorn(port: int) -> list[str]:
    return ["uvicorn", APP, "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"]


def _hypercorn(port: int) -> list[str]:
    return ["hypercorn", APP, "--bind", f"127.0.0.1:{port}"]


def _gunicorn(port: int) -> list[str]:
    return ["gunicorn", APP, "-k", "uvicorn_worker.UvicornWorker", "-w", "2",
            "-b", f"127.0.0.1:{port}"]


def _granian(port: int) -> list[str]:
    return ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), APP]


def _daphne(port: int) -> list[str]:
    return ["daphne", "-b", "127.0.0.1", "-p", str(port), APP]


COMMANDS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn": _uvicorn,
    "hypercorn": _hypercorn,
    "gunicorn": _gunicorn,
    "granian": _granian,
    "daphne": _daphne,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until[T](check: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 0.05, describe: Callable[[], str] | None = None) -> T:
    """Call `check` until it returns something truthy (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 100):
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    extra = f"\n{describe()}" if describe else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")


def descendants(pid: int) -> set[int]:
    """Pids of every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listener_backends(worker_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """LISTEN connections of reproq runtimes on the test database (pg_stat_activity)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT pid, application_name, query, state FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE %s",
            ["reproq-listen-%"])
        rows = [dict(zip(("pid", "application_name", "query", "state"), r, strict=True))
                for r in cur.fetchall()]
    if worker_ids is not None:
        names = {f"reproq-listen-{w}"[:63] for w in worker_ids}
        rows = [r for r in rows if r["application_name"] in names]
    return rows


def listening(row: dict[str, Any]) -> bool:
    """True once the backend ran its LISTEN (pg_stat_activity.query is its last statement)."""
    return row["state"] == "idle" and row["query"].strip().upper().startswith("LISTEN")


def run_row(run_id: str | int) -> TaskRun:
    return TaskRun.objects.get(pk=int(run_id))


def wait_for_status(run_id: str | int, states: Iterable[str] = FINAL, *, timeout: float = 20.0,
                    logs: Callable[[], str] | None = None) -> TaskRun:
    """Poll a run's raw status until it is one of `states`; return the row."""
    wanted = set(states)
    last: list[TaskRun] = []

    def check() -> TaskRun | None:
        row = run_row(run_id)
        last[:] = [row]
        return row if row.status in wanted else None

    def describe() -> str:
        row = last[0] if last else None
        state = (f"run {run_id}: status={row.status} attempts={row.attempts} "
                 f"reason={row.status_reason!r} errors={row.errors!r}" if row else "")
        return state + ("\n" + logs() if logs else "")

    return wait_until(check, timeout=timeout, what=f"run {run_id} to reach {sorted(wanted)}",
                      describe=describe)


def child_env(token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child: the test database, autostart on, a bearer token, overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPROQ_")}
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update({
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "REPROQ_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "REPROQ_AUTOSTART": "1",
        "REPROQ_NOT_STARTED_WARNING_SECONDS": "30",  # the default (tests.settings: 0)
        "REPROQ_API_TOKEN": token,
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    if pgbouncer.enabled() and os.environ.get(pgbouncer.URL_ENV):
        # Through the session's PgBouncer (tests.settings: CONNECTION_MODE "pgbouncer").
        env[pgbouncer.SWITCH_ENV] = "1"
        env["DATABASE_URL"] = os.environ[pgbouncer.URL_ENV]
    return env


def expect_listeners() -> bool:
    """Whether runtimes hold a LISTEN connection (not through PgBouncer: poll-only there)."""
    return not pgbouncer.enabled()


@dataclass
class Child:
    """One subprocess started by the harness (a server or a worker command)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str
    port: int = 0
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"----- last {lines} lines of {self.name} log ({self.log_path}) -----\n{tail}"

    def pids(self) -> set[int]:
        return {self.pid} | descendants(self.pid)

    def worker_rows(self) -> list[Worker]:
        return list(Worker.objects.filter(pid__in=self.pids()).order_by("pid"))

    def worker_ids(self) -> set[str]:
        return {w.id for w in self.worker_rows()}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP request on a fresh connection (no keep-alive: servers shut down promptly);
        `trust_env=False` so no proxy is ever used for loopback."""
        headers = {"Authorization": f"Bearer {self.token}", "Connection": "close",
                   **kwargs.pop("headers", {})}
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            return client.request(method, self.url(path), headers=headers, **kwargs)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        response = self.request("GET", "/reproq/healthz")
        try:
            body = response.json()
        except ValueError:
            body = {"text": response.text[:500]}
        return response.status_code, body

    def enqueue_http(self, task_name: str, *args: Any, **kwargs: Any) -> str:
        response = self.request("POST", f"/enqueue/{task_name}/",
                                content=json.dumps({"args": args, "kwargs": kwargs}),
                                headers={"Content-Type": "application/json"})
        assert response.status_code == 200, (response.status_code, response.text[:500],
                                              self.log_tail())
        return str(response.json()["id"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"{self.name} exited early with code {self.proc.returncode}\n"
                                 f"{self.log_tail()}")

    def wait_ready(self, *, workers: int = 1, timeout: float = 30.0,
                   settle: float = 0.5) -> list[Worker]:
        """Healthz 200 with the runtime running, `workers` worker rows in this process tree and
        each of them LISTENing (unless poll-only behind PgBouncer); then `settle` seconds so
        the start-up catch-up claim is over."""
        last: dict[str, Any] = {}

        def ready() -> list[Worker] | None:
            self.check_alive()
            try:
                code, body = self.healthz()
            except httpx.HTTPError as exc:
                last["healthz"] = repr(exc)
                return None
            last["healthz"] = (code, body)
            if code != 200 or body.get("runtime", {}).get("state") != "running":
                return None
            rows = self.worker_rows()
            last["workers"] = [(w.id, w.pid, w.server) for w in rows]
            if len(rows) < workers:
                return None
            if expect_listeners():
                listeners = listener_backends(w.id for w in rows)
                last["listeners"] = listeners
                if len([b for b in listeners if listening(b)]) < len(rows):
                    return None
            return rows

        rows = wait_until(ready, timeout=timeout, interval=0.1, what=f"{self.name} to be ready",
                          describe=lambda: f"last observations: {last!r}\n{self.log_tail()}")
        time.sleep(settle)
        return rows

    def signal(self, signum: int) -> None:
        """Signal the main process (only while it is ours: not yet reaped)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) did not exit within {timeout:g}s"
                                 f"\n{self.log_tail()}") from None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the main process, SIGKILL the whole group after `timeout` (and any leftover
        process of the group in every case)."""
        if self.stopped:
            return
        self.stopped = True
        family = descendants(self.pid) if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:g}s: SIGKILL")
                # The leader is not reaped yet, so its process group is still ours.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        # Leftovers (e.g. server workers orphaned by a killed leader) still in our group.
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == self.pid:
                    os.kill(pid, signal.SIGKILL)


class Servers:
    """Starts servers and commands for one test; `close()` stops them all (use as fixture)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.token = secrets.token_urlsafe(16)

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None,
               port: int = 0) -> Child:
        log_path = self.log_dir / f"{name}-{len(self.children)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv], cwd=REPO_ROOT, env=child_env(self.token, env),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        child = Child(name=name, proc=proc, log_path=log_path, token=self.token, port=port)
        self.children.append(child)
        return child

    def start(self, server: str, *, env: dict[str, str] | None = None,
              extra_args: Sequence[str] = (), workers: int = 1,
              ready_timeout: float = 30.0) -> Child:
        """Start `server` on a free loopback port and wait until its runtime(s) listen."""
        port = free_port()
        child = self._spawn(server, [*COMMANDS[server](port), *extra_args], env, port=port)
        child.wait_ready(workers=workers, timeout=ready_timeout)
        return child

    def command(self, name: str, argv: Sequence[str],
                env: dict[str, str] | None = None) -> Child:
        """Start `python -m <argv>` (e.g. the worker command) without waiting."""
        return self._spawn(name, argv, env)

    def logs(self) -> str:
        return "\n".join(child.log_tail() for child in self.children)

    def close(self) -> None:
        for child in self.children:
            child.stop()


def run_command(argv: Sequence[str], *, env: dict[str, str] | None = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m <argv>` to completion (bounded) with the child environment."""
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT,
                          env=child_env(secrets.token_urlsafe(8), env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)
