"""Database outages with real servers: PostgreSQL stopped and started, started late, partitioned.

Every test here runs its own PostgreSQL (`tests.outage.OwnPostgres`, stopped and started by the
test; never the suite's shared server) and real uvicorn servers on it. The load is
``chaos_probe``, which logs when each attempt starts and ends, so that the checks are on what
really ran: no run ran twice at once (`tests.outage.overlaps`), every run ended SUCCESSFUL, and
the result of each run was written by the attempt that owned it last. Recovery times are printed
(``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import chaos
from tests.outage import OwnPostgres, TcpProxy, overlaps, probe_attempts
from tests.servers import COMMANDS, Child, Servers, free_port, run_command, wait_until

pytestmark = [pytest.mark.servers]

DB = chaos.DB
FINAL = ("SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED")
# Short leases so that leases expire during the outages below; a fallback poll far beyond every
# wait (a run that starts promptly after an outage was woken by the runtime's own recovery).
ENV = {"REPROQ_LEASE_SECONDS": "3", "REPROQ_HEARTBEAT_SECONDS": "0.5",
       "REPROQ_RECLAIM_SECONDS": "0.5", "REPROQ_POLL_FALLBACK_SECONDS": "60",
       "REPROQ_CONCURRENCY": "10", "REPROQ_POOL_MAX_SIZE": "4"}
RECOVERY_BOUND = 5.0  # the runtime claims again this soon after the database is back
PAGE_BOUND = 1.0  # a page that needs no database, while it is down
HEALTHZ_BOUND = 5.0  # /reproq/healthz answers 503 within this
ENQUEUE_BOUND = 7.0  # an enqueue fails with DatabaseUnavailable within this (5 s + slack)


@pytest.fixture(scope="module")
def pg() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        server.start()
        chaos.prepare(server, lambda env: run_command(["django", "migrate", "--noinput"],
                                                      env=env, timeout=180))
        yield server
    finally:
        server.close()


@pytest.fixture
def db(pg: OwnPostgres) -> Iterator[OwnPostgres]:
    """The module's server, running, with no runs or workers left by an earlier test."""
    if not pg.running:
        pg.start()
    with pg.connect(DB) as conn:
        conn.execute("TRUNCATE reproq_task_runs, reproq_workers CASCADE")
    yield pg
    if not pg.running:
        pg.start()




# --------------------------------------------------------------------------- helpers


def start_server(servers: Servers, pg: OwnPostgres, *, port: int | None = None,
                 wait: bool = True, env: dict[str, str] | None = None) -> Child:
    """A uvicorn server on `pg` (through `port`, e.g. a proxy's); waits for healthz 200 unless
    `wait` is off (the database may be down)."""
    http_port = free_port()
    child = servers._spawn("uvicorn", COMMANDS["uvicorn"](http_port), {
        **ENV, "DATABASE_URL": pg.url(port=port), "REPROQ_TEST_DB_NAME": DB, **(env or {})},
        port=http_port)
    if wait:
        wait_healthy(child, timeout=60)
    return child


def get(child: Child, path: str, timeout: float = 15.0) -> tuple[int, Any, float]:
    """(status, JSON body or text, seconds taken) of one request."""
    began = time.monotonic()
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        r = client.get(child.url(path), headers={"Authorization": f"Bearer {child.token}",
                                                 "Connection": "close"})
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text[:300]
    return r.status_code, body, time.monotonic() - began


def post_enqueue(child: Child, body: dict[str, Any], timeout: float = 30.0
                 ) -> tuple[int, Any, float]:
    began = time.monotonic()
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        r = client.post(child.url("/enqueue/chaos_probe/"), content=json.dumps(body),
                        headers={"Authorization": f"Bearer {child.token}",
                                 "Content-Type": "application/json", "Connection": "close"})
    try:
        out: Any = r.json()
    except ValueError:
        out = r.text[:300]
    return r.status_code, out, time.monotonic() - began


