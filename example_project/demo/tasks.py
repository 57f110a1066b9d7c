"""The demo's tasks: sync and async, with retries, context metadata and priorities."""

import asyncio
import random
import time

from django.tasks import task


@task(queue_name="emails")
def send_welcome_email(address: str) -> str:
    time.sleep(0.2)  # pretend to talk to an SMTP server
    return f"welcome mail sent to {address}"


@task
async def fetch_preview(url: str) -> dict:
    await asyncio.sleep(0.3)  # pretend to fetch over HTTP without blocking the server
    return {"url": url, "title": f"Preview of {url}"}


@task(queue_name="reports", takes_context=True)
def build_report(context, rows: int) -> int:
    total = 0
    for i in range(rows):
        total += i * i
        if i % 10_000 == 0:
            context.metadata["progress"] = round(i / max(rows, 1), 2)
    context.metadata["progress"] = 1.0
    return total


@task
def flaky(chance: float = 0.5) -> str:
    if random.random() < chance:
        raise RuntimeError("the flaky service said no (this attempt will be retried)")
    return "made it"
