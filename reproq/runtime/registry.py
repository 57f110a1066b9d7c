"""This process's identity as a worker: id, host, pid, queues, concurrency, server, start time."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import __version__


def detect_server() -> str:
    """Best guess of the ASGI server hosting this process (for the worker row and dashboard)."""
    for module, name in (("granian", "granian"), ("hypercorn", "hypercorn"),
                         ("daphne.server", "daphne"), ("gunicorn", "gunicorn"),
                         ("uvicorn", "uvicorn")):
        if module in sys.modules:
            return name
    return "worker"


def make_worker_id(configured: str = "") -> str:
    if configured:
        return configured[:64]
    host = socket.gethostname().split(".")[0][:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class WorkerIdentity:
    worker_id: str
    queues: tuple[str, ...]
    concurrency: int
    server: str
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def row(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname[:255], "pid": self.pid,
            "queues": json.dumps(list(self.queues)), "concurrency": self.concurrency,
            "server": self.server[:64], "version": __version__, "started_at": self.started_at,
        }
