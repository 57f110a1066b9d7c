"""Fuzz: hand-written rows. Rows inserted by SQL into reproq_task_runs with any values
PostgreSQL accepts (args/kwargs/metadata nested ~1,000 deep, numbers like 1e5000, bad `bytes`
markers, odd task paths, limits and timestamps) never leave a stuck run: a real runtime (in
this process, on its own event loop) brings every such row to a final state, and the good
rows inserted in the same statement - claimed in the same batches - succeed. Each example is
one INSERT of a batch of rows; the admin change page and get_result of every row answer too.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from reproq import sql
from tests.fuzz.strategies import batches, json_values, markers, nested, text

FINAL = ("SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED")
QUEUES = ("default", "emails", "reports", "other")  # every queue the test runtime serves
WAIT_SECONDS = 20.0
ROWS_PER_EXAMPLE = 100  # ~1,000 hand-written rows in 10 batches (each batch waits for its runs)
GOOD_PER_EXAMPLE = 5

COLUMNS = ("backend_alias", "task_path", "queue_name", "priority", "status", "sort_key", "args",
           "kwargs", "enqueued_at", "run_after", "attempts", "max_attempts", "timeout_seconds",
           "worker_ids", "errors", "metadata", "lock_key", "concurrency_key",
           "concurrency_limit", "sem_key", "sem_limit", "blocked", "cancel_requested",
           "expires_at", "status_reason", "code_ref", "pip_lock_hash", "receives")
JSONB = {"args", "kwargs", "worker_ids", "errors", "metadata"}
TIMES = {"enqueued_at", "run_after", "expires_at"}

PG_TEXT = text(nul=False, max_size=40)


def json_text(*, container: str = "") -> Any:
    """JSON text as another program might write it into a jsonb column."""
    plain = json_values(nul=False, max_leaves=15)
    if container == "list":
        plain = st.lists(plain, max_size=4)
    elif container == "dict":
        plain = st.dictionaries(PG_TEXT, plain, max_size=4)
    special = st.sampled_from([
        "1e5000", "[1e5000]", '{"a": -1e5000}', "[1e-5000]", "[123456789012345678901234567890]",
        '[{"__reproq__": "bytes", "v": "!!"}]', '[{"__reproq__": "bytes", "v": "YWJj"}]',
        '[{"__reproq__": "martian", "v": 1}]', '{"x": {"__reproq__": "decimal", "v": "x"}}',
        '[{"__reproq__": "model", "v": ["testapp.Account", 10000000]}]',
        '[{"__reproq__": "model", "v": ["nope.Nope", 1]}]',
        '[{"__reproq__": "datetime", "v": "2024-02-30T00:00:00"}]',
        '[{"__reproq__": "timedelta", "v": [1e10, 0, 0]}]', '"text"', "null", "5", "{}", "[]",
        '{"": 1}'])
    deep = st.builds(nested, st.integers(min_value=900, max_value=1100),
                     st.sampled_from(["1", "[]", "1e5000"]), st.sampled_from(["list", "dict"]))
    return st.one_of(plain.map(json.dumps), special, deep,
                     st.lists(markers(nul=False), max_size=3).map(json.dumps))


def timestamp() -> Any:
    return st.one_of(st.sampled_from(["'-infinity'", "now()", "now() - interval '1 hour'",
                                      "'4713-01-01 BC'", "'1970-01-01'"]),
                     st.datetimes().map(lambda d: f"'{d.isoformat()}+00'"))


@st.composite
def hand_row(draw: Any) -> dict[str, Any]:
    """One row as written by hand: every column PostgreSQL accepts, values of any shape.
    (Left out: queues no runtime serves, run_after in the future and retry budgets of
    thousands - they legitimately wait.)"""
    task = draw(st.one_of(
        st.sampled_from(["tests.testapp.tasks.add", "tests.testapp.tasks.echo",
                         "tests.testapp.tasks.async_add", "tests.testapp.tasks.boom",
                         "tests.testapp.tasks.with_context", "tests.testapp.tasks.unstorable",
                         "tests.testapp.tasks.no_such_task", "tests.testapp",
                         "tests.testapp.tasks.Task", "zz_fuzz_missing.tasks.x", "", ".", "..",
                         "tests..testapp", "reproq.payload.encode"]),
        st.from_regex(r"\Azz_fuzz_[a-z]{1,8}(\.[a-z_]{1,8}){0,3}\Z"),
        PG_TEXT.filter(lambda t: "." not in t)))
    # (a limit of 0 holds its runs back by design; PostgreSQL refuses negative ones:
    # reproq_runs_sem_limit_nonnegative, see test_poison_rows)
    sem = draw(st.sampled_from([(None, None), ("c:fuzz", 1), ("c:fuzz", 3), ("l:fuzz", 1)]))
    return {
        "backend_alias": draw(st.one_of(st.just("default"), PG_TEXT.map(lambda t: t[:64]))),
        "task_path": task,
        "queue_name": draw(st.sampled_from(QUEUES)),
        # The table's CHECK constraints: priority -100..100, attempts >= 0,
        # max_attempts >= 1, timeout_seconds >= 1, receives '' / result / results.
        "priority": draw(st.integers(min_value=-100, max_value=100)),
        "status": draw(st.sampled_from(["READY", "READY", "WAITING"])),
        "sort_key": draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        "args": draw(json_text(container="list") | json_text()),
        "kwargs": draw(json_text(container="dict") | json_text()),
        "enqueued_at": draw(timestamp()),
        "run_after": draw(st.sampled_from(["'-infinity'", "now()", "now() - interval '1 day'",
                                           "'1970-01-01'"])),
        "attempts": draw(st.one_of(st.integers(min_value=0, max_value=3),
                                   st.sampled_from([2**31 - 2, 2**31 - 1]))),
        "max_attempts": draw(st.integers(min_value=1, max_value=3)),
        "timeout_seconds": draw(st.sampled_from([900, 5, 1, 2**31 - 1])),
        "worker_ids": draw(json_text()),
        "errors": draw(json_text()),
        "metadata": draw(json_text(container="dict") | json_text()),
        "lock_key": None,
        "concurrency_key": None,
        "concurrency_limit": draw(st.sampled_from([None, 1, 5])),
        "sem_key": sem[0],
        "sem_limit": sem[1],
        "blocked": False,
        "cancel_requested": draw(st.booleans()),
        "expires_at": draw(st.one_of(st.none(), timestamp(), st.just("'infinity'"))),
        "status_reason": draw(PG_TEXT),
        "code_ref": draw(PG_TEXT),
        "pip_lock_hash": draw(PG_TEXT),
        "receives": draw(st.sampled_from(["", "", "result", "results"])),
    }


GOOD = {"backend_alias": "default", "task_path": "tests.testapp.tasks.add",
        "queue_name": "default", "priority": 0, "status": "READY", "sort_key": 0,
        "args": "[1, 2]", "kwargs": "{}", "enqueued_at": "now()", "run_after": "now()",
        "attempts": 0, "max_attempts": 1, "timeout_seconds": 900, "worker_ids": "[]",
        "errors": "[]", "metadata": "{}", "lock_key": None, "concurrency_key": None,
        "concurrency_limit": None, "sem_key": None, "sem_limit": None, "blocked": False,
        "cancel_requested": False, "expires_at": None, "status_reason": "", "code_ref": "",
        "pip_lock_hash": "", "receives": ""}


def insert(rows: list[dict[str, Any]]) -> list[int]:
    """All rows in one INSERT (timestamps are SQL expressions), then one NOTIFY per queue."""
    values: list[str] = []
    params: list[Any] = []
    for row in rows:
        parts = []
        for col in COLUMNS:
            value = row[col]
            if col in TIMES:
                parts.append("NULL" if value is None else value)
            elif col in JSONB:
                parts.append("%s::jsonb")
                params.append(value)
            else:
                parts.append("%s")
                params.append(value)
        values.append("(" + ", ".join(parts) + ")")
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO reproq_task_runs ({', '.join(COLUMNS)}) VALUES "
                       + ", ".join(values) + " RETURNING id", params)
        ids = [int(r[0]) for r in cursor.fetchall()]
        for queue in QUEUES:
            cursor.execute("SELECT pg_notify(%s, %s)", [sql.CHANNEL, f"r:{queue}"])
    return ids


def states(ids: list[int]) -> dict[int, tuple[str, Any, str]]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, status, return_value::text, status_reason "
                       "FROM reproq_task_runs WHERE id = ANY(%s)", [ids])
        return {int(i): (s, rv, reason) for i, s, rv, reason in cursor.fetchall()}


def wait_final(ids: list[int], timeout: float) -> dict[int, tuple[str, Any, str]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = states(ids)
        if all(s[0] in FINAL for s in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def python_can_load(text_value: str) -> str:
    try:
        json.loads(text_value)
    except Exception as exc:
        return f"json.loads fails: {type(exc).__name__}"
    return "loads"


@pytest.fixture
def runtime() -> Iterator[None]:
    """The runtime on an event loop of its own thread, while hypothesis runs in this one."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    from reproq import db
    from reproq.runtime import host

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-runtime", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(
        host.start("test", overrides={"beat": False, "lease_seconds": 3,
                                      "heartbeat_seconds": 0.5, "reclaim_seconds": 0.5}),
        loop).result(30)
    try:
        yield
    finally:
        async def stop() -> None:
            await host.stop()
            await db.close_pools()
            host.reset_for_tests()
            await sync_to_async(connections.close_all)()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.django_db(transaction=True)
