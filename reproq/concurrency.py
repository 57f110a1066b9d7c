"""Per-task concurrency limits: the `limits_concurrency` decorator and its registry.

Django's `Task` objects are frozen dataclasses, so limits live in a module-level registry keyed by
the task's module path instead of on the object. The decorator works above or below ``@task``::

    @limits_concurrency(lambda account_id, **_: f"account:{account_id}", to=2)
    @task
    def sync_account(account_id): ...

At enqueue, a per-call ``concurrency_key=`` / ``concurrency_limit=`` wins over the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.tasks import Task

KeySpec = str | Callable[..., str]


@dataclass(frozen=True)
class ConcurrencyRule:
    key: KeySpec
    limit: int

    def resolve_key(self, args: tuple | list, kwargs: dict[str, Any]) -> str:
        return resolve_key(self.key, args, kwargs)


_registry: dict[str, ConcurrencyRule] = {}


def _check_limit(to: Any) -> int:
    if not isinstance(to, int) or isinstance(to, bool) or to < 0:
        raise ValueError(f"concurrency limit must be an int >= 0, got {to!r}")
    return to


def resolve_key(key: KeySpec, args: tuple | list, kwargs: dict[str, Any]) -> str:
    value = key(*args, **kwargs) if callable(key) else key
    if not isinstance(value, str) or not value:
        raise TypeError(f"concurrency key must resolve to a non-empty str, got {value!r}")
    return value


def limits_concurrency(key: KeySpec, *, to: int) -> Callable[[Any], Any]:
    """Never run more than `to` runs of this task with the same key at once, cluster-wide."""
    if not (isinstance(key, str) and key) and not callable(key):
        raise TypeError("limits_concurrency key must be a non-empty str or a callable")
    rule = ConcurrencyRule(key=key, limit=_check_limit(to))

    def decorate(target: Any) -> Any:
        if isinstance(target, Task):
            path = target.module_path
        elif callable(target):
            path = f"{target.__module__}.{target.__qualname__}"
        else:
            raise TypeError("limits_concurrency decorates a @task or a function")
        _registry[path] = rule
        return target

    return decorate


def rule_for(task_path: str) -> ConcurrencyRule | None:
    return _registry.get(task_path)
