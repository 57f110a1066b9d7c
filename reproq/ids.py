"""Run and event ids from untrusted input, parsed strictly (one helper for every entry point).

Python's ``int()`` reads U+0661 (an Arabic-Indic digit) as 1, ``" 7 "`` as 7 and ``"1_000"`` as
1000, and ``str.isdigit()`` is true for ``"²"`` which ``int()`` then rejects; an id beyond bigint
reaches PostgreSQL and fails there. An id here is 1 to 19 ASCII digits whose value is in
1 .. 2**63 - 1 (a PostgreSQL ``bigint``); anything else is a `ValueError` with a readable message
(the HTTP views answer 400 with it, the CLI an argument error).
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_ID = 2**63 - 1  # PostgreSQL bigint
MAX_IDS = 10_000  # runs per operator action (cancel, retry, replay, discard)
_MAX_DIGITS = len(str(MAX_ID))


def parse_id(value: object, what: str = "run id", *, minimum: int = 1) -> int:
    """`value` (an int, or a string of ASCII digits with an optional leading ``#``) as an id
    from `minimum` (1; 0 for a Last-Event-ID) to `MAX_ID`."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, shown = value, str(value)
    elif isinstance(value, str):
        text, shown = value.removeprefix("#"), repr(value[:40])
        number = -1
        if text and len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit():
            number = int(text)
    else:
        raise ValueError(f"a {what} must be a whole number, got {type(value).__name__}")
    if not minimum <= number <= MAX_ID:
        raise ValueError(f"{shown} is not a {what} (a whole number from {minimum} to {MAX_ID})")
    return number


def parse_ids(values: Iterable[object], *, limit: int = MAX_IDS, what: str = "run id"
              ) -> list[int]:
    """Distinct ids, sorted; more than `limit` distinct ids is a `ValueError` (checked while
    reading, so 200,000 ids are refused without building them all)."""
    seen: set[int] = set()
    for value in values:
        seen.add(parse_id(value, what))
        if len(seen) > limit:
            raise ValueError(f"more than {limit} runs given: at most {limit} per action (narrow "
                             "the selection)")
    return sorted(seen)


def split_ids(values: Iterable[str]) -> Iterable[str]:
    """Form values that may each hold several ids separated by commas (``id=1,2&id=3``)."""
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part:
                yield part