# A failing batch waits WAIT_SECONDS: no shrinking (the message names the rows at fault).
@settings(max_examples=batches(ROWS_PER_EXAMPLE),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(st.lists(hand_row(), min_size=1, max_size=2 * ROWS_PER_EXAMPLE), st.randoms())
def test_hand_written_rows_never_leave_a_stuck_run_and_good_neighbours_succeed(runtime, rows,
                                                                              rnd):
    good = [dict(GOOD, queue_name=q) for q in rnd.choices(QUEUES, k=GOOD_PER_EXAMPLE)]
    batch = rows + good
    rnd.shuffle(batch)
    ids = insert(batch)
    try:
        seen = wait_final(ids, WAIT_SECONDS)
        by_id = dict(zip(ids, batch, strict=True))
        stuck = {i: seen[i] for i in ids if seen[i][0] not in FINAL}
        good_ids = [i for i, row in by_id.items() if any(row is g for g in good)]
        bad_good = {i: seen[i] for i in good_ids if seen[i][:2] != ("SUCCESSFUL", "3")}
        if stuck or bad_good:
            culprits = [
                {"id": i, "state": seen[i][:1] + seen[i][2:],
                 **{k: (v[:120] + "..." if isinstance(v, str) and len(v) > 120 else v)
                    for k, v in by_id[i].items() if v != GOOD.get(k)},
                 "args": python_can_load(by_id[i]["args"]),
                 "kwargs": python_can_load(by_id[i]["kwargs"]),
                 "metadata": python_can_load(by_id[i]["metadata"])}
                for i in ids if i not in good_ids]
            pytest.fail(f"{len(stuck)} of {len(ids)} runs not final after {WAIT_SECONDS}s, "
                        f"{len(bad_good)} of {len(good_ids)} good runs did not succeed "
                        f"({sorted(set(s[0] for s in bad_good.values()))}, e.g. "
                        f"{next(iter(bad_good.values()), None)}); the hand-written rows: "
                        + json.dumps(culprits, default=str)[:6000])
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM reproq_task_runs WHERE id = ANY(%s)", [ids])


@pytest.mark.django_db
@settings(max_examples=batches(ROWS_PER_EXAMPLE))
@given(st.lists(hand_row(), min_size=1, max_size=2 * ROWS_PER_EXAMPLE))
def test_every_hand_written_row_shows_in_the_admin_and_in_get_result(rows):
    """The admin change page and get_result of any row answer (no 500, no exception)."""
    from django.db import transaction
    from django.tasks import default_task_backend

    from tests.dashboard_helpers import staff_user

    with transaction.atomic():
        ids = insert(rows)
        client = Client()
        client.force_login(staff_user())
        for run_id in ids:
            response = client.get(f"/admin/reproq/taskrun/{run_id}/change/")
            assert response.status_code == 200, (run_id, response.status_code)
            default_task_backend.get_result(str(run_id))
        transaction.set_rollback(True)
