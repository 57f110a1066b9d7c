"""JSON read back from PostgreSQL that Python may be unable to load.

PostgreSQL's jsonb accepts values that Python's json module refuses: nesting deeper than the
recursion limit (~1,000 levels) and numbers of more than 4,300 digits (``1e5000`` is stored
exactly). Rows holding them are written by SQL, pg_cron or another language, never by reproq.
Readers that show a run (``get_result``, the admin, the dashboard) use `loads` and show such a
value as its stored text, marked `Undecodable`, instead of failing; the runtime fails such a run
alone and at once (`reproq.runtime.executor.load_row`).
"""

from __future__ import annotations

import json
from typing import Any

PREVIEW_CHARS = 2000


class Undecodable(str):
    """A stored JSON text Python cannot load; the text itself, with `reason` (the loader's)."""

    reason: str

    def __new__(cls, text: str, reason: str) -> Undecodable:
        self = super().__new__(cls, text)
        self.reason = reason
        return self

    def preview(self) -> str:
        """What a page shows: the reason, then the start of the stored text."""
        head = str.__str__(self)[:PREVIEW_CHARS]
        more = "…" if len(self) > PREVIEW_CHARS else ""
        return f"cannot be decoded ({self.reason}); stored text: {head}{more}"


def reason_of(exc: BaseException) -> str:
    """A short reason from a loader error (never the stored value itself)."""
    text = str(exc).split(";")[0]
    return f"{type(exc).__name__}: {text[:200]}"


def loads(text: str | bytes | None, **kwargs: Any) -> Any:
    """``json.loads``, or the text as `Undecodable` when PostgreSQL's JSON is beyond Python's."""
    if text is None:
        return None
    try:
        return json.loads(text, **kwargs)
    except (ValueError, RecursionError) as exc:
        raw = text.decode() if isinstance(text, bytes) else text
        return Undecodable(raw, reason_of(exc))
