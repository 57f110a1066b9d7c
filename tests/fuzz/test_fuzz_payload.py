"""Fuzz: reproq.payload. Every supported value round-trips (through JSON and through a jsonb
column); values it cannot store are refused with PayloadError; decoding arbitrary JSON (rows
written by hand) raises nothing but ValueError (or PayloadError)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import math
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from hypothesis import given, settings
from hypothesis import strategies as st

from reproq import payload
from reproq.payload import MARK, PayloadError
from tests.fuzz.strategies import batches, json_values, markers, nested_value, payload_values

DECODE_ERRORS = (ValueError, PayloadError)
RESERVED_NAMES = ("run_after", "lock_key", "priority", "concurrency_key", "concurrency_limit")


def fingerprint(value: Any, *, zero_sign: bool = True) -> Any:
    """A comparable picture of a value that tells apart what == does not (1 / 1.0 / True,
    tuple / list, set / frozenset, Decimal('1.0') / Decimal('1'), the offset of a datetime)."""
    kind = type(value)
    if kind in (list, tuple):
        return (kind.__name__, [fingerprint(v, zero_sign=zero_sign) for v in value])
    if kind is dict:
        return ("dict", sorted((k, fingerprint(v, zero_sign=zero_sign))
                               for k, v in value.items()))
    if kind in (set, frozenset):
        return (kind.__name__, sorted(repr(fingerprint(v, zero_sign=zero_sign)) for v in value))
    if kind is float:
        return ("float", repr(value) if zero_sign or value != 0 else "0.0")
    if kind is Decimal:
        return ("Decimal", str(value))
    if kind is dt.datetime:
        return ("datetime", value.isoformat(), value.utcoffset() is None)
    if kind is dt.time:
        return ("time", value.isoformat(), value.utcoffset() is None)
    return (kind.__name__, value)


def through_json(value: Any) -> Any:
    return payload.decode(json.loads(payload.dumps(payload.encode(value, "args[0]"))), None)


@given(payload_values())
def test_every_supported_value_round_trips_through_json(value):
    """Same types, same digits, same instants and offsets (`fingerprint`; not ==, which calls
    an ambiguous local time unequal to the same instant at a fixed offset, PEP 495)."""
    back = through_json(value)
    assert fingerprint(back) == fingerprint(value)


@pytest.mark.django_db
@settings(max_examples=batches(20))
@given(st.lists(payload_values(max_leaves=10), min_size=1, max_size=40))
def test_every_supported_value_round_trips_through_a_jsonb_column(values):
    """What PostgreSQL gives back, 20 values per statement on average."""
    texts = [payload.dumps(payload.encode(v, f"args[{i}]")) for i, v in enumerate(values)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT j::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY AS t(j, n) "
                       "ORDER BY n", [texts])
        stored = [row[0] for row in cursor.fetchall()]
    for value, text in zip(values, stored, strict=True):
        back = payload.decode(json.loads(text), None)
        # jsonb keeps numbers as numeric, which has no negative zero (-0.0 comes back 0.0).
        assert fingerprint(back, zero_sign=False) == fingerprint(value, zero_sign=False), text


class Opaque:
    """A type reproq does not store."""


def anything() -> Any:
    """Values an application might pass by mistake, next to the supported ones."""
    odd = st.one_of(
        st.builds(Opaque), st.complex_numbers(), st.just(math.nan), st.just(math.inf),
        st.just(-math.inf), st.just(Decimal("NaN")), st.just(Decimal("sNaN")),
        st.just(Decimal("Infinity")),
        # ints past Python's 4,300-digit str limit (built lazily: their repr raises)
        st.integers(min_value=4290, max_value=6000).map(lambda digits: 10**digits),
        st.text(st.characters(blacklist_categories=()), max_size=20),  # NUL, lone surrogates
        st.sampled_from(["\x00", "a\ud800", "\udfff"]),
        st.datetimes(timezones=st.timezones()), st.just(dt.datetime.max),
        st.builds(bytearray, st.binary(max_size=5)), st.just(range(3)), st.just(print),
        st.just(...), st.just(NotImplemented), st.just(object()),
    )
    return st.recursive(
        st.one_of(odd, payload_values(max_leaves=3)),
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.none(),
                                      st.tuples(st.integers())), children, max_size=3),
            st.lists(children, max_size=3).map(tuple)),
        max_leaves=8)


@given(anything())
def test_encode_either_stores_faithfully_or_refuses_with_payload_error(value):
    """The promise of docs/enqueue.md: what cannot round-trip is refused at enqueue with
    PayloadError naming the argument - never another exception, never a silent change."""
    try:
        text = payload.dumps(payload.encode(value, "args[0]"), "args[0]")
    except PayloadError as exc:
        assert "args[0]" in str(exc)
        return
    back = payload.decode(json.loads(text), None)
    assert fingerprint(back) == fingerprint(value)


ANY_TEXT = st.one_of(st.text(st.characters(blacklist_categories=()), max_size=12),
                     st.sampled_from(["\x00", "a\x00", "\ud800", "a\udfff"]))


@given(st.lists(st.one_of(ANY_TEXT, payload_values(max_leaves=3)), max_size=3),
       st.dictionaries(ANY_TEXT, st.one_of(ANY_TEXT, st.integers()), max_size=3))
def test_encode_call_refuses_unstorable_text_in_values_and_names(args, kwargs):
    """NUL characters and lone surrogates, in a value or a keyword argument's name: refused
    with PayloadError (PostgreSQL's jsonb takes neither), never a database or Unicode error."""
    try:
        enc_args, enc_kwargs = payload.encode_call(args, kwargs)
        texts = payload.dumps(enc_args, "args"), payload.dumps(enc_kwargs, "kwargs")
    except PayloadError:
        return
    for text in texts:
        assert "\\u0000" not in text and "\x00" not in text
        text.encode("utf-8")  # no lone surrogate
    assert [fingerprint(v) for v in payload.decode(json.loads(texts[0]), None)] == [
        fingerprint(v) for v in args]


@given(st.one_of(json_values(), markers(), st.lists(markers(), max_size=4),
                 st.dictionaries(st.text(max_size=5), markers(), max_size=4)))
def test_decoding_arbitrary_json_raises_only_a_decode_error(doc):
    """Rows written by SQL, pg_cron or another language hold any JSON: decoding it returns a
    value or raises ValueError (PayloadError), nothing else."""
    with contextlib.suppress(*DECODE_ERRORS):
        payload.decode(doc, None)


@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["list", "dict", "tuple"]))
def test_decoding_deeply_nested_json_raises_only_a_decode_error(depth, kind):
    """PostgreSQL accepts jsonb nested thousands of levels deep."""
    if kind == "tuple":
        doc: Any = 1
        for _ in range(depth):
            doc = {MARK: "tuple", "v": [doc]}
    else:
        doc = nested_value(depth, kind)
    with contextlib.suppress(*DECODE_ERRORS):
        payload.decode(doc, None)


