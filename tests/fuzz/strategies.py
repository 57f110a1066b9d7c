"""Strategies shared by the fuzz tests: values reproq stores, arbitrary JSON (as PostgreSQL
accepts it, written by hand), hostile text, and helpers to bound time and scale batches."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import string
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from reproq.payload import MARK

MARKER_KINDS = ("dict", "tuple", "set", "frozenset", "datetime", "date", "time", "timedelta",
                "float", "decimal", "uuid", "bytes", "model")

# Strings that broke, or could break, parsers of ids, numbers and names.
TRICKY = [
    "", " ", "0", "1", "-1", "+1", "007", "1.5", "1e3", "1e5000", "-1e5000", "nan", "inf",
    "-inf", "NaN", "Infinity", "1_000", "0x10", "²", "\u0661",
    "\u0661\u0662", "\u0663\u0664\u0665", "\U0001d7d9", "Ⅻ", "½", "#1", "##1",
    "#", ",", ",,", "1,2", "1,,2", " 1 , 2 ", "9223372036854775807", "9223372036854775808",
    "-9223372036854775809", "99999999999999999999", "9" * 40, "9" * 5000, "2147483648",
    "\x00", "a\x00b", "\n", "\r\n", "\t", "\u2028", "\ufeff", "\u200b", "é", "Ω",
    "\U0001d518\U0001d52b\U0001d526",
    "🙂", "'", '"', "\\", "%", "%00", "%s", "%(x)s", "{}", "[]", "null", "true", "<script>",
    "' OR 1=1 --", "; DROP TABLE reproq_task_runs; --", "../../etc/passwd", "..", ".", "-",
    "--", "-h", "--help", "=", "a=b", "default", "emails", "reports", "other", "DEFAULT",
    "queue:default", "task:tests.testapp.tasks.add", "global", "tests.testapp.tasks.add",
    "READY", "FAILED", "failed", "x" * 65, "x" * 300, "x" * 10_000,
]


def text(*, nul: bool = True, surrogates: bool = False, max_size: int = 60) -> Any:
    """Any text (no lone surrogates by default: they cannot travel in URLs or argv), mixed
    with the tricky strings above."""
    blacklist = () if surrogates else ("Cs",)
    chars = st.characters(blacklist_categories=blacklist,
                          blacklist_characters=() if nul else ("\x00",))
    tricky = TRICKY if nul else [t for t in TRICKY if "\x00" not in t]
    return st.one_of(st.sampled_from(tricky), st.text(chars, max_size=max_size),
                     st.text(string.printable, max_size=max_size))


# Every character str.isdigit() accepts (superscripts, Arabic-Indic, Devanagari, fullwidth ...):
# int() refuses some of them and reads the others as ASCII digits.
UNICODE_DIGITS = "".join(c for c in map(chr, range(0x10000)) if c.isdigit())


def integers_text() -> Any:
    """Text that is almost a number: every shape a parser of ids or counts meets."""
    return st.one_of(
        st.text(UNICODE_DIGITS, min_size=1, max_size=6),
        st.builds(lambda a, b: a + b, st.sampled_from(["", "#", "-", " "]),
                  st.text("0123456789" + UNICODE_DIGITS[:40], min_size=1, max_size=6)),
        st.integers().map(str),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.sampled_from(TRICKY),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text("0123456789-+.,#_ e²\u0661\u0662\u0969\U0001d7d9", max_size=25),
    )


# --------------------------------------------------------------------------- JSON


def json_scalars(*, big_ints: bool = True, nul: bool = True) -> Any:
    ints = st.integers() if big_ints else st.integers(min_value=-(2**63), max_value=2**63)
    return st.one_of(st.none(), st.booleans(), ints,
                     st.floats(allow_nan=False, allow_infinity=False),
                     text(nul=nul, max_size=30))


def json_values(*, max_leaves: int = 25, nul: bool = True) -> Any:
    """Arbitrary JSON documents as Python values (what json.loads can return), with marker
    objects (real kinds with arbitrary values, and unknown kinds) mixed in."""

    def extend(children: Any) -> Any:
        keys = st.one_of(st.sampled_from([MARK, "v", "a", ""]), text(nul=nul, max_size=10))
        marker = st.fixed_dictionaries(
            {MARK: st.one_of(st.sampled_from(MARKER_KINDS), text(nul=nul, max_size=12),
                             children)},
            optional={"v": children, "extra": children})
        return st.one_of(st.lists(children, max_size=5),
                         st.dictionaries(keys, children, max_size=5),
                         marker)

    return st.recursive(json_scalars(nul=nul), extend, max_leaves=max_leaves)


def markers(*, nul: bool = True) -> Any:
    """Marker objects with a known kind and a value of the wrong shape or content."""
    wrongish = st.one_of(
        json_values(max_leaves=6, nul=nul),
        text(max_size=40, nul=nul),
        st.lists(st.integers(), min_size=3, max_size=3),
        st.lists(st.integers(min_value=-(2**40), max_value=2**40), min_size=0, max_size=4),
        st.sampled_from(["", "!!!", "a", "abc", "YWJj", "YWJj=", "YW Jj", "Y", "=", "----",
                         "2024-02-30", "2024-13-01T00:00:00", "9999-12-31T23:59:59+25:00",
                         "25:00", "1E+999999999", "NaN", "sNaN", "-Infinity", "1e5000",
                         "not-a-uuid", "12345678123456781234567812345678", "{}", "[]"]),
    )
    return st.fixed_dictionaries({MARK: st.sampled_from(MARKER_KINDS), "v": wrongish})


def nested(depth: int, leaf: str = "1", kind: str = "list") -> str:
    """JSON text nested `depth` levels deep (lists or objects), as written by another language."""
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


def nested_value(depth: int, kind: str = "list") -> Any:
    """The same as a Python value, built without recursion."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# --------------------------------------------------------------------------- payload values

SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                    max_size=30)


def hashable_values() -> Any:
    """Supported values that can be set members (and so also dict-free)."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**200), max_value=2**200),
        st.floats(allow_nan=False, allow_infinity=False), SAFE_TEXT, st.binary(max_size=40),
        st.datetimes(timezones=st.none() | st.timezones()), st.dates(), st.times(),
        st.times(timezones=st.timezones()), st.timedeltas(),
        st.decimals(allow_nan=False, allow_infinity=False), st.uuids())
    return st.recursive(
        leaves,
        lambda children: st.one_of(st.tuples(children, children), st.frozensets(children,
                                                                                max_size=4)),
        max_leaves=6)


def payload_values(*, max_leaves: int = 20) -> Any:
    """Every type reproq promises to store, nested (model instances aside: they need rows)."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**200), max_value=2**200),
        st.floats(allow_nan=False, allow_infinity=False), SAFE_TEXT,
        st.binary(max_size=60),
        st.datetimes(timezones=st.none() | st.timezones() | st.just(dt.UTC)),
        # Fixed offsets in whole seconds, as zoneinfo has them (Python's fromisoformat drops
        # a microsecond part of an offset).
        st.datetimes(timezones=st.integers(min_value=-86399, max_value=86399).map(
            lambda s: dt.timezone(dt.timedelta(seconds=s)))),
        st.dates(), st.times(), st.times(timezones=st.just(dt.timezone(dt.timedelta(hours=-3)))),
        st.timedeltas(), st.decimals(allow_nan=False, allow_infinity=False),
        st.decimals(places=40, allow_nan=False, allow_infinity=False),
        st.sampled_from([Decimal("-0"), Decimal("1E+999"), Decimal("1E-999"), Decimal("-0.00")]),
        st.uuids(),
        st.sampled_from([uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]),
    )

    def extend(children: Any) -> Any:
        keys = st.one_of(SAFE_TEXT, st.sampled_from([MARK, "v", ""]))
        return st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(keys, children, max_size=5),
            st.lists(children, max_size=4).map(tuple),
            st.sets(hashable_values(), max_size=4),
            st.frozensets(hashable_values(), max_size=4),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


# --------------------------------------------------------------------------- helpers


def batches(rows_per_example: int) -> int:
    """Examples for a DB-backed target that draws `rows_per_example` rows per example on
    average: the profile's example count in rows (at least 3 examples)."""
    return max(3, settings.default.max_examples // rows_per_example)


class Hang(Exception):
    """Raised inside code that ran longer than `bounded` allows."""


@contextlib.contextmanager
def bounded(seconds: float, what: str = "call") -> Iterator[None]:
    """Fail with `Hang` if the block runs longer than `seconds` (SIGALRM; main thread)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what} still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
