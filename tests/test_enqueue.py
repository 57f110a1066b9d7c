"""The enqueue side of ReproqBackend against a real PostgreSQL: enqueue, bulk_enqueue, dedup,
NOTIFY, reserved keyword arguments, signals, aenqueue and get_result / aget_result."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.db.models import JSONField, Value
from django.tasks import TaskResultStatus, task, task_backends
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
from django.tasks.signals import task_enqueued
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reproq import db as reproq_db
from reproq import payload
from reproq.backend import MAX_BATCH, PIPELINE_CHUNK
from reproq.exceptions import InvalidEnqueue
from reproq.models import TaskRun
from reproq.payload import PayloadError
from reproq.results import ReproqTaskResult
from reproq.states import RawStatus
from tests.testapp import tasks
from tests.testapp.models import Account, Document

WHEN = dt.datetime(2024, 5, 17, 9, 30, 0, 250000, tzinfo=dt.UTC)



def move_to(pk, status, **fields):
    """Put a run in `status` by hand along allowed transitions (final states are final)."""
    qs = TaskRun.objects.filter(pk=pk)
    if status in {"SUCCESSFUL", "FAILED", "CANCELLED"}:
        qs.update(status="RUNNING")
    qs.update(status=status, **fields)

def backend():
    return task_backends["default"]


def tasks_setting(**options):
    """settings.TASKS with extra OPTIONS for the default backend."""
    base = settings.TASKS["default"]
    return {"default": {**base, "OPTIONS": {**base.get("OPTIONS", {}), **options}}}


def row_count():
    return TaskRun.objects.count()


@pytest.fixture
def no_prepared_statements():
    with override_settings(TASKS=tasks_setting(PREPARED_STATEMENTS=False)):
        yield


# --------------------------------------------------------------------------- listener helpers


@pytest.fixture
def listener():
    """A separate autocommit connection to the test database, LISTENing on reproq."""
    conn = psycopg.connect(reproq_db.conninfo("default"), autocommit=True)
    conn.execute("LISTEN reproq")
    try:
        yield conn
    finally:
        conn.close()


def received(conn, timeout=0.25, stop_after=None):
    """Notification payloads that arrive within `timeout` seconds."""
    return [n.payload for n in conn.notifies(timeout=timeout, stop_after=stop_after)]


# --------------------------------------------------------------------------- basics


@pytest.mark.django_db
def test_enqueue_returns_ready_result_with_string_id():
    result = tasks.add.enqueue(2, 3)
    assert isinstance(result, ReproqTaskResult)
    assert isinstance(result.id, str)
    assert result.id.isdigit()
    assert result.status == TaskResultStatus.READY
    assert result.raw_status == RawStatus.READY == "READY"
    assert result.backend == "default"
    assert result.args == [2, 3]
    assert result.kwargs == {}
    assert result.errors == []
    assert result.worker_ids == []
    assert result.started_at is None and result.finished_at is None
    assert timezone.is_aware(result.enqueued_at)
    assert result.task.module_path == "tests.testapp.tasks.add"
    assert result.queue_name == "default"
    assert not result.is_finished
    with pytest.raises(ValueError, match="not finished"):
        _ = result.return_value

    row = TaskRun.objects.get(pk=int(result.id))
    assert row.status == "READY"
    assert row.task_path == "tests.testapp.tasks.add"
    assert row.queue_name == "default"
    assert row.backend_alias == "default"
    assert row.priority == 0
    assert row.args == [2, 3]
    assert row.kwargs == {}
    assert row.attempts == 0
    assert row.max_attempts == 3  # TASKS OPTIONS in tests/settings.py
    assert row.timeout_seconds == 900
    assert row.enqueued_at == result.enqueued_at
    assert row.run_after == row.enqueued_at
    assert row.expires_at is None
    assert row.spec_hash and len(row.spec_hash) == 64
    assert row.lock_key is None and row.concurrency_key is None


@pytest.mark.django_db
def test_result_keeps_rich_argument_types():
    uid = uuid.uuid4()
    result = tasks.echo.enqueue(Decimal("1.50"), (1, 2), when=WHEN, ids={uid})
    assert result.args == [Decimal("1.50"), (1, 2)]
    assert type(result.args[1]) is tuple
    assert result.kwargs == {"when": WHEN, "ids": {uid}}
    fetched = tasks.echo.get_result(result.id)
    assert fetched.args == [Decimal("1.50"), (1, 2)]
    assert type(fetched.args[1]) is tuple
    assert fetched.kwargs == {"when": WHEN, "ids": {uid}}


@pytest.mark.django_db
def test_floats_keep_their_type_through_the_database():
    values = (1e16, -2.5e20, 0.1, 1e-7, 3.0, 10**20)
    result = tasks.echo.enqueue(*values)
    fetched = tasks.echo.get_result(result.id)
    assert fetched.args == list(values)
    assert [type(v) for v in fetched.args] == [float] * 5 + [int]


@pytest.mark.django_db
def test_enqueue_model_instances_and_read_them_back():
    account = Account.objects.create(name="acme")
    doc = Document.objects.create(title="t")
    result = tasks.echo.enqueue(account, doc=doc)
    row = TaskRun.objects.get(pk=result.id)
    assert row.args == [{"__reproq__": "model", "v": ["testapp.Account", account.pk]}]
    fetched = tasks.echo.get_result(result.id)
    assert fetched.args == [account]
    assert isinstance(fetched.kwargs["doc"], Document)
    assert fetched.kwargs["doc"].title == "t"


@pytest.mark.django_db
def test_queue_priority_and_task_options_are_stored():
    email = tasks.send_email.enqueue("a@example.com", subject="hi")
    row = TaskRun.objects.get(pk=email.id)
    assert (row.queue_name, row.priority) == ("emails", 5)
    assert email.queue_name == "emails"

    custom = tasks.add.using(queue_name="reports", priority=-3, max_attempts=7,
                             timeout_seconds=12, expires_in=timedelta(minutes=5))
    result = custom.enqueue(1, 1)
    row = TaskRun.objects.get(pk=result.id)
    assert (row.queue_name, row.priority) == ("reports", -3)
    assert (row.max_attempts, row.timeout_seconds) == (7, 12)
    assert row.expires_at == row.run_after + timedelta(minutes=5)
    assert result.task.priority == -3


@pytest.mark.django_db
def test_expires_in_option_counts_from_the_due_time():
    with override_settings(TASKS=tasks_setting(EXPIRES_IN=timedelta(hours=1))):
        result = tasks.add.enqueue(1, 2, run_after=timedelta(minutes=10))
    row = TaskRun.objects.get(pk=result.id)
    assert row.run_after == row.enqueued_at + timedelta(minutes=10)
    assert row.expires_at == row.run_after + timedelta(hours=1)


@pytest.mark.django_db
def test_get_result_round_trip_and_refresh():
    result = tasks.add.enqueue(4, 5)
    fetched = tasks.add.get_result(result.id)
    assert fetched.id == result.id
    assert fetched.args == [4, 5]
    assert fetched.status == TaskResultStatus.READY
    assert fetched.task.func is tasks.add.func
    assert fetched.enqueued_at == result.enqueued_at
    assert backend().get_result(int(result.id)).id == result.id

    move_to(result.id, "SUCCESSFUL", return_value=9, finished_at=timezone.now(),
        started_at=timezone.now(), worker_ids=["w1"])
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.raw_status == "SUCCESSFUL"
    assert result.return_value == 9
    assert result.worker_ids == ["w1"]
    assert result.is_finished


# --------------------------------------------------------------------------- statement counts


@pytest.mark.django_db
def test_enqueue_is_exactly_one_statement():
    tasks.add.enqueue(0, 0)  # warm up (connection, imports)
    with CaptureQueriesContext(connection) as ctx:
        tasks.add.enqueue(1, 2)
    assert len(ctx.captured_queries) == 1, ctx.captured_queries
    with CaptureQueriesContext(connection) as ctx:
        tasks.echo.enqueue(1, run_after=timedelta(seconds=30), priority=9,
                           concurrency_key="c", concurrency_limit=1)
    assert len(ctx.captured_queries) == 1


def _persistence(cursor, relation):
    cursor.execute("SELECT relpersistence FROM pg_class WHERE oid = %s::regclass", [relation])
    return cursor.fetchone()[0]


@pytest.mark.django_db
def test_dashboard_events_skip_the_wal_but_their_ids_survive_a_crash():
    """reproq_events is UNLOGGED (an enqueue writes a row to it); its id sequence is logged, so
    event ids keep growing after crash recovery empties the table."""
    with connection.cursor() as cur:
        assert _persistence(cur, "reproq_events") == "u"
        cur.execute("SELECT pg_get_serial_sequence('reproq_events', 'id')")
        assert _persistence(cur, cur.fetchone()[0]) == "p"
        assert _persistence(cur, "reproq_task_runs") == "p"


@pytest.mark.django_db(transaction=True)
def test_enqueue_names_the_run_id_sequence_and_the_migration_restores_its_name():
    """ENQUEUE draws ids from reproq_task_runs_id_seq by name; a database whose sequence was
    renamed by hand gets the name back from migration 0004, and enqueue works again."""
    import importlib

    fast_path = importlib.import_module("reproq.migrations.0004_enqueue_fast_path")
    with connection.cursor() as cur:
        cur.execute("ALTER SEQUENCE reproq_task_runs_id_seq RENAME TO reproq_renamed_by_hand")
    try:
        with pytest.raises(Exception, match="reproq_task_runs_id_seq"):
            tasks.add.enqueue(1, 2)
        assert row_count() == 0
    finally:
        with connection.cursor() as cur:
            cur.execute(fast_path.FORWARD)
            cur.execute("SELECT pg_get_serial_sequence('reproq_task_runs', 'id')")
            assert cur.fetchone()[0].endswith(".reproq_task_runs_id_seq")
    result = tasks.add.enqueue(1, 2)
    assert TaskRun.objects.get(pk=int(result.id)).status == "READY"


@pytest.mark.django_db(transaction=True)
def test_enqueue_inside_atomic_is_one_statement():
    with transaction.atomic(), CaptureQueriesContext(connection) as ctx:
        tasks.add.enqueue(1, 2)
    assert len(ctx.captured_queries) == 1


def enqueue_statements(ctx: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries
            if "INSERT INTO reproq_task_runs" in (q["sql"] or "")]


def other_statements(ctx: CaptureQueriesContext) -> list[str]:
    """Captured statements that are neither ENQUEUE nor transaction control."""
    # Django 6.0 logs some transaction control with sql None
    return [q["sql"] for q in ctx.captured_queries if q["sql"]
            and "INSERT INTO reproq_task_runs" not in q["sql"]
            and not q["sql"].upper().startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "BEGIN",
                                                   "COMMIT"))]


@pytest.mark.django_db
def test_bulk_enqueue_up_to_the_pipeline_chunk_is_one_statement():
    calls = [(tasks.echo, (i,), {"n": i}) for i in range(PIPELINE_CHUNK)]
    with CaptureQueriesContext(connection) as ctx:
        results = backend().bulk_enqueue(calls)
    assert len(ctx.captured_queries) == 1
    assert [r.args for r in results] == [[i] for i in range(PIPELINE_CHUNK)]


@pytest.mark.django_db
def test_bulk_enqueue_of_ten_thousand_is_pipelined_in_input_order():
    calls = [(tasks.echo, (i,), {"n": i}) for i in range(MAX_BATCH)]
    with CaptureQueriesContext(connection) as ctx:
        results = backend().bulk_enqueue(calls)
    # one statement per chunk, sent back to back without waiting (pipeline), in a savepoint
    assert len(enqueue_statements(ctx)) == MAX_BATCH // PIPELINE_CHUNK
    assert other_statements(ctx) == []
    assert len(results) == MAX_BATCH
    assert [r.args for r in results] == [[i] for i in range(MAX_BATCH)]
    assert len({r.id for r in results}) == MAX_BATCH
    stored = dict(TaskRun.objects.values_list("id", "args"))
    assert len(stored) == MAX_BATCH
    for i, result in enumerate(results):
        assert stored[int(result.id)] == [i]
        assert result.raw_status == "READY"


@pytest.mark.django_db
def test_bulk_enqueue_resolves_duplicates_across_pipelined_chunks():
    calls = [(tasks.echo, (i,), {}) for i in range(PIPELINE_CHUNK + 1)]
    calls.append((tasks.echo, (0,), {}))  # a duplicate of the first chunk, in the second
    with CaptureQueriesContext(connection) as ctx:
        results = backend().bulk_enqueue(calls)
    assert len(enqueue_statements(ctx)) == 2
    assert len(other_statements(ctx)) == 1  # the look-up of the cross-chunk duplicate
    assert [r.args for r in results[-3:]] == [[PIPELINE_CHUNK - 1], [PIPELINE_CHUNK], [0]]
    assert results[-1].id == results[0].id
    assert row_count() == PIPELINE_CHUNK + 1


@pytest.mark.django_db
@pytest.mark.usefixtures("no_prepared_statements")
def test_bulk_enqueue_without_prepared_statements_is_one_statement_per_batch():
    calls = [(tasks.echo, (i,), {}) for i in range(MAX_BATCH + 1)]
    calls.append((tasks.echo, (0,), {}))  # a duplicate of the first batch, in the second
    with CaptureQueriesContext(connection) as ctx:
        results = backend().bulk_enqueue(calls)
    # first batch, second batch, and the look-up of the cross-batch duplicate
    assert len(ctx.captured_queries) == 3
    assert [r.args for r in results[-3:]] == [[MAX_BATCH - 1], [MAX_BATCH], [0]]
    assert results[-1].id == results[0].id
    assert row_count() == MAX_BATCH + 1


@pytest.mark.django_db(transaction=True)
def test_bad_call_in_a_later_pipelined_chunk_writes_nothing():
    calls = [(tasks.add, (i, i), {}) for i in range(3 * PIPELINE_CHUNK)]
    calls.insert(2 * PIPELINE_CHUNK + 5, (tasks.echo, (object(),), {}))
    with pytest.raises(PayloadError, match=r"args\[0\]"):
        backend().bulk_enqueue(calls)
    assert row_count() == 0
    assert backend().bulk_enqueue(calls[:10])[0].args == [0, 0]  # the connection still works


@pytest.mark.django_db
def test_async_and_context_tasks_can_be_enqueued():
    result = tasks.async_add.enqueue(1, 2)
    assert result.raw_status == "READY"
    assert TaskRun.objects.get(pk=result.id).task_path == "tests.testapp.tasks.async_add"
    ctx = tasks.with_context.enqueue("v")
    assert ctx.args == ["v"]
    assert tasks.with_context.get_result(ctx.id).args == ["v"]


@pytest.mark.django_db
def test_bulk_enqueue_mixes_tasks_queues_and_deferral():
    results = backend().bulk_enqueue([
        (tasks.add, (1, 2), {}),
        (tasks.send_email, ("x@example.com",), {}),
        (tasks.echo, (), {"run_after": timedelta(hours=1), "priority": 50}),
    ])
    assert [r.raw_status for r in results] == ["READY", "READY", "WAITING"]
    assert [r.queue_name for r in results] == ["default", "emails", "default"]
    rows = {r.id: r for r in TaskRun.objects.all()}
    assert rows[int(results[1].id)].task_path == "tests.testapp.tasks.send_email"
    assert rows[int(results[2].id)].priority == 50
    assert results[2].task.priority == 50
    assert results[2].task.run_after == rows[int(results[2].id)].run_after


@pytest.mark.django_db
def test_bulk_enqueue_of_nothing_is_no_statement():
    with CaptureQueriesContext(connection) as ctx:
        assert backend().bulk_enqueue([]) == []
    assert len(ctx.captured_queries) == 0


@pytest.mark.django_db
def test_bulk_enqueue_with_duplicates_inside_the_batch():
    calls = [
        (tasks.add, (1, 2), {}),
        (tasks.add, (3, 4), {}),
        (tasks.add, (1, 2), {}),
        (tasks.add, (1, 2), {}),
        (tasks.add, (3, 4), {}),
    ]
    with CaptureQueriesContext(connection) as ctx:
        results = backend().bulk_enqueue(calls)
    assert len(ctx.captured_queries) == 1  # in-batch duplicates need no second look-up
    ids = [r.id for r in results]
    assert ids[0] == ids[2] == ids[3]
    assert ids[1] == ids[4]
    assert ids[0] != ids[1]
    assert row_count() == 2


@pytest.mark.django_db
def test_bulk_enqueue_with_existing_and_in_batch_duplicates():
    first = tasks.add.enqueue(1, 2)
    results = backend().bulk_enqueue(
        [(tasks.add, (1, 2), {}), (tasks.add, (5, 6), {}), (tasks.add, (1, 2), {})])
    assert [results[0].id, results[2].id] == [first.id, first.id]
    assert results[0].args == [1, 2]
    assert results[1].id != first.id
    assert row_count() == 2


# --------------------------------------------------------------------------- dedup


@pytest.mark.django_db
def test_same_spec_twice_gives_the_same_id():
    with CaptureQueriesContext(connection) as ctx:
        first = tasks.add.enqueue(1, 2)
    assert len(ctx.captured_queries) == 1
    with CaptureQueriesContext(connection) as ctx:
        second = tasks.add.enqueue(1, 2)
    assert len(ctx.captured_queries) == 2  # the dedup hit reads the active run
    assert second.id == first.id
    assert second.status == TaskResultStatus.READY
    assert second.args == [1, 2]
    assert second.enqueued_at == first.enqueued_at
    assert row_count() == 1


@pytest.mark.django_db
def test_dedup_key_includes_args_kwargs_task_and_queue():
    ids = {
        tasks.echo.enqueue(1).id,
        tasks.echo.enqueue(2).id,
        tasks.echo.enqueue(1, x=1).id,
        tasks.echo.enqueue(x=1).id,
        tasks.echo.using(queue_name="emails").enqueue(1).id,
        tasks.add.enqueue(1, 0).id,
    }
    assert len(ids) == 6
    assert tasks.echo.enqueue(1, x=1).id in ids
    assert row_count() == 6


@pytest.mark.django_db
def test_dedup_hit_returns_the_deferred_run():
    first = tasks.add.enqueue(1, 2, run_after=timedelta(hours=1))
    second = tasks.add.enqueue(1, 2)
    assert second.id == first.id
    assert second.raw_status == "WAITING"
    assert second.status == TaskResultStatus.READY


@pytest.mark.django_db
def test_dedup_can_be_switched_off_in_options():
    with override_settings(TASKS=tasks_setting(DEDUP_ACTIVE=False)):
        first = tasks.add.enqueue(1, 2)
        second = tasks.add.enqueue(1, 2)
    assert first.id != second.id
    assert row_count() == 2
    assert set(TaskRun.objects.values_list("spec_hash", flat=True)) == {None}


@pytest.mark.django_db
def test_dedup_can_be_switched_per_task():
    plain = tasks.add.using(dedup=False)
    assert plain.enqueue(1, 2).id != plain.enqueue(1, 2).id
    with override_settings(TASKS=tasks_setting(DEDUP_ACTIVE=False)):
        deduped = tasks.add.using(dedup=True)
        assert deduped.enqueue(7, 7).id == deduped.enqueue(7, 7).id


@pytest.mark.django_db
@pytest.mark.parametrize("final", ["SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"])
def test_dedup_applies_only_while_active(final):
    first = tasks.add.enqueue(1, 2)
    move_to(first.id, final, finished_at=timezone.now())
    second = tasks.add.enqueue(1, 2)
    assert second.id != first.id
    assert second.raw_status == "READY"
    assert row_count() == 2
    # and the new run is active, so it dedups again
    assert tasks.add.enqueue(1, 2).id == second.id


@pytest.mark.django_db
def test_dedup_applies_while_running():
    first = tasks.add.enqueue(1, 2)
    TaskRun.objects.filter(pk=first.id).update(status="RUNNING", started_at=timezone.now())
    again = tasks.add.enqueue(1, 2)
    assert again.id == first.id
    assert again.raw_status == "RUNNING"
    assert again.status == TaskResultStatus.RUNNING


@pytest.mark.django_db(transaction=True)
def test_dedup_inside_atomic_and_rollback():
    with transaction.atomic():
        first = tasks.add.enqueue(1, 2)
        second = tasks.add.enqueue(1, 2)
        assert first.id == second.id
        assert row_count() == 1
    assert row_count() == 1

    TaskRun.objects.all().delete()
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.add.enqueue(3, 4)
        tasks.add.enqueue(3, 4)
        raise RuntimeError("roll back")
    assert row_count() == 0
    # nothing is left behind that would block the spec
    after = tasks.add.enqueue(3, 4)
    assert TaskRun.objects.get().pk == int(after.id)


@pytest.mark.django_db(transaction=True)
def test_dedup_under_concurrent_enqueuers():
    workers = 16
    barrier = threading.Barrier(workers)
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def enqueue():
        try:
            connection.ensure_connection()
            barrier.wait(timeout=10)
            result = tasks.add.enqueue(100, 200)
            with lock:
                ids.append(result.id)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=enqueue) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert len(ids) == workers
    assert len(set(ids)) == 1
    assert row_count() == 1
    assert TaskRun.objects.get().pk == int(ids[0])


# --------------------------------------------------------------------------- NOTIFY


@pytest.mark.django_db(transaction=True)
def test_notify_is_sent_on_commit_only(listener):
    with transaction.atomic():
        tasks.add.enqueue(1, 2)
        assert received(listener) == []
    assert received(listener, timeout=2, stop_after=1) == ["r:default"]
    assert received(listener) == []


@pytest.mark.django_db(transaction=True)
def test_autocommit_enqueue_notifies_at_once(listener):
    tasks.send_email.enqueue("a@example.com")
    assert received(listener, timeout=2, stop_after=1) == ["r:emails"]


@pytest.mark.django_db(transaction=True)
def test_one_task_statement_writes_what_the_batch_statement_writes(listener):
    """`enqueue` of one task sends ENQUEUE_ONE (scalar parameters), `bulk_enqueue` of several
    sends ENQUEUE (arrays): the same run row, dashboard event and NOTIFY for the same call."""
    from reproq.models import Event

    later = timezone.now().replace(microsecond=123456) + timedelta(hours=1)
    configured = tasks.echo.using(max_attempts=5, timeout_seconds=9, queue_name="reports",
                                  expires_in=timedelta(minutes=5), dedup=False)
    cases = [
        (tasks.add, {}),
        (tasks.echo, {"n": 1, "priority": 7}),
        (tasks.echo, {"run_after": later}),
        (tasks.echo, {"run_after": timedelta(seconds=30)}),
        (tasks.echo, {"lock_key": "k1"}),
        (tasks.echo, {"concurrency_key": "ck", "concurrency_limit": 2}),
        (configured, {"run_after": later}),
    ]
    timed = {"id", "args", "spec_hash", "enqueued_at"}
    relative = timed | {"run_after", "sort_key", "expires_at"}
    cols = [f.column for f in TaskRun._meta.concrete_fields]
    filler = tasks.add.using(queue_name="other")
    for i, (case, options) in enumerate(cases):
        with CaptureQueriesContext(connection) as ctx:
            one = backend().enqueue(case, (f"one-{i}",), dict(options))
        assert [q for q in ctx.captured_queries if "SELECT 0 AS ord, %(args_1)s" in q["sql"]]
        heard_one = received(listener, timeout=2, stop_after=1)
        many = backend().bulk_enqueue([(case, (f"many-{i}",), dict(options)),
                                       (filler, (i, i), {})])[0]
        heard_many = [p for p in received(listener, timeout=2, stop_after=2) if p != "r:other"]
        a = TaskRun.objects.filter(pk=int(one.id)).values(*cols).get()
        b = TaskRun.objects.filter(pk=int(many.id)).values(*cols).get()
        ignore = timed if isinstance(options.get("run_after"), dt.datetime) else relative
        assert {c: a[c] for c in cols if c not in ignore} == {
            c: b[c] for c in cols if c not in ignore}, (options, a, b)
        assert (one.args, one.kwargs, one.status, one.task.priority) == (
            [f"one-{i}"], many.kwargs, many.status, many.task.priority)
        ev_one = Event.objects.get(run_id=int(one.id))
        ev_many = Event.objects.get(run_id=int(many.id))
        assert (ev_one.kind, ev_one.task_path, ev_one.queue_name, ev_one.data) == (
            ev_many.kind, ev_many.task_path, ev_many.queue_name,
            {"count": 1, "run_ids": [int(one.id)]}) and ev_many.data["count"] == 1
        if a["status"] == "READY":
            assert heard_one == heard_many == [f"r:{a['queue_name']}"]
        elif isinstance(options.get("run_after"), dt.datetime):
            assert heard_one == heard_many and heard_one[0].startswith("w:")
        else:
            assert heard_one[0].startswith("w:") and heard_many[0].startswith("w:")


@pytest.mark.django_db(transaction=True)
def test_rolled_back_enqueue_sends_no_notify(listener):
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.add.enqueue(1, 2)
        raise RuntimeError
    assert received(listener, timeout=0.5) == []
    assert row_count() == 0


@pytest.mark.django_db(transaction=True)
def test_deferred_enqueue_is_waiting_and_sends_its_due_time(listener):
    result = tasks.add.enqueue(1, 2, run_after=timedelta(seconds=60))
    assert result.raw_status == "WAITING"
    assert result.status == TaskResultStatus.READY
    row = TaskRun.objects.get(pk=result.id)
    assert row.status == "WAITING"
    assert row.run_after == row.enqueued_at + timedelta(seconds=60)
    assert result.task.run_after == row.run_after
    notes = received(listener, timeout=2, stop_after=1)
    assert len(notes) == 1
    kind, _, epoch = notes[0].partition(":")
    assert kind == "w"
    assert abs(float(epoch) - row.run_after.timestamp()) < 0.001
    assert received(listener) == []


@pytest.mark.django_db(transaction=True)
def test_bulk_enqueue_notifies_once_per_queue(listener):
    calls = [(tasks.echo, (i,), {}) for i in range(200)]
    calls += [(tasks.send_email, (f"u{i}@example.com",), {}) for i in range(200)]
    calls += [(tasks.echo, (-i,), {"run_after": timedelta(minutes=i)}) for i in range(1, 6)]
    backend().bulk_enqueue(calls)
    notes = received(listener, timeout=0.5)
    assert sorted(n for n in notes if n.startswith("r:")) == ["r:default", "r:emails"]
    waits = [n for n in notes if n.startswith("w:")]
    assert len(waits) == 1  # only the earliest due time
    assert len(notes) == 3


@pytest.mark.django_db(transaction=True)
def test_dedup_hit_sends_no_notify(listener):
    tasks.add.enqueue(1, 2)
    assert received(listener, timeout=2, stop_after=1) == ["r:default"]
    tasks.add.enqueue(1, 2)
    assert received(listener, timeout=0.3) == []


# --------------------------------------------------------------------------- reserved kwargs


@pytest.mark.django_db
def test_reserved_kwargs_are_stored_in_columns_and_removed_from_kwargs():
    when = timezone.now() + timedelta(hours=2)
    result = tasks.echo.enqueue(1, run_after=when, priority=7,
                                concurrency_key="conc:1", concurrency_limit=3, other="x")
    locked = tasks.echo.enqueue(2, lock_key="lock:1")
    row = TaskRun.objects.get(pk=result.id)
    assert row.run_after == when
    assert row.status == "WAITING"
    assert row.priority == 7
    assert row.concurrency_key == "conc:1"
    assert row.concurrency_limit == 3
    assert (row.sem_key, row.sem_limit) == ("c:conc:1", 3)
    locked_row = TaskRun.objects.get(pk=locked.id)
    assert locked_row.lock_key == "lock:1"
    assert (locked_row.sem_key, locked_row.sem_limit) == ("l:lock:1", 1)
    assert row.args == [1]
    assert row.kwargs == {"other": "x"}
    assert result.kwargs == {"other": "x"}
    assert result.task.priority == 7
    assert result.task.run_after == when
    assert result.raw_status == "WAITING"
    fetched = tasks.echo.get_result(result.id)
    assert fetched.kwargs == {"other": "x"}
    assert fetched.task.priority == 7
    assert fetched.task.run_after == when


@pytest.mark.django_db
def test_reserved_kwargs_do_not_change_the_dedup_key():
    first = tasks.echo.enqueue(1, other="x")
    second = tasks.echo.enqueue(1, other="x", priority=9, lock_key="l")
    assert second.id == first.id


@pytest.mark.django_db
def test_run_after_in_the_past_or_none_is_ready():
    past = tasks.add.enqueue(1, 1, run_after=timezone.now() - timedelta(hours=1))
    assert past.raw_status == "READY"
    zero = tasks.add.enqueue(2, 2, run_after=timedelta(0))
    assert zero.raw_status == "READY"
    negative = tasks.add.enqueue(3, 3, run_after=timedelta(seconds=-30))
    assert negative.raw_status == "READY"
    none = tasks.add.enqueue(4, 4, run_after=None)
    assert none.raw_status == "READY"


@pytest.mark.django_db
def test_run_after_from_using():
    deferred = tasks.add.using(run_after=timedelta(minutes=5)).enqueue(1, 2)
    assert deferred.raw_status == "WAITING"
    row = TaskRun.objects.get(pk=deferred.id)
    assert row.run_after == deferred.task.run_after
    later = timezone.now() + timedelta(days=1)
    at = tasks.add.using(run_after=later).enqueue(2, 3)
    assert TaskRun.objects.get(pk=at.id).run_after == later
    # an enqueue-time run_after wins over the task's
    sooner = tasks.add.using(run_after=later).enqueue(3, 4, run_after=None)
    assert sooner.raw_status == "READY"


@pytest.mark.django_db
def test_priority_reserved_kwarg_bounds_are_accepted():
    assert TaskRun.objects.get(pk=tasks.add.enqueue(1, 1, priority=100).id).priority == 100
    assert TaskRun.objects.get(pk=tasks.add.enqueue(2, 2, priority=-100).id).priority == -100


@pytest.mark.django_db
def test_callable_concurrency_key_gets_the_task_arguments():
    seen = []

    def key(*args, **kwargs):
        seen.append((args, kwargs))
        return f"user:{args[0]}:{kwargs['mode']}"

    result = tasks.echo.enqueue(42, mode="fast", concurrency_key=key, concurrency_limit=1)
    row = TaskRun.objects.get(pk=result.id)
    assert (row.concurrency_key, row.concurrency_limit) == ("user:42:fast", 1)
    assert seen == [((42,), {"mode": "fast"})]
    assert row.kwargs == {"mode": "fast"}


@pytest.mark.django_db
def test_concurrency_limit_zero_is_allowed():
    result = tasks.echo.enqueue(1, concurrency_key="paused", concurrency_limit=0)
    assert TaskRun.objects.get(pk=result.id).concurrency_limit == 0


@pytest.mark.django_db
def test_limits_concurrency_rule_is_stored_on_the_row():
    above = tasks.sync_account.enqueue(42)
    row = TaskRun.objects.get(pk=above.id)
    assert (row.concurrency_key, row.concurrency_limit) == ("account:42", 2)

    by_kw = tasks.sync_account.enqueue(account_id=7, full=True)
    row = TaskRun.objects.get(pk=by_kw.id)
    assert (row.concurrency_key, row.concurrency_limit) == ("account:7", 2)

    below = tasks.build_report.enqueue("weekly")
    row = TaskRun.objects.get(pk=below.id)
    assert (row.concurrency_key, row.concurrency_limit) == ("reports", 1)

    # a per-call key and limit win over the rule
    override = tasks.sync_account.enqueue(9, concurrency_key="special", concurrency_limit=5)
    row = TaskRun.objects.get(pk=override.id)
    assert (row.concurrency_key, row.concurrency_limit) == ("special", 5)

    # tasks without a rule store nothing
    row = TaskRun.objects.get(pk=tasks.add.enqueue(1, 2).id)
    assert (row.concurrency_key, row.concurrency_limit) == (None, None)


@pytest.mark.django_db
def test_limits_concurrency_key_that_fails_is_a_clear_error():
    with pytest.raises(InvalidEnqueue, match="limits_concurrency key"):
        tasks.sync_account.enqueue()  # the key lambda needs account_id
    assert row_count() == 0


# --------------------------------------------------------------------------- signal


@pytest.mark.django_db
def test_task_enqueued_signal_fires_once_per_new_row():
    seen: list[ReproqTaskResult] = []

    def receiver(sender, task_result, **kwargs):
        seen.append(task_result)

    task_enqueued.connect(receiver)
    try:
        first = tasks.add.enqueue(1, 2)
        assert [r.id for r in seen] == [first.id]
        tasks.add.enqueue(1, 2)  # dedup hit: no new row, no signal
        assert len(seen) == 1
        results = backend().bulk_enqueue([
            (tasks.add, (1, 2), {}), (tasks.add, (5, 5), {}), (tasks.add, (5, 5), {}),
            (tasks.add, (6, 6), {}),
        ])
        assert [r.id for r in seen[1:]] == [results[1].id, results[3].id]
        with override_settings(TASKS=tasks_setting(DEDUP_ACTIVE=False)):
            tasks.add.enqueue(1, 2)
            tasks.add.enqueue(1, 2)
        assert len(seen) == 5
        assert all(isinstance(r, ReproqTaskResult) for r in seen)
    finally:
        task_enqueued.disconnect(receiver)


# --------------------------------------------------------------------------- async


@pytest.mark.django_db(transaction=True)
def test_aenqueue_and_aget_result():
    async def main():
        try:
            result = await tasks.echo.aenqueue(Decimal("2.50"), (1, 2), when=WHEN)
            again = await tasks.echo.aenqueue(Decimal("2.50"), (1, 2), when=WHEN)
            fetched = await tasks.echo.aget_result(result.id)
            deferred = await tasks.add.aenqueue(1, 2, run_after=timedelta(minutes=1))
            return result, again, fetched, deferred
        finally:
            await reproq_db.close_pools()

    result, again, fetched, deferred = asyncio.run(main())
    assert isinstance(result, ReproqTaskResult)
    assert result.status == TaskResultStatus.READY
    assert result.raw_status == "READY"
    assert again.id == result.id
    assert fetched.id == result.id
    assert fetched.args == [Decimal("2.50"), (1, 2)]
    assert type(fetched.args[1]) is tuple
    assert fetched.kwargs == {"when": WHEN}
    assert deferred.raw_status == "WAITING"
    # committed at once, visible to Django's connection
    assert TaskRun.objects.filter(pk__in=[result.id, deferred.id]).count() == 2


@pytest.mark.django_db(transaction=True)
def test_abulk_enqueue_and_signal():
    seen = []

    async def receiver(sender, task_result, **kwargs):
        seen.append(task_result.id)

    async def main():
        try:
            return await backend().abulk_enqueue(
                [(tasks.add, (i, i), {}) for i in range(50)] + [(tasks.add, (0, 0), {})])
        finally:
            await reproq_db.close_pools()

    task_enqueued.connect(receiver)
    try:
        results = asyncio.run(main())
    finally:
        task_enqueued.disconnect(receiver)
    assert [r.args for r in results[:50]] == [[i, i] for i in range(50)]
    assert results[50].id == results[0].id
    assert seen == [r.id for r in results[:50]]
    assert row_count() == 50


@pytest.mark.django_db(transaction=True)
def test_aenqueue_validates_before_touching_the_database():
    async def main():
        try:
            with pytest.raises(PayloadError, match=r"kwargs\['x'\]"):
                await tasks.echo.aenqueue(x=object())
            with pytest.raises(InvalidEnqueue):
                await tasks.echo.aenqueue(priority=500)
        finally:
            await reproq_db.close_pools()

    asyncio.run(main())
    assert row_count() == 0


# --------------------------------------------------------------------------- get_result


@pytest.mark.django_db
@pytest.mark.parametrize("bad_id", ["999999999", "abc", "", "-1", "1.0", " 1", "1" * 30, "٣", "#1",
                                    "0", str(2**63), "9223372036854775807"])
def test_get_result_of_unknown_id_raises(bad_id):
    with pytest.raises(TaskResultDoesNotExist):
        backend().get_result(bad_id)
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result(bad_id)


@pytest.mark.django_db(transaction=True)
def test_aget_result_of_unknown_id_raises():
    async def main():
        try:
            for bad_id in ["999999999", "abc", "", "-1"]:
                with pytest.raises(TaskResultDoesNotExist):
                    await backend().aget_result(bad_id)
                with pytest.raises(TaskResultDoesNotExist):
                    await tasks.add.aget_result(bad_id)
        finally:
            await reproq_db.close_pools()

    asyncio.run(main())


@pytest.mark.django_db(transaction=True)
def test_get_result_of_another_task_raises_mismatch():
    other = tasks.echo.enqueue(1)
    with pytest.raises(TaskResultMismatch):
        tasks.add.get_result(other.id)
    assert tasks.echo.get_result(other.id).id == other.id

    async def main():
        try:
            with pytest.raises(TaskResultMismatch):
                await tasks.add.aget_result(other.id)
        finally:
            await reproq_db.close_pools()

    asyncio.run(main())


STATES = [
    ("READY", TaskResultStatus.READY),
    ("WAITING", TaskResultStatus.READY),
    ("RUNNING", TaskResultStatus.RUNNING),
    ("SUCCESSFUL", TaskResultStatus.SUCCESSFUL),
    ("FAILED", TaskResultStatus.FAILED),
    ("CANCELLED", TaskResultStatus.FAILED),
    ("EXPIRED", TaskResultStatus.FAILED),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("raw", "expected"), STATES)
def test_get_result_maps_every_raw_status(raw, expected):
    result = tasks.add.enqueue(1, 2)
    now = timezone.now()
    changes = {"status": raw}
    if raw in {"RUNNING", "SUCCESSFUL", "FAILED"}:
        changes.update(started_at=now, last_attempted_at=now, attempts=1, worker_ids=["w-1"])
    if raw in {"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"}:
        changes.update(finished_at=now, status_reason=f"{raw.lower()} by test")
    if raw == "SUCCESSFUL":
        changes["return_value"] = payload.encode({"total": Decimal("3.00"), "when": WHEN})
    if raw == "FAILED":
        changes["errors"] = [{"exception_class_path": "builtins.ValueError",
                              "traceback": "Traceback ...\nValueError: bad"}]
    move_to(result.id, changes.pop("status"), **changes)

    fetched = tasks.add.get_result(result.id)
    assert fetched.status == expected
    assert fetched.raw_status == raw
    assert fetched.args == [1, 2]
    assert fetched.is_finished == (raw in {"SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"})
    if raw == "SUCCESSFUL":
        assert fetched.return_value == {"total": Decimal("3.00"), "when": WHEN}
        assert fetched.finished_at == now
        assert fetched.worker_ids == ["w-1"]
        assert fetched.attempts == 1
    elif expected == TaskResultStatus.FAILED:
        with pytest.raises(ValueError, match="failed"):
            _ = fetched.return_value
        assert fetched.status_reason == f"{raw.lower()} by test"
    else:
        with pytest.raises(ValueError, match="not finished"):
            _ = fetched.return_value
    if raw == "FAILED":
        assert len(fetched.errors) == 1
        error = fetched.errors[0]
        assert isinstance(error, TaskError)
        assert error.exception_class_path == "builtins.ValueError"
        assert error.exception_class is ValueError
        assert "ValueError: bad" in error.traceback
    else:
        assert fetched.errors == []


@pytest.mark.django_db
def test_successful_with_none_return_value():
    result = tasks.add.enqueue(1, 2)
    move_to(result.id, "SUCCESSFUL", finished_at=timezone.now())
    assert tasks.add.get_result(result.id).return_value is None


def hand_row(**fields):
    now = timezone.now()
    values = {"task_path": "tests.testapp.tasks.add", "sort_key": 0, "enqueued_at": now,
              "run_after": now, "args": [], "kwargs": {}}
    values.update(fields)
    for name in ("args", "kwargs"):
        if values[name] is None:  # a JSON null, not SQL NULL
            values[name] = Value(None, output_field=JSONField())
    return TaskRun.objects.create(**values)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["no.such.module.task", "tests.testapp.tasks.missing",
                                  "os.path.join", "", "tests.testapp.models.Account"])
def test_row_with_unknown_task_path_still_gives_a_result(path):
    row = hand_row(task_path=path, args=[1], kwargs={"a": "b"}, queue_name="gone-queue",
                   priority=3)
    result = backend().get_result(str(row.pk))
    assert result.id == str(row.pk)
    assert result.status == TaskResultStatus.READY
    assert result.args == [1]
    assert result.kwargs == {"a": "b"}
    assert result.queue_name == "gone-queue"
    assert result.task.priority == 3
    with pytest.raises(TaskResultMismatch):
        tasks.add.get_result(str(row.pk))


GARBAGE = [
    ({"__reproq__": "pickle", "v": "x"}, {}),
    ({"__reproq__": "datetime", "v": "not a date"}, {}),
    ({"__reproq__": "tuple", "v": 5}, {}),
    ([{"__reproq__": "decimal", "v": "abc"}], {"k": {"__reproq__": "uuid", "v": "zz"}}),
    ([{"__reproq__": "model", "v": ["testapp.Account", 999999]}], {}),
    ([{"__reproq__": "model", "v": ["nope.Model", 1]}], {}),
    ("a string", 12),
    (None, None),
    ({"plain": "object"}, [1, 2]),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("args", "kwargs"), GARBAGE, ids=repr)
def test_row_with_garbage_args_still_gives_a_result(args, kwargs):
    row = hand_row(args=args, kwargs=kwargs)
    result = tasks.add.get_result(str(row.pk))
    assert result.id == str(row.pk)
    assert isinstance(result.args, list)
    assert isinstance(result.kwargs, dict)
    assert result.status == TaskResultStatus.READY


@pytest.mark.django_db
def test_row_with_garbage_everywhere_still_gives_a_result():
    row = hand_row(task_path="gone.task", args=5, kwargs="x", status="FAILED",
                   errors={"not": "a list"}, worker_ids=17, metadata=[1, 2],
                   return_value={"__reproq__": "bogus"})
    result = backend().get_result(str(row.pk))
    assert result.status == TaskResultStatus.FAILED
    assert result.errors == []
    assert result.worker_ids == []
    assert result.metadata == {}
    TaskRun.objects.filter(pk=row.pk).delete()
    row = hand_row(task_path="gone.task", status="SUCCESSFUL",
                   errors=[None, "text", {"exception_class_path": "x.Y"}],
                   return_value={"__reproq__": "bogus"})
    result = backend().get_result(str(row.pk))
    assert result.return_value == {"__reproq__": "bogus"}  # shown as stored
    assert [e.exception_class_path for e in result.errors] == ["x.Y"]


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def no_rows_written():
    """Assert that the test wrote no task run at all."""
    yield
    assert row_count() == 0


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_unknown_queue_is_rejected():
    with pytest.raises(InvalidTask, match="nope"):
        tasks.add.using(queue_name="nope").enqueue(1, 2)
    with pytest.raises(InvalidTask, match="not valid"):
        tasks.add.using(queue_name="bad queue!")


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
@pytest.mark.parametrize("priority", [101, -101, True, False, "high", 1.5, None, 10**10])
def test_bad_priority_kwarg_is_rejected(priority):
    with pytest.raises(InvalidEnqueue, match="priority must be an int from -100 to 100"):
        tasks.add.enqueue(1, 2, priority=priority)


@pytest.mark.parametrize("priority", [101, -101, True, "high", 5.0])
def test_bad_task_priority_from_using_is_invalid_task(priority):
    with pytest.raises(InvalidTask, match="priority"):
        tasks.add.using(priority=priority)


def test_invalid_enqueue_is_invalid_task_and_value_error():
    assert issubclass(InvalidEnqueue, InvalidTask)
    assert issubclass(InvalidEnqueue, ValueError)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_naive_run_after_is_rejected():
    naive = dt.datetime(2030, 1, 1, 12, 0)
    with pytest.raises(InvalidEnqueue, match="aware") as excinfo:
        tasks.add.enqueue(1, 2, run_after=naive)
    assert "timedelta" in str(excinfo.value)  # says what to write instead


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
@pytest.mark.parametrize("value", ["tomorrow", 60, 1.5, dt.date(2030, 1, 1)])
def test_run_after_of_wrong_type_is_rejected(value):
    with pytest.raises(InvalidEnqueue, match="run_after must be an aware datetime or a timedelta"):
        tasks.add.enqueue(1, 2, run_after=value)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
@pytest.mark.parametrize("lock_key", [5, "", b"key", "k" * 256, ["a"]])
def test_bad_lock_key_is_rejected(lock_key):
    with pytest.raises(InvalidEnqueue, match="lock_key must be a non-empty str"):
        tasks.add.enqueue(1, 2, lock_key=lock_key)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency_key": "k"}, "go together"),
        ({"concurrency_limit": 2}, "go together"),
        ({"concurrency_key": "k", "concurrency_limit": -1}, "int >= 0"),
        ({"concurrency_key": "k", "concurrency_limit": True}, "int >= 0"),
        ({"concurrency_key": "k", "concurrency_limit": "2"}, "int >= 0"),
        ({"concurrency_key": "", "concurrency_limit": 1}, "non-empty str or a callable"),
        ({"concurrency_key": 5, "concurrency_limit": 1}, "non-empty str or a callable"),
        ({"concurrency_key": lambda *a, **k: 5, "concurrency_limit": 1}, "could not be computed"),
        ({"concurrency_key": lambda *a, **k: 1 / 0, "concurrency_limit": 1},
         "could not be computed"),
        ({"concurrency_key": "k" * 256, "concurrency_limit": 1}, "longer than 255"),
    ],
    ids=repr,
)
def test_bad_concurrency_kwargs_are_rejected(kwargs, message):
    with pytest.raises(InvalidEnqueue, match=message):
        tasks.echo.enqueue(1, **kwargs)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_unserialisable_argument_is_rejected():
    with pytest.raises(PayloadError, match=r"kwargs\['when'\]"):
        tasks.echo.enqueue(1, when=object())
    with pytest.raises(PayloadError, match=r"args\[1\]"):
        tasks.echo.enqueue(1, float("nan"))
    with pytest.raises(PayloadError, match=r"args\[0\]"):
        tasks.echo.enqueue(Account(name="unsaved"))
    with pytest.raises(PayloadError, match=r"args\[0\]"):
        tasks.echo.enqueue("x" * (payload.MAX_PAYLOAD_BYTES + 1))


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_one_bad_call_in_a_bulk_writes_nothing():
    calls = [(tasks.add, (i, i), {}) for i in range(100)]
    calls.insert(50, (tasks.echo, (object(),), {}))
    with pytest.raises(PayloadError, match=r"args\[0\]"):
        backend().bulk_enqueue(calls)
    calls[50] = (tasks.echo, (), {"priority": 1000})
    with pytest.raises(InvalidEnqueue):
        backend().bulk_enqueue(calls)


def test_task_not_defined_at_module_level_is_rejected():
    with pytest.raises(InvalidTask, match="module level"):
        @task
        def local_task():
            return 1


def clashing(item, priority=0):
    return item


def clashing_lock(item, *, lock_key=None):
    return item


@pytest.mark.parametrize("func", [clashing, clashing_lock])
def test_task_with_a_reserved_parameter_name_is_rejected(func):
    with pytest.raises(InvalidTask, match="reserves"):
        task(func)


@pytest.mark.parametrize(
    "options",
    [{"max_attempts": 0}, {"max_attempts": -1}, {"max_attempts": 1.5},
     {"timeout_seconds": 0}, {"timeout_seconds": "60"}, {"dedup": "yes"},
     {"expires_in": timedelta(0)}, {"expires_in": 60}],
    ids=repr,
)
def test_bad_task_options_are_rejected(options):
    with pytest.raises(InvalidTask):
        tasks.add.using(**options)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_task_of_another_backend_alias_is_rejected():
    two = {**tasks_setting(), "other": {**settings.TASKS["default"], "OPTIONS": {}}}
    with override_settings(TASKS=two):
        other_task = tasks.add.using(backend="other")
        with pytest.raises(InvalidTask, match="backend 'other'"):
            task_backends["default"].enqueue(other_task, (1, 2), {})


def test_validation_happens_before_any_database_access():
    # no django_db mark: pytest-django fails any database access in this test
    with pytest.raises(InvalidEnqueue):
        tasks.add.enqueue(1, 2, priority=101)
    with pytest.raises(PayloadError):
        tasks.add.enqueue(1, object())
    with pytest.raises(InvalidEnqueue):
        backend().bulk_enqueue([(tasks.add, (1, 2), {}), (tasks.add, (1, 2), {"lock_key": 1})])


@pytest.mark.django_db
def test_enqueue_without_prepared_statements_behaves_the_same():
    with override_settings(TASKS=tasks_setting(PREPARED_STATEMENTS=False)):
        first = tasks.add.enqueue(40, 2)
        assert tasks.add.enqueue(40, 2).id == first.id
        assert tasks.add.get_result(first.id).args == [40, 2]
        with CaptureQueriesContext(connection) as ctx:
            tasks.add.enqueue(41, 2)
        assert len(ctx.captured_queries) == 1


def prepared_on_django_connection() -> list[str]:
    with connection.cursor() as cur:
        cur.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cur.fetchall()]


@pytest.mark.django_db
def test_enqueue_is_prepared_on_djangos_connection_and_djangos_queries_are_not():
    """Django opens connections with prepare_threshold=None (psycopg then ignores prepare=True):
    reproq's statement must still be prepared, Django's own queries must stay unprepared."""
    for i in range(3):
        tasks.add.enqueue(i, 1)
    for _ in range(20):
        TaskRun.objects.filter(queue_name="default").count()
    statements = prepared_on_django_connection()
    assert len([s for s in statements if "INSERT INTO reproq_task_runs" in s]) == 1
    assert not [s for s in statements if "__count" in s]


@pytest.mark.django_db
def test_enqueue_without_prepared_statements_prepares_nothing():
    with override_settings(TASKS=tasks_setting(PREPARED_STATEMENTS=False)):
        for i in range(3):
            tasks.add.enqueue(i, 1)
        assert prepared_on_django_connection() == []


# --------------------------------------------------------------------------- text and time limits

FAR = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)

# (kwargs of the call, the error's type, what the message must name)
UNSTORABLE_CALLS = [
    ({"a\x00b": 1}, PayloadError, r"keyword argument name 'a\\x00b'.*NUL"),
    ({"ok": "x\x00y"}, PayloadError, r"kwargs\['ok'\].*NUL"),
    ({"\ud800": 1}, PayloadError, r"keyword argument name '\\ud800'.*surrogate"),
    ({"ok": "caf\u00e9 \udfff"}, PayloadError, r"kwargs\['ok'\].*surrogate"),
    ({"ok": ["fine", {"deep": ("\ud83d",)}]}, PayloadError,
     r"kwargs\['ok'\]\[1\]\['deep'\]\[0\].*surrogate"),
    ({"ok": {"\udc00key": 1}}, PayloadError, r"kwargs\['ok'\] key '\\udc00key'.*surrogate"),
    ({"ok": {"k\x00": 1}}, PayloadError, r"kwargs\['ok'\] key 'k\\x00'.*NUL"),
    ({"ok": {"\ud800"}}, PayloadError, r"kwargs\['ok'\] item.*surrogate"),
    ({"run_after": FAR}, InvalidEnqueue, r"run_after 9999-12-31.*too far in the future"),
    ({"run_after": dt.datetime(9999, 6, 1, tzinfo=dt.UTC)}, InvalidEnqueue,
     r"run_after 9999-06-01.*too far in the future"),
    ({"run_after": dt.datetime.max.replace(tzinfo=dt.timezone(-timedelta(hours=14)))},
     InvalidEnqueue, r"run_after .*too far in the future"),
    ({"run_after": timedelta(days=999_999_999)}, InvalidEnqueue,
     r"run_after \(a delay of .* seconds\) is too far in the future"),
    ({"run_after": timedelta.max}, InvalidEnqueue, r"run_after \(a delay.*too far"),
    ({"run_after": timedelta(days=365 * 8000)}, InvalidEnqueue, r"run_after \(a delay.*too far"),
    ({"lock_key": "lock\x00"}, InvalidEnqueue, r"lock_key 'lock\\x00' cannot be stored.*NUL"),
    ({"lock_key": "lock\ud800"}, InvalidEnqueue, r"lock_key 'lock\\ud800'.*surrogate"),
    ({"concurrency_key": "c\x00", "concurrency_limit": 1}, InvalidEnqueue,
     r"concurrency key 'c\\x00' cannot be stored.*NUL"),
    ({"concurrency_key": lambda *a, **k: "c\udfff", "concurrency_limit": 1}, InvalidEnqueue,
     r"concurrency key 'c\\udfff'.*surrogate"),
]
UNSTORABLE_IDS = ["nul-kwarg-name", "nul-value", "surrogate-kwarg-name", "surrogate-value",
                  "surrogate-deep", "surrogate-dict-key", "nul-dict-key", "surrogate-set-item",
                  "datetime-max", "year-9999", "datetime-max-west", "timedelta-999999999-days",
                  "timedelta-max", "8000-years", "nul-lock-key", "surrogate-lock-key",
                  "nul-concurrency-key", "surrogate-computed-concurrency-key"]


def _enqueue_one(kwargs):
    return tasks.echo.enqueue(1, **kwargs)  # ENQUEUE_ONE


def _bulk_enqueue(kwargs):  # ENQUEUE (arrays), the bad call in the middle
    return backend().bulk_enqueue([(tasks.echo, (0,), {}), (tasks.echo, (1,), kwargs),
                                   (tasks.echo, (2,), {})])


def _aenqueue(kwargs):
    async def main():
        try:
            return await tasks.echo.aenqueue(1, **kwargs)
        finally:
            await reproq_db.close_pools()
    return asyncio.run(main())


def _abulk_enqueue(kwargs):
    async def main():
        try:
            return await backend().abulk_enqueue([(tasks.echo, (0,), {}),
                                                  (tasks.echo, (1,), kwargs)])
        finally:
            await reproq_db.close_pools()
    return asyncio.run(main())


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_rows_written")
@pytest.mark.parametrize("how", [_enqueue_one, _bulk_enqueue, _aenqueue, _abulk_enqueue],
                         ids=["enqueue", "bulk_enqueue", "aenqueue", "abulk_enqueue"])
@pytest.mark.parametrize(("kwargs", "error", "names"), UNSTORABLE_CALLS, ids=UNSTORABLE_IDS)
def test_unstorable_text_or_time_is_refused_naming_the_argument(how, kwargs, error, names):
    with pytest.raises(error, match=names) as excinfo:
        how(kwargs)
    assert isinstance(excinfo.value, InvalidTask)
    str(excinfo.value).encode()  # the message itself is printable (surrogates are escaped)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_unstorable_text_in_a_later_pipelined_chunk_writes_nothing():
    calls = [(tasks.add, (i, i), {}) for i in range(PIPELINE_CHUNK + 10)]
    calls[-3] = (tasks.echo, (), {"name": "x\udc80"})
    with pytest.raises(PayloadError, match=r"kwargs\['name'\].*surrogate"):
        backend().bulk_enqueue(calls)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_unstorable_positional_argument_and_task_run_after_are_refused():
    with pytest.raises(PayloadError, match=r"args\[1\].*surrogate"):
        tasks.echo.enqueue("fine", "\ud800")
    with pytest.raises(PayloadError, match=r"args\[0\]\[0\] key '\\x00'"):
        tasks.echo.enqueue([{"\x00": 1}])
    with pytest.raises(InvalidEnqueue, match=r"run_after 9999-12-31.*too far"):
        tasks.echo.using(run_after=FAR).enqueue(1)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_rows_written")
def test_expiry_beyond_the_last_readable_year_is_refused():
    late = dt.datetime(9998, 6, 1, tzinfo=dt.UTC)
    with pytest.raises(InvalidEnqueue, match=r"expires_in .* ends after 9999-01-01"):
        tasks.echo.using(expires_in=timedelta(days=365)).enqueue(1, run_after=late)
    with pytest.raises(InvalidEnqueue, match=r"expires_in"):
        tasks.echo.using(expires_in=timedelta.max).enqueue(1)


@pytest.mark.django_db(transaction=True)
def test_far_but_readable_times_are_stored_and_read_back():
    late = dt.datetime(9998, 12, 31, tzinfo=dt.UTC)
    result = tasks.echo.enqueue(1, run_after=late)
    assert result.raw_status == "WAITING"
    assert tasks.echo.get_result(result.id).task.run_after == late
    # readable in a session far east of UTC too (psycopg's loaders, as reproq's pools use)
    with psycopg.connect(reproq_db.conninfo("default"), options="-c TimeZone=Etc/GMT-14") as conn:
        (stored,) = conn.execute("SELECT run_after FROM reproq_task_runs WHERE id = %s",
                                 [int(result.id)]).fetchone()
    assert stored == late
    delayed = tasks.echo.enqueue(2, run_after=timedelta(days=1_000_000))
    assert TaskRun.objects.get(pk=delayed.id).run_after.year > 4700
    expiring = tasks.echo.using(expires_in=timedelta(days=365)).enqueue(3, run_after=dt.datetime(
        9997, 1, 1, tzinfo=dt.UTC))
    assert TaskRun.objects.get(pk=expiring.id).expires_at.year == 9998


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("early", [
    dt.datetime.min.replace(tzinfo=dt.UTC),
    dt.datetime.min.replace(tzinfo=dt.timezone(timedelta(hours=14))),
    dt.datetime.min.replace(tzinfo=dt.timezone(-timedelta(hours=14))),
], ids=["utc", "east", "west"])
def test_run_after_in_year_one_is_due_at_once_and_readable_in_any_time_zone(early):
    result = tasks.echo.enqueue(1, run_after=early)
    assert result.raw_status == "READY"
    # A session far west of UTC (psycopg's own loaders, as reproq's pools use): year 1 in UTC
    # would read as year 0 there, which Python cannot represent.
    with psycopg.connect(reproq_db.conninfo("default"), options="-c TimeZone=Etc/GMT+12") as conn:
        (stored,) = conn.execute("SELECT run_after FROM reproq_task_runs WHERE id = %s",
                                 [int(result.id)]).fetchone()
    assert stored == dt.datetime(1, 1, 2, tzinfo=dt.UTC)  # reproq.backend.EARLIEST_DUE