@given(st.one_of(st.text(max_size=40), st.binary(max_size=30).map(
    lambda b: base64.b64encode(b).decode()).flatmap(
        lambda good: st.sampled_from([good, good + "=", good[:-1], " " + good, good + "\n",
                                      good.replace("A", "-"), good + "!"]))))
def test_a_bytes_marker_decodes_only_from_canonical_base64(text):
    """A non-base64 `bytes` marker is a damaged payload, not b""."""
    doc = {MARK: "bytes", "v": text}
    try:
        back = payload.decode(doc, None)
    except DECODE_ERRORS:
        return
    assert base64.b64encode(back).decode() == text


# --------------------------------------------------------------------------- enqueue

RESERVED = st.fixed_dictionaries({}, optional={
    "run_after": st.one_of(st.none(), st.datetimes(timezones=st.timezones()),
                           st.datetimes(timezones=st.just(dt.UTC)), st.datetimes(),
                           st.timedeltas(), st.just(dt.datetime.max.replace(tzinfo=dt.UTC)),
                           st.just(dt.datetime.min.replace(tzinfo=dt.UTC)),
                           st.just(dt.timedelta.max), st.integers()),
    "priority": st.one_of(st.integers(min_value=-150, max_value=150), st.integers(),
                          st.booleans(), st.none()),
    "lock_key": st.one_of(st.none(), ANY_TEXT, st.integers()),
})


@pytest.mark.django_db
@given(st.lists(st.one_of(ANY_TEXT, payload_values(max_leaves=4), st.builds(Opaque)),
                max_size=3),
       st.dictionaries(ANY_TEXT.filter(lambda k: k not in RESERVED_NAMES),
                       st.one_of(ANY_TEXT, payload_values(max_leaves=3)), max_size=3),
       RESERVED)
def test_enqueue_stores_arbitrary_arguments_or_refuses_them_with_invalid_task(args, kwargs,
                                                                              reserved):
    """An enqueue either stores the call (get_result gives the arguments back) or raises
    django.tasks' InvalidTask (PayloadError, InvalidEnqueue) naming the problem - never a
    database, Unicode or overflow error."""
    from django.db import transaction
    from django.tasks.exceptions import InvalidTask

    from tests.testapp import tasks

    with transaction.atomic():
        try:
            result = tasks.echo.enqueue(*args, **kwargs, **reserved)
        except InvalidTask:
            return
        stored = tasks.echo.get_result(result.id)
        assert [fingerprint(v) for v in stored.args] == [fingerprint(v) for v in args]
        assert {k: fingerprint(v) for k, v in stored.kwargs.items()} == {
            k: fingerprint(v) for k, v in kwargs.items()}
        transaction.set_rollback(True)


@pytest.mark.django_db
@given(st.dictionaries(ANY_TEXT.filter(lambda k: k not in RESERVED_NAMES), st.integers(),
                       min_size=1, max_size=3))
def test_enqueue_stores_any_keyword_name_or_refuses_it_with_invalid_task(kwargs):
    from django.db import transaction
    from django.tasks.exceptions import InvalidTask

    from tests.testapp import tasks

    with transaction.atomic():
        try:
            result = tasks.echo.enqueue(**kwargs)
        except InvalidTask as exc:
            assert "kwargs" in str(exc) or "keyword" in str(exc)
            return
        assert tasks.echo.get_result(result.id).kwargs == kwargs
        transaction.set_rollback(True)


@pytest.mark.django_db
@given(RESERVED.filter(lambda r: "run_after" in r).map(lambda r: r["run_after"]))
def test_enqueue_accepts_any_run_after_or_refuses_it_with_invalid_task(run_after):
    from django.db import transaction
    from django.tasks.exceptions import InvalidTask

    from tests.testapp import tasks

    with transaction.atomic():
        try:
            result = tasks.echo.enqueue(1, run_after=run_after)
        except InvalidTask as exc:
            assert "run_after" in str(exc)
            return
        assert tasks.echo.get_result(result.id).args == [1]
        transaction.set_rollback(True)
