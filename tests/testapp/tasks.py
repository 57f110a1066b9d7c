"""Tasks used by the test suite: all defined at module level, as Django requires."""

import asyncio
import time

from django.tasks import task

from reproq.concurrency import limits_concurrency


@task
def add(a, b):
    return a + b


@task(queue_name="emails", priority=5)
def send_email(to, subject=""):
    return f"sent {subject} to {to}"


@task
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@task
async def async_add(a, b):
    await asyncio.sleep(0)
    return a + b


@task(takes_context=True)
def with_context(context, value):
    context.metadata["seen"] = value
    return context.attempt


@task
def sleepy(seconds):
    time.sleep(seconds)
    return seconds


@task
def boom(message="boom"):
    raise ValueError(message)


# --- runtime tests -------------------------------------------------------------------------


@task(takes_context=True)
def fail_until(context, succeed_on):
    if context.attempt < succeed_on:
        raise RuntimeError(f"failing attempt {context.attempt}")
    return context.attempt


@task
async def async_sleep(seconds):
    await asyncio.sleep(seconds)
    return seconds


@task
def unstorable():
    return object()


@task(takes_context=True)
def saves_metadata(context, marker):
    context.metadata["marker"] = marker
    context.save_metadata()
    return context.task_result.id


@task(takes_context=True)
async def async_saves_metadata(context, marker):
    context.metadata["marker"] = marker
    await context.asave_metadata()
    return context.attempt


@task
def receives(value):
    return repr(value)


# --------------------------------------------------------------------------- concurrency limits


@limits_concurrency(lambda account_id, **_: f"account:{account_id}", to=2)
@task
def sync_account(account_id, full=False):
    return account_id


@task
@limits_concurrency("reports", to=1)
def build_report(name):
    return name


# ----------------------------------------------------------------- flow control (test_flow.py)


@task
def flow_probe(key, ms, n=0):
    """Sleeps `ms` milliseconds and reports its own execution interval and process."""
    import os

    start = time.time()
    time.sleep(ms / 1000)
    return {"key": key, "n": n, "start": start, "end": time.time(), "pid": os.getpid()}


@limits_concurrency(lambda key, ms, n=0: f"flow-decorated:{key}", to=2)
@task
def flow_probe_limited(key, ms, n=0):
    return flow_probe.func(key, ms, n)


@task
def flow_rated(n):
    return n


@task
def flow_other(n):
    return n


@task(takes_context=True)
def flow_cooperative(context, max_seconds):
    """A sync task that stops when asked: polls context.cancel_requested (bounded)."""
    context.metadata["polling"] = True
    context.save_metadata()
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        if context.cancel_requested:
            context.metadata["saw_cancel"] = True
            return "stopped"
        time.sleep(0.02)
    return "ran out"


@task
def flow_touch(path):
    """Leaves a trace on disk when it runs (to prove a run never started)."""
    with open(path, "a") as fh:
        fh.write("ran\n")
    return path


@task(takes_context=True)
def reports_its_result(context):
    """Stores what its TaskResult and context said, to compare with get_result afterwards."""
    r = context.task_result
    context.metadata["seen"] = {
        "enqueued_at": r.enqueued_at.isoformat(), "started_at": r.started_at.isoformat(),
        "last_attempted_at": r.last_attempted_at.isoformat(), "worker_ids": r.worker_ids,
        "pre": context.metadata.get("pre"), "aware": r.enqueued_at.utcoffset() is not None,
    }


@task(takes_context=True)
def unstorable_output(context, kind):
    """Output Python's json writes but PostgreSQL's jsonb refuses (NUL, a lone surrogate)."""
    if kind == "metadata":
        context.metadata["m"] = "a\x00b"
        return 1
    if kind == "raise":
        raise ValueError("bad \x00 byte and \ud800 half a pair")
    return {"nul": "a\x00b", "surrogate": "x\ud800y"}[kind]
# ----------------------------------------------------------------- outages (test_outages.py)


@task(takes_context=True)
async def chaos_probe(context, path, ms):
    """Sleeps `ms` milliseconds; appends 'S <run> <attempt> <worker> <pid> <time>' to `path` when
    the attempt starts and 'E ... <ok|cancelled>' when it returns or is cancelled (a SIGKILLed
    attempt leaves no E line), so that tests.outage.overlaps can prove no run ran twice at once.
    Returns the attempt, worker and pid that ran it to the end."""
    import os

    r = context.task_result
    head = f"{r.id} {context.attempt} {r.worker_ids[-1]} {os.getpid()}"

    def note(line):
        # One write() of one short line with O_APPEND: lines of processes never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    note(f"S {head} {time.time():.6f}")
    try:
        await asyncio.sleep(ms / 1000)
    except BaseException:
        note(f"E {head} {time.time():.6f} cancelled")
        raise
    note(f"E {head} {time.time():.6f} ok")
    return {"attempt": context.attempt, "worker": r.worker_ids[-1], "pid": os.getpid()}
