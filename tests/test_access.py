"""Access to reproq's HTTP endpoints: closed by default; staff session or API token; CSRF for
session POSTs; CIDR allow-list; wrong tokens rate-limited per address; /healthz optionally
public."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client

from reproq import access
from tests.dashboard_helpers import staff_user

TOKEN = "access-token-0123456789abcdef"

ENDPOINTS = [
    ("GET", "/reproq/"),
    ("GET", "/reproq/snapshot/"),
    ("GET", "/reproq/stats/"),
    ("GET", "/reproq/metrics"),
    ("GET", "/reproq/healthz"),
    ("GET", "/reproq/assets/dashboard.js"),
    ("GET", "/reproq/assets/dashboard.css"),
    ("POST", "/reproq/action/"),
    ("GET", "/reproq/events/"),
]
ACTION = {"action": "resume", "queue": "other"}
# Tested on one event loop (AsyncClient): the stream's reader and /healthz's probe open psycopg
# connections that belong to the loop they were made on.
ASYNC_ONLY = {"/reproq/events/", "/reproq/healthz"}


@pytest.fixture(autouse=True)
def _clean_limiter(settings):
    settings.REPROQ_API_TOKEN = TOKEN
    access.failures.reset()
    yield
    access.failures.reset()


def call(client: Client, method: str, path: str, **headers: str):
    if method == "POST":
        return client.post(path, ACTION, headers=headers)
    return client.get(path, headers=headers)


@pytest.mark.django_db
@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_every_endpoint_refuses_anonymous_and_non_staff(method, path):
    resp = call(Client(), method, path)
    if path == "/reproq/":
        assert resp.status_code == 302
        assert resp["Location"] == "/admin/login/?next=%2Freproq%2F"
    else:
        assert resp.status_code == 403, resp.content
        assert resp.json()["error"].startswith("forbidden")
    user = get_user_model().objects.create_user("plain", password="pw-plain-123")
    client = Client()
    client.force_login(user)
    resp = call(client, method, path)
    assert resp.status_code in {302, 403}
    # A wrong token is refused too (and never redirected to a login page).
    assert call(Client(), method, path, Authorization="Bearer nope").status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize("method, path", [e for e in ENDPOINTS if e[1] not in ASYNC_ONLY])
def test_every_endpoint_accepts_staff_and_token(method, path):
    ok = {200}
    staff = Client()
    staff.force_login(staff_user())
    if method == "POST":
        staff.get("/reproq/")
        resp = staff.post(path, {**ACTION, "csrfmiddlewaretoken": staff.cookies["csrftoken"].value},
                          headers={"Accept": "application/json"})
    else:
        resp = staff.get(path)
    assert resp.status_code in ok, resp.content[:300]
    for header in ({"Authorization": f"Bearer {TOKEN}"}, {"X-Reproq-Token": TOKEN}):
        resp = call(Client(enforce_csrf_checks=True), method, path, **header)
        assert resp.status_code in ok, (header, resp.content[:300])


@pytest.mark.django_db(transaction=True)
def test_event_stream_and_healthz_refuse_anonymous_and_accept_staff_and_token(settings):
    settings.REPROQ_SSE_MAX_SECONDS = 2
    user = staff_user()

    async def main():
        from asgiref.sync import sync_to_async
        from django.db import connections

        from reproq import db
        from reproq.asgi import sse
        from reproq.runtime import host

        # Streams refuse to start in a process that is shutting down: earlier in-process
        # lifespan or runtime stops must not leak into this test.
        sse.reset_shutdown()
        host.reset_for_tests()
        try:
            assert (await AsyncClient().get("/reproq/events/")).status_code == 403
            staff = AsyncClient()
            await staff.aforce_login(user)
            for client, headers in [(staff, {}),
                                    (AsyncClient(), {"Authorization": f"Bearer {TOKEN}"})]:
                resp = await client.get("/reproq/events/", headers=headers)
                assert resp.status_code == 200
                assert resp["Content-Type"].startswith("text/event-stream")
                stream = aiter(resp.streaming_content)
                first = await asyncio.wait_for(anext(stream), 5)
                assert first.startswith(b"retry: ")
                await stream.aclose()
                health = await client.get("/reproq/healthz", headers=headers)
                assert health.status_code in {200, 503} and "database" in health.json()
            assert (await AsyncClient().get("/reproq/healthz")).status_code == 403
        finally:
            await sse.close_hub()
            await db.close_pools()
            # The request's sync parts ran in asgiref's thread: close what it opened.
            await sync_to_async(connections.close_all)()

    asyncio.run(main())


@pytest.mark.django_db
def test_session_posts_need_csrf_token_posts_do_not():
    staff = Client(enforce_csrf_checks=True)
    staff.force_login(staff_user())
    assert staff.post("/reproq/action/", ACTION).status_code == 403
    api = Client(enforce_csrf_checks=True)
    assert api.post("/reproq/action/", ACTION,
                    headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.django_db
def test_wrong_tokens_are_rate_limited_per_address(settings):
    settings.REPROQ_AUTH_FAILURE_LIMIT = 3
    settings.REPROQ_AUTH_FAILURE_WINDOW_SECONDS = 1.0
    client = Client()
    for header in ({"Authorization": "Bearer a"}, {"X-Reproq-Token": "b"},
                   {"Authorization": "Bearer c"}):
        assert client.get("/reproq/stats/", headers=header).status_code == 403
    # Locked out: even the right token gets 429 (no oracle), with a Retry-After.
    resp = client.get("/reproq/stats/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 429
    assert 1 <= int(resp["Retry-After"]) <= 1
    assert "retry later" in resp.json()["error"]
    # Another address is not affected; a staff session is not a token attempt.
    other = Client(REMOTE_ADDR="10.9.8.7")
    assert other.get("/reproq/stats/",
                     headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    staff = Client()
    staff.force_login(staff_user())
    assert staff.get("/reproq/stats/").status_code == 200
    time.sleep(1.1)
    assert client.get("/reproq/stats/",
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.django_db
def test_cidr_allow_list_from_settings_and_environment(settings, monkeypatch):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    settings.REPROQ_ALLOWED_CIDRS = ["10.0.0.0/8", "2001:db8::/32"]
    resp = Client().get("/reproq/stats/", headers=auth)  # the test client is 127.0.0.1
    assert resp.status_code == 403 and "REPROQ_ALLOWED_CIDRS" in resp.json()["error"]
    assert Client(REMOTE_ADDR="10.1.2.3").get("/reproq/stats/", headers=auth).status_code == 200
    assert Client(REMOTE_ADDR="2001:db8::5").get("/reproq/metrics",
                                                 headers=auth).status_code == 200
    staff = Client()
    staff.force_login(staff_user())
    assert staff.get("/reproq/").status_code == 403  # not redirected to a login either
    monkeypatch.setenv("REPROQ_ALLOWED_CIDRS", "127.0.0.0/8")
    assert Client().get("/reproq/stats/", headers=auth).status_code == 200
    assert Client(REMOTE_ADDR="10.1.2.3").get("/reproq/stats/", headers=auth).status_code == 403


@pytest.mark.django_db
def test_healthz_can_be_opened_alone(settings, monkeypatch):
    settings.REPROQ_HEALTHZ_PUBLIC = True

    async def fake_probe(alias):  # the probe itself is exercised on one loop above
        return True, ""

    monkeypatch.setattr("reproq.views._database_ok", fake_probe)
    resp = Client().get("/reproq/healthz")
    assert resp.status_code == 200 and resp.json()["database"] is True
    assert Client().get("/reproq/stats/").status_code == 403
    assert Client().get("/reproq/metrics").status_code == 403


@pytest.mark.django_db
def test_no_configured_token_accepts_no_token(settings, monkeypatch):
    settings.REPROQ_API_TOKEN = ""
    monkeypatch.delenv("REPROQ_API_TOKEN", raising=False)
    for header in ({"Authorization": "Bearer "}, {"X-Reproq-Token": ""},
                   {"Authorization": f"Bearer {TOKEN}"}):
        assert Client().get("/reproq/stats/", headers=header).status_code == 403
