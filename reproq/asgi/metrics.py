"""Prometheus metrics: ``GET /reproq/metrics`` (text format, prometheus-client).

Two kinds of numbers, so that a scrape is right however many processes serve the app:

* **Cluster-wide gauges, derived from the database at scrape time** (any process gives the
  same answer): queue depth by state, running runs, workers, the beat leader, paused queues,
  schedules, estimated runs by status. They cost a handful of index scans (`reproq.stats`).
* **Per-process counters and histograms**, fed by this process's runtime: finished attempts by
  queue/task/outcome, queue wait (eligible -> started) and run duration. Each series carries a
  ``worker`` label (the runtime's worker id), so series of different processes never mix;
  ``sum by (queue, outcome) (rate(reproq_tasks_total[5m]))`` gives the cluster rate.
  Scrape each process, or set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
  mode: an empty directory shared by the processes of one host, created before they start) and
  every process then answers with the counters of all processes on that host.
* Process-local gauges (``reproq_pool_connections``, ``reproq_sse_clients``,
  ``reproq_runtime_up``, ``reproq_runtime_crashes_total``) describe the process that answered.

Label values are bounded: a process keeps its own series for the first
``METRICS_MAX_LABEL_VALUES`` (REPROQ_RUNTIME, default 500) distinct queue names and, separately,
task paths it records; later ones share the ``(other)`` series (no queue or task can be called
that). Hand-written rows can carry any task path or queue name, and prometheus-client keeps a
series until the process ends, so without the cap they would grow without limit. The database
gauges keep the configured queues and the busiest others, and add the rest up under ``(other)``.

See docs/metrics.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest

from ..access import staff_or_token
from ..runtime import observers

if TYPE_CHECKING:
    from ..runtime.observers import Source
    from ..runtime.outcome import Completion

logger = logging.getLogger("reproq.metrics")

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
OUTCOMES = {"SUCCESSFUL": "succeeded", "FAILED": "failed", "READY": "retried",
            "WAITING": "retried", "CANCELLED": "cancelled", "EXPIRED": "expired"}

# The per-process instruments live in their own registry (never the global one): in
# multiprocess mode their values go to PROMETHEUS_MULTIPROC_DIR and are read back from there.
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
TASKS = Counter("reproq_tasks", "Finished attempts, by queue, task and outcome (succeeded, "
                "failed, retried, cancelled, expired), counted by the process that ran them",
                ["queue", "task", "outcome", "worker"], registry=PROCESS_REGISTRY)
QUEUE_WAIT = Histogram("reproq_queue_wait_seconds", "Seconds from a run becoming eligible "
                       "(run_after) to the start of its attempt", ["queue", "worker"],
                       buckets=WAIT_BUCKETS, registry=PROCESS_REGISTRY)
RUN_DURATION = Histogram("reproq_run_duration_seconds", "Seconds one attempt ran",
                         ["queue", "task", "worker"], buckets=RUN_BUCKETS,
                         registry=PROCESS_REGISTRY)


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


# --------------------------------------------------------------------------- runtime hooks


# The label value that stands for every queue name or task path beyond the cap. Parentheses
# are neither in a queue name (conf.QUEUE_NAME_RE) nor in a dotted import path.
OTHER = "(other)"


class LabelCap:
    """The first `limit` distinct values of one label keep their own series; later ones are
    `OTHER`. A value once admitted keeps its series (prometheus-client never drops one)."""

    __slots__ = ("admitted",)

    def __init__(self) -> None:
        self.admitted: set[str] = set()

    def __call__(self, value: str, limit: int) -> str:
        if value in self.admitted:
            return value
        if len(self.admitted) < limit:
            self.admitted.add(value)
            return value
        return OTHER


QUEUE_LABELS = LabelCap()
TASK_LABELS = LabelCap()

_CHILDREN: dict[tuple[Any, ...], Any] = {}
_CHILDREN_MAX = 4096


def _child(metric: Any, limit: int, queue: str, task: str | None, *rest: str) -> Any:
    """``metric.labels(queue, [task,] *rest)`` with queue and task capped (`LabelCap`),
    remembered: the runtime records every run, and prometheus-client's lookup (validation, a
    lock) costs more than the increment itself."""
    key = (id(metric), queue, task, rest)
    child = _CHILDREN.get(key)
    if child is None:
        if len(_CHILDREN) >= _CHILDREN_MAX:
            _CHILDREN.clear()
        labels = [QUEUE_LABELS(queue, limit)]
        if task is not None:
            labels.append(TASK_LABELS(task, limit))
        child = _CHILDREN[key] = metric.labels(*labels, *rest)
    return child


def record_claimed(runtime: Source, rows: list[dict[str, Any]]) -> None:
    """Every claim's rows (through `reproq.runtime.observers`): queue wait of started attempts."""
    worker = runtime.worker_id
    limit = runtime.settings.metrics_max_label_values
    for row in rows:
        status = row.get("status")
        if status == "RUNNING":
            wait = row.get("queue_wait")  # computed by the claim (reproq.sql._CLAIM_RETURNING)
            if wait is not None:
                _child(QUEUE_WAIT, limit, row["queue_name"], None, worker).observe(wait)
        elif status == "EXPIRED":
            _child(TASKS, limit, row["queue_name"], row["task_path"], "expired", worker).inc()


