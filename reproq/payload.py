"""Task payloads: strict, reversible JSON encoding of arguments and return values, and `spec_hash`.

Plain JSON values (str, int, float, bool, None, list, dict with str keys) are stored as they are.
Other supported types are stored as marker objects ``{"__reproq__": "<kind>", "v": ...}`` and come
back as the type that was passed: datetime, date, time, timedelta, Decimal, UUID, bytes, tuple,
set, frozenset and saved model instances (stored by ``app_label.Model`` and primary key, fetched
again when the task runs). Anything else raises `PayloadError` at enqueue, naming the argument;
so do strings PostgreSQL cannot store (a NUL character, a lone UTF-16 surrogate), in values and in
dict keys and keyword names alike.

`decode` is strict: a marker object that `encode` could not have written (a row written by hand:
SQL, pg_cron, another language) raises `PayloadDecodeError` naming where it sits, never a value
made up from it; the runtime fails such a run as non-retryable.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from django.tasks.exceptions import InvalidTask

MARK = "__reproq__"
MAX_PAYLOAD_BYTES = 1_000_000
FLOAT_AS_TEXT = 1e16  # floats this large lose their type in jsonb (see `encode`)

SUPPORTED = (
    "str, int, float (finite), bool, None, list, tuple, dict with str keys, set, frozenset, "
    "bytes, datetime, date, time, timedelta, Decimal, UUID, saved model instances"
)


class PayloadError(InvalidTask, TypeError):
    """An argument or return value that reproq cannot store faithfully."""


class PayloadDecodeError(ValueError):
    """A stored payload that `encode` could not have written (e.g. a hand-written row)."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store `text` (a NUL, a lone surrogate), or None.

    Callers on hot paths test ``"\\x00" in text or not text.isascii()`` first: ``isascii`` is
    O(1) on CPython, so ASCII text costs one C-speed NUL scan and no regex. (`encode` checks
    NUL per string; lone surrogates are found once per payload by `dumps`.)
    """
    if "\x00" in text:
        return "it contains a NUL character, which PostgreSQL rejects"
    if not text.isascii() and _SURROGATE.search(text) is not None:
        return ("it contains a lone surrogate (a UTF-16 half, e.g. '\\ud800'), which is not "
                "valid Unicode text and cannot be stored")
    return None


def _fail(where: str, value: Any, why: str) -> PayloadError:
    return PayloadError(
        f"{where} has type {type(value).__module__}.{type(value).__qualname__}: {why}. "
        f"reproq stores {SUPPORTED}."
    )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode(value: Any, where: str = "value") -> Any:
    """Return a JSON-able form of `value`; raise `PayloadError` naming `where` if impossible."""
    try:
        return _encode(value, where)
    except RecursionError:
        raise PayloadError(f"{where} is nested too deeply to store (more levels than Python's "
                           "recursion limit)") from None


def _encode(value: Any, where: str) -> Any:
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return value
    if kind is str:
        if "\x00" in value:
            raise _fail(where, value, "it contains a NUL character, which PostgreSQL rejects")
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _fail(where, value, f"{value!r} is not valid JSON")
        if abs(value) >= FLOAT_AS_TEXT:
            # Python writes these as 1e+16; jsonb stores them as numeric and prints
            # 10000000000000000, which json.loads reads back as an int.
            return {MARK: "float", "v": repr(value)}
        return value
    if kind is list:
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if kind is dict:
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _fail(
                    f"{where} key {key!r}", key, "dict keys must be str to survive JSON unchanged"
                )
            if "\x00" in key:
                raise _fail(f"{where} key {key!r}", key, "it contains a NUL character")
            out[key] = _encode(item, f"{where}[{key!r}]")
        if MARK in out:
            return {MARK: "dict", "v": out}
        return out
    if kind is tuple:
        return {MARK: "tuple",
                "v": [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if kind is set or kind is frozenset:
        items = [_encode(item, f"{where} item") for item in value]
        items.sort(key=_canonical)
        return {MARK: kind.__name__, "v": items}
    if kind is dt.datetime:
        return {MARK: "datetime", "v": value.isoformat()}
    if kind is dt.date:
        return {MARK: "date", "v": value.isoformat()}
    if kind is dt.time:
        return {MARK: "time", "v": value.isoformat()}
    if kind is dt.timedelta:
        return {MARK: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if kind is Decimal:
        return {MARK: "decimal", "v": str(value)}
    if kind is uuid.UUID:
        return {MARK: "uuid", "v": str(value)}
    if kind is bytes:
        return {MARK: "bytes", "v": base64.b64encode(value).decode("ascii")}
    model_ref = _encode_model(value, where)
    if model_ref is not None:
        return model_ref
    raise _fail(where, value, "this type cannot round-trip through JSON")


def _encode_model(value: Any, where: str) -> dict[str, Any] | None:
    from django.db.models import Model

    if not isinstance(value, Model):
        return None
    if value.pk is None or value._state.adding:
        raise _fail(where, value, "only saved model instances can be passed (they travel by pk)")
    label = value._meta.label
    return {MARK: "model", "v": [label, encode(value.pk, f"{where}.pk")]}


ModelLoader = Callable[[str, Any], Any]


def load_model(label: str, pk: Any) -> Any:
    """Fetch a model instance by label and pk (raises the model's DoesNotExist if it is gone)."""
    from django.apps import apps

    model = apps.get_model(label)
    return model._default_manager.get(pk=pk)


def decode(value: Any, load: ModelLoader | None = load_model, where: str = "payload") -> Any:
    """Invert `encode`. With ``load=None`` model references come back as `ModelRef`.

    A marker object that `encode` could not have written raises `PayloadDecodeError` naming its
    place under `where` (e.g. ``payload[0]['file']``); errors of `load` itself (a deleted model
    instance, an unknown model) come through unchanged.
    """
    try:
        return _decode(value, load)
    except RecursionError:  # jsonb nests deeper than Python's stack (rows written by hand)
        raise PayloadDecodeError(f"{where} is nested too deeply to decode") from None
    except PayloadDecodeError as exc:
        located = _locate(value, where)
        if located is None:  # pragma: no cover - _decode and _locate disagree
            raise
        raise PayloadDecodeError(located) from exc


def _decode(value: Any, load: ModelLoader | None) -> Any:
    if isinstance(value, list):
        return [_decode(item, load) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(MARK)
    if kind is None:
        return {key: _decode(item, load) for key, item in value.items()}
    return _marker(kind, value, load)


_FLOAT_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                        r"[0-9a-fA-F]{12}")
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                           r"|[+-]?(?:Infinity|Inf|s?NaN[0-9]*)", re.IGNORECASE)
_MODEL_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


