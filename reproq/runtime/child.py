"""The child process of process mode: sets Django up once, then runs one sync task at a time.

Requests and replies are plain dicts over a multiprocessing pipe. Django's task_started /
task_finished signals are sent here, where the task runs. The parent kills this process when
the task times out or is cancelled, and starts a new one.
"""

from __future__ import annotations

import os
import traceback
from typing import Any


def main(conn: Any, settings_module: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    import django

    django.setup()
    conn.send({"ready": os.getpid()})
    while True:
        try:
            request = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if request is None:
            return
        conn.send(run_one(request))


def run_one(request: dict[str, Any]) -> dict[str, Any]:
    from django.db import close_old_connections
    from django.tasks import TaskResultStatus
    from django.tasks.signals import task_finished, task_started

    from .. import payload
    from ..backend import ReproqBackend
    from ..results import ReproqTaskContext, ReproqTaskResult, copy_task_unvalidated
    from .claimer import run_details
    from .executor import MetadataSaverSync, decode_call, resolve_task

    row = request["row"]
    close_old_connections()
    context = None
    try:
        try:
            task = resolve_task(row["task_path"])
            args, kwargs = decode_call(row)
        except Exception as exc:
            return _error(exc, retryable=not _non_retryable(exc))
        task = copy_task_unvalidated(task, priority=row["priority"],
                                     queue_name=row["queue_name"], backend=request["backend"])
        details = run_details(row)
        result = ReproqTaskResult(
            task=task, id=str(row["id"]), status=TaskResultStatus.RUNNING,
            enqueued_at=details["enqueued_at"], started_at=details["started_at"],
            finished_at=None, last_attempted_at=details["last_attempted_at"], args=args,
            kwargs=kwargs, backend=request["backend"], errors=[],
            worker_ids=list(details["worker_ids"]), raw_status="RUNNING",
            metadata=dict(details["metadata"]),
        )
        if task.takes_context:
            context = ReproqTaskContext(task_result=result, metadata=dict(details["metadata"]),
                                        _saver=MetadataSaverSync(request["database"], row["id"]))
        task_started.send(sender=ReproqBackend, task_result=result)
        call_args = [context, *args] if context is not None else args
        try:
            value = task.func(*call_args, **kwargs)
            text = payload.dumps(payload.encode(value, "return value"))
        except Exception as exc:
            final = request["final_attempt"] or isinstance(exc, payload.PayloadError)
            if final:
                object.__setattr__(result, "status", TaskResultStatus.FAILED)
                task_finished.send(sender=ReproqBackend, task_result=result)
            reply = _error(exc, retryable=not isinstance(exc, payload.PayloadError))
            reply["metadata"] = _metadata(context)
            return reply
        object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
        object.__setattr__(result, "_return_value", value)
        task_finished.send(sender=ReproqBackend, task_result=result)
        return {"ok": True, "return_value": text, "metadata": _metadata(context)}
    finally:
        close_old_connections()


def _non_retryable(exc: BaseException) -> bool:
    from .outcome import NonRetryable

    return isinstance(exc, NonRetryable)


def _metadata(context: Any) -> str | None:
    from .. import payload

    if context is None:
        return None
    try:
        return payload.dumps(payload.encode(context.metadata, "metadata"))
    except payload.PayloadError:
        return None


def _error(exc: BaseException, *, retryable: bool) -> dict[str, Any]:
    cause = exc.__cause__ if exc.__cause__ is not None and not retryable else exc
    cls = type(cause)
    return {
        "ok": False,
        "retryable": retryable,
        "exception_class_path": f"{cls.__module__}.{cls.__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cause)),
    }
