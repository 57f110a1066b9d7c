"""Requests first (`reproq.runtime.gate`): counting requests in the ASGI wrapper, the gate's
bounded wait, its settings, and a real uvicorn on loopback with the runtime inside."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from asgiref.sync import sync_to_async
from django.db import connections
from django.tasks.signals import task_started
from django.test import override_settings

from reproq import conf, db
from reproq.asgi import lifespan
from reproq.conf import explain_runtime, load_runtime_settings
from reproq.runtime import host
from reproq.runtime.gate import REQUESTS, TRAFFIC_WINDOW_SECONDS, RequestCounter, RequestGate
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.servers import free_port
from tests.testapp import tasks

# --------------------------------------------------------------------------- the gate alone


def test_gate_is_open_without_requests_and_when_disabled():
    async def body():
        counter = RequestCounter()
        gate = RequestGate(enabled=True, max_wait=1.0, requests=counter)
        await gate.wait()
        counter.enter()
        off = RequestGate(enabled=False, max_wait=1.0, requests=counter)
        await off.wait()
        return gate.waits, off.waits

    assert asyncio.run(body()) == (0, 0)


def test_gate_waits_until_the_last_request_leaves():
    order: list[str] = []

    async def body():
        counter = RequestCounter()
        gate = RequestGate(enabled=True, max_wait=1.0, requests=counter)
        first, second = counter.enter(), counter.enter()

        async def runtime_side():
            await gate.wait()
            order.append("runtime")

        waiter = asyncio.create_task(runtime_side())
        for _ in range(5):
            await asyncio.sleep(0)
        counter.leave(first)
        for _ in range(5):
            await asyncio.sleep(0)
        order.append("last request leaves")
        counter.leave(second)
        await waiter
        counter.leave(second)  # idempotent
        return gate, counter

    gate, counter = asyncio.run(body())
    assert order == ["last request leaves", "runtime"]
    assert gate.waits == 1 and gate.timeouts == 0 and counter.inflight == 0


def test_gate_wait_is_bounded_then_stays_open_for_a_while():
    async def body():
        counter = RequestCounter()
        gate = RequestGate(enabled=True, max_wait=0.05, requests=counter)
        counter.enter()
        fresh = asyncio.create_task(asyncio.sleep(0))

        async def keep_young() -> None:  # a new request every 10 ms: never quiet
            while True:
                counter.enter()
                await asyncio.sleep(0.01)

        traffic = asyncio.create_task(keep_young())
        await fresh
        await gate.wait()  # ends at max_wait with requests still in flight
        after_timeout = gate.timeouts
        await gate.wait()  # the gate stays open right after a timeout
        traffic.cancel()
        return after_timeout, gate.timeouts, gate.waits, counter.inflight

    after_timeout, timeouts, waits, inflight = asyncio.run(body())
    assert after_timeout == 1 and timeouts == 1 and waits == 1
    assert inflight > 1


def test_requests_older_than_the_bound_do_not_count():
    async def body():
        counter = RequestCounter()
        gate = RequestGate(enabled=True, max_wait=0.05, requests=counter)
        counter.enter()  # e.g. a long poll
        await asyncio.sleep(0.1)
        await gate.wait()
        return gate.waits, gate.busy()

    assert asyncio.run(body()) == (0, False)


# --------------------------------------------------------------------------- the ASGI wrapper


async def _drive(app: Any, scope_type: str) -> list[int]:
    """Call the wrapped app once; return the in-flight count seen at each message sent."""
    seen: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        seen.append(REQUESTS.inflight)

    scope = {"type": scope_type, "path": "/", "headers": []}
    await lifespan(app, autostart=False)(scope, receive, send)
    return seen


def test_wrapper_counts_a_request_until_its_response_is_complete():
    inside: list[int] = []

    async def app(scope, receive, send):
        inside.append(REQUESTS.inflight)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain")]})
        inside.append(REQUESTS.inflight)
        await send({"type": "http.response.body", "body": b"ok"})
        inside.append(REQUESTS.inflight)  # after the final body: no longer in flight

    REQUESTS.reset()
    during_send = asyncio.run(_drive(app, "http"))
    assert inside == [1, 1, 0] and during_send == [1, 1] and REQUESTS.inflight == 0


def test_streams_websockets_and_errors_stop_counting():
    inside: list[int] = []

    async def sse(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"Content-Type", b"text/event-stream; charset=utf-8")]})
        inside.append(REQUESTS.inflight)  # an SSE stream never counts once it started

    async def chunks(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        inside.append(REQUESTS.inflight)
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        inside.append(REQUESTS.inflight)  # streaming: may last for ever

    async def websocket(scope, receive, send):
        inside.append(REQUESTS.inflight)

    async def broken(scope, receive, send):
        inside.append(REQUESTS.inflight)
        raise RuntimeError("view crashed")

    REQUESTS.reset()

    async def body():
        await _drive(sse, "http")
        await _drive(chunks, "http")
        await _drive(websocket, "websocket")
        with pytest.raises(RuntimeError):
            await _drive(broken, "http")

    asyncio.run(body())
    assert inside == [0, 1, 0, 0, 1] and REQUESTS.inflight == 0


def test_claims_take_small_bites_while_requests_keep_arriving():
    counter = RequestCounter()
    gate = RequestGate(enabled=True, max_wait=0.05, claim_batch=3, requests=counter)
    quiet = gate.claim_limit(10)
    token = counter.enter()
    in_flight = gate.claim_limit(10), gate.claim_limit(2)
    counter.leave(token)
    just_after = gate.claim_limit(10)  # the last request started less than a second ago
    threading.Event().wait(TRAFFIC_WINDOW_SECONDS + 0.05)
    later = gate.claim_limit(10)
    counter.enter()
    off = RequestGate(enabled=False, max_wait=0.05, claim_batch=3, requests=counter)
    assert (quiet, in_flight, just_after, later) == (10, (3, 2), 3, 10)
    assert off.claim_limit(10) == 10 and not off.traffic()
    assert gate.status()["capped_claims"] == 2 and gate.status()["claim_batch"] == 3


# --------------------------------------------------------------------------- settings


def test_settings_defaults_env_overrides_and_explain():
    rs, problems = load_runtime_settings(environ={})
    assert not problems and rs.yield_to_requests is True and rs.yield_max_wait_seconds == 0.05
    rs, problems = load_runtime_settings(environ={"REPROQ_YIELD_TO_REQUESTS": "off",
                                                  "REPROQ_YIELD_MAX_WAIT_SECONDS": "0.1"})
    assert not problems and rs.yield_to_requests is False and rs.yield_max_wait_seconds == 0.1
    rows = {name: (value, source) for name, value, source in explain_runtime(rs)}
    assert rows["YIELD_TO_REQUESTS"] == (False, "env REPROQ_YIELD_TO_REQUESTS")
    assert rows["YIELD_MAX_WAIT_SECONDS"] == (0.1, "env REPROQ_YIELD_MAX_WAIT_SECONDS")
    assert load_runtime_settings(environ={})[0].yield_claim_batch == 4
    rs, problems = load_runtime_settings(environ={"REPROQ_YIELD_CLAIM_BATCH": "2"})
    assert not problems and rs.yield_claim_batch == 2


@pytest.mark.parametrize(("raw", "env", "expected"), [
    ({"YIELD_MAX_WAIT_SECONDS": 0}, {}, "'YIELD_MAX_WAIT_SECONDS'] (from settings.REPROQ_RUNTIME)"
     ": 0 is not valid (write a number > 0)"),
    ({"YIELD_MAX_WAIT_SECONDS": "50ms"}, {}, "'50ms' is not valid (write a number > 0)"),
    ({"YIELD_MAX_WAIT_SECONDS": 5}, {}, "5 is above 1s"),
    ({}, {"REPROQ_YIELD_MAX_WAIT_SECONDS": "-1"}, "(from env REPROQ_YIELD_MAX_WAIT_SECONDS): "
     "-1.0 is not valid"),
    ({}, {"REPROQ_YIELD_TO_REQUESTS": "maybe"}, "(from env REPROQ_YIELD_TO_REQUESTS): 'maybe' "
     "is not valid (write True or False"),
    ({"YIELD_TO_REQUESTS": 1}, {}, "'YIELD_TO_REQUESTS'] (from settings.REPROQ_RUNTIME): 1 is "
     "not valid"),
    ({"YIELD_CLAIM_BATCH": 0}, {}, "'YIELD_CLAIM_BATCH'] (from settings.REPROQ_RUNTIME): 0 is "
     "not valid (write a whole number >= 1)"),
    ({"YIELD_CLAIM_BATCH": 2.5}, {}, "2.5 is not valid (write a whole number >= 1)"),
    ({}, {"REPROQ_YIELD_CLAIM_BATCH": "four"}, "(from env REPROQ_YIELD_CLAIM_BATCH): 'four' is "
     "not valid"),
])
def test_bad_values_give_a_clear_error(raw, env, expected):
    with override_settings(REPROQ_RUNTIME=raw):
        _, problems = load_runtime_settings(environ=env)
    assert len(problems) == 1 and expected in str(problems[0]), problems


# --------------------------------------------------------------------------- real server


class Views:
    """The inner ASGI app: /hold waits for `release`, /slow answers after 30 ms, /sse streams
    until `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/sse":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b": hi\n\n", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/hold":
            await self.release.wait()
        elif path == "/slow":
            await asyncio.sleep(0.03)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def serve(body: Callable[[Views, str], Awaitable[Any]], **runtime: Any) -> Any:
    """uvicorn on 127.0.0.1 with the runtime in its lifespan; `body(views, base_url)`."""
    settings = {"LEASE_SECONDS": 5, "HEARTBEAT_SECONDS": 1, "POLL_FALLBACK_SECONDS": 5,
                "BEAT": False, **runtime}

    async def main() -> Any:
        views = Views()
        port = free_port()
        config = uvicorn.Config(lifespan(views, autostart=True), host="127.0.0.1", port=port,
                                lifespan="on", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            for _ in range(500):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.02)
            assert server.started and host.current() is not None
            return await body(views, f"http://127.0.0.1:{port}")
        finally:
            views.release.set()
            server.should_exit = True
            await asyncio.wait_for(task, 30)
            await host.stop()
            await db.close_pools()
            host.reset_for_tests()
            REQUESTS.reset()
            await sync_to_async(connections.close_all)()

    with override_settings(REPROQ_RUNTIME=settings):
        conf.reset_cache()
        try:
            return asyncio.run(main())
        finally:
            conf.reset_cache()


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Starts:
    """Records, for each task start, whether the test still held its request open."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.log: list[bool] = []

    def __call__(self, sender: Any, task_result: Any, **kwargs: Any) -> None:
        self.log.append(self.held.is_set())

    def __enter__(self) -> Starts:
        task_started.connect(self)
        return self

    def __exit__(self, *exc: object) -> None:
        task_started.disconnect(self)


@pytest.mark.django_db(transaction=True)
def test_no_task_starts_while_a_request_is_in_flight():
    async def body(views: Views, base: str) -> tuple[list[bool], list[str], dict[str, Any]]:
        rt = host.current()
        assert rt is not None
        async with httpx.AsyncClient(timeout=20) as client:
            starts.held.set()
            held = asyncio.create_task(client.get(base + "/hold"))
            await until(lambda: REQUESTS.inflight == 1, "the request to arrive")
            results = [await tasks.add.aenqueue(i, 1) for i in range(3)]
            await until(lambda: rt.gate.waits >= 1, "the runtime to wait at the gate")
            await asyncio.sleep(0.2)
            starts.held.clear()
            views.release.set()
            assert (await held).status_code == 200
            done = [await wait_for(r.id) for r in results]
        return starts.log, [r.raw_status for r in done], rt.gate.status()

    with Starts() as starts:
        log, statuses, gate = serve(body, YIELD_MAX_WAIT_SECONDS=1.0)
    assert statuses == ["SUCCESSFUL"] * 3
    assert log == [False] * 3  # every start came after the request was answered
    assert gate["waits"] >= 1 and gate["timeouts"] == 0


@pytest.mark.django_db(transaction=True)
def test_tasks_still_run_under_continuous_requests():
    async def body(views: Views, base: str) -> tuple[list[bool], list[str], dict[str, Any]]:
        rt = host.current()
        assert rt is not None
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=20) as client:
            async def traffic() -> None:  # a 30 ms request every 10 ms: never quiet
                pending = set()
                while not stop.is_set():
                    pending.add(asyncio.create_task(client.get(base + "/slow")))
                    await asyncio.sleep(0.01)
                await asyncio.gather(*pending)

            starts.held.set()
            load = asyncio.create_task(traffic())
            await until(lambda: REQUESTS.inflight >= 2, "traffic")
            results = [await tasks.add.aenqueue(i, 1) for i in range(20)]
            done = [await wait_for(r.id) for r in results]
            starts.held.clear()
            stop.set()
            await load
        return starts.log, [r.raw_status for r in done], rt.gate.status()

    with Starts() as starts:
        log, statuses, gate = serve(body, YIELD_MAX_WAIT_SECONDS=0.05)
    assert statuses == ["SUCCESSFUL"] * 20
    assert log == [True] * 20  # all ran while the traffic went on
    assert gate["timeouts"] >= 1  # ... because waits ended at the bound


@pytest.mark.django_db(transaction=True)
def test_a_backlog_is_claimed_in_small_bites_under_traffic():
    async def body(views: Views, base: str) -> tuple[list[str], int, dict[str, Any]]:
        rt = host.current()
        assert rt is not None
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=20) as client:
            async def traffic() -> None:  # a request every 20 ms
                while not stop.is_set():
                    await client.get(base + "/")
                    await asyncio.sleep(0.02)

            load = asyncio.create_task(traffic())
            await until(lambda: REQUESTS.total >= 2, "traffic")
            claims = rt.claimer.claims
            results = await sync_to_async(tasks.add.get_backend().bulk_enqueue)(
                [(tasks.add, (i, 1), {}) for i in range(20)])
            done = [await wait_for(r.id) for r in results]
            stop.set()
            await load
        return [r.raw_status for r in done], rt.claimer.claims - claims, rt.gate.status()

    statuses, claims, gate = serve(body, YIELD_CLAIM_BATCH=3, CONCURRENCY=10)
    assert statuses == ["SUCCESSFUL"] * 20
    assert claims >= 7  # 20 runs, at most 3 per claim (10 free slots each time otherwise)
    assert gate["capped_claims"] >= 1 and gate["claim_batch"] == 3


@pytest.mark.django_db(transaction=True)
def test_event_streams_and_disabled_gate_do_not_hold_tasks_back():
    async def body(views: Views, base: str) -> tuple[list[str], dict[str, Any]]:
        rt = host.current()
        assert rt is not None
        async with httpx.AsyncClient(timeout=20) as client, client.stream(
                "GET", base + "/sse") as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            results = [await tasks.add.aenqueue(i, 1) for i in range(3)]
            done = [await wait_for(r.id) for r in results]
            views.release.set()
        return [r.raw_status for r in done], rt.gate.status()

    statuses, gate = serve(body, YIELD_MAX_WAIT_SECONDS=1.0)
    assert statuses == ["SUCCESSFUL"] * 3 and gate["waits"] == 0

    async def held(views: Views, base: str) -> tuple[list[str], dict[str, Any]]:
        rt = host.current()
        assert rt is not None
        async with httpx.AsyncClient(timeout=20) as client:
            req = asyncio.create_task(client.get(base + "/hold"))
            await until(lambda: REQUESTS.inflight == 1, "the request to arrive")
            results = [await tasks.add.aenqueue(i, 1) for i in range(3)]
            done = [await wait_for(r.id) for r in results]  # while the request is held
            views.release.set()
            await req
        return [r.raw_status for r in done], rt.gate.status()

    statuses, gate = serve(held, YIELD_TO_REQUESTS=False, YIELD_MAX_WAIT_SECONDS=1.0)
    assert statuses == ["SUCCESSFUL"] * 3 and gate["waits"] == 0 and not gate["enabled"]


@pytest.mark.django_db(transaction=True)
def test_a_runtime_without_a_web_server_never_waits():
    results = [tasks.add.enqueue(i, 1) for i in range(5)]

    async def body(rt):
        return [await wait_for(r.id) for r in results], rt.gate.status()

    done, gate = run_with_runtime(body)
    assert [r.raw_status for r in done] == ["SUCCESSFUL"] * 5
    assert gate["enabled"] and gate["waits"] == 0 and gate["inflight"] == 0