def _bad(kind: Any, why: str) -> PayloadDecodeError:
    return PayloadDecodeError(f"a {kind!r} marker {why}")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _marker(kind: Any, value: dict[str, Any], load: ModelLoader | None) -> Any:
    """One marker object ``{"__reproq__": kind, "v": raw}``, checked as strictly as `encode`
    writes it: the exact two keys, the type of ``v``, and text in the form `encode` uses."""
    if len(value) != 2 or "v" not in value:
        raise _bad(kind, f"must have exactly the keys {MARK!r} and 'v', "
                         f"not {sorted(map(str, value))!r}")
    raw = value["v"]
    match kind:
        case "dict":
            if not isinstance(raw, dict):
                raise _bad(kind, f"needs a JSON object in 'v', not {_json_type(raw)}")
            return {key: _decode(item, load) for key, item in raw.items()}
        case "tuple" | "set" | "frozenset":
            if not isinstance(raw, list):
                raise _bad(kind, f"needs a JSON array in 'v', not {_json_type(raw)}")
            items = [_decode(item, load) for item in raw]
            if kind == "tuple":
                return tuple(items)
            try:
                return set(items) if kind == "set" else frozenset(items)
            except TypeError:
                raise _bad(kind, "holds an item that cannot be in a set (a list or a dict)"
                           ) from None
        case "datetime" | "date" | "time":
            if not isinstance(raw, str):
                raise _bad(kind, f"needs ISO 8601 text in 'v', not {_json_type(raw)}")
            parse = {"datetime": dt.datetime, "date": dt.date, "time": dt.time}[kind]
            try:
                return parse.fromisoformat(raw)
            except ValueError:
                raise _bad(kind, f"holds text that is not an ISO 8601 {kind}") from None
        case "timedelta":
            if not (isinstance(raw, list) and len(raw) == 3 and all(map(_is_int, raw))):
                raise _bad(kind, "needs [days, seconds, microseconds] as three integers in 'v'")
            days, seconds, micros = raw
            try:
                return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
            except OverflowError:
                raise _bad(kind, "is out of range (beyond 999999999 days)") from None
        case "float":
            if not isinstance(raw, str) or _FLOAT_TEXT.fullmatch(raw) is None:
                raise _bad(kind, "needs a finite number written as text in 'v'")
            number = float(raw)
            if not math.isfinite(number):
                raise _bad(kind, "is out of a float's range")
            return number
        case "decimal":
            if not isinstance(raw, str) or _DECIMAL_TEXT.fullmatch(raw) is None:
                raise _bad(kind, "needs a decimal number written as text in 'v'")
            try:
                return Decimal(raw)
            except (InvalidOperation, ValueError):  # pragma: no cover - the pattern rules out
                raise _bad(kind, "needs a decimal number written as text in 'v'") from None
        case "uuid":
            if not isinstance(raw, str) or _UUID_TEXT.fullmatch(raw) is None:
                raise _bad(kind, "needs a UUID written as 8-4-4-4-12 hex digits in 'v'")
            return uuid.UUID(raw)
        case "bytes":
            if not isinstance(raw, str):
                raise _bad(kind, f"needs base64 text in 'v', not {_json_type(raw)}")
            try:
                data = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise _bad(kind, "holds text that is not valid base64") from None
            if base64.b64encode(data).decode() != raw:  # "0000=", "AB==": not what encode writes
                raise _bad(kind, "holds base64 text that is not in canonical form")
            return data
        case "model":
            if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str)
                    and _MODEL_LABEL.fullmatch(raw[0]) is not None):
                raise _bad(kind, "needs [\"app_label.Model\", pk] in 'v'")
            label, pk = raw
            pk = _decode(pk, load)
            if isinstance(pk, list | dict | set | frozenset | tuple):
                raise _bad(kind, f"has a {type(pk).__name__} as primary key")
            return ModelRef(label, pk) if load is None else load(label, pk)
    raise PayloadDecodeError(f"unknown payload marker {kind!r}")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)


