"""What one attempt produced (`Completion`), and the retry policy that turns errors into states."""

from __future__ import annotations

import json
import random
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..payload import PayloadError


class NonRetryable(Exception):
    """Wraps an error that retrying cannot fix (garbage payload, unstorable return value)."""


@dataclass
class Completion:
    """The end of one attempt, as the COMPLETE statement records it."""

    id: int
    status: str  # SUCCESSFUL, FAILED, READY/WAITING (retry), CANCELLED
    task_path: str = ""
    queue_name: str = ""
    return_value: str | None = None  # JSON text
    error: str | None = None  # JSON text of one error record
    delay: float | None = None
    reason: str = ""
    metadata: str | None = None  # JSON text, None = unchanged
    duration: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 30.0
    max_seconds: float = 3600.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        """Seconds before attempt `attempt + 1`: base x 2^(attempt-1), capped, with jitter."""
        raw = min(self.base_seconds * (2 ** max(attempt - 1, 0)), self.max_seconds)
        if self.jitter:
            raw *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(raw, 0.0)


def storable_text(text: str) -> str:
    """`text` as PostgreSQL's jsonb takes it: NUL and lone surrogates (which Python's json
    writes as escapes and jsonb refuses) spelled as backslash escapes; other text unchanged."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def error_record(exc: BaseException, attempt: int, worker_id: str) -> dict[str, Any]:
    cause = exc.__cause__ if isinstance(exc, NonRetryable) and exc.__cause__ else exc
    cls = type(cause)
    return {
        "exception_class_path": storable_text(f"{cls.__module__}.{cls.__qualname__}"),
        "traceback": storable_text("".join(traceback.format_exception(cause))),
        "attempt": attempt,
        "worker_id": worker_id,
        "at": datetime.now(UTC).isoformat(),
    }


def failure(
    job_id: int, exc: BaseException, *, attempt: int, max_attempts: int, worker_id: str,
    policy: RetryPolicy, reason: str = "",
) -> Completion:
    """FAILED when attempts are spent or the error is not retryable, else READY/WAITING."""
    record = json.dumps(error_record(exc, attempt, worker_id), default=str)
    final = attempt >= max_attempts or isinstance(exc, NonRetryable | PayloadError)
    cls = type(exc.__cause__ if isinstance(exc, NonRetryable) and exc.__cause__ else exc)
    summary = reason or f"{cls.__qualname__} on attempt {attempt} of {max_attempts}"
    if final:
        return Completion(id=job_id, status="FAILED", error=record, reason=summary)
    delay = policy.delay(attempt)
    return Completion(id=job_id, status="WAITING" if delay > 0 else "READY", error=record,
                      delay=delay, reason=f"retrying: {summary}")
