"""The dashboard, stats, metrics and the admin changelist on 1,000,000 task runs.

One module fixture inserts a history with a single INSERT ... SELECT over generate_series:
~786,000 finished runs spread over ~3.5 days (3 % FAILED, 1 % CANCELLED, 1 % EXPIRED), a
backlog of 200,000 READY runs (50,000 per queue: past the exact-count cap, so estimated),
3,000 WAITING (200 blocked), 50 RUNNING; plus 30,000 events in the last 5 minutes (past the
throughput cap). It ANALYZEs, and removes it all at the end. Each page is requested a few
times; the median time, the SQL time and the number of queries are asserted against bounds and
written to test-artifacts/dashboard-timings.json (and printed).
"""

from __future__ import annotations

import json
import re
import statistics
import time

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.dashboard_helpers import staff_user
from tests.servers import REPO_ROOT

N = 1_000_000
READY, WAITING, RUNNING = 200_000, 3_000, 50
EVENTS = 30_000
TOKEN = "scale-token-0123456789"
REPEAT = 5
ANALYZE_SAMPLE = 30_000  # rows ANALYZE reads at default_statistics_target 100

FILL = """
INSERT INTO reproq_task_runs (
    backend_alias, task_path, queue_name, priority, status, sort_key, args, kwargs, spec_hash,
    enqueued_at, run_after, started_at, last_attempted_at, finished_at, attempts, max_attempts,
    timeout_seconds, lease_owner, leased_until, worker_ids, errors, return_value, metadata,
    blocked, cancel_requested, status_reason, code_ref, pip_lock_hash)
SELECT 'default', 'bench.tasks.task_' || (g %% 20),
       (ARRAY['default', 'emails', 'reports', 'other'])[1 + g %% 4], 0, s.status,
       (extract(epoch FROM t.at) * 1000000)::bigint, '[1, 2]'::jsonb, '{}'::jsonb, NULL,
       t.at, t.at,
       CASE WHEN s.status IN ('READY', 'WAITING') THEN NULL ELSE t.at END,
       CASE WHEN s.status IN ('READY', 'WAITING') THEN NULL ELSE t.at END,
       CASE WHEN s.status IN ('READY', 'WAITING', 'RUNNING') THEN NULL
            ELSE t.at + interval '1 second' END,
       CASE WHEN s.status IN ('READY', 'WAITING') THEN 0 ELSE 1 END, 3, 900,
       CASE WHEN s.status = 'RUNNING' THEN 'bench-worker' END,
       CASE WHEN s.status = 'RUNNING' THEN now() + interval '1 hour' END,
       '[]'::jsonb,
       CASE WHEN s.status = 'FAILED' THEN jsonb_build_array(jsonb_build_object(
                'exception_class_path', 'builtins.ValueError', 'attempt', 1,
                'traceback', 'Traceback (most recent call last):\n  File "x.py", line 1\n'
                             || 'ValueError: bad input ' || g))
            ELSE '[]'::jsonb END,
       CASE WHEN s.status = 'SUCCESSFUL' THEN to_jsonb(g) END, '{}'::jsonb,
       s.status = 'WAITING' AND g %% 15 = 0, false,
       CASE WHEN s.status = 'FAILED' THEN 'ValueError on attempt 1 of 3' ELSE '' END, '', ''
FROM generate_series(1, %(n)s) AS g
CROSS JOIN LATERAL (SELECT CASE
        WHEN g > %(n)s - %(ready)s THEN 'READY'
        WHEN g > %(n)s - %(ready)s - %(waiting)s THEN 'WAITING'
        WHEN g > %(n)s - %(ready)s - %(waiting)s - %(running)s THEN 'RUNNING'
        WHEN g %% 100 < 3 THEN 'FAILED'
        WHEN g %% 100 = 3 THEN 'CANCELLED'
        WHEN g %% 100 = 4 THEN 'EXPIRED'
        ELSE 'SUCCESSFUL' END AS status) s
CROSS JOIN LATERAL (SELECT CASE WHEN s.status = 'WAITING' THEN now() + interval '1 hour'
                                ELSE now() - (%(n)s - g) * interval '0.3 second' END AS at) t
"""

