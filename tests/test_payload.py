"""reproq.payload: strict, reversible encoding of task arguments, and spec_hash."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.tasks.exceptions import InvalidTask

from reproq import payload
from reproq.payload import MARK, ModelRef, PayloadDecodeError, PayloadError
from tests.testapp.models import Account, Document


def roundtrip(value, load=payload.load_model):
    """encode -> dumps -> json.loads -> decode, as a value travels through the jsonb column."""
    encoded = payload.encode(value, "args[0]")
    text = payload.dumps(encoded)
    assert isinstance(text, str)
    return payload.decode(json.loads(text), load)


def assert_same(value, back):
    assert back == value
    assert type(back) is type(value)


# --------------------------------------------------------------------------- round trips

PLAIN = [
    None, True, False, 0, -7, 2**62, 1.5, -0.0, "", "héllo ✓", [], {}, [1, "a", None],
    {"a": 1, "b": [True, None, {"c": "d"}]},
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_json_values_are_stored_as_they_are(value):
    assert payload.encode(value) == value
    assert_same(value, roundtrip(value))


def test_bool_stays_bool_and_int_stays_int():
    back = roundtrip([True, 1, 1.0])
    assert [type(v) for v in back] == [bool, int, float]


AWARE = dt.datetime(2024, 3, 5, 14, 30, 15, 123456, tzinfo=dt.UTC)


RICH = [
    AWARE,
    dt.datetime(2024, 3, 5, 14, 30, 15, 123456, tzinfo=ZoneInfo("Europe/Paris")),
    dt.datetime(2024, 3, 5, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
    dt.datetime(1999, 12, 31, 23, 59, 59),
    dt.date(2024, 2, 29),
    dt.time(8, 15, 30, 999),
    dt.time(8, 15, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    dt.timedelta(0),
    Decimal("3.14159265358979323846264338327950288"),
    Decimal("-0.00"),
    Decimal("1E+10"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"",
    b"\x00\xff binary \n",
    (),
    (1, "two", 3.0),
    set(),
    {1, 2, 3},
    frozenset({"a", "b"}),
]


@pytest.mark.parametrize("value", RICH, ids=repr)
def test_rich_types_round_trip(value):
    back = roundtrip(value)
    assert_same(value, back)


BIG_AND_SMALL_FLOATS = [1e15, 9999999999999998.0, 1e16, -1.5e20, 1.7976931348623157e308, 1e-5,
                        5e-324, 123.0, 0.1]


@pytest.mark.parametrize("value", BIG_AND_SMALL_FLOATS, ids=repr)
def test_floats_round_trip(value):
    assert_same(value, roundtrip(value))


@pytest.mark.django_db
@pytest.mark.parametrize("value", PLAIN + RICH + BIG_AND_SMALL_FLOATS + [2**70, -(2**63)],
                         ids=repr)
def test_round_trip_through_a_jsonb_column(value):
    """What the database gives back, not just what json.loads gives back."""
    text = payload.dumps(payload.encode(value, "args[0]"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::jsonb::text", [text])
        stored = cursor.fetchone()[0]
    back = payload.decode(json.loads(stored))
    assert_same(value, back)


def test_datetime_awareness_is_kept():
    naive = dt.datetime(2024, 1, 1, 12, 0)
    back_naive = roundtrip(naive)
    assert back_naive.tzinfo is None
    back_aware = roundtrip(AWARE)
    assert back_aware.utcoffset() == dt.timedelta(0)
    paris = AWARE.astimezone(ZoneInfo("Europe/Paris"))
    back_paris = roundtrip(paris)
    assert back_paris == paris
    assert back_paris.utcoffset() == paris.utcoffset()


def test_decimal_keeps_its_exact_digits():
    value = Decimal("1.10")
    back = roundtrip(value)
    assert str(back) == "1.10"


def test_tuple_set_frozenset_are_not_confused_with_list():
    value = [(1, 2), [1, 2], {1, 2}, frozenset({1, 2})]
    back = roundtrip(value)
    assert [type(v) for v in back] == [tuple, list, set, frozenset]
    assert back == value


def test_nested_containers_round_trip():
    value = {
        "when": AWARE,
        "items": [(Decimal("1.5"), {b"x", b"y"}), {"deep": [dt.date(2020, 1, 1), None]}],
        "ids": frozenset({uuid.UUID(int=1), uuid.UUID(int=2)}),
        "nested": {"tuple_of_sets": ({1}, frozenset({(1, 2)}))},
    }
    back = roundtrip(value)
    assert back == value
    assert type(back["items"][0]) is tuple
    assert type(back["nested"]["tuple_of_sets"][1]) is frozenset
    assert type(next(iter(back["nested"]["tuple_of_sets"][1]))) is tuple


def test_encoded_form_is_marker_objects():
    assert payload.encode(Decimal("2.5")) == {MARK: "decimal", "v": "2.5"}
    assert payload.encode((1, 2)) == {MARK: "tuple", "v": [1, 2]}
    assert payload.encode(b"hi") == {MARK: "bytes", "v": "aGk="}


def test_dict_with_marker_key_is_escaped():
    value = {MARK: "datetime", "v": "2024-01-01T00:00:00"}
    encoded = payload.encode(value)
    assert encoded == {MARK: "dict", "v": value}
    back = roundtrip(value)
    assert_same(value, back)
    assert isinstance(back["v"], str)  # not decoded into a datetime


def test_nested_dicts_with_marker_keys_are_escaped():
    value = {"outer": {MARK: {MARK: "tuple", "v": [1]}}, MARK: None, "list": [{MARK: 1}]}
    back = roundtrip(value)
    assert back == value
    assert back["outer"][MARK] == {MARK: "tuple", "v": [1]}


def test_set_encoding_is_independent_of_insertion_order():
    a = set()
    b = set()
    items = ["x", "yy", "a", "zzz", "b", 3, (1, 2)]
    for item in items:
        a.add(item)
    for item in reversed(items):
        b.add(item)
    assert payload.dumps(payload.encode(a)) == payload.dumps(payload.encode(b))


@pytest.mark.django_db
def test_saved_model_with_int_pk_round_trips():
    account = Account.objects.create(name="acme")
    encoded = payload.encode(account)
    assert encoded == {MARK: "model", "v": ["testapp.Account", account.pk]}
    back = roundtrip(account)
    assert isinstance(back, Account)
    assert back.pk == account.pk
    assert back.name == "acme"
    assert back is not account


@pytest.mark.django_db
def test_saved_model_with_uuid_pk_round_trips():
    doc = Document.objects.create(title="spec")
    back = roundtrip(doc)
    assert isinstance(back, Document)
    assert back.pk == doc.pk
    assert isinstance(back.pk, uuid.UUID)
    assert back.title == "spec"


@pytest.mark.django_db
def test_models_inside_containers_round_trip():
    account = Account.objects.create(name="a")
    doc = Document.objects.create(title="d")
    back = roundtrip({"pair": (account, doc), "list": [account]})
    assert back == {"pair": (account, doc), "list": [account]}


@pytest.mark.django_db
def test_decode_without_loader_gives_model_refs():
    doc = Document.objects.create(title="d")
    ref = roundtrip(doc, load=None)
    assert isinstance(ref, ModelRef)
    assert ref == ModelRef("testapp.Document", doc.pk)
    assert ref == doc
    assert ref.get() == doc
    assert hash(ref) == hash(ModelRef("testapp.Document", doc.pk))


@pytest.mark.django_db
def test_deleted_model_raises_does_not_exist_on_decode():
    account = Account.objects.create(name="gone")
    encoded = json.loads(payload.dumps(payload.encode(account)))
    account.delete()
    with pytest.raises(Account.DoesNotExist):
        payload.decode(encoded)


def test_encode_call_names_positions_and_keywords():
    args, kwargs = payload.encode_call((1, (2,)), {"when": dt.date(2024, 1, 1)})
    assert args == [1, {MARK: "tuple", "v": [2]}]
    assert kwargs == {"when": {MARK: "date", "v": "2024-01-01"}}


# --------------------------------------------------------------------------- bad input


def assert_payload_error(excinfo, *fragments):
    err = excinfo.value
    assert isinstance(err, PayloadError)
    assert isinstance(err, InvalidTask)
    assert isinstance(err, TypeError)
    message = str(err)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_payload_error_is_invalid_task_and_type_error():
    assert issubclass(PayloadError, InvalidTask)
    assert issubclass(PayloadError, TypeError)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("args", "kwargs", "path", "why"),
    [
        ((object(),), {}, "args[0]", "builtins.object"),
        ((1, Opaque()), {}, "args[1]", "Opaque"),
        ((), {"when": object()}, "kwargs['when']", "builtins.object"),
        ((float("nan"),), {}, "args[0]", "nan"),
        ((), {"x": float("inf")}, "kwargs['x']", "inf"),
        ((-math.inf,), {}, "args[0]", "inf"),
        (("ok", "bad\x00nul"), {}, "args[1]", "NUL"),
        (({1: "a"},), {}, "args[0] key 1", "str"),
        ((), {"d": {"k": {(1, 2): 3}}}, "kwargs['d']['k'] key (1, 2)", "str"),
        (({"k\x00": 1},), {}, "args[0] key", "NUL"),
        ((), {"a\x00b": 1}, "keyword argument name 'a\\x00b'", "NUL"),
        (([1, [2, object()]],), {}, "args[0][1][1]", "object"),
        (((1, object()),), {}, "args[0][1]", "object"),
        (({"a": [None, {"b": float("nan")}]},), {}, "args[0]['a'][1]['b']", "nan"),
        (({object()},), {}, "args[0] item", "object"),
        ((), {"v": bytearray(b"x")}, "kwargs['v']", "bytearray"),
        ((), {"v": [1, 2].__iter__()}, "kwargs['v']", "iterator"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_unsupported_values_raise_payload_error_naming_the_argument(args, kwargs, path, why):
    with pytest.raises(PayloadError) as excinfo:
        payload.encode_call(args, kwargs)
    message = assert_payload_error(excinfo, path, why)
    assert "reproq stores" in message  # says what would work


def stored(args, kwargs):
    """What enqueue does with a call before anything reaches the database."""
    enc_args, enc_kwargs = payload.encode_call(args, kwargs)
    return payload.dumps(enc_args, "args"), payload.dumps(enc_kwargs, "kwargs")


@pytest.mark.parametrize(
    ("args", "kwargs", "path"),
    [
        (("\ud800",), {}, "args[0]"),
        (("ok", ["é\udfff"]), {}, "args[1][0]"),
        ((), {"\ud83d": 1}, "keyword argument name '\\ud83d'"),
        ((), {"k": "\udc80"}, "kwargs['k']"),
        (({"\udc00": 1},), {}, "args[0] key '\\udc00'"),
        (({"\ud800"},), {}, "args[0] item"),
        ((("a", "\ud800"),), {}, "args[0][1]"),
        (({"x": [{"__reproq__": "\ud800"}]},), {}, "args[0]['x'][0]['__reproq__']"),
        ((), {"d": {"__reproq__": 1, "y": "\udfff"}}, "kwargs['d']['y']"),
        (({"k": frozenset({("t", "\udbff")})},), {}, "args[0]['k'] item[1]"),
    ],
    ids=repr,
)
def test_lone_surrogates_are_refused_naming_the_argument(args, kwargs, path):
    with pytest.raises(PayloadError) as excinfo:
        stored(args, kwargs)
    message = assert_payload_error(excinfo, path, "surrogate")
    assert message.startswith(path), message
    message.encode()  # printable: the surrogate is escaped in the message


def test_text_that_is_valid_unicode_is_accepted_whatever_its_script():
    for text in ("plain", "héllo", "日本語", "emoji 🎉", "\U0010ffff", "\ufffd", "\ud7ff\ue000"):
        assert [json.loads(part) for part in stored((text,), {text: text})] == [
            [text], {text: text}]


def test_metadata_and_return_values_with_unstorable_text_name_where_it_is():
    with pytest.raises(PayloadError, match=r"metadata\['note'\] has type builtins.str: .*surr"):
        payload.dumps(payload.encode({"note": "half \ud800"}, "metadata"), "metadata")
    with pytest.raises(PayloadError, match=r"return value key 'a\\x00'.*NUL"):
        payload.encode({"a\x00": 1}, "return value")


def test_subclasses_of_supported_types_are_rejected():
    class MyStr(str):
        pass

    class MyDict(dict):
        pass

    for value in (MyStr("x"), MyDict(a=1)):
        with pytest.raises(PayloadError) as excinfo:
            payload.encode_call((value,), {})
        assert_payload_error(excinfo, "args[0]")


def test_non_str_keyword_names_are_rejected():
    with pytest.raises(PayloadError):
        payload.encode_call((), {1: "x"})


@pytest.mark.django_db
def test_unsaved_model_instances_are_rejected():
    with pytest.raises(PayloadError) as excinfo:
        payload.encode_call((), {"account": Account(name="new")})
    assert_payload_error(excinfo, "kwargs['account']", "saved")
    # a UUID pk is filled in before saving: still rejected, it is not in the database yet
    with pytest.raises(PayloadError) as excinfo:
        payload.encode_call((Document(title="new"),), {})
    assert_payload_error(excinfo, "args[0]", "saved")


def test_oversize_payload_is_rejected():
    big = "x" * (payload.MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(PayloadError) as excinfo:
        payload.dumps(payload.encode([big]))
    assert_payload_error(excinfo, str(payload.MAX_PAYLOAD_BYTES))


def test_oversize_payload_names_the_biggest_argument():
    enc_args, enc_kwargs = payload.encode_call(
        ("small", "x" * payload.MAX_PAYLOAD_BYTES), {"blob": "y" * payload.MAX_PAYLOAD_BYTES})
    with pytest.raises(PayloadError) as excinfo:
        payload.dumps(enc_args, "args")
    assert_payload_error(excinfo, "args[1]")
    with pytest.raises(PayloadError) as excinfo:
        payload.dumps(enc_kwargs, "kwargs")
    assert_payload_error(excinfo, "kwargs['blob']")


def test_payload_limit_counts_bytes_not_characters():
    # 400,000 three-byte characters: under the limit in characters, over it in bytes
    text = "€" * 400_000
    with pytest.raises(PayloadError):
        payload.dumps(payload.encode([text]))


def test_payload_just_under_the_limit_is_accepted():
    text = "x" * (payload.MAX_PAYLOAD_BYTES - 10)
    assert len(payload.dumps(text)) == payload.MAX_PAYLOAD_BYTES - 8


def test_decode_rejects_unknown_markers():
    with pytest.raises(ValueError, match="unknown payload marker"):
        payload.decode({MARK: "pickle", "v": "gASV"})


# --------------------------------------------------------------------------- hand-written rows

# Marker objects `encode` never writes, as SQL, pg_cron or another language might: each must
# raise PayloadDecodeError naming the marker and its place, never come back as a made-up value.
BAD_MARKERS = [
    ({MARK: "bytes", "v": "not base64!"}, "'bytes' marker", "base64"),
    ({MARK: "bytes", "v": "!!!!"}, "'bytes' marker", "base64"),  # lax decoding: b""
    ({MARK: "bytes", "v": "QQ"}, "'bytes' marker", "base64"),  # padding missing
    ({MARK: "bytes", "v": "QQ==\n"}, "'bytes' marker", "base64"),
    ({MARK: "bytes", "v": 12}, "'bytes' marker", "base64"),
    ({MARK: "datetime", "v": "yesterday"}, "'datetime' marker", "ISO 8601"),
    ({MARK: "datetime", "v": 1715938200}, "'datetime' marker", "ISO 8601"),
    ({MARK: "date", "v": "2024-13-01"}, "'date' marker", "ISO 8601"),
    ({MARK: "time", "v": "25:00"}, "'time' marker", "ISO 8601"),
    ({MARK: "time", "v": None}, "'time' marker", "ISO 8601"),
    ({MARK: "timedelta", "v": [1, 2]}, "'timedelta' marker", "three integers"),
    ({MARK: "timedelta", "v": [1, 2, 3.5]}, "'timedelta' marker", "three integers"),
    ({MARK: "timedelta", "v": [True, 0, 0]}, "'timedelta' marker", "three integers"),
    ({MARK: "timedelta", "v": "1 day"}, "'timedelta' marker", "three integers"),
    ({MARK: "timedelta", "v": [10**10, 0, 0]}, "'timedelta' marker", "out of range"),
    ({MARK: "decimal", "v": "twelve"}, "'decimal' marker", "decimal number"),
    ({MARK: "decimal", "v": " 1.5 "}, "'decimal' marker", "decimal number"),
    ({MARK: "decimal", "v": "1_000"}, "'decimal' marker", "decimal number"),
    ({MARK: "decimal", "v": 1.5}, "'decimal' marker", "decimal number"),
    ({MARK: "float", "v": "nan"}, "'float' marker", "finite number"),
    ({MARK: "float", "v": "1e5000"}, "'float' marker", "range"),
    ({MARK: "float", "v": "1_0"}, "'float' marker", "finite number"),
    ({MARK: "float", "v": 1e20}, "'float' marker", "finite number"),
    ({MARK: "uuid", "v": "1234"}, "'uuid' marker", "8-4-4-4-12"),
    ({MARK: "uuid", "v": "{12345678-1234-5678-1234-567812345678}"}, "'uuid' marker", "8-4-4-4-12"),
    ({MARK: "uuid", "v": "urn:uuid:12345678-1234-5678-1234-567812345678"}, "'uuid' marker",
     "8-4-4-4-12"),
    ({MARK: "uuid", "v": "123456781234567812345678123456-78"}, "'uuid' marker", "8-4-4-4-12"),
    ({MARK: "tuple", "v": "ab"}, "'tuple' marker", "JSON array"),
    ({MARK: "set", "v": {"a": 1}}, "'set' marker", "JSON array"),
    ({MARK: "set", "v": [[1, 2]]}, "'set' marker", "cannot be in a set"),
    ({MARK: "frozenset", "v": [{"a": 1}]}, "'frozenset' marker", "cannot be in a set"),
    ({MARK: "dict", "v": [1]}, "'dict' marker", "JSON object"),
    ({MARK: "model", "v": "testapp.Account:1"}, "'model' marker", "app_label.Model"),
    ({MARK: "model", "v": ["testapp.Account"]}, "'model' marker", "app_label.Model"),
    ({MARK: "model", "v": ["no label", 1]}, "'model' marker", "app_label.Model"),
    ({MARK: "model", "v": ["testapp.Account", [1]]}, "'model' marker", "primary key"),
    ({MARK: "bytes"}, "'bytes' marker", "exactly the keys"),
    ({MARK: "bytes", "v": "", "extra": 1}, "'bytes' marker", "exactly the keys"),
    ({MARK: "pickle", "v": "gASV"}, "unknown payload marker 'pickle'", ""),
    ({MARK: 7, "v": 1}, "unknown payload marker 7", ""),
]


@pytest.mark.parametrize(("marker", "names", "why"), BAD_MARKERS,
                         ids=[repr(m)[:60] for m, _, _ in BAD_MARKERS])
def test_hand_written_markers_that_encode_never_writes_fail_to_decode(marker, names, why):
    stored = [1, {"file": [None, marker]}]
    with pytest.raises(PayloadDecodeError) as excinfo:
        payload.decode(stored)
    message = str(excinfo.value)
    assert message.startswith("payload[1]['file'][1]: "), message
    assert names in message and why in message, message
    assert isinstance(excinfo.value, ValueError)
    assert not isinstance(excinfo.value, LookupError)  # the runtime would retry a LookupError
    with pytest.raises(PayloadDecodeError):
        payload.decode(stored, None)  # without loading models too


def test_decode_error_names_the_place_inside_markers_and_under_the_given_name():
    bad = {MARK: "bytes", "v": "%%%"}
    cases = [
        ({MARK: "tuple", "v": [0, bad]}, "args[0][1]: "),
        ({MARK: "set", "v": [{MARK: "tuple", "v": [bad]}]}, "args[0] item[0]: "),
        ({MARK: "dict", "v": {MARK: 1, "k": bad}}, "args[0]['k']: "),
        ({MARK: "model", "v": ["testapp.Account", bad]}, "args[0].pk: "),
    ]
    for value, where in cases:
        with pytest.raises(PayloadDecodeError) as excinfo:
            payload.decode([value], where="args")
        assert str(excinfo.value).startswith(where), str(excinfo.value)


def test_decode_error_messages_do_not_repeat_the_stored_value():
    secret = "c2VjcmV0LXRva2Vu!"  # not base64 because of the "!"
    with pytest.raises(PayloadDecodeError) as excinfo:
        payload.decode({"token": {MARK: "bytes", "v": secret}})
    assert secret not in str(excinfo.value)
    for kind, raw in (("date", "secret-date"), ("decimal", "secret-number"),
                      ("uuid", "secret-uuid")):
        with pytest.raises(PayloadDecodeError) as excinfo:
            payload.decode({MARK: kind, "v": raw})
        assert raw not in str(excinfo.value)


@pytest.mark.parametrize("value", [
    b"", b"\x00\xff" * 10, Decimal("NaN"), Decimal("-Infinity"), Decimal("sNaN"),
    Decimal("-0E-7"), Decimal("1E+999999"), Decimal("1.50"), -1e300, 1e16, -2.5e17,
    dt.timedelta(days=-999_999_999), dt.timedelta.max,
    uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), dt.time(23, 59, 59, 999999, tzinfo=dt.UTC),
    dt.datetime.min, dt.datetime.max.replace(tzinfo=ZoneInfo("Pacific/Kiritimati")),
], ids=repr)
def test_strict_decoding_still_reads_everything_encode_writes(value):
    back = roundtrip(value)
    if isinstance(value, Decimal) and value.is_nan():  # NaN != NaN
        assert type(back) is Decimal and str(back) == str(value)
    else:
        assert_same(value, back)


def test_hand_written_markers_in_the_forms_other_writers_use_are_accepted():
    assert payload.decode({MARK: "uuid", "v": "ABCDEF01-2345-6789-ABCD-EF0123456789"}) == uuid.UUID(
        "abcdef01-2345-6789-abcd-ef0123456789")
    assert payload.decode({MARK: "decimal", "v": "1e2"}) == Decimal("100")
    assert payload.decode({MARK: "float", "v": "1.5"}) == 1.5
    assert payload.decode({MARK: "datetime", "v": "2024-05-17T09:30:00Z"}) == dt.datetime(
        2024, 5, 17, 9, 30, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- spec_hash


def spec(task_path="tests.testapp.tasks.add", queue="default", args=(1, 2), kwargs=None,
         backend="default"):
    enc_args, enc_kwargs = payload.encode_call(args, kwargs or {})
    return payload.spec_hash(backend, task_path, queue, enc_args, enc_kwargs)


def test_spec_hash_is_a_stable_sha256_hex():
    digest = spec()
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert digest == spec()


def test_spec_hash_is_equal_for_equal_inputs():
    assert spec(args=(AWARE, Decimal("1.0")), kwargs={"a": 1, "b": 2}) == spec(
        args=(AWARE, Decimal("1.0")), kwargs={"b": 2, "a": 1})
    assert spec(args=({"y": 1, "x": [1, 2]},)) == spec(args=({"x": [1, 2], "y": 1},))


def test_spec_hash_ignores_set_insertion_order():
    first, second = set(), set()
    items = [f"item-{i}" for i in range(50)] + [1, 2.5, (1, "a")]
    for item in items:
        first.add(item)
    for item in reversed(items):
        second.add(item)
    assert spec(args=(first,), kwargs={"f": frozenset(items)}) == spec(
        args=(second,), kwargs={"f": frozenset(reversed(items))})


@pytest.mark.parametrize(
    "changes",
    [
        {"task_path": "tests.testapp.tasks.echo"},
        {"queue": "emails"},
        {"backend": "other"},
        {"args": (2, 1)},
        {"args": (1, 2, 3)},
        {"args": (1, 2.0)},
        {"args": (1, True)},
        {"args": (1, "2")},
        {"args": ((1, 2),)},
        {"args": ([1, 2],)},
        {"args": (1,), "kwargs": {"b": 2}},
        {"kwargs": {"x": 1}},
        {"kwargs": {"x": None}},
    ],
    ids=repr,
)
def test_spec_hash_differs_when_the_spec_differs(changes):
    assert spec(**changes) != spec()


def test_spec_hash_distinguishes_types_with_the_same_json():
    assert spec(args=([1, 2],)) != spec(args=((1, 2),))
    assert spec(args=({1, 2},)) != spec(args=(frozenset({1, 2}),))
    assert spec(args=("2024-01-01",)) != spec(args=(dt.date(2024, 1, 1),))


@pytest.mark.django_db(transaction=True)
def test_hand_written_row_with_a_non_base64_bytes_marker_fails_at_once_without_retry():
    from tests.dashboard_helpers import make_run
    from tests.runtime_helpers import run_with_runtime, wait_for

    bad = make_run("READY", task="tests.testapp.tasks.echo", max_attempts=3,
                   args=["fine", {MARK: "bytes", "v": "%%%%"}], kwargs={})  # lax: b""
    good = make_run("READY", task="tests.testapp.tasks.echo", max_attempts=3,
                    args=[{MARK: "bytes", "v": "aGk="}], kwargs={})

    async def body(rt):
        return await wait_for(str(bad.pk)), await wait_for(str(good.pk))

    failed, succeeded = run_with_runtime(body)
    assert failed.raw_status == "FAILED"
    assert failed.errors and len(failed.errors) == 1  # not retried: 1 attempt of 3
    assert failed.errors[0].exception_class_path == "reproq.payload.PayloadDecodeError"
    assert "args[1]: a 'bytes' marker holds text that is not valid base64" in (
        failed.errors[0].traceback)
    assert "PayloadDecodeError" in failed.status_reason
    assert succeeded.raw_status == "SUCCESSFUL"
    assert succeeded.return_value == {"args": [b"hi"], "kwargs": {}}


def test_an_integer_too_large_to_write_as_json_is_a_payload_error_naming_the_place():
    with pytest.raises(payload.PayloadError, match="args holds an integer too large"):
        payload.dumps(payload.encode([1, 10**4300], "args"), "args")
    assert payload.dumps(payload.encode([10**4000], "args"), "args").startswith("[1000")


def test_nesting_deeper_than_pythons_stack_is_a_payload_error_both_ways():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(payload.PayloadError, match=r"args\[0\] is nested too deeply to store"):
        payload.encode_call([deep], {})
    with pytest.raises(payload.PayloadDecodeError, match="args is nested too deeply to decode"):
        payload.decode(deep, None, where="args")
