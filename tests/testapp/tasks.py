"""Tasks used by the test suite: all defined at module level, as Django requires."""

import asyncio
import time

from django.tasks import task


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
