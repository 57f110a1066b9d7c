"""Access to reproq's HTTP endpoints: closed by default; staff session or API token; CSRF for
session POSTs; CIDR allow-list; wrong tokens rate-limited per address; /healthz optionally
public."""

from __future__ import annotations

import asyncio
import time

import httpx
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
def test_wrong_tokens_are_rate_limited_per_address_but_the_right_token_always_passes(settings):
    settings.REPROQ_AUTH_FAILURE_LIMIT = 3
    settings.REPROQ_AUTH_FAILURE_WINDOW_SECONDS = 1.0
    client = Client()
    for header in ({"Authorization": "Bearer a"}, {"X-Reproq-Token": "b"},
                   {"Authorization": "Bearer c"}):
        assert client.get("/reproq/stats/", headers=header).status_code == 403
    # Limited: further wrong tokens get 429 with a Retry-After ...
    resp = client.get("/reproq/stats/", headers={"Authorization": "Bearer d"})
    assert resp.status_code == 429
    assert 1 <= int(resp["Retry-After"]) <= 1
    assert "retry later" in resp.json()["error"]
    # ... but the right token from the same address (a scraper behind the same proxy as the
    # guesser) is not locked out by someone else's failures.
    for _ in range(3):
        assert client.get("/reproq/stats/",
                          headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/reproq/stats/", headers={"X-Reproq-Token": "e"}).status_code == 429
    # Another address is not affected; a staff session is not a token attempt.
    other = Client(REMOTE_ADDR="10.9.8.7")
    assert other.get("/reproq/stats/", headers={"X-Reproq-Token": "f"}).status_code == 403
    staff = Client()
    staff.force_login(staff_user())
    assert staff.get("/reproq/stats/").status_code == 200
    time.sleep(1.1)
    assert client.get("/reproq/stats/", headers={"X-Reproq-Token": "g"}).status_code == 403


@pytest.mark.django_db
def test_wrong_tokens_from_one_ipv6_slash_64_are_counted_together(settings):
    settings.REPROQ_AUTH_FAILURE_LIMIT = 3
    wrong = {"Authorization": "Bearer nope"}
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"):
        assert Client(REMOTE_ADDR=host).get("/reproq/stats/", headers=wrong).status_code == 403
    assert Client(REMOTE_ADDR="2001:db8:1:2::9").get("/reproq/stats/",
                                                     headers=wrong).status_code == 429
    assert Client(REMOTE_ADDR="2001:db8:1:3::1").get("/reproq/stats/",
                                                     headers=wrong).status_code == 403


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
    # Only True opens it: a string in settings is not a yes.
    settings.REPROQ_HEALTHZ_PUBLIC = "False"
    assert Client().get("/reproq/healthz").status_code == 403


@pytest.mark.django_db
def test_healthz_public_and_the_token_are_read_from_the_environment(settings, monkeypatch):
    async def fake_probe(alias):
        return True, ""

    monkeypatch.setattr("reproq.views._database_ok", fake_probe)
    assert Client().get("/reproq/healthz").status_code == 403
    monkeypatch.setenv("REPROQ_HEALTHZ_PUBLIC", "1")
    assert Client().get("/reproq/healthz").status_code == 200
    settings.REPROQ_HEALTHZ_PUBLIC = True
    monkeypatch.setenv("REPROQ_HEALTHZ_PUBLIC", "false")  # the environment wins both ways
    assert Client().get("/reproq/healthz").status_code == 403
    monkeypatch.setenv("REPROQ_HEALTHZ_PUBLIC", "maybe")  # not a yes: stays closed
    assert Client().get("/reproq/healthz").status_code == 403
    # REPROQ_API_TOKEN: the environment overrides the setting, as documented.
    monkeypatch.setenv("REPROQ_API_TOKEN", "env-token-0123456789abcdef")
    assert Client().get("/reproq/stats/", headers={
        "Authorization": "Bearer env-token-0123456789abcdef"}).status_code == 200
    assert Client().get("/reproq/stats/", headers={
        "Authorization": f"Bearer {TOKEN}"}).status_code == 403


@pytest.mark.django_db
def test_no_configured_token_accepts_no_token(settings, monkeypatch):
    settings.REPROQ_API_TOKEN = ""
    monkeypatch.delenv("REPROQ_API_TOKEN", raising=False)
    for header in ({"Authorization": "Bearer "}, {"X-Reproq-Token": ""},
                   {"Authorization": f"Bearer {TOKEN}"}):
        assert Client().get("/reproq/stats/", headers=header).status_code == 403


# --------------------------------------------------------------------------- proxies


def _stats(remote: str, forwarded: str | None = None, token: str = TOKEN) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return Client(REMOTE_ADDR=remote).get("/reproq/stats/", headers=headers).status_code


@pytest.mark.django_db
def test_forwarded_for_is_read_right_to_left_and_only_from_trusted_proxies(settings):
    settings.REPROQ_ALLOWED_CIDRS = ["192.0.2.0/24"]
    proxy = "10.0.0.1"
    # Without REPROQ_TRUSTED_PROXIES the header is never believed.
    assert _stats(proxy, "192.0.2.5") == 403
    settings.REPROQ_TRUSTED_PROXIES = ["10.0.0.0/24"]
    assert _stats(proxy, "192.0.2.5") == 200
    assert _stats(proxy) == 403  # no header: the proxy itself is the client
    # The client wrote the left part; the trusted proxy appended what it saw on the right.
    assert _stats(proxy, "192.0.2.5, 203.0.113.9") == 403
    assert _stats(proxy, "203.0.113.9, 192.0.2.5") == 200
    assert _stats(proxy, "192.0.2.5, 10.0.0.7") == 200  # a second trusted hop is skipped
    assert _stats(proxy, "[::ffff:192.0.2.5]:4711") == 200
    assert _stats(proxy, "192.0.2.5:4711") == 200
    assert _stats(proxy, "192.0.2.5, unknown") == 403  # not an address: the client is unknown
    assert _stats(proxy, "") == 403
    # An untrusted peer's header is ignored, whatever it says.
    assert _stats("203.0.113.9", "192.0.2.5") == 403
    assert _stats("::ffff:192.0.2.5") == 200  # a dual-stack listener's IPv4 client


@pytest.mark.django_db
def test_wrong_tokens_behind_a_trusted_proxy_count_per_client_and_garbage_per_proxy(settings):
    settings.REPROQ_TRUSTED_PROXIES = ["10.0.0.1"]
    settings.REPROQ_AUTH_FAILURE_LIMIT = 2
    for _ in range(2):
        assert _stats("10.0.0.1", "198.51.100.1", token="wrong") == 403
    assert _stats("10.0.0.1", "198.51.100.1", token="wrong") == 429
    assert _stats("10.0.0.1", "198.51.100.2", token="wrong") == 403  # another client
    assert _stats("10.0.0.1", "198.51.100.1") == 200
    # Values that are no address cannot be varied to escape the limit: they count against
    # the proxy that reported them.
    codes = [_stats("10.0.0.1", f"nonsense-{i}", token="wrong") for i in range(4)]
    assert codes == [403, 403, 429, 429]


@pytest.mark.django_db
@pytest.mark.parametrize("name, value", [
    ("REPROQ_ALLOWED_CIDRS", ["10.0.0.0/8", "10.0.0.0/33"]),
    ("REPROQ_ALLOWED_CIDRS", "10.0.0.0/8,not-a-network"),
    ("REPROQ_TRUSTED_PROXIES", ["127.0.0.1", "localhost"]),
    ("REPROQ_TRUSTED_PROXIES", 42),
])
def test_an_invalid_address_setting_makes_every_endpoint_refuse_with_json(settings, name,
                                                                         value, caplog):
    setattr(settings, name, value)
    for path in ("/reproq/stats/", "/reproq/", "/reproq/metrics"):
        for client in (Client(), Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")):
            resp = client.get(path)
            assert resp.status_code == 500, (path, resp.content[:200])
            assert resp["Content-Type"] == "application/json"
            assert name in resp.json()["error"] and "manage.py check" in resp.json()["error"]
    assert any(name in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_token_clients_get_json_for_too_many_fields_and_too_large_a_body(settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    api = Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    many = "&".join(f"id={i}" for i in range(1, 20)) + "&action=cancel"
    resp = api.post("/reproq/action/", many, content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 400 and resp["Content-Type"] == "application/json"
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in resp.json()["error"]
    big = "action=cancel&id=" + ",".join(["1"] * 1000)
    resp = api.post("/reproq/action/", big, content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 413 and resp["Content-Type"] == "application/json"
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in resp.json()["error"]
    resp = api.get("/reproq/stats/?" + "&".join(f"x={i}" for i in range(20)))
    assert resp.status_code == 400 and resp["Content-Type"] == "application/json"
    resp = api.get("/reproq/events/?" + "&".join(f"queue=q{i}" for i in range(20)))
    assert resp.status_code == 400 and resp["Content-Type"] == "application/json"
    # Nothing is read before the caller is known: anonymous clients still get 403.
    assert Client().post("/reproq/action/", big, content_type="application/x-www-form-"
                         "urlencoded").status_code == 403


# --------------------------------------------------------------------------- real servers


def _start(servers, server: str, env: dict[str, str], extra_args=()):
    """A server without a runtime, ready once it answers (a 403 is an answer)."""
    from tests.servers import COMMANDS, free_port, wait_until

    port = free_port()
    srv = servers._spawn(server, [*COMMANDS[server](port), *extra_args],
                         {"REPROQ_AUTOSTART": "0", **env}, port=port)

    def ready():
        srv.check_alive()
        try:
            return srv.request("GET", "/reproq/assets/dashboard.css").status_code in {200, 403}
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=30, interval=0.1, what=f"{server} to answer",
               describe=srv.log_tail)
    return srv




def _get(srv, token: str, forwarded: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return srv.request("GET", "/reproq/stats/", headers=headers).status_code


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_fresh_forwarded_for_values_neither_escape_the_limit_nor_lock_out_the_scraper(servers):
    srv = _start(servers, "uvicorn", {"REPROQ_AUTH_FAILURE_LIMIT": "5"})
    # uvicorn trusts 127.0.0.1 as a proxy and rewrites the client from the header; reproq
    # counts the socket peer.
    codes = [_get(srv, "wrong", f"198.51.100.{i}") for i in range(1, 31)]
    assert codes == [403] * 5 + [429] * 25, codes
    # The right token from the same (limited) address still gets in.
    assert _get(srv, srv.token) == 200
    assert _get(srv, srv.token, "198.51.100.99") == 200
    assert _get(srv, "wrong") == 429


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("server, extra_args", [
    ("uvicorn", ()),
    ("gunicorn", ("-w", "1")),
    ("daphne", ("--proxy-headers",)),
    ("hypercorn", ()),
])
def test_forwarded_for_from_an_untrusted_peer_does_not_pass_the_cidr_rule(servers, server,
                                                                          extra_args):
    srv = _start(servers, server, {"REPROQ_ALLOWED_CIDRS": "10.0.0.0/8"}, extra_args)
    assert _get(srv, srv.token) == 403
    assert _get(srv, srv.token, "10.1.2.3") == 403


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_forwarded_for_from_a_trusted_proxy_names_the_client(servers):
    srv = _start(servers, "uvicorn", {"REPROQ_ALLOWED_CIDRS": "10.0.0.0/8",
                                      "REPROQ_TRUSTED_PROXIES": "127.0.0.1/32",
                                      "REPROQ_AUTH_FAILURE_LIMIT": "3"})
    assert _get(srv, srv.token) == 403  # the proxy itself is not an allowed client
    assert _get(srv, srv.token, "10.1.2.3") == 200
    assert _get(srv, srv.token, "10.1.2.3, 198.51.100.7") == 403  # rightmost untrusted hop
    assert _get(srv, srv.token, "198.51.100.7, 10.1.2.3") == 200
    codes = [_get(srv, "wrong", "10.9.9.9") for _ in range(4)]
    assert codes == [403, 403, 403, 429]
    assert _get(srv, "wrong", "10.9.9.8") == 403  # counted per forwarded client


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_a_proxy_on_a_unix_socket_is_trusted_only_when_listed(servers, tmp_path):
    from tests.servers import APP, wait_until

    def start(name: str, env: dict[str, str]) -> tuple[object, str]:
        sock = str(tmp_path / f"{name}.sock")
        srv = servers._spawn(name, ["uvicorn", APP, "--uds", sock, "--lifespan", "on"],
                             {"REPROQ_AUTOSTART": "0", "REPROQ_ALLOWED_CIDRS": "10.0.0.0/8",
                              **env})
        return srv, sock

    def get(srv, sock: str, forwarded: str | None = None) -> int | None:
        srv.check_alive()
        headers = {"Authorization": f"Bearer {srv.token}", "Connection": "close"}
        if forwarded is not None:
            headers["X-Forwarded-For"] = forwarded
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock), trust_env=False,
                              timeout=10.0) as client:
                return client.get("http://proxy/reproq/stats/", headers=headers).status_code
        except httpx.HTTPError:
            return None

    trusted, trusted_sock = start("uds-trusted", {"REPROQ_TRUSTED_PROXIES": "unix"})
    plain, plain_sock = start("uds-plain", {})
    for srv, sock in ((trusted, trusted_sock), (plain, plain_sock)):
        wait_until(lambda s=srv, k=sock: get(s, k) is not None, timeout=30, interval=0.1,
                   what=f"{srv.name} to answer", describe=srv.log_tail)
    assert get(trusted, trusted_sock) == 403  # no header: the client is unknown
    assert get(trusted, trusted_sock, "10.1.2.3") == 200
    assert get(trusted, trusted_sock, "198.51.100.1") == 403
    assert get(plain, plain_sock, "10.1.2.3") == 403
