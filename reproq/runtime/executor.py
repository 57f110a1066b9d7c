"""Runs claimed rows: async tasks on the event loop, sync tasks in threads or child processes.

Each attempt is one asyncio task (the loop's ``create_task``: an anyio task group and cancel
scope per run cost several times the run of a no-op task) and ends as a `Completion` handed to
the completer (batched writes). The runtime cancels whatever still runs at the end of its
shutdown grace period (`cancel_all`). Timeouts: an async task is cancelled at its deadline
(``asyncio.timeout``); a user cancel or a lost lease cancels it at once. A sync task in a
thread cannot be stopped: at the deadline its context reports `cancel_requested` (a cooperative
task can return), and the run stays RUNNING — its lease renewed, its slot held — until the
thread returns; then the attempt is recorded as timed out. So a stuck thread never runs
alongside a retry of itself. A sync task on a queue listed in PROCESS_QUEUES runs in a child
process that is killed at the deadline and replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any

import anyio
from django.db import close_old_connections
from django.tasks import Task, TaskResultStatus
from django.tasks.signals import task_finished, task_started
from django.utils.module_loading import import_string

from .. import payload
from ..backend import ReproqBackend
from ..results import ReproqTaskContext, ReproqTaskResult, copy_task_unvalidated
from ..storedjson import reason_of
from .claimer import run_details
from .outcome import Completion, NonRetryable, failure
from .threads import DaemonThreadPool

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")
CANCEL_WAIT_SECONDS = 5.0  # shutdown: longest wait for cancelled runs to stop


class TaskTimeout(TimeoutError):
    """The attempt ran past its timeout_seconds."""


class TaskCancelled(Exception):
    """The run was cancelled while it was running."""


@dataclass
class Job:
    """One claimed row being executed in this process."""

    row: dict[str, Any]
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    awaiting: bool = False  # an async task's coroutine is being awaited (it can be cancelled)
    lost: bool = False  # lease lost (reclaimed elsewhere): result must not be written
    cancel_requested: bool = False  # a user asked to cancel this run
    timed_out: bool = False
    in_thread: bool = False  # a worker thread is executing it right now
    started: float = field(default_factory=time.monotonic)
    id: int = field(init=False)

    def __post_init__(self) -> None:
        self.id = int(self.row["id"])

    @property
    def attempt(self) -> int:
        return int(self.row["attempts"])


def resolve_task(task_path: str) -> Task:
    try:
        obj = import_string(task_path)
    except Exception as exc:
        raise LookupError(f"cannot import task {task_path!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Task):
        raise NonRetryable(f"{task_path!r} is a {type(obj).__name__}, not a @task") from TypeError(
            f"{task_path!r} is not a django.tasks.Task")
    return obj


_TEXT_COLUMNS = (("args", "args_json"), ("kwargs", "kwargs_json"))


def load_row(row: dict[str, Any]) -> None:
    """Decode what a claim returns as text (args, kwargs, then the run details), in place.

    PostgreSQL accepts JSON that Python cannot load (nesting ~1,000 deep, a number of more than
    4,300 digits) and times Python's datetime cannot hold: such a row, written by SQL or another
    language, fails alone as `NonRetryable` with a reason naming the column, never its batch.
    """
    for name, text_name in _TEXT_COLUMNS:
        if text_name in row:
            text = row.pop(text_name)
            try:
                row[name] = json.loads(text) if text is not None else None
            except (ValueError, RecursionError) as exc:
                raise NonRetryable(f"stored {name} cannot be decoded: {reason_of(exc)}"
                                   ) from exc
    try:
        run_details(row)
    except (ValueError, RecursionError, OverflowError) as exc:
        raise NonRetryable(f"stored worker_ids or metadata cannot be decoded: "
                           f"{reason_of(exc)}") from exc


def decode_call(row: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Arguments as the task receives them; a damaged payload is a non-retryable error."""
    try:
        args = payload.decode(row["args"], where="args")
        kwargs = payload.decode(row["kwargs"], where="kwargs")
    except LookupError:
        raise
    except Exception as exc:
        raise NonRetryable(f"stored arguments cannot be decoded: {exc}") from exc
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(
            isinstance(k, str) for k in kwargs):
        raise NonRetryable("stored arguments are damaged") from ValueError(
            f"args must be a JSON array and kwargs a JSON object, got "
            f"{type(row['args']).__name__} and {type(row['kwargs']).__name__}")
    return args, kwargs