EVENTS_FILL = """
INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
SELECT now() - (%(n)s - g) * (interval '295 seconds' / %(n)s), 'succeeded', g,
       'bench.tasks.task_' || (g %% 20),
       (ARRAY['default', 'emails', 'reports', 'other'])[1 + g %% 4], 'bench-worker',
       jsonb_build_object('count', 2, 'run_ids', jsonb_build_array(g))
FROM generate_series(1, %(n)s) AS g
"""

RESULTS: dict[str, dict[str, float]] = {}
EXACT: dict[str, int] = {}


@pytest.fixture(scope="module")
def million(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        began = time.perf_counter()
        with connection.cursor() as cur:
            cur.execute("SET synchronous_commit = off")
            cur.execute(FILL, {"n": N, "ready": READY, "waiting": WAITING, "running": RUNNING})
            cur.execute(EVENTS_FILL, {"n": EVENTS})
            cur.execute("ANALYZE reproq_task_runs")
            cur.execute("ANALYZE reproq_events")
            cur.execute("SELECT status, count(*) FROM reproq_task_runs GROUP BY status")
            EXACT.update({status: int(n) for status, n in cur.fetchall()})
            cur.execute("SET synchronous_commit = on")
        RESULTS["fill"] = {"seconds": round(time.perf_counter() - began, 2), "rows": N}
        try:
            yield N
        finally:
            with connection.cursor() as cur:
                cur.execute("TRUNCATE reproq_task_runs, reproq_concurrency, reproq_events")
            out = REPO_ROOT / "test-artifacts"
            out.mkdir(exist_ok=True)
            (out / "dashboard-timings.json").write_text(json.dumps(RESULTS, indent=2))
            print("\n1,000,000-row timings (median of "
                  f"{REPEAT}, ms / queries):\n{json.dumps(RESULTS, indent=2)}")


def measure(client: Client, name: str, url: str, *, max_queries: int, max_ms: float,
            max_sql_ms: float = 150, **headers: str) -> str:
    """GET `url` REPEAT times (after one warm-up); assert and record the median time of the
    request and of its SQL, and the number of queries. The SQL time is what grows with the
    table; the rest (template rendering) does not, and varies with the machine's load."""
    assert client.get(url, headers=headers).status_code == 200
    times, sql_times, counts, body = [], [], [], b""
    for _ in range(REPEAT):
        with CaptureQueriesContext(connection) as ctx:
            began = time.perf_counter()
            resp = client.get(url, headers=headers)
            times.append((time.perf_counter() - began) * 1000)
        assert resp.status_code == 200, (name, resp.status_code, resp.content[:300])
        counts.append(len(ctx.captured_queries))
        sql_times.append(sum(float(q["time"]) for q in ctx.captured_queries) * 1000)
        body = resp.content
        unbounded = [q["sql"] for q in ctx.captured_queries
                     if re.search(r"COUNT\(\*\)", q["sql"], re.I)
                     and "reproq_task_runs" in q["sql"] and "LIMIT" not in q["sql"].upper()
                     and "WHERE" not in q["sql"].upper()]
        assert not unbounded, (name, unbounded)
    median, sql_median = statistics.median(times), statistics.median(sql_times)
    RESULTS[name] = {"median_ms": round(median, 1), "max_ms": round(max(times), 1),
                     "sql_median_ms": round(sql_median, 1), "queries": max(counts)}
    assert max(counts) <= max_queries, (name, counts, [q["sql"][:200] for q in
                                                       ctx.captured_queries])
    assert sql_median < max_sql_ms, (name, sql_times, [(q["time"], q["sql"][:200])
                                                       for q in ctx.captured_queries])
    assert median < max_ms, (name, times)
    return body.decode()


@pytest.mark.django_db
def test_dashboard_stats_and_metrics_on_a_million_rows(million, settings):
    settings.REPROQ_API_TOKEN = TOKEN
    client = Client()
    client.force_login(staff_user())
    page = measure(client, "dashboard /reproq/", "/reproq/", max_queries=24, max_ms=1000)
    assert 'data-queue="emails"' in page
    snap = json.loads(measure(client, "snapshot /reproq/snapshot/", "/reproq/snapshot/",
                              max_queries=20, max_ms=1000))
    queues = {q["name"]: q for q in snap["queues"]}
    for q in queues.values():  # 50,000 READY each: past the cap, the planner's estimate
        assert q["estimated"] == ["READY"] and abs(q["ready"] - READY / 4) < READY / 4 * 0.25
    assert sum(q["waiting"] for q in queues.values()) == WAITING  # under the cap: exact
    assert sum(q["running"] for q in queues.values()) == RUNNING
    assert sum(q["blocked"] for q in queues.values()) == WAITING // 15
    assert len(snap["running"]) == RUNNING and len(snap["recent_failures"]) == 20
    total = snap["runs"]["total"]
    assert total["estimated"] and abs(total["count"] - N) < N * 0.05
    for status in ("FAILED", "SUCCESSFUL", "CANCELLED"):
        got = snap["runs"]["by_status"][status]
        # ANALYZE samples 30,000 rows: allow 4 standard deviations of that sample's count
        sampled = ANALYZE_SAMPLE * EXACT[status] / N
        tolerance = max(0.05, 4 / sampled**0.5)
        assert got["estimated"] and abs(got["count"] - EXACT[status]) < EXACT[status] * tolerance
    assert snap["runs"]["by_status"]["READY"]["estimated"]
    assert snap["runs"]["by_status"]["WAITING"] == {"count": WAITING, "estimated": False}
    assert snap["top_failing_tasks"] and snap["top_failing_tasks"][0]["failures"] > 0
    # 30,000 events in 5 minutes, 2 successes each: read the newest 20,000 and scale up.
    assert snap["throughput_estimated"] is True
    per_queue = EVENTS / 4 * 2
    for q in queues.values():
        assert abs(q["succeeded_5m"] - per_queue) < per_queue * 0.1, q
        assert abs(q["succeeded_1m"] - per_queue / 5) < per_queue / 5 * 0.15, q

    measure(Client(), "stats /reproq/stats/", "/reproq/stats/", max_queries=16, max_ms=1000,
            Authorization=f"Bearer {TOKEN}")
    text = measure(Client(), "metrics /reproq/metrics", "/reproq/metrics", max_queries=14,
                   max_ms=1000, Authorization=f"Bearer {TOKEN}")
    depth = float(re.search(r'^reproq_queue_depth\{queue="default",state="READY"\} (\S+)$',
                            text, re.M).group(1))
    assert abs(depth - READY / 4) < READY / 4 * 0.25
    assert 'reproq_queue_depth{queue="default",state="WAITING"} 750.0' in text


@pytest.mark.django_db
def test_admin_changelist_on_a_million_rows(million):
    client = Client()
    client.force_login(staff_user())
    base = "/admin/reproq/taskrun/"
    page = measure(client, "admin changelist", base, max_queries=15, max_ms=1500)
    shown = re.search(r"([\d,]+) task runs", page)
    assert shown and abs(int(shown.group(1).replace(",", "")) - N) < N * 0.05, shown
    assert len(re.findall(r'name="_selected_action"', page)) == 100
    # an id that exists (the sequence is shared with the tests that ran before)
    some_id = re.search(r'name="_selected_action" value="(\d+)"', page).group(1)
    for name, query in [("failed", "?status__exact=FAILED"), ("queue", "?queue=emails"),
                        ("task", "?task=bench.tasks.task_7"), ("running", "?lease=held"),
                        ("search id", f"?q=%23{some_id}"), ("search text", "?q=task_1"),
                        ("page 50", "?p=50")]:
        page = measure(client, f"admin changelist {name}", base + query, max_queries=15,
                       max_ms=1500)
        assert "_selected_action" in page, name
    run_id = re.search(r'name="_selected_action" value="(\d+)"', page).group(1)
    measure(client, "admin change page", f"{base}{run_id}/change/", max_queries=12,
            max_ms=1000)
