"""Peers of reproq, benchmarked in the same run: their own virtualenv and small driver scripts.

The peers may pin dependencies that clash with reproq's, so they get a virtualenv of their own,
created with the same Python under ``~/.cache/reproq-bench/peers-venv`` (outside the repo;
``REPROQ_BENCH_PEERS_VENV`` overrides it) and filled from PyPI with `PEER_REQUIREMENTS`. Each
peer has one driver module here (``<peer>_peer.py``) that runs as a subprocess of that
virtualenv's python; the orchestrator imports the same module only for its constants (SQL that
reads the peer's own timestamps), so driver modules import their library inside functions.
Only the standard library is imported at module level in this package.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]

PEER_REQUIREMENTS = [
    "procrastinate>=3.5,<4",
    "django-tasks-db>=0.13,<1",
    "pgqueuer>=1.0,<2",
    "asyncpg>=0.30,<1",
    "psycopg[binary,pool]>=3.2.10,<4",
    "Django>=6.0,<7",
    "uvicorn>=0.34,<1",
]
DISTRIBUTIONS = ["procrastinate", "django-tasks-db", "pgqueuer", "asyncpg", "psycopg", "Django",
                 "uvicorn"]

# name -> driver module (in this package)
PEER_MODULES = {
    "procrastinate": "bench.peers.procrastinate_peer",
    "pgqueuer": "bench.peers.pgqueuer_peer",
    "django-tasks-db": "bench.peers.dtdb_peer",
}
DEFAULT_PEERS = ["django-tasks-db", "procrastinate", "pgqueuer"]


class PeerError(RuntimeError):
    pass


def venv_dir() -> Path:
    if os.environ.get("REPROQ_BENCH_PEERS_VENV"):
        return Path(os.environ["REPROQ_BENCH_PEERS_VENV"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reproq-bench" / "peers-venv"


def ensure_venv(log: Any = print) -> str:
    """Create or update the peers' virtualenv; return its python. Bounded: 15 minutes."""
    root = venv_dir()
    python = root / "bin" / "python"
    if not python.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        log(f"creating the peers' virtualenv at {root}")
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    stamp = root / ".reproq-bench-requirements"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if not stamp.exists() or stamp.read_text() != wanted:
        log("installing the peers from PyPI: " + ", ".join(PEER_REQUIREMENTS))
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *PEER_REQUIREMENTS], check=True, timeout=900)
        stamp.write_text(wanted)
    return str(python)


def versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m\n"
            f"out = {{}}\nfor d in {DISTRIBUTIONS!r}:\n"
            "    try: out[d] = m.version(d)\n"
            "    except Exception: out[d] = '-'\n"
            "print(json.dumps(out))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}


class Peer:
    """The orchestrator's handle on one peer: its driver module, database and subprocesses."""

    def __init__(self, name: str, python: str, admin_url: str):
        self.name = name
        self.mod: ModuleType = importlib.import_module(PEER_MODULES[name])
        self.python = python
        from bench.common import url_for_db

        self.db: str = self.mod.DB
        self.url = url_for_db(admin_url, self.db)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PYTHONPATH"] = str(REPO)
        env["BENCH_DB_URL"] = self.url
        env.update(getattr(self.mod, "ENV", {}))
        return env

    def argv(self, command: str, *args: str) -> list[str]:
        return [self.python, "-m", self.mod.__name__, command, *args]

    def call(self, command: str, *args: str, timeout: float = 600) -> dict[str, Any]:
        """Run one driver command to completion; return its JSON result."""
        t0 = time.monotonic()
        for attempt in range(6):  # a server shared with test suites may be out of slots
            try:
                res = subprocess.run(self.argv(command, *args), env=self.env, cwd=REPO,
                                     capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise PeerError(f"{self.name} {command}: timed out after {timeout:.0f}s") from exc
            if res.returncode == 0 or "too many clients" not in res.stderr or attempt == 5:
                break
            time.sleep(5)
        if res.returncode != 0:
            tail = "\n".join(res.stderr.strip().splitlines()[-8:])
            raise PeerError(f"{self.name} {command} exited {res.returncode}: {tail}")
        lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
        if not lines:
            raise PeerError(f"{self.name} {command} printed no result: {res.stdout[-500:]}")
        out = json.loads(lines[-1])
        out.setdefault("_elapsed", time.monotonic() - t0)
        return out

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a long-running driver process; its output goes to a log file (a pipe nobody
        reads would fill up and block it)."""
        log_dir = Path(tempfile.gettempdir()) / "reproq-bench-logs"
        log_dir.mkdir(exist_ok=True)
        log = open(log_dir / f"{self.db}-{time.time_ns()}.log", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=log, stderr=log,
                                    **kwargs)
        finally:
            log.close()
        proc.log_path = log.name  # type: ignore[attr-defined]
        return proc

    def start_workers(self, concurrency: int, processes: int) -> list[subprocess.Popen]:
        procs: list[subprocess.Popen] = []
        for _ in range(processes):
            for argv in self.mod.worker_argv(self.python, concurrency):
                procs.append(self.spawn(argv))
        return procs

    def concurrency_note(self, concurrency: int, processes: int) -> str:
        return self.mod.concurrency_note(concurrency, processes)