def wait_healthy(child: Child, timeout: float) -> None:
    def ok() -> bool:
        child.check_alive()
        try:
            code, body, _ = get(child, "/reproq/healthz", timeout=5)
        except httpx.HTTPError:
            return False
        return code == 200 and body["runtime"]["state"] == "running"

    wait_until(ok, timeout=timeout, interval=0.1, what=f"{child.name} healthz 200",
               describe=child.log_tail)


def enqueue(child: Child, log: Path, ms: int, count: int) -> list[int]:
    code, body, _ = post_enqueue(child, {"kwargs": {"path": str(log), "ms": ms}, "count": count,
                                         "using": {"max_attempts": 10, "dedup": False}})
    assert code == 200, (code, body, child.log_tail())
    return [int(i) for i in body["ids"]]


def rows(pg: OwnPostgres, ids: list[int]) -> dict[int, dict[str, Any]]:
    with pg.connect(DB) as conn:
        cur = conn.execute("SELECT id, status, attempts, worker_ids, return_value, errors, "
                           "lease_owner FROM reproq_task_runs WHERE id = ANY(%s)", [ids])
        names = [c.name for c in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def wait_all_final(pg: OwnPostgres, ids: list[int], timeout: float, logs: Any) -> None:
    def done() -> bool:
        return all(r["status"] in FINAL for r in rows(pg, ids).values())

    def describe() -> str:
        left = [r for r in rows(pg, ids).values() if r["status"] not in FINAL]
        return f"{len(left)} not final, e.g. {left[:3]}\n{logs()}"

    wait_until(done, timeout=timeout, interval=0.2, what=f"{len(ids)} runs to finish",
               describe=describe)


def assert_load_done(pg: OwnPostgres, ids: list[int], log: Path,
                     died: dict[int, float] | None = None) -> dict[int, dict[str, Any]]:
    """Every run SUCCESSFUL, none ran twice at once, and each result came from the attempt that
    owned the run last (a process that lost a run wrote nothing for it)."""
    final = rows(pg, ids)
    assert len(final) == len(ids)
    bad = [r for r in final.values() if r["status"] != "SUCCESSFUL"]
    assert not bad, bad[:5]
    attempts = probe_attempts(log)
    assert set(attempts) >= set(ids), "runs that never started: " + str(set(ids) - set(attempts))
    clash = overlaps({i: attempts[i] for i in ids}, died)
    assert not clash, clash[:5]
    wrong = [r for r in final.values() if r["return_value"]["worker"] != r["worker_ids"][-1]]
    assert not wrong, wrong[:5]
    return final


def first_start_after(log: Path, since: float, pids: set[int] | None = None
                      ) -> float | None:
    """Time of the first attempt started after `since` (by one of `pids`), from the probe log."""
    starts = [a.start for runs in probe_attempts(log).values() for a in runs
              if a.start > since and (pids is None or a.pid in pids)]
    return min(starts) if starts else None


def assert_serves_while_down(child: Child) -> dict[str, float]:
    """While the database is away: a page without database answers fast, healthz says 503 with
    the reason, an enqueue fails with a clear error in bounded time. Returns the timings."""
    code, body, ping = max((get(child, "/ping/") for _ in range(5)), key=lambda r: r[2])
    assert (code, body) == (200, {"pong": True})
    assert ping < PAGE_BOUND, ping

    def unhealthy() -> tuple[int, Any, float] | None:
        got = get(child, "/reproq/healthz")
        return got if got[0] == 503 else None

    code, body, health = wait_until(unhealthy, timeout=15, interval=0.2,
                                    what="healthz 503", describe=child.log_tail)
    assert health < HEALTHZ_BOUND, health
    assert body["database"] is False and any(r.startswith("database") for r in body["reasons"])
    code, body, enq = post_enqueue(child, {"kwargs": {"path": "/dev/null", "ms": 1}})
    assert code == 503, (code, body)
    assert "database" in body["error"] and "enqueued" in body["error"], body
    assert enq < ENQUEUE_BOUND, enq
    child.check_alive()
    return {"ping_s": ping, "healthz_s": health, "enqueue_fail_s": enq}


# --------------------------------------------------------------------------- stop / start


def test_database_stopped_and_started_under_load_every_run_finishes_once(db, servers, tmp_path):
    log = tmp_path / "probe.log"
    a = start_server(servers, db)
    b = start_server(servers, db)
    ids = enqueue(a, log, ms=800, count=120)  # ~5 s of work for 20 slots
    wait_until(lambda: len(probe_attempts(log)) >= 20, timeout=20, what="runs to start",
               describe=lambda: f"{list(rows(db, ids).values())[:2]}\n{servers.logs()}")

    db.stop("fast")
    down_at = time.time()
    timings = assert_serves_while_down(a)
    time.sleep(max(0.0, 5.0 - (time.time() - down_at)))
    db.start()
    up_at = time.time()

    started = wait_until(lambda: first_start_after(log, up_at), timeout=30, interval=0.05,
                         what="a run to start after the restart", describe=servers.logs)
    recovery = started - up_at
    wait_all_final(db, ids, timeout=60, logs=servers.logs)
    assert_load_done(db, ids, log)
    wait_healthy(a, timeout=10)
    wait_healthy(b, timeout=10)
    print(f"outage stop/start: {json.dumps(timings)}; claims again {recovery:.2f}s after "
          "PostgreSQL accepted connections")
    assert recovery < RECOVERY_BOUND, recovery


def test_server_started_while_database_is_down_serves_and_runs_tasks_once_it_is_up(
        db, servers, tmp_path):
    log = tmp_path / "probe.log"
    db.stop("fast")
    srv = start_server(servers, db, wait=False)

    def answering() -> bool:
        srv.check_alive()
        try:
            return get(srv, "/ping/", timeout=2)[0] == 200
        except httpx.HTTPError:
            return False

    wait_until(answering, timeout=60, interval=0.1, what="the server to serve",
               describe=srv.log_tail)
    timings = assert_serves_while_down(srv)
    time.sleep(2)
    db.start()
    up_at = time.time()
    wait_healthy(srv, timeout=30)
    healthy = time.time() - up_at
    ids = enqueue(srv, log, ms=50, count=30)
    wait_all_final(db, ids, timeout=30, logs=servers.logs)
    assert_load_done(db, ids, log)
    ran = first_start_after(log, up_at)
    assert ran is not None
    print(f"outage start-while-down: {json.dumps(timings)}; healthz 200 {healthy:.2f}s and "
          f"first run {ran - up_at:.2f}s after PostgreSQL accepted connections")
    assert healthy < RECOVERY_BOUND, healthy


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("drop", [False, True], ids=["resumed", "half-open"])
def test_partitioned_server_loses_its_leases_to_another_and_writes_nothing_for_them(
        db, servers, tmp_path, drop):
    """Server A reaches PostgreSQL through a proxy that goes silent for 8 s (leases are 3 s);
    server B, connected directly, reclaims the runs A held and runs them. A stops its attempts
    when it can no longer renew their lease, writes no result for them, and claims again once the
    partition heals (`drop`: A's connections of before stay dead, half-open)."""
    log = tmp_path / "probe.log"
    proxy = TcpProxy(db.port)
    try:
        a = start_server(servers, db, port=proxy.port)
        b = start_server(servers, db, env={"REPROQ_CONCURRENCY": "40"})  # connected directly
        a_pid = a.pid
        everything = enqueue(b, log, ms=6000, count=20)
        wait_until(lambda: len(probe_attempts(log)) >= 20, timeout=20, what="runs to start",
                   describe=servers.logs)
        runs = probe_attempts(log)
        ids = [i for i in everything if runs[i][0].pid == a_pid]  # what A holds
        assert ids, "A claimed nothing"
        proxy.partition()
        cut_at = time.time()
        timings = assert_serves_while_down(a)

        def taken_over() -> float | None:
            """When B had started every run A held (from the probe log), else None."""
            runs = probe_attempts(log)
            firsts = [min((x.start for x in runs.get(i, []) if x.pid != a_pid), default=None)
                      for i in ids]
            return None if None in firsts else max(firsts)  # type: ignore[type-var]

        taken = wait_until(taken_over, timeout=20, interval=0.2,
                           what="B to take A's runs over", describe=servers.logs) - cut_at
        time.sleep(max(0.0, 8.0 - (time.time() - cut_at)))
        proxy.heal(drop=drop)
        healed_at = time.time()
        more = enqueue(b, log, ms=500, count=600)  # 7.5 s of work for B alone
        started = wait_until(lambda: first_start_after(log, healed_at, {a_pid}), timeout=30,
                             interval=0.05, what="A to claim again", describe=servers.logs)
        recovery = started - healed_at
        wait_all_final(db, everything + more, timeout=60, logs=servers.logs)
        final = assert_load_done(db, everything + more, log)
        a_attempts = [x for i in ids for x in probe_attempts(log)[i] if x.pid == a_pid]
        assert a_attempts and all(x.outcome == "cancelled" for x in a_attempts), a_attempts
        assert all(r["return_value"]["pid"] != a_pid for i, r in final.items() if i in ids)
        wait_healthy(a, timeout=15)
        print(f"outage partition ({'half-open' if drop else 'resumed'}): {json.dumps(timings)};"
              f" B ran A's runs {taken:.2f}s after the cut; A claims again {recovery:.2f}s "
              "after the partition healed")
        assert recovery < RECOVERY_BOUND, recovery
    finally:
        servers.close()  # before the proxy goes: a clean shutdown needs the database
        proxy.close()


def test_probe_log_finds_attempts_of_one_run_that_overlap(tmp_path):
    log = tmp_path / "probe.log"
    log.write_text("S 1 1 w1 10 100.0\nS 1 2 w2 11 101.0\nE 1 2 w2 11 102.0 ok\n"
                   "E 1 1 w1 10 103.0 cancelled\nS 2 1 w1 10 100.0\nE 2 1 w1 10 101.0 ok\n"
                   "S 2 2 w2 11 101.5\nS 3 1 w1 12 100.0\nS 3 2 w2 11 105.0\n")
    runs = probe_attempts(log)
    assert [(x.run_id, x.attempt) for x, _ in overlaps(runs, died={12: 104.0}, now=200.0)] == [
        (1, 1)]
    assert [(x.run_id, x.attempt) for x, _ in overlaps(runs, died={}, now=200.0)] == [
        (1, 1), (3, 1)]


# --------------------------------------------------------------------------- chaos (small)


def test_chaos_small_sigkills_and_a_database_stop_lose_nothing_and_run_nothing_twice_at_once(
        db, servers, tmp_path):
    """issue 16 item 7 at a size for CI: 500 runs across 3 servers, 3 SIGKILLs 2 s apart and
    PostgreSQL stopped once for 3 s (as a crash). `./dev bench chaos` is the full size."""
    figures = chaos.run(db, servers, tmp_path / "probe.log", tasks=500, task_ms=300,
                        concurrency=10, kills=3, pg_stops=(3.0,), pg_down=3.0,
                        finish_timeout=120)
    assert figures.kills == 3 and len(figures.pg_stops) == 1
    assert figures.statuses == {"SUCCESSFUL": 500}
    assert figures.pg_stops[0]["recovery"] < RECOVERY_BOUND, figures.pg_stops


def test_a_lost_database_is_told_from_a_statement_error():
    import psycopg
    from psycopg_pool import PoolTimeout

    from reproq import db as dbmod

    assert dbmod.is_unavailable(psycopg.OperationalError("consuming input failed"))
    assert dbmod.is_unavailable(psycopg.errors.AdminShutdown("terminating connection"))
    assert dbmod.is_unavailable(psycopg.errors.TooManyConnections("too many"))
    assert dbmod.is_unavailable(PoolTimeout("couldn't get a connection"))
    assert dbmod.is_unavailable(TimeoutError())
    assert not dbmod.is_unavailable(psycopg.errors.DeadlockDetected("deadlock detected"))
    assert not dbmod.is_unavailable(ValueError("a bug"))
