"""The django-tasks-db peer's task body: the same no-op as reproq's (sync)."""

from django.tasks import task


@task
def noop(i: int = 0) -> None:
    return None
