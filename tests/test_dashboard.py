"""The live dashboard, its snapshot/stats JSON, its actions, the admin, and the SSE stream.

In-process tests use Django's test client (the async views run on the test's connection);
SSE and the browser test run real uvicorn servers (tests/servers.py). The browser test drives
Debian's chromium through Selenium, installing both on a fresh machine, and saves a screenshot
to test-artifacts/dashboard.png. Timings on 1,000,000 rows: tests/test_dashboard_scale.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest
from django.db import connection
from django.test import Client

from reproq.models import Event, QueueControl, TaskRun
from tests.dashboard_helpers import XSS, events_of, make_run, read_sse, staff_user
from tests.servers import (
    COMMANDS,
    REPO_ROOT,
    Servers,
    expect_listeners,
    free_port,
    wait_for_status,
    wait_until,
)

TOKEN = "dash-token-0123456789"


@pytest.fixture
def token(settings):
    settings.REPROQ_API_TOKEN = TOKEN
    return TOKEN


@pytest.fixture
def staff_client(db):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user())
    return client


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- page + snapshot


@pytest.mark.django_db
def test_dashboard_page_and_snapshot_show_the_database(staff_client):
    for _ in range(3):
        make_run("READY", "emails", "tests.testapp.tasks.send_email")
    make_run("WAITING", "emails", "tests.testapp.tasks.send_email", blocked=True)
    make_run("RUNNING", "default")
    failed = make_run("FAILED", "reports", "tests.testapp.tasks.boom")
    make_run("SUCCESSFUL", "default")
    QueueControl.objects.create(queue_name="reports", paused=True, reason="maintenance")
    Event.objects.create(kind="succeeded", task_path="tests.testapp.tasks.add",
                         queue_name="default", data={"count": 7})

    page = staff_client.get("/reproq/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-queue="emails"' in html and 'id="reproq-snapshot"' in html
    assert "maintenance" in html and f'data-run="{failed.pk}"' in html
    assert "csrfmiddlewaretoken" in html

    snap = staff_client.get("/reproq/snapshot/").json()
    queues = {q["name"]: q for q in snap["queues"]}
    assert queues["emails"]["ready"] == 3
    assert queues["emails"]["waiting"] == 1 and queues["emails"]["blocked"] == 1
    assert queues["default"]["running"] == 1
    assert queues["default"]["succeeded_1m"] == 7
    assert queues["reports"]["paused"] is True
    assert snap["runs"]["by_status"]["FAILED"] == {"count": 1, "estimated": False}
    assert snap["runs"]["total"]["count"] == TaskRun.objects.count()
    assert [r["id"] for r in snap["running"]] == list(
        TaskRun.objects.filter(status="RUNNING").values_list("id", flat=True))
    assert snap["recent_failures"][0]["id"] == failed.pk
    assert "ValueError: boom" in snap["recent_failures"][0]["traceback"]
    assert snap["top_failing_tasks"][0] == {**snap["top_failing_tasks"][0],
                                            "task_path": "tests.testapp.tasks.boom",
                                            "failures": 1}

    # The assets are served by reproq itself (no staticfiles needed), cacheable by ETag.
    js = staff_client.get("/reproq/assets/dashboard.js")
    assert js.status_code == 200 and b"EventSource" in js.content
    assert staff_client.get("/reproq/assets/dashboard.js",
                            HTTP_IF_NONE_MATCH=js["ETag"]).status_code == 304
    assert staff_client.get("/reproq/assets/other.js").status_code == 404
    # No innerHTML anywhere in the dashboard's script.
    assert b"innerHTML" not in js.content and b"insertAdjacentHTML" not in js.content


@pytest.mark.django_db
def test_stats_json_matches_the_documented_schema(token):
    make_run("READY", "default")
    make_run("FAILED", "default", "tests.testapp.tasks.boom")
    from reproq.models import PeriodicTask

    PeriodicTask.objects.create(name="nightly", cron_expr="0 3 * * *",
                                task_path="tests.testapp.tasks.add", args=[1, 2])
    body = Client().get("/reproq/stats/", headers=_auth()).json()
    assert body["throughput_estimated"] is False
    assert set(body) >= {"schema", "generated_at", "database", "runs", "queues", "workers",
                         "schedules", "queue_controls", "top_failing_tasks", "events",
                         "query_ms"}
    assert body["schema"] == 1
    assert set(body["runs"]["by_status"]) == {"READY", "WAITING", "RUNNING", "SUCCESSFUL",
                                              "FAILED", "CANCELLED", "EXPIRED"}
    assert body["runs"]["by_status"]["READY"]["count"] == 1
    assert {q["name"] for q in body["queues"]} >= {"default", "emails", "reports", "other"}
    queue_keys = {"name", "estimated", "ready", "waiting", "blocked", "running", "paused",
                  "pause_reason", "enqueued_1m", "succeeded_1m", "failed_1m", "succeeded_5m",
                  "failed_5m", "retried_5m", "throughput_per_minute"}
    assert all(set(q) == queue_keys for q in body["queues"])
    assert body["schedules"]["count"] == 1 and body["schedules"]["items"][0]["name"] == "nightly"
    assert body["schedules"]["items"][0]["next_run_at"]
    assert body["top_failing_tasks"][0]["task_path"] == "tests.testapp.tasks.boom"
    assert body["workers"] == {"count": 0, "leader": None, "items": []}
    assert "running" not in body
    with_lists = Client().get("/reproq/stats/?lists=1", headers=_auth()).json()
    assert "running" in with_lists and "recent_failures" in with_lists


# --------------------------------------------------------------------------- actions


@pytest.mark.django_db
def test_actions_need_csrf_for_sessions_and_change_the_database(staff_client, token):
    failed = make_run("FAILED", "default", "tests.testapp.tasks.boom", args=["x"],
                      priority=3, max_attempts=5)
    ready = make_run("READY", "emails", "tests.testapp.tasks.send_email")

    # Without the CSRF token a session POST is refused.
    refused = staff_client.post("/reproq/action/", {"action": "retry", "id": failed.pk})
    assert refused.status_code == 403
    assert TaskRun.objects.filter(parent_id=failed.pk).count() == 0

    staff_client.get("/reproq/")
    csrf = staff_client.cookies["csrftoken"].value
    ok = staff_client.post("/reproq/action/", {"action": "retry", "id": failed.pk},
                           HTTP_X_CSRFTOKEN=csrf, HTTP_ACCEPT="application/json")
    assert ok.status_code == 200, ok.content
    body = ok.json()
    copy = TaskRun.objects.get(parent_id=failed.pk)
    assert body["created"] == {str(failed.pk): copy.pk}
    assert (copy.status, copy.task_path, copy.queue_name, copy.args, copy.priority,
            copy.max_attempts, copy.attempts) == ("READY", failed.task_path, "default", ["x"], 3,
                                                 5, 0)
    assert copy.metadata == {"replay_of": failed.pk}
    assert Event.objects.filter(kind="enqueued", run_id=copy.pk).exists()
    # Retry refuses runs that are not finished-without-success.
    body = staff_client.post("/reproq/action/", {"action": "retry", "id": ready.pk},
                             HTTP_X_CSRFTOKEN=csrf, HTTP_ACCEPT="application/json").json()
    assert body["changed"] == 0 and "not eligible" in body["message"]

    # A form POST (no JavaScript) redirects back to the dashboard.
    resp = staff_client.post("/reproq/action/", {"action": "cancel", "id": ready.pk,
                                                 "csrfmiddlewaretoken": csrf})
    assert resp.status_code == 302 and resp["Location"] == "/reproq/"
    assert TaskRun.objects.get(pk=ready.pk).status == "CANCELLED"

    resp = staff_client.post("/reproq/action/", {"action": "pause", "queue": "emails",
                                                 "reason": "smtp", "csrfmiddlewaretoken": csrf})
    assert resp.status_code == 302
    qc = QueueControl.objects.get(queue_name="emails")
    assert qc.paused and qc.reason == "smtp" and qc.updated_by == "staff"
    assert Event.objects.filter(kind="queue_paused", queue_name="emails").exists()

    # A token client needs no CSRF token; replay copies any run.
    done = make_run("SUCCESSFUL", "default")
    api = Client(enforce_csrf_checks=True)
    body = api.post("/reproq/action/", {"action": "replay", "id": done.pk}, headers=_auth()).json()
    assert body["ok"] and TaskRun.objects.get(parent_id=done.pk).status == "READY"
    body = api.post("/reproq/action/", {"action": "resume", "queue": "emails"},
                    headers=_auth()).json()
    assert body["ok"] and not QueueControl.objects.get(queue_name="emails").paused
    bad = api.post("/reproq/action/", {"action": "explode"}, headers=_auth())
    assert bad.status_code == 400
    assert api.get("/reproq/action/", headers=_auth()).status_code == 405


@pytest.mark.django_db
@pytest.mark.parametrize("raw", [
    "99999999999999999999",  # beyond bigint
    "9223372036854775808",  # 2**63
    "\u0661",  # an Arabic-Indic digit one, which int() reads as 1
    "\u00b2",  # a superscript two, which str.isdigit() accepts
    "0", "-1", "1_0", "1e3", "0x1", "#", "1,,\u0967",
])
def test_action_ids_are_ascii_digits_in_bigint_range_or_400(token, raw):
    first = make_run("READY", "default")
    api = Client(enforce_csrf_checks=True)
    resp = api.post("/reproq/action/", {"action": "cancel", "id": raw}, headers=_auth())
    assert resp.status_code == 400, resp.content[:300]
    assert resp.json()["ok"] is False and "run id" in resp.json()["error"]
    assert TaskRun.objects.get(pk=first.pk).status == "READY"
    for action in ("retry", "replay", "discard"):
        resp = api.post("/reproq/action/", {"action": action, "id": raw}, headers=_auth())
        assert resp.status_code == 400, (action, resp.content[:300])
    # The largest bigint is a valid id (of no run).
    resp = api.post("/reproq/action/", {"action": "cancel", "id": str(2**63 - 1)},
                    headers=_auth())
    assert resp.status_code == 200 and resp.json()["changed"] == 0


@pytest.mark.django_db
def test_cancel_takes_at_most_10000_runs_at_every_entry_point(token):
    from django.core.management import CommandError, call_command

    from reproq.control import acancel_runs, cancel_runs

    run = make_run("READY", "default")
    ids = [run.pk, *range(10**9, 10**9 + 10_000)]
    api = Client(enforce_csrf_checks=True)
    resp = api.post("/reproq/action/", {"action": "cancel", "id": ",".join(map(str, ids))},
                    headers=_auth())
    assert resp.status_code == 400 and "at most 10000" in resp.json()["error"]
    with pytest.raises(ValueError, match="at most 10000"):
        cancel_runs(ids)
    with pytest.raises(ValueError, match="at most 10000"):
        asyncio.run(acancel_runs(ids))
    argv = [arg for i in ids for arg in ("--id", str(i))]
    with pytest.raises(CommandError, match="at most 10000"):
        call_command("reproq", "cancel", *argv, stdout=io.StringIO())
    assert TaskRun.objects.get(pk=run.pk).status == "READY"
    # Exactly 10,000 (duplicates count once) is fine.
    assert cancel_runs([run.pk, run.pk, *ids[1:10_000]]) == 1
    assert TaskRun.objects.get(pk=run.pk).status == "CANCELLED"


@pytest.mark.django_db
@pytest.mark.parametrize("raw", ["\u0661", "\u00b2", "99999999999999999999", "-1", "1e3"])
def test_event_stream_reads_last_event_id_strictly(token, raw):
    for headers, query in (({"Last-Event-ID": raw}, {}), ({}, {"last_event_id": raw}),
                           ({}, {"since": raw})):
        resp = Client().get("/reproq/events/", query, headers={**_auth(), **headers})
        assert resp.status_code == 400, (headers, query, resp.content[:200])
        assert "Last-Event-ID" in resp.json()["error"]


# --------------------------------------------------------------------------- escaping


@pytest.mark.django_db
def test_script_in_task_args_and_error_is_inert_in_admin_and_dashboard(staff_client):
    run = make_run("FAILED", "default", f"tests.{XSS}.task", args=[XSS], kwargs={"k": XSS},
                   errors=[{"exception_class_path": f"x.{XSS}", "traceback": f"Err: {XSS}",
                            "attempt": 1, "worker_id": XSS}], status_reason=XSS)
    pages = {
        "dashboard": staff_client.get("/reproq/"),
        "changelist": staff_client.get("/admin/reproq/taskrun/"),
        "change": staff_client.get(f"/admin/reproq/taskrun/{run.pk}/change/"),
        "failed filter": staff_client.get("/admin/reproq/taskrun/?status__exact=FAILED"),
    }
    for name, page in pages.items():
        assert page.status_code == 200, name
        html = page.content.decode()
        assert "<script>window.__xss" not in html, name
        assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html, name
    # The snapshot embedded for the script escapes "<" too (json_script).
    embedded = re.search(r'<script id="reproq-snapshot" type="application/json">(.*?)</script>',
                         pages["dashboard"].content.decode(), re.S)
    assert embedded and "<" not in embedded.group(1)
    assert XSS in json.dumps(json.loads(embedded.group(1)))


# --------------------------------------------------------------------------- admin


@pytest.mark.django_db
def test_admin_filters_search_and_actions(staff_client):
    boom = [make_run("FAILED", "reports", "tests.testapp.tasks.boom") for _ in range(2)]
    ready = make_run("READY", "emails", "tests.testapp.tasks.send_email")
    running = make_run("RUNNING", "default", lease_owner="w-1")
    done = make_run("SUCCESSFUL", "default")

    def ids(url: str) -> set[int]:
        page = staff_client.get(url)
        assert page.status_code == 200, page.content[:500]
        return {int(i) for i in re.findall(r'name="_selected_action" value="(\d+)"',
                                           page.content.decode())}

    base = "/admin/reproq/taskrun/"
    assert ids(base) == {r.pk for r in [*boom, ready, running, done]}
    assert ids(base + "?status__exact=FAILED") == {r.pk for r in boom}
    assert ids(base + "?queue=emails") == {ready.pk}
    assert ids(base + "?task=tests.testapp.tasks.boom") == {r.pk for r in boom}
    assert ids(base + "?lease=held") == {running.pk}
    assert ids(base + "?lease=worker:w-1") == {running.pk}
    assert ids(base + f"?q=%23{ready.pk}") == {ready.pk}
    assert ids(base + "?q=SEND_EMAIL") == {ready.pk}
    assert ids(base + "?q=nothing-like-this") == set()
    page = staff_client.get(base).content.decode()
    assert "tests.testapp.tasks.send_email" in page  # the task filter's choices
    assert "Delete selected" not in page and "Discard selected runs" in page

    staff_client.get(base)
    csrf = staff_client.cookies["csrftoken"].value

    def act(action: str, selected: list[TaskRun]) -> None:
        resp = staff_client.post(base, {"action": action, "csrfmiddlewaretoken": csrf,
                                        "_selected_action": [r.pk for r in selected]})
        assert resp.status_code == 302, resp.content[:500]

    act("retry_failed", boom)
    assert TaskRun.objects.filter(parent_id__in=[r.pk for r in boom], status="READY").count() == 2
    act("replay_runs", [done])
    assert TaskRun.objects.filter(parent_id=done.pk).count() == 1
    act("cancel_runs", [ready])
    assert TaskRun.objects.get(pk=ready.pk).status == "CANCELLED"
    act("pause_queues", [ready])
    assert QueueControl.objects.get(queue_name="emails").paused
    act("resume_queues", [ready])
    assert not QueueControl.objects.get(queue_name="emails").paused
    act("discard_runs", [done, running])
    assert not TaskRun.objects.filter(pk=done.pk).exists()
    assert TaskRun.objects.filter(pk=running.pk).exists()  # running runs are kept


@pytest.mark.django_db
def test_admin_search_for_odd_numbers_and_queue_actions_on_bad_names_answer_cleanly(
        staff_client):
    run = make_run("READY", "default")
    odd = make_run("READY", "bad queue!")  # written by hand: not a valid queue name
    base = "/admin/reproq/taskrun/"
    for term in ("\u00b2", "\u0661", "99999999999999999999", "#9223372036854775808", "#"):
        page = staff_client.get(base, {"q": term})
        assert page.status_code == 200, (term, page.content[:300])
        assert f'value="{run.pk}"' not in page.content.decode()
    page = staff_client.get(base, {"q": f"#{run.pk}"})
    assert f'name="_selected_action" value="{run.pk}"' in page.content.decode()

    staff_client.get(base)
    csrf = staff_client.cookies["csrftoken"].value
    for action in ("pause_queues", "resume_queues"):
        resp = staff_client.post(base, {"action": action, "csrfmiddlewaretoken": csrf,
                                        "_selected_action": [run.pk, odd.pk]}, follow=True)
        assert resp.status_code == 200, resp.content[:300]
        text = resp.content.decode()
        assert "Skipped invalid queue names" in text and "bad queue!" in text
    assert not QueueControl.objects.filter(queue_name="bad queue!").exists()
    assert QueueControl.objects.get(queue_name="default").paused is False  # paused, resumed
    # The queue controls' own form refuses such a name instead of failing on save.
    resp = staff_client.post("/admin/reproq/queuecontrol/add/", {
        "queue_name": "bad queue!", "paused": "on", "reason": "",
        "csrfmiddlewaretoken": csrf})
    assert resp.status_code == 200 and "invalid queue name" in resp.content.decode()
    QueueControl.objects.create(queue_name="also bad!", paused=False)
    resp = staff_client.post("/admin/reproq/queuecontrol/", {
        "action": "pause", "csrfmiddlewaretoken": csrf, "_selected_action": ["also bad!"]},
        follow=True)
    assert resp.status_code == 200 and "Skipped invalid queue names" in resp.content.decode()


# --------------------------------------------------------------------------- SSE (unit)


def _event_row(eid: int, kind: str = "succeeded", queue: str = "default") -> dict:
    from django.utils import timezone

    return {"id": eid, "created_at": timezone.now(), "kind": kind, "run_id": eid,
            "task_path": "tests.testapp.tasks.add", "queue_name": queue, "worker_id": "w",
            "data": {"count": 1}}


def test_hub_bounds_each_client_in_bytes_filters_and_delivers_late_rows_without_an_id():
    from reproq.asgi.sse import Event, EventFilter, EventHub

    hub = EventHub("default")
    size = len(Event.from_row(_event_row(5)).chunk())  # the largest of the events below
    slow = hub.subscribe(EventFilter(), max_bytes=3 * size + size // 2)
    failures = hub.subscribe(EventFilter(kinds=frozenset({"failed"}),
                                         queues=frozenset({"default"})), max_bytes=10 * size)
    hub.dispatch([_event_row(i) for i in range(1, 6)]
                 + [_event_row(6, "failed"), _event_row(7, "failed", "emails")])
    # The slow client kept the newest 3 (what fits its bytes) and is told about the 4 it lost.
    assert len(slow.queue) == 3 and slow.buffered == sum(len(c) for _, c in slow.queue)
    assert slow.buffered <= slow.max_bytes
    chunk = slow.drain().decode()
    assert chunk.startswith("event: gap\n") and '"dropped": 4' in chunk
    assert f'"bytes": {4 * size}' in chunk  # the 4 lost were "succeeded" events of `size`
    assert [int(i) for i in re.findall(r"^id: (\d+)$", chunk, re.M)] == [5, 6, 7]
    assert not slow.queue and slow.dropped == 0 and slow.buffered == 0
    assert re.findall(r"^id: (\d+)$", failures.drain().decode(), re.M) == ["6"]

    # Ids 8 and 9 are skipped (not committed yet): 10 is delivered, then 9 arrives late,
    # without an id line, exactly once.
    hub.dispatch([_event_row(10)])
    assert hub.cursor == 10 and set(hub.gaps) == {8, 9}
    hub.dispatch([_event_row(9), _event_row(9)])
    late = slow.drain().decode()
    assert late.startswith("id: 10\n") and late.count('"id":9,') == 1
    assert "id: 9\n" not in late and set(hub.gaps) == {8}
    hub.unsubscribe(slow)
    hub.unsubscribe(failures)
    assert not hub.subscribers


# --------------------------------------------------------------------------- SSE (servers)




def start_web(servers: Servers, env: dict[str, str]):
    """A uvicorn process that serves pages without a runtime (ready when /healthz is 200)."""
    port = free_port()
    srv = servers._spawn("uvicorn-web", COMMANDS["uvicorn"](port), env, port=port)

    def ready():
        srv.check_alive()
        try:
            return srv.healthz()[0] == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=30, interval=0.1, what="the web server",
               describe=srv.log_tail)
    return srv


def _stream(client: httpx.Client, srv, path: str = "/reproq/events/", **headers: str):
    return client.stream("GET", srv.url(path), headers={
        "Authorization": f"Bearer {srv.token}", "Accept": "text/event-stream", **headers})


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_sse_streams_events_of_another_process_with_filters_resume_and_cleanup(servers):
    # "web" serves the stream and runs no runtime; "worker" enqueues (through its view) and
    # runs the tasks: every event the stream shows comes from the other process.
    web = start_web(servers, {"REPROQ_AUTOSTART": "0", "REPROQ_SSE_HEARTBEAT_SECONDS": "0.5"})
    worker = servers.start("uvicorn", env={"REPROQ_POLL_FALLBACK_SECONDS": "300"})
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, read=5.0)) as client:
        with _stream(client, web) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            run_id = int(worker.enqueue_http("add", 2, 3))

            def finished(messages, raw):
                return any(e["kind"] == "succeeded" and run_id in e["data"].get("run_ids", [])
                           for e in events_of(messages))

            messages, raw = read_sse(resp, until=finished, timeout=20)
        kinds = [e["kind"] for e in events_of(messages) if e.get("run_id") == run_id
                 or run_id in (e.get("data") or {}).get("run_ids", [])]
        # (one flush may carry a 'succeeded' before a 'started': compare as a multiset)
        assert sorted(kinds) == ["enqueued", "started", "succeeded"], events_of(messages)
        worker_ids = worker.worker_ids()
        ev = events_of(messages, "succeeded")[-1]
        assert ev["worker"] in worker_ids and ev["queue"] == "default"
        assert ev["task"] == "tests.testapp.tasks.add" and ev["status"] == "SUCCESSFUL"
        assert all(int(m["id"]) == m["json"]["id"] for m in messages if "json" in m)
        assert "retry" in messages[0]
        last_seen = max(int(m["id"]) for m in messages if "id" in m)

        # Heartbeats while idle.
        with _stream(client, web) as resp:
            _, raw = read_sse(resp, until=lambda m, r: ": keep-alive" in r, timeout=5)
        assert ": keep-alive" in raw

        # Missed while disconnected, replayed from Last-Event-ID, in order, nothing twice.
        missed = [int(worker.enqueue_http("add", i, i)) for i in range(3)]
        for rid in missed:
            wait_for_status(rid, timeout=20, logs=servers.logs)
        wait_until(lambda: Event.objects.filter(kind="succeeded", data__run_ids__contains=[
            missed[-1]]).exists(), timeout=10, what="the last success event")
        with _stream(client, web, **{"Last-Event-ID": str(last_seen)}) as resp:
            def replayed(messages, raw):
                got = {r for e in events_of(messages, "succeeded") for r in e["data"]["run_ids"]}
                return set(missed) <= got

            messages, _ = read_sse(resp, until=replayed, timeout=10)
        ids = [int(m["id"]) for m in messages if "id" in m]
        assert ids == sorted(set(ids)) and min(ids) > last_seen
        assert not any(m.get("event") == "gap" for m in messages)

        # Filters: only failures of the "default" queue.
        with _stream(client, web, "/reproq/events/?status=failed&queue=default") as resp:
            worker.enqueue_http("add", 1, 1)
            bad = int(worker.enqueue_http("boom", "filtered"))
            messages, _ = read_sse(
                resp, timeout=20, until=lambda m, r: any(e.get("run_id") == bad and e["kind"]
                                                         == "failed" for e in events_of(m)))
        assert {e["kind"] for e in events_of(messages)} == {"failed"}
        bad_filter = client.get(web.url("/reproq/events/?status=nope"),
                                headers={"Authorization": f"Bearer {web.token}"})
        assert bad_filter.status_code == 400

        # The web process's LISTEN connection (its notifier's: the hub has none of its own)
        # is killed: it reconnects and the hub catches up. (Through PgBouncer there is none:
        # the hub polls, and the event still arrives.)
        with _stream(client, web) as resp:
            read_sse(resp, until=lambda m, r: True, timeout=5)  # the opening comment
            with connection.cursor() as cur:
                cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = current_database() "
                            "AND application_name = %s", [f"reproq-listen-{web.pid}"])
                assert cur.fetchone()[0] == (1 if expect_listeners() else 0)
            rid = int(worker.enqueue_http("add", 40, 2))
            messages, _ = read_sse(resp, timeout=15, until=lambda m, r: any(
                e["kind"] == "succeeded" and rid in e["data"].get("run_ids", [])
                for e in events_of(m)))

    # Worker and leader changes are events too (published by the worker process).
    mine = worker.worker_ids()
    wait_until(lambda: Event.objects.filter(kind="leader_changed", worker_id__in=mine,
                                            data__leader=True).exists(),
               timeout=10, what="a leader_changed event")
    assert Event.objects.filter(kind="worker_joined", worker_id__in=mine).exists()

    # Disconnected clients are unsubscribed (the process's stream gauge drops to 0).
    def no_clients():
        text = web.request("GET", "/reproq/metrics").text
        match = re.search(r"^reproq_sse_clients (\S+)$", text, re.M)
        return match and float(match.group(1)) == 0

    wait_until(no_clients, timeout=5, what="SSE clients to be unsubscribed")


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_sse_streams_end_by_themselves_on_max_age_and_on_shutdown(servers):
    srv = servers.start("uvicorn", env={"REPROQ_SSE_MAX_SECONDS": "1.5",
                                        "REPROQ_SSE_RETRY_MS": "750"})
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, read=5.0)) as client:
        began = time.monotonic()
        with _stream(client, srv) as resp:
            messages, _ = read_sse(resp, until=lambda m, r: False, timeout=6)
        assert 1.4 < time.monotonic() - began < 5
        bye = messages[-1]
        assert bye["event"] == "bye" and json.loads(bye["data"])["reason"] == "max-age"
        assert bye["retry"] == "500"

    srv2 = servers.start("uvicorn", env={"REPROQ_SSE_MAX_SECONDS": "300"})
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, read=8.0)) as client:
        with _stream(client, srv2) as resp:
            assert resp.status_code == 200
            began = time.monotonic()
            srv2.signal(signal.SIGTERM)
            messages, _ = read_sse(resp, until=lambda m, r: False, timeout=8)
        assert messages[-1]["event"] == "bye", messages
        assert json.loads(messages[-1]["data"])["reason"] == "shutdown"
        assert messages[-1]["retry"] == "2000"
    # uvicorn waited for the stream, then ran the lifespan shutdown: well before 300 s.
    # (uvicorn re-raises the captured SIGTERM once its graceful shutdown is complete)
    assert srv2.wait_exit(timeout=15) in {0, -signal.SIGTERM}
    assert time.monotonic() - began < 10
    assert "Application shutdown complete" in srv2.log_tail(200)


# --------------------------------------------------------------------------- browser


CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1400,1800"]


def _ensure_chromium() -> tuple[str, str]:
    """Debian's chromium + chromedriver, installed with apt-get on a fresh machine."""
    chrome, driver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(chrome) and os.path.exists(driver)):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                  "chromium-driver"]]
        for step in steps:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600,
                                  check=False)
            if done.returncode != 0:
                msg = (f"!!! BROWSER TEST SKIPPED: `{' '.join(step)}` failed "
                       f"({done.returncode}): {done.stderr[-2000:]}")
                print(msg)
                pytest.skip(msg)
    return chrome, driver


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("selenium", reason="pip install -e '.[test]' (selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver_path = _ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        options.add_argument(flag)
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


class _Wait:
    """WebDriverWait that shows the page's console and status when it times out."""

    def __init__(self, driver, timeout: float) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, timeout, poll_frequency=0.1)

    def until(self, condition):
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait.until(condition)
        except TimeoutException:
            logs = self.driver.get_log("browser")
            status = self.driver.execute_script(
                "var s = document.getElementById('live-status'); return s && s.textContent")
            raise AssertionError(f"browser wait timed out at {self.driver.current_url}; "
                                 f"live-status={status!r}; console={logs!r}") from None


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_browser_dashboard_counters_move_live(servers, browser):
    from selenium.webdriver.common.by import By

    staff_user("browser", "pw-browser-123")
    # A failure whose task name, args and error contain <script>: shown as text, never run.
    make_run("FAILED", "default", f"tests.{XSS}.task", args=[XSS],
             errors=[{"exception_class_path": XSS, "traceback": f"Err: {XSS}", "attempt": 1}])
    srv = servers.start("uvicorn", env={"REPROQ_POLL_FALLBACK_SECONDS": "300"})

    browser.get(srv.url("/admin/login/?next=/reproq/"))
    browser.find_element(By.NAME, "username").send_keys("browser")
    browser.find_element(By.NAME, "password").send_keys("pw-browser-123")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait = _Wait(browser, 20)
    wait.until(lambda d: d.current_url.endswith("/reproq/"))
    wait.until(lambda d: d.find_element(By.ID, "live-status").text == "live")
    browser.execute_script("window.__sameDocument = 'yes';")

    def number(element_id: str) -> int:
        text = browser.find_element(By.ID, element_id).text
        return int(text.replace(",", "").lstrip("~") or 0)

    before = {"enqueued": number("tile-enqueued"), "succeeded": number("tile-succeeded")}
    ids = [srv.enqueue_http("add", i, i) for i in range(5)]  # through the server's view
    wait.until(lambda d: number("tile-enqueued") >= before["enqueued"] + 5)
    wait.until(lambda d: number("tile-succeeded") >= before["succeeded"] + 5)
    for rid in ids:
        wait_for_status(rid, timeout=10, logs=servers.logs)
    wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, 'tr[data-queue="default"] td[data-field="succeeded_1m"]').text != "0")
    assert number("events-seen") >= 2
    log = browser.find_element(By.ID, "event-log").text
    assert "succeeded" in log and "enqueued" in log
    # Same document all along: the counters moved without a reload.
    assert browser.execute_script("return window.__sameDocument") == "yes"
    # The <script> row is text, and never ran.
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert XSS in browser.find_element(By.ID, "failures").text

    # Settle on a fresh snapshot (the live increments are exact again) for the screenshot.
    wait.until(lambda d: d.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "window.reproqDashboard.refresh().then(done, function () { done(false); });"))
    assert number("tile-running") == 0 and number("tile-succeeded") >= before["succeeded"] + 5

    out = REPO_ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    shot = out / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"\ndashboard screenshot: {shot}")
