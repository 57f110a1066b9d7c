"""Process mode: sync tasks of the queues in PROCESS_QUEUES run in child processes that can be
killed. A child runs one task at a time; at the timeout (or on cancel) it is SIGKILLed and a new
one is started in its place, so a stuck task never keeps a slot or a thread forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from .outcome import Completion, NonRetryable, failure

if TYPE_CHECKING:
    from .executor import Job
    from .runtime import Runtime

logger = logging.getLogger("reproq.runtime")


class ChildDied(RuntimeError):
    """The child process running the task exited without answering."""


@dataclass
class Child:
    process: Any
    conn: Any
    killed_for: str = ""
    run_id: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self, why: str) -> None:
        self.killed_for = why
        if self.process.is_alive():
            self.process.kill()


def _spawn(settings_module: str) -> Child:
    from .child import main

    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=main, args=(child_conn, settings_module), daemon=True,
                          name="reproq-child")
    process.start()
    child_conn.close()
    if not parent_conn.poll(60):
        process.kill()
        raise ChildDied("child process did not become ready within 60s")
    parent_conn.recv()
    return Child(process=process, conn=parent_conn)


class ProcessPool:
    def __init__(self, runtime: Runtime, queues: tuple[str, ...], size: int) -> None:
        self.runtime = runtime
        self.queues = set(queues)
        self.size = size
        self.settings_module = os.environ.get("DJANGO_SETTINGS_MODULE", "")
        self.busy: dict[int, Child] = {}
        self.replaced = 0
        self._send, self._recv = anyio.create_memory_object_stream[Child](size)

    async def start(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self.size):
                tg.start_soon(self._add_child)

    async def _add_child(self) -> None:
        child = await anyio.to_thread.run_sync(_spawn, self.settings_module)
        await self._send.send(child)

    def kill_run(self, run_id: int) -> None:
        child = self.busy.get(run_id)
        if child is not None:
            child.kill("cancelled")

    async def run(self, job: Job, timeout: float) -> Completion:
        child = await self._recv.receive()
        self.busy[job.id] = child
        child.run_id = job.id
        executor = self.runtime.executor
        request = {
            "row": job.row, "backend": self.runtime.backend.alias,
            "database": self.runtime.backend.database,
            "final_attempt": job.attempt >= int(job.row["max_attempts"]),
        }
        reply: dict[str, Any] | None = None
        try:
            child.conn.send(request)
            if job.cancel_requested:
                child.kill("cancelled")
            with anyio.move_on_after(timeout):
                reply = await anyio.to_thread.run_sync(_receive, child, abandon_on_cancel=True)
            if reply is None and not child.killed_for:
                child.kill("timeout")
        finally:
            self.busy.pop(job.id, None)
            if child.alive() and not child.killed_for:
                await self._send.send(child)
            else:
                self.replaced += 1
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(child.process.join, 5)
                self.runtime.spawn_background(self._add_child)
        if reply is not None and reply.get("ok") is not None:
            return self._completion(job, reply)
        if child.killed_for == "cancelled":
            return executor._cancelled(job, Exception("cancelled: child process killed"))
        if child.killed_for == "timeout":
            from .executor import TaskTimeout

            return executor._fail(job, TaskTimeout(
                f"sync task exceeded its timeout of {timeout:g}s; its child process was killed "
                "and replaced"))
        return executor._fail(job, ChildDied(
            f"child process exited with code {child.process.exitcode} while running the task"))

    def _completion(self, job: Job, reply: dict[str, Any]) -> Completion:
        if reply["ok"]:
            return Completion(id=job.id, status="SUCCESSFUL", return_value=reply["return_value"],
                              metadata=reply.get("metadata"))
        exc: BaseException = RemoteTaskError(reply)
        if not reply.get("retryable", True):
            exc = NonRetryable(reply["message"])
            exc.__cause__ = RemoteTaskError(reply)
        max_attempts = int(job.row["max_attempts"])
        name = reply["exception_class_path"].rsplit(".", 1)[-1]
        completion = failure(job.id, exc, attempt=job.attempt, max_attempts=max_attempts,
                             worker_id=self.runtime.worker_id, policy=self.runtime.retry_policy,
                             reason=f"{name} on attempt {job.attempt} of {max_attempts}")
        record = json.loads(completion.error or "{}")
        record["exception_class_path"] = reply["exception_class_path"]
        record["traceback"] = reply["traceback"]
        completion.error = json.dumps(record)
        completion.metadata = reply.get("metadata")
        return completion

    async def close(self) -> None:
        for child in list(self.busy.values()):
            child.kill("shutdown")
        while True:
            try:
                child = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            with contextlib.suppress(OSError):
                child.conn.send(None)
            child.process.join(1)
            if child.process.is_alive():
                child.process.kill()


class RemoteTaskError(Exception):
    """An exception raised by a task in a child process (class path and traceback kept)."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply['exception_class_path']}: {reply['message']}")
        self.reply = reply


def _receive(child: Child) -> dict[str, Any] | None:
    try:
        return child.conn.recv()
    except (EOFError, OSError):
        return None