class MetadataSaverSync:
    """Writes a running task's metadata from sync code (its thread or child process)."""

    def __init__(self, database: str, run_id: int) -> None:
        self.database = database
        self.run_id = run_id

    def save(self, metadata: dict[str, Any]) -> None:
        from django.db import connections

        from .. import sql

        text = payload.dumps(payload.encode(metadata, "metadata"))
        with connections[self.database].cursor() as cursor:
            cursor.execute(sql.SAVE_METADATA, {"metadata": text, "id": self.run_id})

    async def asave(self, metadata: dict[str, Any]) -> None:
        from asgiref.sync import sync_to_async

        await sync_to_async(self.save, thread_sensitive=False)(metadata)


class MetadataSaver(MetadataSaverSync):
    """Metadata writes of a task running in this process (async ones use the runtime's pool)."""

    def __init__(self, runtime: Runtime, run_id: int) -> None:
        super().__init__(runtime.backend.database, run_id)
        self.runtime = runtime

    async def asave(self, metadata: dict[str, Any]) -> None:
        from .. import sql

        text = payload.dumps(payload.encode(metadata, "metadata"))
        async with self.runtime.pool.connection() as conn:
            await conn.execute(sql.SAVE_METADATA, {"metadata": text, "id": self.run_id})


_LOG_RECEIVER_MODULE = "django.tasks.signals"
_TASKS_LOGGER = logging.getLogger("django.tasks")  # what Django's own log receivers log to
_log_only_cache: dict[tuple[Any, ...], bool] = {}


def _send(signal: Any, result: ReproqTaskResult) -> None:
    signal.send(sender=ReproqBackend, task_result=result)


def _log_only(signal: Any) -> bool:
    """True when every receiver of `signal` for reproq's backend is one of Django's own log
    receivers (`django.tasks.signals`); remembered until the signal's receivers change."""
    key = (id(signal), *(entry[0] for entry in signal.receivers))
    known = _log_only_cache.get(key)
    if known is None:
        sync_receivers, async_receivers = signal._live_receivers(ReproqBackend)
        known = not async_receivers and all(
            getattr(r, "__module__", "") == _LOG_RECEIVER_MODULE for r in sync_receivers)
        if len(_log_only_cache) > 64:
            _log_only_cache.clear()
        _log_only_cache[key] = known
    return known


def _silent(signal: Any, level: int) -> bool:
    """Sending `signal` would do nothing: only Django's log receivers listen and the
    django.tasks logger drops `level` (then the result object need not even be built)."""
    return not _TASKS_LOGGER.isEnabledFor(level) and _log_only(signal)


def _finish_level(completion: Completion) -> int:
    """The level Django's task_finished log receiver logs `completion` at."""
    return logging.INFO if completion.status == "SUCCESSFUL" else logging.ERROR


