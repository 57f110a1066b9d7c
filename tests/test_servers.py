"""The reproq runtime inside real ASGI servers (subprocesses on loopback, real signals).

uvicorn, hypercorn, gunicorn + uvicorn workers, granian and daphne each run the runtime and
execute tasks; a SIGKILLed server's run is reclaimed by another; a killed LISTEN connection is
re-established; SIGTERM drains and releases; bad rows fail readably; `manage.py reproq worker`
runs and stops cleanly. See tests/servers.py for the harness.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from django.db import connection

from reproq.models import TaskRun, Worker
from tests.servers import (
    listener_backends,
    listening,
    run_command,
    run_row,
    wait_for_status,
    wait_until,
)
from tests.testapp import tasks

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

# A fallback timer far beyond every wait below: a run that starts proves the NOTIFY wake-up.
NOTIFY_ONLY = {"REPROQ_POLL_FALLBACK_SECONDS": "300"}




# --------------------------------------------------------------------------- every server


@pytest.mark.parametrize("server, processes", [
    ("uvicorn", 1), ("hypercorn", 1), ("gunicorn", 2), ("granian", 1), ("daphne", 1),
])
def test_server_runs_the_runtime_and_tasks(servers, server, processes):
    srv = servers.start(server, env={**NOTIFY_ONLY, "REPROQ_GC_FREEZE": "1"},
                        workers=processes)

    code, body = srv.healthz()
    assert code == 200, body
    assert body["runtime"]["state"] == "running"
    # Started by the server itself, not lazily by the first request.
    assert body["runtime"]["via"] == ("daphne" if server == "daphne" else "lifespan")
    assert body["runtime"]["listening"] is True
    rows = srv.worker_rows()
    assert len(rows) == processes, [(w.id, w.pid) for w in rows]
    assert len({w.pid for w in rows}) == processes  # one runtime per server process
    assert {w.server for w in rows} == {server}
    mine = {w.id for w in rows}
    assert body["runtime"]["worker_id"] in mine

    # Enqueued from the test process while the runtime idles: woken by NOTIFY.
    result = tasks.add.enqueue(2, 3)
    done = wait_for_status(result.id, timeout=20, logs=servers.logs)
    assert done.status == "SUCCESSFUL", (done.errors, srv.log_tail())
    assert done.return_value == 5
    assert done.attempts == 1
    assert done.worker_ids[-1] in mine

    # Enqueued by an async view of the same server (`aenqueue`).
    run_id = srv.enqueue_http("add", 20, 22)
    done = wait_for_status(run_id, timeout=20, logs=servers.logs)
    assert done.status == "SUCCESSFUL", (done.errors, srv.log_tail())
    assert done.return_value == 42
    assert done.worker_ids[-1] in mine

    _, body = srv.healthz()
    assert body["runtime"]["crashes"] == {}, body
    # Each process froze its startup heap for the GC once (GC_FREEZE).
    frozen = dict(re.findall(r"runtime (\S+) started \(.*?(\d+) startup objects frozen",
                             srv.log_tail(400)))  # by worker id (some servers log it twice)
    assert frozen.keys() == mine and min(map(int, frozen.values())) > 10_000, frozen


# --------------------------------------------------------------------------- SIGKILL


def test_sigkilled_server_run_is_reclaimed_by_another(servers):
    env = {"REPROQ_LEASE_SECONDS": "3", "REPROQ_HEARTBEAT_SECONDS": "1",
           "REPROQ_RECLAIM_SECONDS": "1"}
    a = servers.start("uvicorn", env=env)
    b = servers.start("uvicorn", env=env)
    by_id = {w.id: (w.pid, srv) for srv in (a, b) for w in srv.worker_rows()}
    assert len(by_id) == 2

    result = tasks.sleepy.enqueue(4)
    running = wait_for_status(result.id, {"RUNNING"}, timeout=20, logs=servers.logs)
    owner = running.lease_owner
    assert owner in by_id, (owner, by_id)
    assert Worker.objects.get(pk=owner).pid == by_id[owner][0]
    victim_pid, victim = by_id[owner]
    survivor = b if victim is a else a
    os.kill(victim_pid, signal.SIGKILL)
    assert victim.wait_exit(10) == -signal.SIGKILL

    # lease (3 s) expires -> reclaimed to READY -> survivor claims it -> runs 4 s.
    done = wait_for_status(result.id, timeout=30, logs=servers.logs)
    assert done.status == "SUCCESSFUL", (done.errors, survivor.log_tail())
    assert done.attempts == 2
    assert done.return_value == 4
    assert [e["exception_class_path"] for e in done.errors] == ["reproq.exceptions.LeaseExpired"]
    assert owner in done.errors[0]["traceback"]
    assert done.worker_ids[0] == owner
    assert done.worker_ids[-1] in survivor.worker_ids()
    survivor.check_alive()


# --------------------------------------------------------------------------- LISTEN killed


def test_listener_reconnects_after_pg_terminate_backend(servers):
    srv = servers.start("uvicorn", env=NOTIFY_ONLY)
    (worker,) = srv.worker_rows()
    (old,) = listener_backends([worker.id])
    with connection.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [old["pid"]])
        assert cur.fetchone()[0] is True

    def new_listener():
        fresh = [b for b in listener_backends([worker.id])
                 if b["pid"] != old["pid"] and listening(b)]
        return fresh or None

    (new,) = wait_until(new_listener, timeout=15, what="a new LISTEN connection",
                        describe=srv.log_tail)
    assert new["pid"] != old["pid"]
    srv.check_alive()

    # The fallback timer is 300 s: only the re-established LISTEN can wake the claimer now.
    result = tasks.add.enqueue(7, 8)
    done = wait_for_status(result.id, timeout=15, logs=servers.logs)
    assert done.status == "SUCCESSFUL"
    assert done.return_value == 15
    assert done.worker_ids == [worker.id]
    assert "LISTEN connection re-established" in srv.log_path.read_text()


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_drains_then_releases_the_rest(servers):
    srv = servers.start("uvicorn", env={"REPROQ_SHUTDOWN_GRACE_SECONDS": "3"},
                        extra_args=["--timeout-graceful-shutdown", "2"])
    (worker,) = srv.worker_rows()
    short = tasks.sleepy.enqueue(1)
    long_sync = tasks.sleepy.enqueue(30)
    long_async = tasks.async_sleep.enqueue(30)
    ids = [short.id, long_sync.id, long_async.id]
    for run_id in ids:
        wait_for_status(run_id, {"RUNNING"}, timeout=15, logs=servers.logs)

    srv.signal(signal.SIGTERM)
    code = srv.wait_exit(15)
    # uvicorn re-raises the captured SIGTERM once its graceful shutdown is complete.
    assert code in {0, -signal.SIGTERM}, srv.log_tail()
    log = srv.log_path.read_text()
    assert "Application shutdown complete" in log
    assert "2 runs still running after the 3s grace period" in log

    done = run_row(short.id)
    assert done.status == "SUCCESSFUL", (done.status, done.errors)
    # The async run was cancelled and is READY at once; the sync run's thread could not be
    # stopped, so it comes back only after the process has exited (WAITING, then READY).
    expected = {long_sync.id: "WAITING", long_async.id: "READY"}
    for run_id in ids[1:]:
        row = run_row(run_id)
        assert row.status in {expected[run_id], "READY"}, (row.status, row.status_reason)
        assert row.attempts == 0
        assert row.status_reason == "released at shutdown"
        assert row.lease_owner is None
        assert row.worker_ids == []
    assert not Worker.objects.filter(pk=worker.id).exists()


# --------------------------------------------------------------------------- bad rows

# Filler for NOT NULL columns added later without a database default, by type.
_FILLER = {"boolean": "false", "integer": "0", "bigint": "0", "smallint": "0",
           "double precision": "0", "text": "''", "character varying": "''",
           "jsonb": "'{}'::jsonb", "timestamp with time zone": "now()"}


def insert_run(task_path: str, args: str = "[]", kwargs: str = "{}", max_attempts: int = 1):
    """A READY row written by hand (as another tool or a bad migration might), bypassing every
    check of `enqueue`; no NOTIFY."""
    values = {
        "backend_alias": "'default'", "task_path": "%(task_path)s", "queue_name": "'default'",
        "priority": "0", "status": "'READY'",
        "sort_key": "(extract(epoch FROM now()) * 1000000)::bigint",
        "args": "%(args)s::jsonb", "kwargs": "%(kwargs)s::jsonb", "enqueued_at": "now()",
        "run_after": "now()", "attempts": "0", "max_attempts": "%(max_attempts)s",
        "timeout_seconds": "60", "worker_ids": "'[]'", "errors": "'[]'", "metadata": "'{}'",
        "cancel_requested": "false", "status_reason": "''", "code_ref": "''",
        "pip_lock_hash": "''",
    }
    with connection.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'reproq_task_runs' "
            "AND is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO'")
        for column, data_type in cur.fetchall():
            values.setdefault(column, _FILLER[data_type])
        cur.execute(
            f"INSERT INTO reproq_task_runs ({', '.join(values)}) "
            f"VALUES ({', '.join(values.values())}) RETURNING id",
            {"task_path": task_path, "args": args, "kwargs": kwargs,
             "max_attempts": max_attempts})
        return cur.fetchone()[0]


def test_bad_rows_fail_readably_and_the_runtime_keeps_working(servers):
    srv = servers.start("uvicorn", env=NOTIFY_ONLY)
    unknown = insert_run("tests.testapp.tasks.no_such_task", max_attempts=2)
    missing = insert_run("tests.no_such_module.some_task", max_attempts=2)
    garbage = insert_run("tests.testapp.tasks.add", args='{"x": 1}', max_attempts=3)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_notify('reproq', 'r:default')")

    row = wait_for_status(unknown, timeout=20, logs=servers.logs)
    assert row.status == "FAILED"
    assert row.attempts == 2  # an import error is retried (a deploy may be rolling out)
    assert [e["exception_class_path"] for e in row.errors] == ["builtins.LookupError"] * 2
    assert "tests.testapp.tasks.no_such_task" in row.errors[-1]["traceback"]
    assert 'does not define a "no_such_task"' in row.errors[-1]["traceback"]
    assert "LookupError" in row.status_reason

    row = wait_for_status(missing, timeout=20, logs=servers.logs)
    assert row.status == "FAILED"
    assert row.attempts == 2
    assert "No module named 'tests.no_such_module'" in row.errors[-1]["traceback"]
    assert "LookupError" in row.status_reason

    row = wait_for_status(garbage, timeout=20, logs=servers.logs)
    assert row.status == "FAILED"
    assert row.attempts == 1  # damaged arguments are not retried
    assert row.errors[-1]["exception_class_path"] == "builtins.ValueError"
    assert "args must be a JSON array" in row.errors[-1]["traceback"]
    assert "ValueError" in row.status_reason

    result = tasks.add.enqueue(1, 2)
    done = wait_for_status(result.id, timeout=15, logs=servers.logs)
    assert done.status == "SUCCESSFUL"
    assert done.return_value == 3
    assert done.worker_ids[-1] in srv.worker_ids()
    code, body = srv.healthz()
    assert code == 200
    assert body["runtime"]["crashes"] == {}, body
    assert TaskRun.objects.filter(status="RUNNING").count() == 0


# --------------------------------------------------------------------------- worker command

WORKER = ["django", "reproq", "worker"]


def start_worker(servers, env=None):
    """Start `manage.py reproq worker` and wait until its runtime LISTENs (bounded)."""
    proc = servers.command("worker", [*WORKER, "--queues", "default", "--concurrency", "2"],
                           env={**NOTIFY_ONLY, **(env or {})})

    def started():
        proc.check_alive()
        rows = list(Worker.objects.filter(pid=proc.pid))
        if rows and all(listening(b) for b in listener_backends([rows[0].id])):
            return rows
        return None

    (worker,) = wait_until(started, timeout=30, interval=0.1, what="the worker to start",
                           describe=proc.log_tail)
    return proc, worker


def test_worker_command_runs_tasks_and_stops_on_sigterm(servers):
    proc, worker = start_worker(servers)
    assert worker.server == "worker"
    assert worker.queues == ["default"]
    assert worker.concurrency == 2

    result = tasks.add.enqueue(4, 4)
    done = wait_for_status(result.id, timeout=15, logs=servers.logs)
    assert done.status == "SUCCESSFUL"
    assert done.worker_ids == [worker.id]

    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(15) == 0, proc.log_tail()
    assert not Worker.objects.filter(pk=worker.id).exists()
    log = proc.log_path.read_text()
    assert "reproq worker stopping" in log
    assert "Traceback" not in log


def test_worker_command_exits_after_grace_with_a_sync_task_still_running(servers):
    proc, _ = start_worker(servers, env={"REPROQ_SHUTDOWN_GRACE_SECONDS": "1"})
    result = tasks.sleepy.enqueue(30)
    wait_for_status(result.id, {"RUNNING"}, timeout=15, logs=servers.logs)

    proc.signal(signal.SIGTERM)
    # Sync tasks run in daemon threads: the process exits without waiting for the 30 s sleep,
    # and the run comes back only after a margin, once the thread is gone with the process.
    assert proc.wait_exit(8) == 0, proc.log_tail()
    row = run_row(result.id)
    assert row.status in {"WAITING", "READY"}, (row.status, row.status_reason)
    assert row.status_reason == "released at shutdown"
    assert row.attempts == 0
    # Nothing else runs here to promote it; it is due a few seconds after the release.
    assert row.status == "WAITING" and row.run_after > row.enqueued_at


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "0"], "0 must be >= 1"),
    (["--concurrency", "many"], "'many' is not a whole number"),
    (["--queues", ""], "give at least one queue name"),
    (["--queues", "bad queue!"], "is not valid"),
])
def test_worker_command_rejects_bad_flags(flags, message):
    before = Worker.objects.count()
    done = run_command([*WORKER, *flags], timeout=60)
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "running queues" not in done.stdout
    assert Worker.objects.count() == before
    assert TaskRun.objects.count() == 0


def test_harness_children_inherit_the_test_database():
    """Guard for the harness itself: children resolve the same test database."""
    done = run_command(["django", "shell", "-c",
                        "from django.db import connection; "
                        "print(connection.settings_dict['NAME'])"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == connection.settings_dict["NAME"]