def record_completion(runtime: Source, completion: Completion) -> None:
    """Every finished attempt (through `reproq.runtime.observers`)."""
    outcome = OUTCOMES.get(completion.status) or completion.status.lower()
    worker = runtime.worker_id
    limit = runtime.settings.metrics_max_label_values
    _child(TASKS, limit, completion.queue_name, completion.task_path, outcome, worker).inc()
    if outcome != "expired":
        _child(RUN_DURATION, limit, completion.queue_name, completion.task_path,
               worker).observe(max(completion.duration, 0.0))


class RuntimeMetrics:
    """The run observer feeding the per-process instruments (`reproq.runtime.observers`)."""

    def claimed(self, source: Source, rows: list[dict[str, Any]]) -> None:
        record_claimed(source, rows)

    def finished(self, source: Source, completion: Completion) -> None:
        record_completion(source, completion)

    def __repr__(self) -> str:
        return "reproq.asgi.metrics.OBSERVER"


OBSERVER = RuntimeMetrics()


def install() -> Callable[[], None]:
    """Feed this process's runtime into the per-process instruments (idempotent; returns the
    removal). Called where a process gets its runtime: `reproq.asgi.lifespan` (every ASGI
    trigger) and ``manage.py reproq worker``."""
    return observers.register(OBSERVER)


