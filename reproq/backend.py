"""`ReproqBackend`: the Django Tasks backend (validate, enqueue, bulk_enqueue, get_result).

Enqueue is one SQL statement per batch (`reproq.sql.ENQUEUE`; `ENQUEUE_ONE` for a single task):
insert, dedup against the partial unique index, and NOTIFY each queue, all in the caller's
transaction when `enqueue` runs inside `transaction.atomic()`. `aenqueue` / `aget_result` use a
native psycopg async pool (no thread hop); `aenqueue` therefore commits on its own, immediately
(see docs/enqueue.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from django.core import checks
from django.db import connections
from django.tasks import Task
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone
from django.utils.module_loading import import_string

from . import batch, djcursor, payload, sql, storedjson
from .batch import EnqueueSpec
from .concurrency import resolve_key, rule_for
from .conf import (
    QUEUE_NAME_RE,
    BackendOptions,
    aging_factor_us,
    current_runtime_settings,
    parse_backend_options,
)
from .exceptions import InvalidEnqueue
from .results import ReproqTask, ReproqTaskResult, copy_task_unvalidated
from .states import RawStatus, to_django_status

RESERVED_KWARGS = ("run_after", "lock_key", "priority", "concurrency_key", "concurrency_limit")
MAX_BATCH = 10_000
PIPELINE_CHUNK = 2_000  # tasks per statement when a bulk call is pipelined
MAX_KEY_LENGTH = 255
# The latest due (or expiry) time a run may have. PostgreSQL stores later timestamps, but Python
# cannot read anything past 9999-12-31 back, in UTC or in a session time zone east of it: such a
# row would break every reader (get_result, the admin, the dashboard). The year before that
# leaves room for every time zone offset.
LATEST_DUE = datetime(9999, 1, 1, tzinfo=UTC)
# An earlier run_after (due at once either way) is stored as this: west of UTC, a time in year 1
# would read back as year 0.
EARLIEST_DUE = datetime(1, 1, 2, tzinfo=UTC)
# The cheap test before the exact one (`_check_due_range`): a run_after in years 2-6999, a delay
# from now and an expires_in each under _FAR_DAYS (~2,738 years) cannot reach LATEST_DUE.
_FAR_DAYS = 1_000_000
_FAR_YEAR = 7000


_reserved_params_checked: dict[Callable[..., Any], str | None] = {}


def _reserved_param_clash(func: Callable[..., Any]) -> str | None:
    if func not in _reserved_params_checked:
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError):
            params = {}
        clash = next((name for name in RESERVED_KWARGS if name in params), None)
        _reserved_params_checked[func] = clash
    return _reserved_params_checked[func]


def _missing_task(*args: Any, **kwargs: Any) -> None:
    """Stands in for a stored task path that no longer imports."""
    raise LookupError("the task function of this run cannot be imported")


class ReproqBackend(BaseTaskBackend):
    task_class = ReproqTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self._parsed: tuple[BackendOptions, list[Any]] | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def reproq_options(self) -> BackendOptions:
        if self._parsed is None:
            opts, problems = parse_backend_options(self.alias, self.options)
            if opts.prepared_statements and not _session_state_allowed():
                opts = dataclasses.replace(opts, prepared_statements=False)  # CONNECTION_MODE
            self._parsed = (opts, problems)
        return self._parsed[0]

    @property
    def database(self) -> str:
        return self.reproq_options.database

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        from django.apps import apps

        from .conf import validate_queues

        messages: list[checks.CheckMessage] = []
        _, problems = parse_backend_options(self.alias, self.options)
        problems += validate_queues(self.alias, list(self.queues))
        for problem in problems:
            messages.append(checks.Error(f"{problem.setting}: {problem.message}",
                                         hint=problem.hint, id="reproq.E001"))
        if not apps.is_installed("reproq"):
            messages.append(checks.Error("reproq is not in INSTALLED_APPS",
                                         hint='add "reproq" to INSTALLED_APPS', id="reproq.E002"))
        db = self.reproq_options.database
        if db in connections and connections[db].vendor != "postgresql":
            messages.append(checks.Error(
                f"reproq needs PostgreSQL; DATABASES[{db!r}] is {connections[db].vendor}",
                hint="point the backend's OPTIONS['DATABASE'] at a PostgreSQL database",
                id="reproq.E003"))
        return messages

    # ------------------------------------------------------------------ validation
    def validate_task(self, task: Task) -> None:
        # Before core's checks, which compare the priority with ints (a str raises TypeError)
        # and accept floats such as 5.0 that the priority column and enqueue then reject.
        if not isinstance(task.priority, int) or isinstance(task.priority, bool):
            raise InvalidTask(f"priority must be an int from -100 to 100, got {task.priority!r}")
        super().validate_task(task)
        if not QUEUE_NAME_RE.match(task.queue_name):
            raise InvalidTask(f"Queue name {task.queue_name!r} is invalid: use 1-64 characters "
                              "from letters, digits, _ . : -")
        clash = _reserved_param_clash(task.func)
        if clash:
            raise InvalidTask(
                f"{task.module_path} has a parameter named {clash!r}, which reproq reserves as an "
                f"enqueue option ({', '.join(RESERVED_KWARGS)}); rename the parameter")
        if isinstance(task, ReproqTask):
            for name in ("max_attempts", "timeout_seconds"):
                value = getattr(task, name)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                          or value < 1):
                    raise InvalidTask(f"{name} must be an int >= 1, got {value!r}")
            if task.dedup is not None and not isinstance(task.dedup, bool):
                raise InvalidTask(f"dedup must be True or False, got {task.dedup!r}")
            if task.expires_in is not None and (not isinstance(task.expires_in, timedelta)
                                                or task.expires_in <= timedelta(0)):
                raise InvalidTask(f"expires_in must be a positive timedelta, "
                                  f"got {task.expires_in!r}")

    # ------------------------------------------------------------------ enqueue
    def prepare(self, task: Task, args: Sequence[Any], kwargs: dict[str, Any], *,
                validated: set[int] | None = None) -> EnqueueSpec:
        """Validate and encode one call; raise before anything touches the database.

        `validated` (ids of task objects already validated in this batch) lets a bulk call
        validate each distinct task once.
        """
        if validated is None or id(task) not in validated:
            self.validate_task(task)
            if task.backend != self.alias:
                raise InvalidTask(f"task {task.module_path} uses backend {task.backend!r}, "
                                  f"not {self.alias!r}")
            if validated is not None:
                validated.add(id(task))
        kwargs = dict(kwargs)
        reserved = ({name: kwargs.pop(name) for name in RESERVED_KWARGS if name in kwargs}
                    if kwargs else {})
        opts = self.reproq_options

        priority = reserved.get("priority", task.priority)
        if (not isinstance(priority, int) or isinstance(priority, bool)
                or not -100 <= priority <= 100):
            raise InvalidEnqueue(f"priority must be an int from -100 to 100, got {priority!r}")

        run_after: datetime | None = task.run_after
        delay: float | None = None
        if "run_after" in reserved:
            value = reserved["run_after"]
            if value is None:
                run_after = None
            elif isinstance(value, timedelta):
                run_after, delay = None, max(value.total_seconds(), 0.0)
            elif isinstance(value, datetime):
                if timezone.is_naive(value):
                    raise InvalidEnqueue(
                        f"run_after must be an aware datetime, got naive {value!r}; use "
                        "django.utils.timezone.now() + timedelta(...) or pass a timedelta")
                run_after = value
            else:
                raise InvalidEnqueue("run_after must be an aware datetime or a timedelta, "
                                     f"got {type(value).__name__}")

        lock_key = reserved.get("lock_key")
        if lock_key is not None and (not isinstance(lock_key, str) or not lock_key
                                     or len(lock_key) > MAX_KEY_LENGTH):
            raise InvalidEnqueue(f"lock_key must be a non-empty str of at most {MAX_KEY_LENGTH} "
                                 f"characters, got {lock_key!r}")
        if lock_key is not None and ("\x00" in lock_key or not lock_key.isascii()):
            problem = payload.text_problem(lock_key)
            if problem is not None:
                raise InvalidEnqueue(f"lock_key {lock_key!r} cannot be stored: {problem}")

        conc_key: str | None = None
        conc_limit: int | None = None
        if "concurrency_key" in reserved or "concurrency_limit" in reserved:
            raw_key = reserved.get("concurrency_key")
            conc_limit = reserved.get("concurrency_limit")
            if raw_key is None or conc_limit is None:
                raise InvalidEnqueue("concurrency_key and concurrency_limit go together")
            if not (isinstance(raw_key, str) and raw_key) and not callable(raw_key):
                raise InvalidEnqueue("concurrency_key must be a non-empty str or a callable of "
                                     f"the task's arguments, got {raw_key!r}")
            if (not isinstance(conc_limit, int) or isinstance(conc_limit, bool)
                    or conc_limit < 0):
                raise InvalidEnqueue(f"concurrency_limit must be an int >= 0, got {conc_limit!r}")
            try:
                conc_key = resolve_key(raw_key, args, kwargs)
            except Exception as exc:
                raise InvalidEnqueue(f"concurrency_key could not be computed: {exc}") from exc
        else:
            rule = rule_for(task.module_path)
            if rule is not None:
                try:
                    conc_key = rule.resolve_key(args, kwargs)
                except Exception as exc:
                    raise InvalidEnqueue(
                        f"the limits_concurrency key of {task.module_path} could not be "
                        f"computed: {exc}") from exc
                conc_limit = rule.limit
        if conc_key is not None:
            if len(conc_key) > MAX_KEY_LENGTH:
                raise InvalidEnqueue(f"concurrency key is longer than {MAX_KEY_LENGTH} characters")
            if "\x00" in conc_key or not conc_key.isascii():
                problem = payload.text_problem(conc_key)
                if problem is not None:
                    raise InvalidEnqueue(f"concurrency key {conc_key!r} cannot be stored: "
                                         f"{problem}")
        if lock_key is not None and conc_key is not None:
            raise InvalidEnqueue(
                f"a run takes either lock_key or a concurrency key, not both (got lock_key="
                f"{lock_key!r} and concurrency key {conc_key!r}); a lock_key is a concurrency "
                "limit of 1 on its own key")

        enc_args, enc_kwargs = payload.encode_call(args, kwargs)
        dedup = opts.dedup_active
        max_attempts, timeout, expires = opts.max_attempts, opts.timeout_seconds, opts.expires_in
        if isinstance(task, ReproqTask):
            dedup = opts.dedup_active if task.dedup is None else task.dedup
            max_attempts = task.max_attempts or max_attempts
            timeout = task.timeout_seconds or timeout
            expires = task.expires_in or expires
        if ((run_after is not None and not 1 < run_after.year < _FAR_YEAR)
                or (delay is not None and delay > _FAR_DAYS * 86400.0)
                or (expires is not None and expires.days > _FAR_DAYS)):
            run_after = _check_due_range(run_after, delay, expires)
        # dumps before spec_hash: it refuses text PostgreSQL cannot store, naming the argument
        args_text = payload.dumps(enc_args, "args")
        kwargs_text = payload.dumps(enc_kwargs, "kwargs") if enc_kwargs else "{}"
        digest = (payload.spec_hash(self.alias, task.module_path, task.queue_name, enc_args,
                                    enc_kwargs) if dedup else None)
        return EnqueueSpec(
            task=task if priority == task.priority else copy_task_unvalidated(
                task, priority=priority),
            args=list(args), kwargs=kwargs,
            enc_args=args_text, enc_kwargs=kwargs_text,
            spec_hash=digest, priority=priority, run_after=run_after, delay=delay,
            lock_key=lock_key, concurrency_key=conc_key, concurrency_limit=conc_limit,
            max_attempts=max_attempts, timeout=timeout,
            expires_in=expires.total_seconds() if expires else None,
        )

    def prepare_all(
        self, calls: Iterable[tuple[Task, Sequence[Any], dict[str, Any]]]
    ) -> list[EnqueueSpec]:
        """`prepare` every call (each distinct task object validated once)."""
        validated: set[int] = set()
        calls = calls if isinstance(calls, list) else list(calls)
        with batch.gc_paused(len(calls)):
            return [self.prepare(task, args, kwargs, validated=validated)
                    for task, args, kwargs in calls]

    def _statement(self, specs: list[EnqueueSpec]) -> tuple[str, dict[str, Any]]:
        """The enqueue statement for `specs` and its parameters: ENQUEUE_ONE for one task,
        ENQUEUE (arrays) for more."""
        params = self._params(specs)
        if len(specs) == 1:
            params["args_1"] = specs[0].enc_args
            return sql.ENQUEUE_ONE, params
        return sql.ENQUEUE, params

    def _params(self, specs: list[EnqueueSpec]) -> dict[str, Any]:
        opts = self.reproq_options
        params = batch.column_params(specs)
        params.update({
            "backend": self.alias,
            "aging_us": aging_factor_us(current_runtime_settings().priority_aging_factor),
            "code_ref": opts.code_ref,
            "pip_lock_hash": opts.pip_lock_hash,
        })
        return params

    def _assemble(
        self, specs: Sequence[EnqueueSpec], rows: list[tuple[Any, ...]],
        existing: dict[str, dict[str, Any]],
    ) -> tuple[list[ReproqTaskResult | None], list[ReproqTaskResult]]:
        """Results in input order (None where the duplicate vanished) and the new ones."""
        with batch.gc_paused(len(rows)):
            return self._assemble_rows(specs, rows, existing)

    def _assemble_rows(
        self, specs: Sequence[EnqueueSpec], rows: list[tuple[Any, ...]],
        existing: dict[str, dict[str, Any]],
    ) -> tuple[list[ReproqTaskResult | None], list[ReproqTaskResult]]:
        inserted, enqueued_at = batch.read_rows(rows)
        results: list[ReproqTaskResult | None] = []
        fresh: list[ReproqTaskResult] = []
        first_in_batch: dict[str, ReproqTaskResult] = {}
        alias = self.alias
        new_result = batch.new_result
        for spec, row in zip(specs, inserted, strict=True):
            if row.run_id is not None:
                assert enqueued_at is not None
                result = new_result(spec, row.run_id, enqueued_at, row.run_after, row.waiting,
                                    alias)
                fresh.append(result)
                if spec.spec_hash:
                    first_in_batch.setdefault(spec.spec_hash, result)
            elif spec.spec_hash in first_in_batch:
                result = first_in_batch[spec.spec_hash]
            elif spec.spec_hash in existing:
                result = self._row_to_result(existing[spec.spec_hash], args=spec.args,
                                             kwargs=spec.kwargs)
            else:
                result = None
            results.append(result)
        return results, fresh

    def enqueue(self, task: Task, args: Sequence[Any], kwargs: dict[str, Any]) -> ReproqTaskResult:
        return self.bulk_enqueue([(task, args, kwargs)])[0]

    def bulk_enqueue(
        self, calls: Iterable[tuple[Task, Sequence[Any], dict[str, Any]]]
    ) -> list[ReproqTaskResult]:
        """Enqueue many calls; results come back in input order.

        Up to PIPELINE_CHUNK calls go in one statement. Larger batches are pipelined (see
        `_bulk_enqueue_pipelined`) in one transaction; without prepared statements they are
        sent as one statement per MAX_BATCH.
        """
        from django.db import InterfaceError, OperationalError

        from .db import client_timeout, unavailable
        from .exceptions import DatabaseUnavailable

        calls = calls if isinstance(calls, list) else list(calls)
        try:
            if len(calls) > PIPELINE_CHUNK and self.reproq_options.prepared_statements:
                return self._bulk_enqueue_pipelined(calls)
            specs = self.prepare_all(calls)
            out: list[ReproqTaskResult] = []
            for start in range(0, len(specs), MAX_BATCH):
                out.extend(self._enqueue_batch_sync(specs[start:start + MAX_BATCH]))
            return out
        except (OperationalError, InterfaceError) as exc:
            if isinstance(exc, DatabaseUnavailable):
                raise
            # Django's connection (its own connect_timeout: set it in DATABASES OPTIONS).
            connected = connections[self.database].connection is not None
            raise unavailable(self.database, client_timeout(self.database), exc,
                              sent=connected) from exc

    def _bulk_enqueue_pipelined(
        self, calls: list[tuple[Task, Sequence[Any], dict[str, Any]]]
    ) -> list[ReproqTaskResult]:
        """Encode and send chunk after chunk without waiting for replies (psycopg pipeline
        mode), so PostgreSQL inserts one chunk while Python encodes the next; then read the
        replies. All in one transaction (a savepoint inside the caller's): bad input found in a
        later chunk, or a failed statement, leaves nothing behind."""
        from django.db import transaction

        sent: list[tuple[list[EnqueueSpec], Any]] = []
        with transaction.atomic(using=self.database):
            try:
                with djcursor.pipeline(self.database):
                    for start in range(0, len(calls), PIPELINE_CHUNK):
                        specs = self.prepare_all(calls[start:start + PIPELINE_CHUNK])
                        cursor = djcursor.cursor(self.database, binary=True)
                        sent.append((specs, cursor))
                        cursor.execute(sql.ENQUEUE, self._params(specs))
                    replies = [(specs, cursor.fetchall()) for specs, cursor in sent]
            finally:
                for _, cursor in sent:
                    cursor.close()
            out: list[ReproqTaskResult] = []
            for specs, rows in replies:
                out.extend(self._enqueue_batch_sync(specs, first_rows=rows))
        return out

    def _enqueue_batch_sync(self, specs: list[EnqueueSpec], *,
                            first_rows: list[tuple[Any, ...]] | None = None,
                            ) -> list[ReproqTaskResult]:
        """Insert `specs` with one statement and resolve dedup skips (a few rounds at most).
        `first_rows`: the first statement's reply, when it was already sent (pipelined)."""
        results: list[ReproqTaskResult | None] = [None] * len(specs)
        pending = list(range(len(specs)))
        with djcursor.cursor(self.database, self.reproq_options.prepared_statements,
                             binary=True) as cursor:
            for _ in range(5):
                chunk = [specs[i] for i in pending]
                if first_rows is not None:
                    rows, first_rows = first_rows, None
                else:
                    cursor.execute(*self._statement(chunk))
                    rows = cursor.fetchall()
                existing: dict[str, dict[str, Any]] = {}
                missing = _dedup_hits(chunk, rows)
                if missing:
                    cursor.execute(sql.ACTIVE_BY_SPEC, {"hashes": sorted(missing)})
                    existing = {r["spec_hash"]: r for r in _dict_rows(cursor)}
                got, fresh = self._assemble(chunk, rows, existing)
                if fresh and batch.enqueued_signal_needed(type(self)):
                    for result in fresh:
                        task_enqueued.send(sender=type(self), task_result=result)
                for i, result in zip(pending, got, strict=True):
                    results[i] = result
                pending = [i for i in pending if results[i] is None]
                if not pending:
                    break
        if pending:
            raise RuntimeError("reproq could not enqueue after repeated dedup races")
        return results  # type: ignore[return-value]

    async def aenqueue(
        self, task: Task, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> ReproqTaskResult:
        return (await self.abulk_enqueue([(task, args, kwargs)]))[0]

    async def abulk_enqueue(
        self, calls: Iterable[tuple[Task, Sequence[Any], dict[str, Any]]]
    ) -> list[ReproqTaskResult]:
        """Async enqueue on reproq's psycopg pool: its own transaction, committed at once.

        Bounded (docs/operations.md, "Database outages"): it waits `db.client_timeout` seconds
        (the alias's connect_timeout, 5 by default) for a connection, and as long again plus
        5 ms per run for the statements of each batch; then it raises
        `reproq.exceptions.DatabaseUnavailable`, which says whether the batch may have been
        written."""
        from .db import UNAVAILABLE, client_timeout, get_pool, unavailable

        specs = self.prepare_all(calls)
        out: list[ReproqTaskResult] = []
        timeout = client_timeout(self.database)
        pool = await get_pool(self.database)
        for start in range(0, len(specs), MAX_BATCH):
            part = specs[start:start + MAX_BATCH]
            bound, sent = timeout, bool(out)
            try:
                async with pool.connection(timeout=timeout) as conn:
                    bound, sent = timeout + 0.005 * len(part), True
                    with anyio.fail_after(bound):
                        results, fresh = await self._aenqueue_part(conn, part)
            except UNAVAILABLE as exc:
                raise unavailable(self.database, bound, exc, sent=sent) from exc
            if fresh and batch.enqueued_signal_needed(type(self)):
                for result in fresh:
                    await task_enqueued.asend(sender=type(self), task_result=result)
            out.extend(results)
        return out

    async def _aenqueue_part(self, conn: Any, part: list[EnqueueSpec]
                             ) -> tuple[list[ReproqTaskResult], list[ReproqTaskResult]]:
        """Insert `part` on `conn` and resolve dedup skips: (results in order, new ones)."""
        from psycopg.rows import tuple_row

        results: list[ReproqTaskResult | None] = [None] * len(part)
        fresh_all: list[ReproqTaskResult] = []
        pending = list(range(len(part)))
        for _ in range(5):
            chunk = [part[i] for i in pending]
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(*self._statement(chunk), binary=True)
                rows = await cur.fetchall()
            existing: dict[str, dict[str, Any]] = {}
            missing = _dedup_hits(chunk, rows)
            if missing:
                dcur = await conn.execute(sql.ACTIVE_BY_SPEC, {"hashes": sorted(missing)})
                existing = {r["spec_hash"]: r for r in await dcur.fetchall()}
            got, fresh = self._assemble(chunk, rows, existing)
            fresh_all.extend(fresh)
            for i, result in zip(pending, got, strict=True):
                results[i] = result
            pending = [i for i in pending if results[i] is None]
            if not pending:
                break
        if pending:
            raise RuntimeError("reproq could not enqueue after repeated dedup races")
        return results, fresh_all  # type: ignore[return-value]

    # ------------------------------------------------------------------ cancellation
    def cancel(self, result_id: str) -> ReproqTaskResult:
        """Cancel a run: READY/WAITING end CANCELLED at once; a RUNNING one is stopped by the
        process running it (within a second, through NOTIFY). Finished runs are unchanged."""
        from .control import cancel_runs

        cancel_runs([self._parse_id(result_id)], self.database)
        return self.get_result(result_id)

    async def acancel(self, result_id: str) -> ReproqTaskResult:
        from .control import acancel_runs

        await acancel_runs([self._parse_id(result_id)], self.database)
        return await self.aget_result(result_id)

    # ------------------------------------------------------------------ results
    @staticmethod
    def _parse_id(result_id: Any) -> int:
        from .ids import parse_id

        text = str(result_id)
        try:
            if text.startswith("#"):
                raise ValueError(text)
            return parse_id(text)
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None

    def get_result(self, result_id: str) -> ReproqTaskResult:
        pk = self._parse_id(result_id)
        with djcursor.cursor(self.database, self.reproq_options.prepared_statements) as cursor:
            cursor.execute(sql.GET_RESULT, {"id": pk})
            rows = _dict_rows(cursor)
        if not rows:
            raise TaskResultDoesNotExist(result_id)
        return self._row_to_result(rows[0])

    async def aget_result(self, result_id: str) -> ReproqTaskResult:
        from asgiref.sync import sync_to_async

        from .db import get_pool

        pk = self._parse_id(result_id)
        pool = await get_pool(self.database)
        async with pool.connection() as conn:
            cur = await conn.execute(sql.GET_RESULT, {"id": pk})
            row = await cur.fetchone()
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        if _has_model_refs(row):
            return await sync_to_async(self._row_to_result)(row)
        return self._row_to_result(row, load=None)

    def _task_for_row(self, row: dict[str, Any]) -> Task:
        run_after, enqueued_at = row["run_after"], row["enqueued_at"]
        deferred = (run_after if run_after is not None and enqueued_at is not None
                    and run_after > enqueued_at else None)
        try:
            task = import_string(row["task_path"])
        except Exception:
            task = None
        if not isinstance(task, Task):
            task = object.__new__(ReproqTask)
            for f in dataclasses.fields(ReproqTask):
                object.__setattr__(task, f.name, f.default if f.name != "func" else _missing_task)
        return copy_task_unvalidated(task, priority=row["priority"],
                                     queue_name=row["queue_name"], run_after=deferred,
                                     backend=self.alias)

    def _row_to_result(
        self, row: dict[str, Any], *, args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None, load: Any = payload.load_model,
    ) -> ReproqTaskResult:
        raw = row["status"]
        if args is None or kwargs is None:
            args, kwargs = _decode_call(row, load)
        errors = [
            TaskError(exception_class_path=str(e.get("exception_class_path", "")),
                      traceback=str(e.get("traceback", "")))
            for e in _json_list(row["errors"]) if isinstance(e, dict)
        ]
        result = ReproqTaskResult(
            task=self._task_for_row(row), id=str(row["id"]), status=to_django_status(raw),
            enqueued_at=row["enqueued_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], last_attempted_at=row["last_attempted_at"],
            args=args, kwargs=kwargs, backend=self.alias, errors=errors,
            worker_ids=[str(w) for w in _json_list(row["worker_ids"]) if w is not None],
            raw_status=raw, status_reason=row["status_reason"] or "",
            metadata=row["metadata"] if isinstance(row["metadata"], dict) else {},
        )
        if raw == RawStatus.SUCCESSFUL:
            try:
                value = payload.decode(row["return_value"], load)
            except Exception:
                value = row["return_value"]
            object.__setattr__(result, "_return_value", value)
        return result


def _check_due_range(run_after: datetime | None, delay: float | None,
                     expires: timedelta | None) -> datetime | None:
    """The run_after to store, or InvalidEnqueue: a due time (run_after, or now + a delay) or
    an expiry (due + expires_in) after LATEST_DUE is refused; a run_after before EARLIEST_DUE
    (already due either way) is stored as EARLIEST_DUE. Only called when a cheap test says one
    of them might be out of range."""
    try:
        due = (run_after if run_after is not None
               else timezone.now() + timedelta(seconds=delay or 0.0))
        too_late = due > LATEST_DUE
    except OverflowError:
        due, too_late = None, True
    if too_late or due is None:
        what = (f"run_after {run_after.isoformat()}" if run_after is not None
                else f"run_after (a delay of {delay:,.0f} seconds)")
        raise InvalidEnqueue(f"{what} is too far in the future: reproq accepts due times "
                             f"before {LATEST_DUE.date().isoformat()} UTC")
    if due < EARLIEST_DUE:
        due = run_after = EARLIEST_DUE
    if expires is not None:
        try:
            too_late = due + expires > LATEST_DUE
        except OverflowError:
            too_late = True
        if too_late:
            raise InvalidEnqueue(f"expires_in {expires} from the due time "
                                 f"{due.date().isoformat()} ends after "
                                 f"{LATEST_DUE.date().isoformat()} UTC: shorten expires_in or "
                                 "run_after")
    return run_after


def _decode_call(row: dict[str, Any], load: Any) -> tuple[list[Any], dict[str, Any]]:
    """Stored args/kwargs as the task will see them; a damaged payload is shown as stored."""
    raw_args, raw_kwargs = row["args"], row["kwargs"]
    try:
        args = payload.decode(raw_args, load)
        kwargs = payload.decode(raw_kwargs, load)
    except Exception:
        return (raw_args if isinstance(raw_args, list) else [raw_args],
                raw_kwargs if isinstance(raw_kwargs, dict) else {"": raw_kwargs})
    if not isinstance(args, list):
        args = [args]
    if not isinstance(kwargs, dict):
        kwargs = {"": kwargs}
    return args, kwargs


def _dedup_hits(specs: Sequence[EnqueueSpec], rows: list[tuple[Any, ...]]) -> set[str]:
    """Spec hashes skipped by ON CONFLICT because of a run that existed before this statement.

    A duplicate of a row inserted by the same statement is resolved in `_assemble` without a
    second statement; only the others need `ACTIVE_BY_SPEC`. (Row[0] is the new id or NULL.)
    """
    skipped = [s.spec_hash for s, r in zip(specs, rows, strict=True) if r[0] is None]
    if not skipped:
        return set()
    inserted = {s.spec_hash for s, r in zip(specs, rows, strict=True) if r[0] is not None}
    return {h for h in skipped if h and h not in inserted}


def _json_list(value: Any) -> list[Any]:
    """A jsonb column that should hold a list; anything else (a hand-edited row) reads as []."""
    return value if isinstance(value, list) else []


def _has_model_refs(row: dict[str, Any]) -> bool:
    text = json.dumps([row["args"], row["kwargs"], row["return_value"]])
    return '"model"' in text and payload.MARK in text


JSON_COLUMNS = frozenset({"args", "kwargs", "worker_ids", "errors", "return_value", "metadata"})


def _session_state_allowed() -> bool:
    from .db import session_state_allowed

    return session_state_allowed()


def _dict_rows(cursor: Any) -> list[dict[str, Any]]:
    """Rows of a Django cursor as dicts; Django hands jsonb over as text, so parse it here (JSON
    Python cannot load stays text, as `storedjson.Undecodable`: such a run is still shown)."""
    names = [col[0] for col in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        for name in JSON_COLUMNS.intersection(row):
            if isinstance(row[name], str):
                row[name] = storedjson.loads(row[name])
    return rows
