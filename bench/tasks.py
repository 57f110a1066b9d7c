"""The benchmark's task bodies: no-ops, sync and async."""

from django.tasks import task


@task
def noop(i: int = 0) -> None:
    return None


@task
async def anoop(i: int = 0) -> None:
    return None