class Executor:
    """Holds the running jobs of this process and runs each to a `Completion`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.concurrency = runtime.settings.concurrency
        self.threads = DaemonThreadPool(self.concurrency)
        self._tasks: dict[str, Task] = {}  # task paths resolved by this runtime
        self.running: dict[int, Job] = {}
        self.early_cancels: dict[int, float] = {}  # cancels heard before their job started
        self._slot_freed: anyio.Event | None = None
        self.stopping = False  # `cancel_all` began: a cancellation means shutdown

    @property
    def slot_freed(self) -> anyio.Event:
        """Set at the next slot release (made on demand: no event per run when none waits)."""
        if self._slot_freed is None:
            self._slot_freed = anyio.Event()
        return self._slot_freed

    def free_slots(self) -> int:
        return max(self.concurrency - len(self.running), 0)

    def submit(self, rows: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        for row in rows:
            job = Job(row=row)
            noted = self.early_cancels.pop(job.id, None)
            if row.get("cancel_requested") or (noted is not None
                                               and time.monotonic() - noted < 60):
                job.cancel_requested = True
                job.cancel_flag.set()
            self.running[job.id] = job
            job.task = loop.create_task(self._run(job), name=f"reproq-run-{job.id}")

    async def cancel_all(self) -> None:
        """Shutdown: cancel every run still going here and wait for them to stop (their rows
        are put back by the runtime; no result is recorded)."""
        self.stopping = True
        tasks = [job.task for job in self.running.values()
                 if job.task is not None and not job.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # bounded: a task that swallows its cancellation must not hold shutdown forever
            await asyncio.wait(tasks, timeout=CANCEL_WAIT_SECONDS)

    def _release_slot(self, job: Job) -> None:
        self.running.pop(job.id, None)
        event, self._slot_freed = self._slot_freed, None
        if event is not None:
            event.set()
        self.runtime.claimer.slot_freed()

    def cancel(self, run_id: int, *, lost: bool = False) -> bool:
        """Stop a running job: a user cancel (recorded CANCELLED) or a lost lease (not recorded,
        since another process owns the row now)."""
        job = self.running.get(run_id)
        if job is None:
            if not lost:
                # The NOTIFY may beat the claim's result here: remember it for a short while.
                self.early_cancels[run_id] = time.monotonic()
                if len(self.early_cancels) > 1000:
                    self.early_cancels.pop(next(iter(self.early_cancels)))
            return False
        job.lost = job.lost or lost
        job.cancel_requested = job.cancel_requested or not lost
        job.cancel_flag.set()
        if job.awaiting and job.task is not None:
            job.task.cancel()  # `_attempt_async` records it as cancelled
        procs = self.runtime.processes
        if procs is not None:
            procs.kill_run(run_id)
        return True

    # ------------------------------------------------------------------ one attempt
    async def _run(self, job: Job) -> None:
        await self.runtime.gate.wait()  # requests first (reproq.runtime.gate)
        start = time.monotonic()
        try:
            completion = await self._attempt(job)
        except BaseException as exc:  # cancellation at shutdown ends up here
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                self.running.pop(job.id, None)
                raise
            logger.exception("reproq: internal error running run %s", job.id)
            completion = self._fail(job, exc)
        completion.duration = time.monotonic() - start
        completion.task_path = job.row["task_path"]
        completion.queue_name = job.row["queue_name"]
        if not job.lost:
            self.runtime.completer.put(completion)
        self.runtime.observe(completion)
        self._release_slot(job)

    def _fail(self, job: Job, exc: BaseException, reason: str = "") -> Completion:
        return failure(job.id, exc, attempt=job.attempt, max_attempts=int(job.row["max_attempts"]),
                       worker_id=self.runtime.worker_id, policy=self.runtime.retry_policy,
                       reason=reason)

    def _result(self, task: Task, job: Job, args: list[Any], kwargs: dict[str, Any],
                status: TaskResultStatus = TaskResultStatus.RUNNING,
                raw: str = "RUNNING", started: ReproqTaskResult | None = None
                ) -> ReproqTaskResult:
        row = job.row
        details = run_details(row)
        task = started.task if started is not None else copy_task_unvalidated(
            task, priority=row["priority"], queue_name=row["queue_name"],
            backend=self.runtime.backend.alias)
        return ReproqTaskResult(
            task=task, id=str(row["id"]), status=status, enqueued_at=details["enqueued_at"],
            started_at=details["started_at"], finished_at=None,
            last_attempted_at=details["last_attempted_at"], args=args, kwargs=kwargs,
            backend=self.runtime.backend.alias, errors=[],
            worker_ids=list(details["worker_ids"]), raw_status=raw,
            metadata=dict(details["metadata"]),
        )

    async def _attempt(self, job: Job) -> Completion:
        row = job.row
        if row["status"] == "EXPIRED":
            return Completion(id=job.id, status="EXPIRED", reason="expired before it started")
        if job.cancel_requested:
            return self._cancelled(job, TaskCancelled("cancelled before it started"))
        try:
            load_row(row)
        except NonRetryable as exc:
            return self._fail(job, exc, reason=str(exc))
        task = self._tasks.get(row["task_path"])
        if task is None:
            try:
                task = self._tasks[row["task_path"]] = resolve_task(row["task_path"])
            except Exception as exc:
                return self._fail(job, exc)
        timeout = float(row["timeout_seconds"])
        if iscoroutinefunction(task.func):
            return await self._attempt_async(job, task, timeout)
        procs = self.runtime.processes
        if procs is not None and row["queue_name"] in procs.queues:
            return await procs.run(job, timeout)
        return await self._attempt_thread(job, task, timeout)

    async def _attempt_async(self, job: Job, task: Task, timeout: float) -> Completion:
        try:
            if _has_models(job.row):
                args, kwargs = await self.threads.run(_decode_in_thread, job.row)
            else:
                args, kwargs = decode_call(job.row)
        except Exception as exc:
            return self._fail(job, exc)
        quiet = _silent(task_started, logging.INFO)
        result = (self._result(task, job, args, kwargs)
                  if task.takes_context or not quiet else None)
        context = self._context(task, job, result)
        if result is not None and not quiet:
            await self._signal(task_started, result)
        call_args = [context, *args] if context is not None else args
        try:
            value = await self._await_task(job, task, call_args, kwargs, timeout)
            completion = self._success(job, value, context)
        except TaskTimeout as exc:
            completion = self._fail(job, exc)
        except TaskCancelled as exc:
            completion = self._cancelled(job, exc)
        except Exception as exc:
            completion = (self._cancelled(job, exc) if job.cancel_requested
                          else self._fail(job, exc))
        if (completion.status in {"SUCCESSFUL", "FAILED", "CANCELLED"}
                and not _silent(task_finished, _finish_level(completion))):
            await self._signal(task_finished, self._final(task, job, args, kwargs, completion,
                                                          result))
        return self._with_metadata(completion, context)

    async def _await_task(self, job: Job, task: Task, call_args: list[Any],
                          kwargs: dict[str, Any], timeout: float) -> Any:
        """The task's coroutine, to its deadline (`TaskTimeout`) or a cancel (`TaskCancelled`:
        `cancel` cancels this asyncio task while `job.awaiting`)."""
        if job.cancel_flag.is_set():
            raise TaskCancelled("cancelled before it started")
        job.awaiting = True
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await task.func(*call_args, **kwargs)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not job.cancel_flag.is_set() or self.stopping or current is None:
                raise  # shutdown (`cancel_all`) or a cancellation from outside
            current.uncancel()
            raise TaskCancelled("cancelled while running") from None
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # the task's own TimeoutError: an ordinary failure
            raise TaskTimeout(f"async task exceeded its timeout of {timeout:g}s and was "
                              "cancelled") from exc
        finally:
            job.awaiting = False

    async def _attempt_thread(self, job: Job, task: Task, timeout: float) -> Completion:
        job.in_thread = True
        future = self.threads.submit(self._run_sync, job, task)
        try:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    return await asyncio.shield(future)
            except TimeoutError:
                if not deadline.expired():
                    raise
            # Deadline passed: ask the task to stop (context.cancel_requested) and keep the run
            # RUNNING until its thread returns, so it never overlaps a retry of itself.
            job.timed_out = True
            job.cancel_flag.set()
            await future
        finally:
            if future.done():
                job.in_thread = False
        return self._fail(job, TaskTimeout(
            f"sync task exceeded its timeout of {timeout:g}s; threads cannot be killed, so the "
            "run stayed RUNNING until its thread returned (list the queue in PROCESS_QUEUES to "
            "kill it at the deadline)"))

    def _run_sync(self, job: Job, task: Task) -> Completion:
        """One attempt of a sync task, in its worker thread (DB connections handled like a
        request's: closed if stale before, and after)."""
        close_old_connections()
        context = None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        try:
            try:
                args, kwargs = decode_call(job.row)
            except Exception as exc:
                return self._fail(job, exc)
            quiet = _silent(task_started, logging.INFO)
            result = (self._result(task, job, args, kwargs)
                      if task.takes_context or not quiet else None)
            context = self._context(task, job, result)
            if result is not None and not quiet:
                _send(task_started, result)
            call_args = [context, *args] if context is not None else args
            try:
                value = task.func(*call_args, **kwargs)
                if job.cancel_requested:
                    raise TaskCancelled("cancelled while running")
                completion = self._success(job, value, context)
            except TaskCancelled as exc:
                completion = self._cancelled(job, exc)
            except Exception as exc:
                completion = (self._cancelled(job, exc) if job.cancel_requested
                              else self._fail(job, exc))
                if (completion.status in {"FAILED", "CANCELLED"}
                        and not _silent(task_finished, _finish_level(completion))):
                    _send(task_finished, self._final(task, job, args, kwargs, completion, result))
                return self._with_metadata(completion, context)
            if (completion.status in {"SUCCESSFUL", "FAILED", "CANCELLED"} and not job.timed_out
                    and not _silent(task_finished, _finish_level(completion))):
                _send(task_finished, self._final(task, job, args, kwargs, completion, result))
            return self._with_metadata(completion, context)
        finally:
            close_old_connections()

    # ------------------------------------------------------------------ helpers
    def _context(self, task: Task, job: Job,
                 result: ReproqTaskResult | None) -> ReproqTaskContext | None:
        if not task.takes_context:
            return None
        assert result is not None  # built whenever the task takes a context
        metadata = dict(run_details(job.row)["metadata"])
        return ReproqTaskContext(task_result=result, metadata=metadata,
                                 _saver=MetadataSaver(self.runtime, job.id),
                                 _cancel_flag=job.cancel_flag)

    def _success(self, job: Job, value: Any, context: ReproqTaskContext | None) -> Completion:
        if value is None:
            return Completion(id=job.id, status="SUCCESSFUL", return_value="null")
        try:
            text = payload.dumps(payload.encode(value, "return value"))
        except payload.PayloadError as exc:
            return self._fail(job, exc, reason=f"return value cannot be stored: {exc}")
        return Completion(id=job.id, status="SUCCESSFUL", return_value=text)

    def _cancelled(self, job: Job, exc: BaseException) -> Completion:
        return Completion(id=job.id, status="CANCELLED", reason="cancelled while running",
                          error=json.dumps({"exception_class_path": "reproq.runtime.executor."
                                            "TaskCancelled", "traceback": str(exc),
                                            "attempt": job.attempt}))

    def _with_metadata(self, completion: Completion,
                       context: ReproqTaskContext | None) -> Completion:
        if context is not None:
            try:
                completion.metadata = payload.dumps(payload.encode(context.metadata, "metadata"))
            except payload.PayloadError as exc:
                logger.warning("reproq: metadata of run %s not saved: %s", completion.id, exc)
        return completion

    def _final(self, task: Task, job: Job, args: list[Any], kwargs: dict[str, Any],
               completion: Completion, started: ReproqTaskResult | None = None
               ) -> ReproqTaskResult:
        status = (TaskResultStatus.SUCCESSFUL if completion.status == "SUCCESSFUL"
                  else TaskResultStatus.FAILED)
        result = self._result(task, job, args, kwargs, status=status, raw=completion.status,
                              started=started)
        if completion.return_value is not None:
            object.__setattr__(result, "_return_value",
                               payload.decode(json.loads(completion.return_value), None))
        return result

    async def _signal(self, signal: Any, result: ReproqTaskResult) -> None:
        """Send a signal from the event loop: Django's own log receivers run inline, other sync
        receivers in a thread, async receivers awaited."""
        if _log_only(signal):
            _send(signal, result)
            return
        await signal.asend(sender=ReproqBackend, task_result=result)


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _has_models(row: dict[str, Any]) -> bool:
    args, kwargs = row["args"], row["kwargs"]
    if not kwargs and type(args) is list and all(type(a) in _SCALARS for a in args):
        return False  # model references are JSON objects
    text = json.dumps([args, kwargs])
    return payload.MARK in text and '"model"' in text


def _decode_in_thread(row: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    close_old_connections()
    try:
        return decode_call(row)
    finally:
        close_old_connections()