def _locate(value: Any, where: str) -> str | None:
    """`where` + the path of the first marker `_decode` rejects, and why (slow; errors only).
    Model references are checked without loading them."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _locate(item, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if not isinstance(value, dict):
        return None
    kind = value.get(MARK)
    if kind is None:
        for key, item in value.items():
            found = _locate(item, f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    raw = value.get("v")
    if len(value) == 2 and "v" in value:
        # Look inside first: an error deep inside a container names the deepest place.
        if kind in ("tuple", "set", "frozenset") and isinstance(raw, list):
            for i, item in enumerate(raw):
                found = _locate(item, f"{where}[{i}]" if kind == "tuple" else f"{where} item")
                if found is not None:
                    return found
        elif kind == "dict" and isinstance(raw, dict):
            for key, item in raw.items():
                found = _locate(item, f"{where}[{key!r}]")
                if found is not None:
                    return found
        elif kind == "model" and isinstance(raw, list) and len(raw) == 2:
            found = _locate(raw[1], f"{where}.pk")
            if found is not None:
                return found
    try:
        _marker(kind, value, None)
    except PayloadDecodeError as exc:
        return f"{where}: {exc}"
    return None


class ModelRef:
    """A model instance reference found in a stored payload, not yet fetched."""

    __slots__ = ("label", "pk")

    def __init__(self, label: str, pk: Any) -> None:
        self.label = label
        self.pk = pk

    def get(self) -> Any:
        return load_model(self.label, self.pk)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelRef):
            return (self.label, self.pk) == (other.label, other.pk)
        from django.db.models import Model

        if isinstance(other, Model):
            return other._meta.label == self.label and other.pk == self.pk
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.label, self.pk))

    def __repr__(self) -> str:
        return f"<ModelRef {self.label} pk={self.pk!r}>"


def encode_call(args: tuple | list, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
    """Encode a task's positional and keyword arguments, naming the bad one on failure."""
    enc_args = [encode(value, f"args[{i}]") for i, value in enumerate(args)]
    enc_kwargs: dict[str, Any] = {}
    for key, value in kwargs.items():
        if type(key) is not str:
            raise PayloadError(f"keyword argument names must be str, not {type(key).__name__}")
        if "\x00" in key:
            raise _fail(f"keyword argument name {key!r}", key,
                        "it contains a NUL character, which PostgreSQL rejects")
        enc_kwargs[key] = encode(value, f"kwargs[{key!r}]")
    return enc_args, enc_kwargs


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any, where: str = "payload") -> str:
    """Serialise an already-encoded value for a jsonb column (at most MAX_PAYLOAD_BYTES).

    Text with a lone surrogate (not valid Unicode, so not valid UTF-8 for PostgreSQL) raises
    `PayloadError` naming its place under `where` (``where == "kwargs"``: the top-level keys are
    keyword argument names). The check is free for ASCII text (``str.isascii`` is O(1)); other
    text is encoded to UTF-8 once, which the size limit needs anyway.
    """
    try:
        text = _ENCODER.encode(value)
    except ValueError as exc:  # an int of more than sys.get_int_max_str_digits() digits
        raise PayloadError(f"{where} holds an integer too large to store ({exc}); pass it as a "
                           "string") from None
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise _unstorable_text(value, where, where == "kwargs") or PayloadError(
                f"{where} contains text that is not valid Unicode") from None
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"{where} is {size} bytes as JSON{_largest_part(value, where)}; reproq stores at "
            f"most {MAX_PAYLOAD_BYTES}. Pass an id and load large data inside the task."
        )
    return text


