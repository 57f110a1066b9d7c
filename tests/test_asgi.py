"""The ASGI wrapper driven directly with ASGI messages: lifespan, failures, lazy start, channels."""

from __future__ import annotations

import asyncio

import pytest
from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application as django_asgi
from django.test import override_settings

from reproq import db
from reproq.asgi import lifespan
from reproq.runtime import host

pytestmark = pytest.mark.django_db(transaction=True)


class Lifespan:
    """Plays the server's side of the ASGI lifespan protocol."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    async def wait_for(self, kind: str, timeout: float = 20) -> dict:
        for _ in range(int(timeout / 0.02)):
            for message in self.sent:
                if message["type"] == kind:
                    return message
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind} in {self.sent}")


async def http_get(app, path: str) -> tuple[int, bytes]:
    messages: list[dict] = []
    sent_request = False

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


def run(coro):
    async def main():
        try:
            return await coro
        finally:
            await host.stop()
            await db.close_pools()
            host.reset_for_tests()

    return asyncio.run(main())


def test_lifespan_starts_and_stops_the_runtime_around_a_channels_router():
    app = lifespan(ProtocolTypeRouter({"http": django_asgi()}), autostart=True)

    async def body():
        server = Lifespan()
        task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"},
                                        "state": {}}, server.receive, server.send))
        await server.inbox.put({"type": "lifespan.startup"})
        await server.wait_for("lifespan.startup.complete")
        running = host.status()
        status, _ = await http_get(app, "/reproq/healthz")  # through the router
        await server.inbox.put({"type": "lifespan.shutdown"})
        await server.wait_for("lifespan.shutdown.complete")
        await task
        return running, status, host.status()

    running, status, after = run(body())
    assert running["state"] == "running" and running["via"] == "lifespan"
    assert status == 403  # the router passed the request on to Django (closed by default)
    assert after["state"] == "stopped"


@override_settings(REPROQ_RUNTIME={"CONCURRENCY": 0})
def test_invalid_settings_fail_lifespan_startup_with_the_reason():
    from reproq import conf

    conf.reset_cache()
    app = lifespan(django_asgi(), autostart=True)

    async def body():
        server = Lifespan()
        task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"},
                                        "state": {}}, server.receive, server.send))
        await server.inbox.put({"type": "lifespan.startup"})
        failed = await server.wait_for("lifespan.startup.failed")
        await task
        return failed

    failed = run(body())
    conf.reset_cache()
    assert "CONCURRENCY" in failed["message"] and "is not valid" in failed["message"]
    assert host.current() is None


@override_settings(REPROQ_RUNTIME={"AUTOSTART": True, "LAZY_START": True,
                                   "HEARTBEAT_SECONDS": 1, "LEASE_SECONDS": 5})
def test_first_request_starts_the_runtime_where_no_lifespan_came():
    from reproq import conf

    conf.reset_cache()
    app = lifespan(django_asgi())

    async def body():
        assert host.current() is None
        await http_get(app, "/reproq/healthz")
        return host.status()

    status = run(body())
    conf.reset_cache()
    assert status["state"] == "running" and status["via"] == "first request"


@override_settings(REPROQ_RUNTIME={"AUTOSTART": True, "LAZY_START": False})
def test_no_lazy_start_means_healthz_says_why():
    from reproq import conf

    conf.reset_cache()
    app = lifespan(django_asgi())

    async def body():
        with override_settings(REPROQ_HEALTHZ_PUBLIC=True):
            return await http_get(app, "/reproq/healthz")

    status, payload = run(body())
    conf.reset_cache()
    assert status == 503
    assert b"runtime not-started" in payload


def test_not_started_warning_is_logged_when_nothing_starts_the_runtime_and_0_turns_it_off(
        settings, caplog, monkeypatch):
    import importlib
    import logging
    import time

    module = importlib.import_module("reproq.asgi.lifespan")  # `lifespan` is also a function
    monkeypatch.setattr(module, "_watchdog_started", False)
    settings.REPROQ_RUNTIME = {**settings.REPROQ_RUNTIME, "NOT_STARTED_WARNING_SECONDS": 0}
    module._start_watchdog()
    assert not module._watchdog_started  # off: no timer

    settings.REPROQ_RUNTIME = {**settings.REPROQ_RUNTIME, "NOT_STARTED_WARNING_SECONDS": 0.05}
    with caplog.at_level(logging.ERROR, logger="reproq"):
        module._start_watchdog()
        assert module._watchdog_started
        for _ in range(100):
            if "has not started" in caplog.text:
                break
            time.sleep(0.02)
    assert "the runtime has not started 0s after the ASGI app was loaded" in caplog.text
