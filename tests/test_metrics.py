"""GET /reproq/metrics: Prometheus text, parsed with prometheus_client.parser.

Database-derived gauges equal the database; the runtime's per-process counters and histograms
count what it ran; with PROMETHEUS_MULTIPROC_DIR every process of a gunicorn server answers
with the counters of all of them, and those equal the database per worker.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from reproq.models import PeriodicTask, QueueControl, TaskRun, Worker
from tests.dashboard_helpers import make_run
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.servers import Servers, wait_for_status
from tests.testapp import tasks


@pytest.fixture(autouse=True)
def runtime_metrics():
    """What a process does where it gets its runtime (reproq.asgi.lifespan, the worker command):
    its runs feed the per-process instruments."""
    from reproq.asgi import metrics

    uninstall = metrics.install()
    yield
    uninstall()

TOKEN = "metrics-token-0123456789"
ADD = "tests.testapp.tasks.add"
BOOM = "tests.testapp.tasks.boom"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), math.nan)


def total(parsed, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in parsed.items() if n == name and want <= set(lab))


@pytest.mark.django_db
def test_metrics_text_parses_and_database_gauges_match_the_database(settings):
    settings.REPROQ_API_TOKEN = TOKEN
    for _ in range(3):
        make_run("READY", "default")
    for _ in range(2):
        make_run("READY", "emails", "tests.testapp.tasks.send_email")
    make_run("WAITING", "default", blocked=True)
    make_run("WAITING", "reports")
    make_run("RUNNING", "reports")
    make_run("RUNNING", "reports")
    make_run("FAILED", "default", BOOM)
    now = timezone.now()
    Worker.objects.create(id="w-lead", hostname="h", pid=1, queues=["default"], concurrency=4,
                          started_at=now, last_seen_at=now - timedelta(seconds=2),
                          leader_since=now)
    Worker.objects.create(id="w-other", hostname="h", pid=2, queues=["default"], concurrency=4,
                          started_at=now, last_seen_at=now)
    QueueControl.objects.create(queue_name="emails", paused=True)
    PeriodicTask.objects.create(name="every-minute", cron_expr="* * * * *", task_path=ADD,
                                args=[1, 2])
    PeriodicTask.objects.create(name="off", cron_expr="* * * * *", task_path=ADD, args=[1, 2],
                                enabled=False)

    resp = Client().get("/reproq/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200
    assert resp["Content-Type"].startswith("text/plain; version=")
    m = samples(resp.content.decode())

    def db(**filters) -> int:
        return TaskRun.objects.filter(**filters).count()

    for queue in ("default", "emails", "reports", "other"):
        assert value(m, "reproq_queue_depth", queue=queue, state="READY") == db(
            queue_name=queue, status="READY")
        assert value(m, "reproq_queue_depth", queue=queue, state="WAITING") == db(
            queue_name=queue, status="WAITING")
        assert value(m, "reproq_queue_depth", queue=queue, state="BLOCKED") == db(
            queue_name=queue, status="WAITING", blocked=True)
        assert value(m, "reproq_running", queue=queue) == db(queue_name=queue, status="RUNNING")
        assert value(m, "reproq_queue_paused", queue=queue) == int(queue == "emails")
    for status in ("READY", "WAITING", "RUNNING", "FAILED", "SUCCESSFUL"):
        assert value(m, "reproq_runs", status=status, estimated="false") == db(status=status)
    assert value(m, "reproq_workers") == Worker.objects.count() == 2
    assert value(m, "reproq_leader", worker="w-lead") == 1
    assert value(m, "reproq_leader_present") == 1
    assert 1.5 < value(m, "reproq_worker_last_seen_seconds", worker="w-lead", hostname="h",
                       server="") < 60
    assert value(m, "reproq_schedules", enabled="true") == 1
    assert value(m, "reproq_schedules", enabled="false") == 1
    assert value(m, "reproq_database_up") == 1
    assert value(m, "reproq_sse_clients") == 0
    assert total(m, "reproq_runtime_up") == 0  # no runtime in the test process


@pytest.mark.django_db(transaction=True)
def test_runtime_counts_outcomes_queue_wait_and_durations():
    from reproq.asgi.metrics import render

    async def body(rt):
        before = samples((await sync_to_async(render)()).decode())
        ids = [(await tasks.add.aenqueue(i, i)).id for i in range(3)]
        ids.append((await tasks.boom.aenqueue("metrics")).id)  # 3 attempts: 2 retries, 1 failure
        for rid in ids:
            await wait_for(rid)
        after = samples((await sync_to_async(render)()).decode())
        return rt.worker_id, before, after

    worker, before, after = run_with_runtime(body)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("reproq_tasks_total", task=ADD, outcome="succeeded", worker=worker) == 3
    assert delta("reproq_tasks_total", task=BOOM, outcome="retried", worker=worker) == 2
    assert delta("reproq_tasks_total", task=BOOM, outcome="failed", worker=worker) == 1
    assert delta("reproq_run_duration_seconds_count", task=ADD, worker=worker) == 3
    assert delta("reproq_run_duration_seconds_count", task=BOOM, worker=worker) == 3
    assert delta("reproq_queue_wait_seconds_count", queue="default", worker=worker) == 6
    # Waits are real (eligible -> started), under the test's bound.
    assert 0 <= delta("reproq_queue_wait_seconds_sum", queue="default", worker=worker) < 20
    assert value(after, "reproq_runtime_up", worker=worker) == 1
    assert value(after, "reproq_pool_connections", worker=worker,
                 pool=f"reproq-{worker}"[:63], state="max") > 0


def label_values(parsed, name: str, label: str, **labels: str) -> set[str]:
    want = set(labels.items())
    return {dict(lab)[label] for (n, lab), _ in parsed.items()
            if n == name and want <= set(lab) and label in dict(lab)}


@pytest.mark.django_db(transaction=True)
def test_task_paths_and_queue_names_beyond_the_cap_share_the_other_series(settings):
    """Hand-written rows can carry any task path and queue name: the series stay bounded."""
    from reproq.asgi.metrics import OTHER, render

    cap, paths, queues = 5, 40, 30
    settings.REPROQ_RUNTIME = {**settings.REPROQ_RUNTIME, "METRICS_MAX_LABEL_VALUES": cap}
    runs = [make_run("READY", "default", f"hand.written.task_{i}", max_attempts=1)
            for i in range(paths)]
    for i in range(queues):  # READY in queues no runtime serves: they stay
        make_run("READY", f"hand-queue-{i}", f"hand.written.other_{i}")

    async def body(rt):
        assert rt.settings.metrics_max_label_values == cap
        before = samples((await sync_to_async(render)()).decode())
        for run in runs:
            await wait_for(str(run.pk))
        after = samples((await sync_to_async(render)()).decode())
        return rt.worker_id, before, after

    worker, before, after = run_with_runtime(body)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # every failure counted, in at most `cap` task series of their own plus "(other)"
    assert delta("reproq_tasks_total", outcome="failed", worker=worker) == paths
    tasks_seen = label_values(after, "reproq_tasks_total", "task", worker=worker)
    assert OTHER in tasks_seen
    assert len(tasks_seen) <= cap + 1, tasks_seen
    assert len(label_values(after, "reproq_run_duration_seconds_count", "task",
                            worker=worker)) <= cap + 1
    assert delta("reproq_tasks_total", task=OTHER, worker=worker) >= paths - cap
    # the database gauges: the configured queues and the busiest others, the rest added up
    depth_queues = label_values(after, "reproq_queue_depth", "queue")
    assert len(depth_queues) == cap + 1 and OTHER in depth_queues, depth_queues
    assert total(after, "reproq_queue_depth", state="READY") == TaskRun.objects.filter(
        status="READY").count() == queues
    assert len(label_values(after, "reproq_running", "queue")) == cap + 1
    assert value(after, "reproq_queue_paused", queue=OTHER) == 0


def test_metrics_label_cap_is_a_runtime_setting_with_env_override_and_validation():
    from reproq.conf import explain_runtime, load_runtime_settings

    rs, problems = load_runtime_settings(environ={})
    assert rs.metrics_max_label_values == 500 and not problems
    rs, problems = load_runtime_settings(environ={"REPROQ_METRICS_MAX_LABEL_VALUES": "50"})
    assert rs.metrics_max_label_values == 50 and not problems
    assert ("METRICS_MAX_LABEL_VALUES", 50, "env REPROQ_METRICS_MAX_LABEL_VALUES") in (
        explain_runtime(rs))
    for bad in ("0", "many", "-3"):
        _, problems = load_runtime_settings(environ={"REPROQ_METRICS_MAX_LABEL_VALUES": bad})
        assert any("METRICS_MAX_LABEL_VALUES" in p.setting for p in problems), bad


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_every_process_answers_with_all_processes_counters_in_multiprocess_mode(tmp_path):
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    servers = Servers(tmp_path)
    try:
        srv = servers.start("gunicorn", workers=2, env={
            "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "REPROQ_CONCURRENCY": "2"})
        # Distinct arguments: identical active runs would be deduplicated into one.
        ids = [tasks.sleepy.enqueue(0.2 + i / 1000).id for i in range(16)]
        for rid in ids:
            wait_for_status(rid, timeout=30, logs=servers.logs)
        runs = list(TaskRun.objects.filter(pk__in=[int(i) for i in ids]))
        assert {r.status for r in runs} == {"SUCCESSFUL"}
        by_worker: dict[str, int] = {}
        for r in runs:
            by_worker[r.worker_ids[-1]] = by_worker.get(r.worker_ids[-1], 0) + 1
        assert len(by_worker) == 2, by_worker  # both processes ran some (2 slots each)
        answered = set()
        for _ in range(6):  # fresh connections: both processes answer, sooner or later
            m = samples(srv.request("GET", "/reproq/metrics").text)
            answered.update(lab[1] for (n, labels), v in m.items()
                            if n == "reproq_runtime_up" and v == 1 for lab in labels
                            if lab[0] == "worker")
            assert total(m, "reproq_tasks_total", task="tests.testapp.tasks.sleepy",
                         outcome="succeeded") == 16
            for worker, count in by_worker.items():
                assert total(m, "reproq_tasks_total", task="tests.testapp.tasks.sleepy",
                             outcome="succeeded", worker=worker) == count
            assert value(m, "reproq_workers") == 2
        assert answered <= srv.worker_ids()
        assert len({r.pid for r in srv.worker_rows()}) == 2
        assert {p.name.split("_")[0] for p in prom_dir.iterdir()} >= {"counter", "histogram"}
    finally:
        servers.close()
        print(servers.logs())