def _unstorable_text(value: Any, where: str, names: bool = False) -> PayloadError | None:
    """The `PayloadError` for the first string in an encoded value that PostgreSQL cannot store,
    named as `encode` names places (``args[0]['k'][1]``, ``... key 'x'``, ``... item``);
    `names`: the top-level keys are keyword argument names. Slow; only after a failure."""
    if type(value) is str:
        problem = text_problem(value)
        return None if problem is None else _fail(where, value, problem)
    if type(value) is list:
        for i, item in enumerate(value):
            found = _unstorable_text(item, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if type(value) is not dict:
        return None
    if MARK in value:
        kind, raw = value[MARK], value.get("v")
        if kind == "dict" and type(raw) is dict:
            value = raw  # an escaped dict: look at it as the plain dict it was
        elif kind in ("tuple", "set", "frozenset") and type(raw) is list:
            for i, item in enumerate(raw):
                found = _unstorable_text(item, f"{where}[{i}]" if kind == "tuple"
                                         else f"{where} item")
                if found is not None:
                    return found
            return None
        elif kind == "model" and type(raw) is list and len(raw) == 2:
            return _unstorable_text(raw[1], f"{where}.pk")
        else:
            return None
    for key, item in value.items():
        problem = text_problem(key)
        if problem is not None:
            return _fail(f"keyword argument name {key!r}" if names else f"{where} key {key!r}",
                         key, problem)
        found = _unstorable_text(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def _largest_part(value: Any, where: str) -> str:
    """`` (largest: args[1], N bytes)`` for an oversize list or dict, to name the culprit."""
    if isinstance(value, list):
        parts = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict) and MARK not in value:
        parts = [(f"{where}[{key!r}]", item) for key, item in value.items()]
    else:
        return ""
    if not parts:
        return ""
    sizes = [(len(json.dumps(item, ensure_ascii=False).encode()), name) for name, item in parts]
    size, name = max(sizes)
    return f" (largest: {name}, {size} bytes)"


def spec_hash(backend: str, task_path: str, queue_name: str, args: Any, kwargs: Any) -> str:
    """Identity of a task spec for dedup: backend alias, task path, queue, encoded args/kwargs."""
    canonical = _canonical([backend, task_path, queue_name, args, kwargs])
    return hashlib.sha256(canonical.encode()).hexdigest()
