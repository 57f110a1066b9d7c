"""The notification seam: one wire protocol (`Topic`), one LISTEN connection per process, and a
poll-only notifier that needs no LISTEN at all."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from reproq.runtime import notifier as notifiers
from reproq.runtime.ports import Topic, decode, encode
from tests.runtime_helpers import run_with_runtime, wait_for
from tests.servers import expect_listeners
from tests.testapp import tasks

ROOT = Path(__file__).resolve().parent.parent / "reproq"


def test_every_notification_reproq_writes_has_a_topic():
    """Each ``'<x>:'`` payload prefix in the SQL and the triggers is a Topic (the wire protocol
    is written once: a new kind of notification must be added to the enum)."""
    sources = [ROOT / "sql.py", *sorted((ROOT / "migrations").glob("*.py"))]
    prefixes = set()
    for path in sources:
        text = path.read_text()
        # 'x:' || <value>, except the semaphore keys 'l:' || lock_key, 'c:' || concurrency_key
        prefixes.update(re.findall(r"'([a-z]):' \|\| (?!lock_key|concurrency_key)", text))
        prefixes.update(re.findall(r"pg_notify\([^,]+, *'([a-z]):", text))
    assert prefixes and prefixes <= {t.value for t in Topic}, prefixes
    assert {"r", "w", "c", "q", "e"} <= prefixes


@pytest.mark.parametrize("payload, expected", [
    ("r:default", (Topic.READY, "default")), ("w:1733.5", (Topic.DUE, "1733.5")),
    ("c:42", (Topic.CANCEL, "42")), ("q:emails", (Topic.QUEUE, "emails")),
    ("e:9", (Topic.EVENTS, "9")), ("e:", (Topic.EVENTS, "")),
    ("x:1", None), ("r", None), ("", None), ("ping", None), (":", None),
])
def test_payloads_decode_to_a_topic_or_nothing(payload, expected):
    assert decode(payload) == expected


def test_encode_is_the_inverse_of_decode():
    for topic in Topic:
        assert decode(encode(topic, "v:1")) == (topic, "v:1")


def test_a_failing_subscriber_never_stops_delivery_to_the_others():
    async def main():
        poller = notifiers.PollNotifier(0.02)
        seen: list[str | None] = []

        def broken(value):
            raise RuntimeError("subscriber bug")

        poller.subscribe(Topic.READY, broken)
        unsubscribe = poller.subscribe(Topic.READY, seen.append)
        poller.dispatch("r:default")
        task = asyncio.ensure_future(poller.run())
        await asyncio.sleep(0.15)
        unsubscribe()
        count = len(seen)
        await asyncio.sleep(0.1)
        task.cancel()
        return seen, count

    seen, count = asyncio.run(main())
    assert seen[0] == "default" and None in seen[1:]
    assert len(seen) == count  # nothing after unsubscribing


@pytest.mark.parametrize("interval", [0, -1, float("nan")])
def test_a_poll_interval_must_be_positive(interval):
    with pytest.raises(ValueError, match="poll interval"):
        notifiers.PollNotifier(interval)


async def _listen_backends(app_prefix: str) -> list[str]:
    from reproq import db

    conn = await db.connect()
    try:
        cur = await conn.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE %s AND pid <> pg_backend_pid()", [app_prefix[:63] + "%"])
        return [r["query"] for r in await cur.fetchall()]
    finally:
        await conn.close()


@pytest.mark.django_db(transaction=True)
def test_poll_only_mode_runs_tasks_with_no_listen_connection():
    run = tasks.add.enqueue(20, 22)

    async def body(rt):
        done = await wait_for(run.id, timeout=10)
        later = await tasks.add.aenqueue(1, 1)  # claimed on a poll tick: no NOTIFY heard
        again = await wait_for(later.id, timeout=10)
        return rt, done, again, await _listen_backends(f"reproq-listen-{rt.worker_id}")

    rt, done, again, backends = run_with_runtime(body, listen=False, poll_interval_seconds=0.2,
                                                 poll_fallback_seconds=300)
    assert (done.return_value, again.return_value) == (42, 2)
    assert rt.status()["notifier"]["kind"] == "poll"
    assert backends == []


@pytest.mark.django_db(transaction=True)
def test_the_runtime_and_the_dashboard_hub_share_one_listen_connection():
    from reproq.asgi import sse

    async def body(rt):
        sse.reset_shutdown()  # a serving period (an earlier test may have ended one)
        hub = sse.get_hub()
        await hub.start()
        from django.http import QueryDict

        sub = hub.subscribe(sse.EventFilter.from_query(QueryDict()), 100)
        try:
            await rt.notifier.wait_connected()
            await asyncio.sleep(0.2)
            # the runtime's LISTEN connection (named after its worker), and any the hub would
            # have opened itself (reproq-sse-<pid>); the loop runs one notifier, the runtime's
            return (await _listen_backends(f"reproq-listen-{rt.worker_id}"),
                    await _listen_backends(f"reproq-sse-{os.getpid()}"),
                    [n.status() for n in notifiers.running()], rt.notifier.status())
        finally:
            hub.unsubscribe(sub)
            await sse.close_hub()

    listen, sse_own, running, runtimes = run_with_runtime(body)
    # the hub has no connection of its own (through PgBouncer: no LISTEN at all, polling)
    assert len(listen) == (1 if expect_listeners() else 0) and sse_own == []
    assert running == [runtimes] and runtimes["subscribers"] == 5  # 4 runtime topics + the hub
