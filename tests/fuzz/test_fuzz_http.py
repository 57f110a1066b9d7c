"""Fuzz: every HTTP endpoint's parameters - reproq's own (dashboard, snapshot, stats, metrics,
assets, actions, healthz, events) and the admin's reproq pages (lists, search, filters,
pagination, change pages, actions, add forms) - as a staff user, an anonymous user and token
clients (right and wrong), against the real test database. Arbitrary query strings, form
values and headers never give a 500 (or an exception out of the view)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from django.db import transaction
from django.test import AsyncClient, Client
from hypothesis import event, given, settings
from hypothesis import strategies as st

from reproq import access
from tests.dashboard_helpers import make_run, staff_user
from tests.fuzz.strategies import batches, integers_text, text

TOKEN = "fuzz-token-0123456789abcdef"
WHO = ("staff", "anonymous", "token", "wrong-token")
# Most requests come from staff: they reach the views' parameter handling.
WHO_WEIGHTED = st.integers(min_value=0, max_value=9).map(
    lambda i: "staff" if i < 6 else WHO[1 + i % 3])
KINDS = {
    "reproq-pages": ["dashboard", "snapshot", "stats", "metrics", "asset"],
    "reproq-action": ["action"],
    "admin-lists": ["admin-list", "admin-index"],
    "admin-change-pages": ["admin-change"],
    "admin-actions": ["admin-action"],
    "admin-add-forms": ["admin-add"],
}


def latin1(strategy: Any) -> Any:
    """Header values travel as latin-1."""
    return strategy.map(lambda s: s.encode("latin-1", "ignore").decode("latin-1"))
VALUE = st.one_of(text(max_size=40), integers_text())
ID = st.one_of(integers_text(), st.sampled_from(["1", "2", "3", "#1", "1,2,3", "\u0661", "²"]),
               st.integers(min_value=2**63 - 2, max_value=2**80).map(str),
               st.integers(min_value=-(2**80), max_value=0).map(str))
IDS = st.lists(ID, min_size=1, max_size=4)
SEARCH = st.one_of(ID, VALUE)


def params(*names: str) -> Any:
    """A query or form: some of the endpoint's own parameters (each a string or a repeated
    list of strings), and in one example of four some other ones."""
    values = st.one_of(VALUE, VALUE, st.lists(VALUE, min_size=1, max_size=3))
    own = (st.dictionaries(st.sampled_from(names), values, max_size=min(4, len(names)))
           if names else st.just({}))
    other = st.dictionaries(text(max_size=12), values, max_size=3)
    return st.tuples(own, st.integers(0, 3), other).map(
        lambda t: {**t[0], **(t[2] if t[1] == 0 else {})})


ADMIN_LISTS = ["taskrun", "worker", "queuecontrol", "ratelimit", "periodictask"]
CHANGE_PAGES = ["taskrun", "worker", "queuecontrol", "ratelimit", "periodictask"]
ACTIONS = ["cancel_runs", "retry_failed", "replay_runs", "discard_runs", "pause_queues",
           "resume_queues", "delete_selected", "pause", "resume", "run_now", "enable",
           "disable"]


@st.composite
def requests(draw: Any, kinds: list[str]) -> tuple[str, str, dict[str, Any], dict[str, str]]:
    """(method, path, query or form data, headers) for one endpoint of `kinds`."""
    kind = draw(st.sampled_from(kinds))
    event(kind)
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Accept"] = draw(st.one_of(
            st.sampled_from(["application/json", "text/html", "*/*",
                             "application/openmetrics-text; version=1.0.0",
                             "application/openmetrics-text; version=0.0.1",
                             "text/plain;version=0.0.4", "application/openmetrics-text;q=x"]),
            latin1(text(max_size=60, nul=False))))
    if kind == "dashboard":
        return "GET", "/reproq/", draw(params()), headers
    if kind == "snapshot":
        return "GET", "/reproq/snapshot/", draw(params()), headers
    if kind == "stats":
        return "GET", "/reproq/stats/", draw(params("lists")), headers
    if kind == "metrics":
        return "GET", "/reproq/metrics", draw(params()), headers
    if kind == "asset":
        name = draw(st.one_of(st.sampled_from(["dashboard.js", "dashboard.css"]),
                              text(max_size=20)))
        if draw(st.booleans()):
            headers["If-None-Match"] = draw(latin1(text(max_size=30, nul=False)))
        return "GET", "/reproq/assets/" + quote(name, safe=""), {}, headers
    if kind == "action":
        form = {**draw(params("action", "id", "queue", "reason")),
                "action": draw(st.one_of(st.sampled_from(
                    ["retry", "replay", "cancel", "discard", "pause", "resume"]), VALUE))}
        if draw(st.integers(0, 4)):
            form = {**form, "id": draw(IDS)}
        if draw(st.booleans()):
            form = {**form, "queue": draw(st.one_of(
                st.sampled_from(["default", "emails", "nope"]), VALUE))}
        return "POST", "/reproq/action/", form, headers
    model = draw(st.one_of(st.just("taskrun"), st.sampled_from(ADMIN_LISTS)))
    base = f"/admin/reproq/{model}/"
    if kind == "admin-index":
        return "GET", "/admin/reproq/", draw(params()), headers
    if kind == "admin-list":
        query = draw(params("q", "status", "status__exact", "queue", "task", "lease", "p", "o",
                            "all", "e", "enabled__exact", "source__exact", "_changelist_filters",
                            "queue_name__exact", "paused__exact"))
        if draw(st.booleans()):
            query = {**query, "q": draw(SEARCH)}
        return "GET", base, query, headers
    if kind == "admin-change":
        pk = draw(st.one_of(st.sampled_from(["1", "2", "3", "4", "5", "6", "default"]),
                            integers_text(), text(max_size=20)))
        suffix = draw(st.sampled_from(["change/", "history/", "delete/", ""]))
        return "GET", f"{base}{quote(pk, safe='')}/{suffix}", draw(params()), headers
    if kind == "admin-action":
        form = {**draw(params("action", "_selected_action", "select_across", "index")),
                "action": draw(st.one_of(st.sampled_from(ACTIONS), VALUE)),
                "_selected_action": draw(IDS), "index": "0"}
        if draw(st.booleans()):
            form = {**form, "select_across": draw(st.sampled_from(["0", "1"]))}
        return "POST", base, form, headers
    fields = {
        "ratelimit": ("key", "rate", "period_seconds", "burst"),
        "queuecontrol": ("queue_name", "paused", "reason"),
        "periodictask": ("name", "cron_expr", "timezone", "task_path", "args", "kwargs",
                         "queue_name", "priority", "max_attempts", "misfire_policy",
                         "overlap_policy", "enabled"),
    }.get(model, ("x",))
    form = {name: draw(st.one_of(VALUE, st.sampled_from(["[]", "{}", "[1, 2]", "* * * * *",
                                                         "UTC", "tests.testapp.tasks.add",
                                                         "default", "run_once", "1e400",
                                                         '{"__reproq__": "bytes"}'])))
            for name in fields if draw(st.integers(0, 4))}
    return "POST", f"{base}add/", form, headers


def client_for(who: str, staff: Any) -> tuple[Client, dict[str, str]]:
    client = Client()
    if who == "staff":
        client.force_login(staff)
        return client, {}
    if who == "token":
        return client, {"Authorization": f"Bearer {TOKEN}"}
    if who == "wrong-token":
        return client, {"X-Reproq-Token": "nope"}
    return client, {}


@pytest.fixture
def site(settings: Any) -> Any:
    settings.REPROQ_API_TOKEN = TOKEN
    # Wrong tokens are rate-limited per address; the fuzzer sends many.
    settings.REPROQ_AUTH_FAILURE_LIMIT = 10**9
    access.failures.reset()
    for status in ("READY", "WAITING", "RUNNING", "SUCCESSFUL", "FAILED", "CANCELLED",
                   "EXPIRED"):
        make_run(status)
    make_run("FAILED", queue="emails", task="tests.testapp.tasks.boom",
             args=[{"__reproq__": "bytes", "v": "!!"}], kwargs={"k": [[[[1]]]]})
    yield staff_user()
    access.failures.reset()


def is_server_error(status: int, path: str) -> bool:
    return status >= 500


@pytest.fixture(autouse=True)
def _quiet_request_log() -> Any:
    """Every 500 is also logged by django.request; the failing example says enough."""
    import logging

    logger = logging.getLogger("django.request")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.mark.django_db
@pytest.mark.parametrize("group", sorted(KINDS))
def test_no_parameter_of_any_endpoint_gives_a_server_error(site, group):
    @settings(max_examples=max(50, settings.default.max_examples // 5))
    @given(WHO_WEIGHTED, requests(KINDS[group]))
    def check(who, request_):
        send(site, who, request_)

    check()


def send(site: Any, who: str, request_: tuple[str, str, dict[str, Any], dict[str, str]]
         ) -> None:
    method, path, data, headers = request_
    client, auth = client_for(who, site)
    # One savepoint per request: a statement that fails must not poison the next example.
    with transaction.atomic():
        if method == "GET":
            query = urlencode(data, doseq=True)
            response = client.get(f"{path}?{query}" if query else path,
                                  headers={**headers, **auth})
        else:
            response = client.post(path, data, headers={**headers, **auth})
        transaction.set_rollback(True)
    event(f"{who}: {response.status_code}")
    assert not is_server_error(response.status_code, path), (
        response.status_code, response.content[:500])
    if path == "/reproq/action/" and response.status_code == 200 and data.get("action") in {
            "retry", "replay", "cancel", "discard"}:
        # Ids are ASCII digits in 1..2**63-1 (an optional '#'); anything else is a 400.
        parts = [p.strip().lstrip("#") for v in data.get("id", []) for p in str(v).split(",")]
        assert all(not p or (p.isascii() and p.isdigit() and 0 < int(p) < 2**63)
                   for p in parts), (data, response.content[:300])


# --------------------------------------------------------------------------- async endpoints


@st.composite
def stream_requests(draw: Any) -> tuple[str, dict[str, Any], dict[str, str]]:
    path = draw(st.sampled_from(["/reproq/events/", "/reproq/healthz"]))
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Last-Event-ID"] = draw(latin1(st.one_of(integers_text(),
                                                          text(max_size=20, nul=False))))
    return path, draw(params("queue", "task", "status", "last_event_id", "since")), headers


@pytest.mark.django_db(transaction=True)
@settings(max_examples=batches(4))
@given(WHO_WEIGHTED, stream_requests())
def test_no_parameter_of_the_event_stream_or_healthz_gives_a_server_error(stream_site, who,
                                                                         request_):
    """On one event loop (the stream's LISTEN connection and healthz's pool belong to it)."""
    path, data, headers = request_
    loop, staff_client = stream_site

    async def call() -> tuple[int, bytes]:
        client = staff_client if who == "staff" else AsyncClient()
        auth = {"token": {"Authorization": f"Bearer {TOKEN}"},
                "wrong-token": {"X-Reproq-Token": "nope"}}.get(who, {})
        query = urlencode(data, doseq=True)
        response = await client.get(f"{path}?{query}" if query else path,
                                    headers={**headers, **auth})
        body = b""
        if response.streaming:
            stream = aiter(response.streaming_content)
            try:
                body = await asyncio.wait_for(anext(stream), 5)
            finally:
                await stream.aclose()
        else:
            body = response.content
        return response.status_code, body

    status, body = loop.run_until_complete(call())
    event(f"{who} {path}: {status}")
    # 503 is healthz's and the stream's documented answer when something is unavailable.
    assert status < 500 or (status == 503 and (b"error" in body or b"reasons" in body)), (
        status, body[:300])


@pytest.fixture
def stream_site(settings: Any) -> Any:
    from asgiref.sync import sync_to_async
    from django.db import connections

    from reproq import db
    from reproq.asgi import sse
    from reproq.runtime import host

    settings.REPROQ_API_TOKEN = TOKEN
    settings.REPROQ_AUTH_FAILURE_LIMIT = 10**9
    settings.REPROQ_SSE_MAX_SECONDS = 1
    access.failures.reset()
    sse.reset_shutdown()
    host.reset_for_tests()
    user = staff_user()
    loop = asyncio.new_event_loop()
    staff = AsyncClient()
    loop.run_until_complete(staff.aforce_login(user))
    try:
        yield loop, staff
    finally:
        async def close() -> None:
            await sse.close_hub()
            await db.close_pools()
            await sync_to_async(connections.close_all)()

        loop.run_until_complete(close())
        loop.close()
        access.failures.reset()
