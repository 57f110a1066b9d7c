"""Is a transaction pooler (PgBouncer in ``pool_mode = transaction``) between us and PostgreSQL?

Behind a transaction pooler each transaction may run on another server connection, so
nothing tied to a session survives: ``LISTEN`` (notifications go to whichever client holds
the server connection, or to nobody), session advisory locks, ``SET`` / ``set_config(..., false)``,
SQL-level ``PREPARE`` and, before PgBouncer 1.21, protocol-level prepared statements. A client
cannot ask PgBouncer for its pool mode (``SHOW pool_mode`` exists only on PgBouncer's admin
console, database ``pgbouncer``), so `detect` looks at what a pooler does to sessions:

1. **Session state.** On connection A: remember ``pg_backend_pid()`` and set a custom setting
   (``reproq.pooler_probe``) for the session. On connection B: read that setting and the pid.
   On A again: read both. With a real session B never sees A's value and A keeps its value
   and its pid. Behind a transaction pooler B usually runs on the server connection A just
   released (PgBouncer reuses the most recently used one), or A lands on another one: any of
   these is proof. A few rounds make a miss by luck unlikely; the evidence is never guessed.
2. **Startup options.** A connection with ``options=-c ...`` (the beat sets
   ``idle_session_timeout`` that way) is refused by PgBouncer before 1.20 with
   "unsupported startup parameter: options".
3. **LISTEN/NOTIFY** (optional, bounded by `notify_timeout`): a NOTIFY sent on B must reach a
   LISTEN on A.

The finding says which connection mode to run: ``direct`` (a real session per connection, or a
pooler in session mode) or ``pgbouncer`` (no session state anywhere). Side effects: the probe's
setting (a custom ``reproq.*`` parameter nobody reads) and, with the NOTIFY check, a LISTEN on a
channel of its own may stay on a pooled server connection until the pooler closes it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

DIRECT, PGBOUNCER = "direct", "pgbouncer"
PROBE_SETTING = "reproq.pooler_probe"
_SET = f"SELECT pg_backend_pid(), set_config('{PROBE_SETTING}', %s, false)"
_GET = f"SELECT pg_backend_pid(), current_setting('{PROBE_SETTING}', true)"


@dataclass(frozen=True)
class PoolerFinding:
    """What `detect` found: whether session state survives, and the mode to run in."""

    transaction_pooled: bool  # session state did not survive between transactions
    mode: str  # DIRECT or PGBOUNCER: the connection mode to use (PGBOUNCER on any evidence)
    evidence: tuple[str, ...]  # what was observed (empty: a real session throughout)
    rounds: int  # session-state rounds run
    startup_options_accepted: bool | None  # None: not checked
    notify_delivered: bool | None  # None: not checked
    seconds: float  # time the whole probe took

    @property
    def summary(self) -> str:
        if not self.evidence:
            return (f"sessions are real ({self.rounds} rounds of session state kept"
                    + (", NOTIFY delivered" if self.notify_delivered else "") + ")")
        what = ("a transaction pooler is in the way" if self.transaction_pooled
                else "a pooler is in the way")
        return f"{what}: " + "; ".join(self.evidence)

    @property
    def hint(self) -> str:
        if self.mode == DIRECT:
            return "run in direct mode (LISTEN/NOTIFY, prepared statements, advisory locks)"
        return ("run in pgbouncer mode: no LISTEN, no prepared statements that outlive a "
                "transaction, no session advisory locks (today: REPROQ_RUNTIME['LISTEN'] = "
                "False, TASKS OPTIONS['PREPARED_STATEMENTS'] = False, Django's "
                "DISABLE_SERVER_SIDE_CURSORS = True, and BEAT = False in pooled processes with "
                "the beat on a direct DSN), or give reproq a direct DSN")


def _connect(info: str, connect_timeout: float) -> psycopg.Connection[Any]:
    return psycopg.connect(info, autocommit=True, prepare_threshold=None,
                           connect_timeout=max(1, int(connect_timeout)))


def _session_rounds(a: psycopg.Connection[Any], b: psycopg.Connection[Any],
                    rounds: int) -> tuple[list[str], int]:
    evidence: list[str] = []
    done = 0
    for _ in range(rounds):
        done += 1
        token = uuid.uuid4().hex
        pid_a1, _ = a.execute(_SET, [token]).fetchone() or (None, None)
        pid_b, seen_b = b.execute(_GET).fetchone() or (None, None)
        pid_a2, kept_a = a.execute(_GET).fetchone() or (None, None)
        if seen_b == token:
            evidence.append("a session setting made on one connection was read on another "
                            f"(server backend {pid_b} served both)")
        if kept_a != token:
            evidence.append("a session setting was gone by the connection's next transaction")
        if pid_a1 != pid_a2:
            evidence.append(f"one connection's backend pid changed between two transactions "
                            f"({pid_a1} -> {pid_a2})")
        if pid_b in (pid_a1, pid_a2) and seen_b != token:
            evidence.append(f"two connections were served by the same backend ({pid_b})")
        if evidence:
            break
    return evidence, done


def _startup_options(info: str, connect_timeout: float) -> bool:
    try:
        with _connect(make_conninfo(info, options=f"-c {PROBE_SETTING}=startup"),
                      connect_timeout) as c:
            c.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        if "options" in str(exc):
            return False
        raise
    return True


def _notify(a: psycopg.Connection[Any], b: psycopg.Connection[Any], timeout: float) -> bool:
    channel = f"reproq_pooler_{uuid.uuid4().hex[:12]}"
    a.execute(f"LISTEN {channel}")
    b.execute("SELECT pg_notify(%s, 'ping')", [channel])
    got = any(n.payload == "ping" for n in a.notifies(timeout=timeout, stop_after=1))
    a.execute(f"UNLISTEN {channel}")
    return got


def detect(alias: str = "default", *, conninfo: str | None = None, rounds: int = 5,
           notify_timeout: float = 0.0, check_startup_options: bool = True,
           connect_timeout: float = 10.0) -> PoolerFinding:
    """Probe the database `alias` (or the libpq string `conninfo`) for a transaction pooler.

    Two connections of its own, a handful of one-statement transactions; with `notify_timeout`
    > 0 also a LISTEN/NOTIFY round trip, waiting at most that long (a pooler makes it wait the
    whole bound). Raises psycopg.OperationalError when the database cannot be reached.
    """
    began = time.monotonic()
    if conninfo is None:
        from .db import conninfo as alias_conninfo

        conninfo = alias_conninfo(alias, application_name="reproq-pooler-probe")
    with _connect(conninfo, connect_timeout) as a, _connect(conninfo, connect_timeout) as b:
        evidence, done = _session_rounds(a, b, max(1, rounds))
        delivered = _notify(a, b, notify_timeout) if notify_timeout > 0 else None
    accepted = _startup_options(conninfo, connect_timeout) if check_startup_options else None
    pooled = bool(evidence)  # so far: session-state evidence only
    if delivered is False:
        evidence.append(f"a NOTIFY sent on one connection did not reach a LISTEN on another "
                        f"within {notify_timeout:g}s")
    if accepted is False:
        evidence.append("a connection with startup options (options=-c ...) was refused, as "
                        "PgBouncer before 1.20 refuses them")
    return PoolerFinding(transaction_pooled=pooled, mode=PGBOUNCER if evidence else DIRECT,
                         evidence=tuple(evidence), rounds=done,
                         startup_options_accepted=accepted, notify_delivered=delivered,
                         seconds=time.monotonic() - began)
