"""Every reproq setting in one place: defaults, Django settings, environment variables, validation.

Precedence (lowest first): built-in defaults < ``settings.TASKS[alias]["OPTIONS"]`` /
``settings.REPROQ_RUNTIME`` < ``REPROQ_*`` environment variables < command-line flags (passed as
``overrides``). `explain_runtime()` reports where each value came from. Validation returns
readable problems (what is wrong and what to write instead); system checks and runtime startup
both use it, so a bad value stops `manage.py check`, `migrate` and every server's startup.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

from django.conf import settings

YIELD_MAX_WAIT_LIMIT = 1.0  # seconds: the longest YIELD_MAX_WAIT_SECONDS accepted
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
BACKEND_PATH = "reproq.backend.ReproqBackend"


@dataclass(frozen=True)
class Problem:
    """One invalid setting: what is wrong and what to write instead."""

    setting: str
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message} ({self.hint})"


# --------------------------------------------------------------------------- backend OPTIONS


@dataclass(frozen=True)
class BackendOptions:
    """Validated ``TASKS[alias]["OPTIONS"]`` of a reproq backend."""

    database: str = "default"
    dedup_active: bool = True
    timeout_seconds: int = 900
    max_attempts: int = 3
    expires_in: timedelta | None = None
    code_ref: str = ""
    pip_lock_hash: str = ""
    retry_base_seconds: float = 30.0
    retry_max_seconds: float = 3600.0
    retry_jitter: float = 0.1
    prepared_statements: bool = True


_OPTION_KEYS = {
    "DATABASE": "database",
    "DEDUP_ACTIVE": "dedup_active",
    "TIMEOUT_SECONDS": "timeout_seconds",
    "MAX_ATTEMPTS": "max_attempts",
    "EXPIRES_IN": "expires_in",
    "CODE_REF": "code_ref",
    "PIP_LOCK_HASH": "pip_lock_hash",
    "RETRY_BASE_SECONDS": "retry_base_seconds",
    "RETRY_MAX_SECONDS": "retry_max_seconds",
    "RETRY_JITTER": "retry_jitter",
    "PREPARED_STATEMENTS": "prepared_statements",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_backend_options(alias: str, raw: Any) -> tuple[BackendOptions, list[Problem]]:
    """Validate OPTIONS; return the options (defaults where invalid) and the problems found."""
    where = f'TASKS["{alias}"]["OPTIONS"]'
    problems: list[Problem] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return BackendOptions(), [Problem(where, f"must be a dict, got {type(raw).__name__}",
                                          'write "OPTIONS": {"MAX_ATTEMPTS": 3, ...}')]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _OPTION_KEYS.get(key)
        if name is None:
            problems.append(Problem(f"{where}[{key!r}]", "is not a reproq option",
                                    "use one of " + ", ".join(sorted(_OPTION_KEYS))))
            continue
        values[name] = value
    opts = BackendOptions()
    checks: list[tuple[str, bool, str]] = [
        ("database", isinstance(values.get("database", "default"), str),
         'a DATABASES alias such as "default"'),
        ("dedup_active", isinstance(values.get("dedup_active", True), bool), "True or False"),
        ("timeout_seconds", _positive_int(values.get("timeout_seconds", 900)),
         "a whole number of seconds > 0, e.g. 900"),
        ("max_attempts", _positive_int(values.get("max_attempts", 3)),
         "a whole number >= 1, e.g. 3"),
        ("expires_in", values.get("expires_in") is None
         or (isinstance(values["expires_in"], timedelta) and values["expires_in"] > timedelta(0)),
         "None or a positive datetime.timedelta, e.g. timedelta(hours=1)"),
        ("code_ref", isinstance(values.get("code_ref", ""), str), 'a string such as a git sha'),
        ("pip_lock_hash", isinstance(values.get("pip_lock_hash", ""), str), "a string"),
        ("retry_base_seconds", _is_number(values.get("retry_base_seconds", 30))
         and values.get("retry_base_seconds", 30) >= 0, "a number of seconds >= 0, e.g. 30"),
        ("retry_max_seconds", _is_number(values.get("retry_max_seconds", 3600))
         and values.get("retry_max_seconds", 3600) > 0, "a number of seconds > 0, e.g. 3600"),
        ("retry_jitter", _is_number(values.get("retry_jitter", 0.1))
         and 0 <= values.get("retry_jitter", 0.1) <= 1, "a fraction between 0 and 1, e.g. 0.1"),
        ("prepared_statements", isinstance(values.get("prepared_statements", True), bool),
         "True or False"),
    ]
    good: dict[str, Any] = {}
    reverse = {v: k for k, v in _OPTION_KEYS.items()}
    for name, ok, hint in checks:
        if name not in values:
            continue
        if ok:
            good[name] = values[name]
        else:
            problems.append(Problem(f"{where}[{reverse[name]!r}]",
                                    f"{values[name]!r} is not valid", f"write {hint}"))
    if "database" in good and good["database"] not in settings.DATABASES:
        problems.append(Problem(f"{where}['DATABASE']", f"{good['database']!r} is not in DATABASES",
                                "name an alias of settings.DATABASES"))
        good.pop("database")
    if not problems or good:
        opts = BackendOptions(**good)
    return opts, problems


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_queues(alias: str, queues: Any) -> list[Problem]:
    where = f'TASKS["{alias}"]["QUEUES"]'
    if not isinstance(queues, list | tuple | set):
        return [Problem(where, f"must be a list, got {type(queues).__name__}",
                        'write "QUEUES": ["default", "emails"]')]
    bad = [q for q in queues if not isinstance(q, str) or not QUEUE_NAME_RE.match(q)]
    if bad:
        return [Problem(where, f"invalid queue names {bad!r}",
                        "use 1-64 characters from letters, digits, _ . : -")]
    return []


# --------------------------------------------------------------------------- REPROQ_RUNTIME


@dataclass(frozen=True)
class RuntimeSettings:
    """Validated runtime settings of one process (``settings.REPROQ_RUNTIME`` + env + flags)."""

    autostart: bool = True
    backend: str = "default"
    queues: tuple[str, ...] = ()  # empty: every queue of the backend (or "default")
    concurrency: int = 10
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    reclaim_seconds: float = 15.0
    poll_fallback_seconds: float = 30.0
    poll_interval_seconds: float = 1.0  # poll-only mode (LISTEN off): how often to look
    priority_aging_factor: float = 0.0
    shutdown_grace_seconds: float = 20.0
    process_queues: tuple[str, ...] = ()  # queues whose sync tasks run in child processes
    process_workers: int = 2
    listen: bool = True  # False: poll-only mode (PgBouncer transaction pooling)
    # "direct": reproq may keep session state (LISTEN, prepared statements, session advisory
    # locks); "pgbouncer": none of it (a transaction pooler in front of PostgreSQL)
    connection_mode: str = "direct"
    pool_max_size: int = 8
    worker_id: str = ""
    lazy_start: bool = True
    not_started_warning_seconds: float = 30.0
    events_retention_seconds: float = 600.0
    finished_retention_seconds: float = 14 * 86400.0  # 0: keep finished runs forever
    beat: bool = True  # compete for beat leadership (cron schedules) in this process
    # how leadership is held: "advisory" (session advisory lock on a dedicated connection) or
    # "lease" (a row with an expiry in reproq_leaders: works through a transaction pooler)
    leader: str = "advisory"
    beat_interval_seconds: float = 2.0
    leader_timeout_seconds: float = 15.0
    misfire_grace_seconds: float = 60.0
    sync_recurring_on_migrate: bool = True
    yield_to_requests: bool = True  # requests first: hold back new work while requests run
    yield_max_wait_seconds: float = 0.05  # ... for at most this long per wait (<= 1)
    yield_claim_batch: int = 4  # while requests arrive: at most this many runs per claim
    gc_freeze: bool = True  # collect once at start, then gc.freeze() the startup heap
    crash_loop_restarts: int = 5  # this many restarts of one service ...
    crash_loop_seconds: float = 60.0  # ... within this window: /healthz says degraded (503)
    # /reproq/metrics: distinct queue and task label values kept per process (each label on
    # its own); later values share the series of the "(other)" bucket
    metrics_max_label_values: int = 500
    sources: dict[str, str] = field(default_factory=dict, compare=False)


_RUNTIME_KINDS: dict[str, str] = {
    "autostart": "bool",
    "backend": "str",
    "queues": "queues",
    "concurrency": "posint",
    "lease_seconds": "posnum",
    "heartbeat_seconds": "posnum",
    "reclaim_seconds": "posnum",
    "poll_fallback_seconds": "posnum",
    "poll_interval_seconds": "posnum",
    "priority_aging_factor": "nonnegnum",
    "shutdown_grace_seconds": "nonnegnum",
    "process_queues": "queues",
    "process_workers": "posint",
    "listen": "bool",
    "connection_mode": "mode",
    "pool_max_size": "posint",
    "worker_id": "str",
    "lazy_start": "bool",
    "not_started_warning_seconds": "nonnegnum",
    "events_retention_seconds": "posnum",
    "finished_retention_seconds": "nonnegnum",
    "beat": "bool",
    "leader": "leader",
    "beat_interval_seconds": "posnum",
    "leader_timeout_seconds": "posnum",
    "misfire_grace_seconds": "posnum",
    "sync_recurring_on_migrate": "bool",
    "yield_to_requests": "bool",
    "yield_max_wait_seconds": "posnum",
    "yield_claim_batch": "posint",
    "gc_freeze": "bool",
    "crash_loop_restarts": "posint",
    "crash_loop_seconds": "posnum",
    "metrics_max_label_values": "posint",
}

_HINTS = {
    "bool": "True or False (env: 1/0, true/false, yes/no)",
    "str": "a string",
    "queues": 'a list of queue names, e.g. ["default", "emails"] (env: comma-separated)',
    "posint": "a whole number >= 1",
    "posnum": "a number > 0",
    "nonnegnum": "a number >= 0",
    "mode": '"direct" (reproq talks to PostgreSQL itself) or "pgbouncer" (through a '
            'transaction pooler)',
    "leader": '"advisory" (a session advisory lock) or "lease" (a row lease, for PgBouncer)',
}
CONNECTION_MODES = ("direct", "pgbouncer")
LEADER_KINDS = ("advisory", "lease")


def _coerce_env(kind: str, text: str) -> Any:
    text = text.strip()
    if kind == "bool":
        low = text.lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        return text
    if kind == "queues":
        return [q.strip() for q in text.split(",") if q.strip()]
    if kind == "posint":
        try:
            return int(text)
        except ValueError:
            return text
    if kind in {"posnum", "nonnegnum"}:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def _valid(kind: str, value: Any) -> bool:
    match kind:
        case "bool":
            return isinstance(value, bool)
        case "str":
            return isinstance(value, str)
        case "queues":
            return isinstance(value, list | tuple) and all(
                isinstance(q, str) and QUEUE_NAME_RE.match(q) for q in value)
        case "posint":
            return _positive_int(value)
        case "posnum":
            return _is_number(value) and value > 0
        case "nonnegnum":
            return _is_number(value) and value >= 0
        case "mode":
            return value in CONNECTION_MODES
        case "leader":
            return value in LEADER_KINDS
    return False


def load_runtime_settings(
    overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> tuple[RuntimeSettings, list[Problem]]:
    """Merge defaults < settings.REPROQ_RUNTIME < REPROQ_* env < overrides, and validate."""
    environ = os.environ if environ is None else environ
    raw = getattr(settings, "REPROQ_RUNTIME", {}) or {}
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        problems.append(Problem("REPROQ_RUNTIME", f"must be a dict, got {type(raw).__name__}",
                                'write REPROQ_RUNTIME = {"CONCURRENCY": 10}'))
        raw = {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {f.name: "default" for f in fields(RuntimeSettings)}
    sources.pop("sources")
    for key, value in raw.items():
        name = str(key).lower()
        if name not in _RUNTIME_KINDS:
            problems.append(Problem(f"REPROQ_RUNTIME[{key!r}]", "is not a runtime setting",
                                    "use one of " + ", ".join(k.upper() for k in _RUNTIME_KINDS)))
            continue
        values[name] = value
        sources[name] = "settings.REPROQ_RUNTIME"
    for name, kind in _RUNTIME_KINDS.items():
        env_name = f"REPROQ_{name.upper()}"
        if env_name in environ:
            values[name] = _coerce_env(kind, environ[env_name])
            sources[name] = f"env {env_name}"
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        values[name] = value
        sources[name] = "command line"
    good: dict[str, Any] = {}
    for name, value in values.items():
        kind = _RUNTIME_KINDS[name]
        if _valid(kind, value):
            good[name] = tuple(value) if kind == "queues" else value
        else:
            problems.append(Problem(f"REPROQ_RUNTIME[{name.upper()!r}] (from {sources[name]})",
                                    f"{value!r} is not valid", f"write {_HINTS[kind]}"))
    if good.get("connection_mode") == "pgbouncer":
        # One switch: no LISTEN behind a transaction pooler (it never delivers notifications).
        if good.get("listen") is True and sources["listen"] != "default":
            problems.append(Problem(
                f"REPROQ_RUNTIME['LISTEN'] (from {sources['listen']})",
                "True contradicts CONNECTION_MODE 'pgbouncer' (a transaction pooler does not "
                "deliver notifications)", "leave LISTEN unset, or use CONNECTION_MODE 'direct'"))
        mode_source = f"CONNECTION_MODE 'pgbouncer' (from {sources['connection_mode']})"
        if good.get("listen") is not False:  # unset: the mode decides (an explicit False stays)
            good["listen"], sources["listen"] = False, mode_source
        # ... and leadership by a row lease: a session advisory lock needs a session
        if good.get("leader") == "advisory" and sources["leader"] != "default":
            problems.append(Problem(
                f"REPROQ_RUNTIME['LEADER'] (from {sources['leader']})",
                "'advisory' contradicts CONNECTION_MODE 'pgbouncer' (a session advisory lock "
                "outlives the transaction a pooler lends)",
                "leave LEADER unset (it is 'lease' then), or use CONNECTION_MODE 'direct'"))
        if good.get("leader") != "lease":
            good["leader"], sources["leader"] = "lease", mode_source
    rs = RuntimeSettings(**good, sources=sources)
    if rs.heartbeat_seconds >= rs.lease_seconds:
        problems.append(Problem("REPROQ_RUNTIME['HEARTBEAT_SECONDS']",
                                f"{rs.heartbeat_seconds} must be below LEASE_SECONDS "
                                f"({rs.lease_seconds})",
                                "renew leases several times per lease, e.g. 10 and 60"))
    if rs.beat_interval_seconds * 2 > rs.leader_timeout_seconds:
        problems.append(Problem("REPROQ_RUNTIME['BEAT_INTERVAL_SECONDS']",
                                f"{rs.beat_interval_seconds} must be at most half of "
                                f"LEADER_TIMEOUT_SECONDS ({rs.leader_timeout_seconds})",
                                "check leadership several times per timeout, e.g. 2 and 15"))
    elif rs.misfire_grace_seconds < 2 * (rs.leader_timeout_seconds + rs.beat_interval_seconds):
        problems.append(Problem("REPROQ_RUNTIME['MISFIRE_GRACE_SECONDS']",
                                f"{rs.misfire_grace_seconds} is shorter than a worst-case leader "
                                "failover (2 x (LEADER_TIMEOUT_SECONDS + BEAT_INTERVAL_SECONDS) = "
                                f"{2 * (rs.leader_timeout_seconds + rs.beat_interval_seconds):g})",
                                "raise it (default 60) so ticks missed in a failover are caught "
                                "up one by one"))
    if rs.yield_max_wait_seconds > YIELD_MAX_WAIT_LIMIT:
        problems.append(Problem("REPROQ_RUNTIME['YIELD_MAX_WAIT_SECONDS']",
                                f"{rs.yield_max_wait_seconds} is above {YIELD_MAX_WAIT_LIMIT:g}s",
                                "tasks could wait that long behind every request: write a "
                                "number of seconds in (0, 1], e.g. 0.05, or set "
                                "YIELD_TO_REQUESTS to False"))
    tasks = getattr(settings, "TASKS", {})
    if rs.backend not in tasks:
        problems.append(Problem("REPROQ_RUNTIME['BACKEND']", f"{rs.backend!r} is not in TASKS",
                                "name the TASKS alias of a reproq backend"))
    elif tasks[rs.backend].get("BACKEND") != BACKEND_PATH:
        problems.append(Problem("REPROQ_RUNTIME['BACKEND']",
                                f"TASKS[{rs.backend!r}] is not a reproq backend",
                                f'set "BACKEND": "{BACKEND_PATH}"'))
    return rs, problems


def explain_runtime(rs: RuntimeSettings) -> list[tuple[str, Any, str]]:
    """(SETTING, value, source) rows for `manage.py reproq config --explain`."""
    return [
        (f.name.upper(), getattr(rs, f.name), rs.sources.get(f.name, "default"))
        for f in fields(RuntimeSettings)
        if f.name != "sources"
    ]


def aging_factor_us(factor_seconds: float) -> int:
    """Microseconds of waiting that one priority point is worth; 0 means strict priority."""
    if factor_seconds <= 0:
        return 10**16  # ~317 years per point: priority always wins, FIFO within a priority
    return int(factor_seconds * 1_000_000)


_cached_runtime: RuntimeSettings | None = None


def current_runtime_settings() -> RuntimeSettings:
    """This process's runtime settings, validated once (reset when settings change in tests)."""
    global _cached_runtime
    if _cached_runtime is None:
        _cached_runtime, _ = load_runtime_settings()
    return _cached_runtime


def reset_cache(**kwargs: Any) -> None:
    global _cached_runtime
    _cached_runtime = None
