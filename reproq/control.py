"""Operator controls shared by the API, the CLI and the admin: cancel, pause/resume, rate limits.

- `cancel_runs` and `set_paused` are one statement each (`reproq.sql.CANCEL`,
  `reproq.sql.SET_PAUSED`) through Django's connection, so they join a caller's transaction;
  their NOTIFY — ``c:<id>`` for each run still RUNNING, ``q:<queue>`` — reaches the other
  processes when it commits. `acancel_runs` sends CANCEL on reproq's own pool instead: its own
  transaction, committed at once.
- `set_rate_limit` and `remove_rate_limit` write the `RateLimit` row through the ORM and notify
  nobody: every claim reads the buckets, so a change applies from the next claim on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from django.db import connections

from . import sql
from .conf import QUEUE_NAME_RE
from .ids import parse_ids

RATE_KEY_RE = re.compile(r"^(global|queue:[A-Za-z0-9_.:-]{1,64}|task:[A-Za-z_][\w.]{0,240})$")


def _database(database: str | None) -> str:
    if database:
        return database
    from django.tasks import default_task_backend

    return getattr(default_task_backend, "database", "default")


def cancel_runs(ids: Iterable[int | str], database: str | None = None) -> int:
    """Cancel runs: waiting ones end CANCELLED at once, running ones are told to stop. Returns
    how many runs were still active. At most `reproq.ids.MAX_IDS` (10,000) distinct ids per
    call (ValueError beyond, and for anything that is not a run id)."""
    clean = parse_ids(ids)
    if not clean:
        return 0
    with connections[_database(database)].cursor() as cursor:
        cursor.execute(sql.CANCEL, {"ids": clean})
        changed, _ = cursor.fetchone()
    return int(changed)


async def acancel_runs(ids: Iterable[int | str], database: str | None = None) -> int:
    from .db import get_pool

    clean = parse_ids(ids)
    if not clean:
        return 0
    pool = await get_pool(_database(database))
    async with pool.connection() as conn:
        cur = await conn.execute(sql.CANCEL, {"ids": clean})
        row = await cur.fetchone()
    return int(row["changed"])


def validate_queue(queue: str) -> str:
    if not isinstance(queue, str) or not QUEUE_NAME_RE.match(queue):
        raise ValueError(f"invalid queue name {queue!r}: use 1-64 characters from letters, "
                         "digits, _ . : -")
    return queue


def set_paused(queue: str, paused: bool, *, reason: str = "", by: str = "",
               database: str | None = None) -> None:
    """Pause or resume a queue in every process (claims skip paused queues immediately)."""
    validate_queue(queue)
    with connections[_database(database)].cursor() as cursor:
        cursor.execute(sql.SET_PAUSED, {"queue": queue, "paused": bool(paused),
                                        "reason": reason[:1000], "by": by[:150]})


def validate_rate_key(key: str) -> str:
    if not isinstance(key, str) or not RATE_KEY_RE.match(key):
        raise ValueError(f"invalid rate limit key {key!r}: write 'global', 'queue:<name>' or "
                         "'task:<module.path>'")
    return key


def set_rate_limit(key: str, rate: int, period_seconds: float = 1.0,
                   burst: int | None = None) -> Any:
    """Create or change a token bucket (it starts full)."""
    from django.utils import timezone

    from .models import RateLimit

    validate_rate_key(key)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
        raise ValueError(f"rate must be a whole number >= 1, got {rate!r}")
    if not isinstance(period_seconds, int | float) or period_seconds <= 0:
        raise ValueError(f"period must be a number of seconds > 0, got {period_seconds!r}")
    burst = rate if burst is None else burst
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise ValueError(f"burst must be a whole number >= 1, got {burst!r}")
    obj, _ = RateLimit.objects.update_or_create(
        key=key, defaults={"rate": rate, "period_seconds": float(period_seconds),
                           "burst": burst, "tokens": float(burst),
                           "refreshed_at": timezone.now()})
    return obj


def remove_rate_limit(key: str) -> bool:
    from .models import RateLimit

    validate_rate_key(key)
    deleted, _ = RateLimit.objects.filter(key=key).delete()
    return bool(deleted)