def capped_queues(queues: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The rows of `stats.queue_table` for the queue gauges: at most `limit` queues of their
    own — the configured ones first, then the busiest — and one `OTHER` row adding up the rest
    (paused when all of them are)."""
    if len(queues) <= limit:
        return queues
    from ..dashboard.conf import configured_queues

    configured = set(configured_queues())

    def rank(q: dict[str, Any]) -> tuple[bool, int, str]:
        return (q["name"] not in configured,
                -(q["ready"] + q["waiting"] + q["running"]), q["name"])

    ordered = sorted(queues, key=rank)
    kept, rest = ordered[:limit], ordered[limit:]
    other = {"name": OTHER, "paused": all(q["paused"] for q in rest)}
    for field in ("ready", "waiting", "blocked", "running"):
        other[field] = sum(q[field] for q in rest)
    return [*kept, other]


# --------------------------------------------------------------------------- collectors


class DatabaseCollector:
    """Cluster-wide gauges read from PostgreSQL at scrape time (Django's connection)."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from .. import stats
        from ..dashboard.conf import backend_database

        began = time.perf_counter()
        ok = GaugeMetricFamily("reproq_database_up", "1 when the scrape could read reproq's "
                               "tables, else 0")
        try:
            with stats.reading(backend_database()) as cursor:
                table = stats.TableStats(cursor)
                active = stats.active_counts(cursor, table=table)
                totals = stats.status_totals(cursor, active, table)
                controls = stats.queue_controls(cursor)
                workers = stats.workers(cursor)
                cursor.execute("SELECT count(*), count(*) FILTER (WHERE enabled) "
                               "FROM reproq_periodic_tasks")
                schedules, enabled = cursor.fetchone()
                last_event = stats.last_event_id(cursor)
        except Exception as exc:
            logger.warning("reproq: metrics could not read the database (%s)",
                           type(exc).__name__)
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        from ..conf import current_runtime_settings

        limit = current_runtime_settings().metrics_max_label_values
        queues = {q["name"]: q for q in capped_queues(stats.queue_table(active, controls, {}),
                                                      limit)}

        depth = GaugeMetricFamily("reproq_queue_depth", "Runs waiting in a queue by state: "
                                  "READY (due), WAITING (deferred or retrying; BLOCKED is the "
                                  "part parked on a full concurrency slot)",
                                  labels=["queue", "state"])
        running = GaugeMetricFamily("reproq_running", "Runs RUNNING now, by queue",
                                    labels=["queue"])
        paused = GaugeMetricFamily("reproq_queue_paused", "1 when the queue is paused",
                                   labels=["queue"])
        for name, q in queues.items():
            depth.add_metric([name, "READY"], q["ready"])
            depth.add_metric([name, "WAITING"], q["waiting"])
            depth.add_metric([name, "BLOCKED"], q["blocked"])
            running.add_metric([name], q["running"])
            paused.add_metric([name], 1 if q["paused"] else 0)
        yield depth
        yield running
        yield paused

        runs = GaugeMetricFamily("reproq_runs", "Runs by status: exact for active states, "
                                 "from PostgreSQL's statistics (estimated=\"true\") for "
                                 "finished ones on large tables", labels=["status", "estimated"])
        for status, value in totals["by_status"].items():
            runs.add_metric([status, "true" if value["estimated"] else "false"], value["count"])
        yield runs

        yield GaugeMetricFamily("reproq_workers", "Live worker rows (runtimes heartbeating)",
                                value=len(workers))
        alive = GaugeMetricFamily("reproq_worker_last_seen_seconds",
                                  "Seconds since each worker's last heartbeat",
                                  labels=["worker", "hostname", "server"])
        for w in workers:
            alive.add_metric([w["id"], w["hostname"], w["server"] or ""], w["seen_ago"])
        yield alive
        leader = GaugeMetricFamily("reproq_leader", "1 for the worker holding beat leadership",
                                   labels=["worker"])
        leaders = [w for w in workers if w["is_leader"]]
        for w in leaders:
            leader.add_metric([w["id"]], 1)
        yield leader
        yield GaugeMetricFamily("reproq_leader_present", "1 when some worker is beat leader",
                                value=1 if leaders else 0)
        sched = GaugeMetricFamily("reproq_schedules", "Periodic schedules", labels=["enabled"])
        sched.add_metric(["true"], int(enabled))
        sched.add_metric(["false"], int(schedules) - int(enabled))
        yield sched
        yield GaugeMetricFamily("reproq_events_last_id", "Id of the newest dashboard event",
                                value=last_event)
        yield GaugeMetricFamily("reproq_scrape_database_seconds",
                                "Time the database part of this scrape took",
                                value=time.perf_counter() - began)


class ProcessCollector:
    """Gauges of the process that answers: pools, SSE clients, runtime state and crashes."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from .. import db
        from ..runtime import host
        from .sse import hubs as open_hubs

        rt = host.current()
        worker = rt.worker_id if rt is not None else f"pid-{os.getpid()}"
        up = GaugeMetricFamily("reproq_runtime_up", "1 when a reproq runtime runs in the "
                               "process that answered", labels=["worker"])
        up.add_metric([worker], 1 if rt is not None and rt.state == "running" else 0)
        yield up
        crashes = CounterMetricFamily("reproq_runtime_crashes", "Crashes of runtime services "
                                      "(each was restarted)", labels=["worker", "service"])
        if rt is not None:
            for service, n in sorted(rt.crashes.items()):
                crashes.add_metric([worker, service], n)
        yield crashes
        pools = GaugeMetricFamily("reproq_pool_connections", "psycopg pool connections of the "
                                  "process that answered, by pool and state",
                                  labels=["worker", "pool", "state"])
        seen: set[int] = set()
        for by_alias in list(db._pools.values()):
            for pool in list(by_alias.values()):
                if id(pool) in seen or pool.closed:
                    continue
                seen.add(id(pool))
                st = pool.get_stats()
                pools.add_metric([worker, pool.name, "size"], st.get("pool_size", 0))
                pools.add_metric([worker, pool.name, "available"], st.get("pool_available", 0))
                pools.add_metric([worker, pool.name, "waiting"], st.get("requests_waiting", 0))
                pools.add_metric([worker, pool.name, "max"], pool.max_size)
        yield pools
        hubs = open_hubs()
        yield GaugeMetricFamily("reproq_sse_clients", "Open event streams in the process that "
                                "answered", value=sum(len(h.subscribers) for h in hubs))
        buffered = [n for h in hubs for n in h.buffered()]
        yield GaugeMetricFamily("reproq_sse_buffered_bytes", "Bytes queued for event stream "
                                "clients in the process that answered", value=sum(buffered))
        yield GaugeMetricFamily("reproq_sse_buffered_bytes_max", "Bytes queued for the "
                                "slowest event stream client in the process that answered",
                                value=max(buffered, default=0))
        dropped = CounterMetricFamily("reproq_sse_dropped_events", "Events dropped for slow "
                                      "clients (closed streams) in the process that answered",
                                      labels=["worker"])
        dropped.add_metric([worker], sum(h.dropped_total for h in hubs))
        yield dropped


def build_registry() -> CollectorRegistry:
    """What one scrape exposes: per-process instruments (this process's, or every process's
    in multiprocess mode), the process gauges and the database gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(PROCESS_REGISTRY))
    registry.register(ProcessCollector())
    registry.register(DatabaseCollector())
    return registry


class _Forward:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def render(accept: str = "") -> bytes:
    """One scrape in the format the Accept header asks for (Prometheus text by default)."""
    return render_negotiated(accept)[0]


def render_negotiated(accept: str = "") -> tuple[bytes, str]:
    if not accept:
        return generate_latest(build_registry()), CONTENT_TYPE_LATEST
    encoder, content_type = choose_encoder(accept)
    return encoder(build_registry()), content_type


@staff_or_token()
async def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /reproq/metrics: Prometheus text (or OpenMetrics when asked for), docs/metrics.md."""
    from asgiref.sync import sync_to_async

    body, content_type = await sync_to_async(render_negotiated)(
        request.headers.get("Accept", ""))
    return HttpResponse(body, content_type=content_type, headers={"Cache-Control": "no-store"})
