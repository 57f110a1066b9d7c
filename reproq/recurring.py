"""The names documented as ``reproq.recurring``, kept importable: schedules now live in two
modules, `reproq.cron` (when a schedule fires: no model, no database) and `reproq.schedules`
(validation, ``@recurring``, the sync of `PeriodicTask` rows). Nothing in reproq imports this
module, so it cannot close an import cycle.
"""

from __future__ import annotations

from .cron import (
    ALLOW,
    CRON_HINT,
    DEFAULT_MISFIRE,
    DEFAULT_OVERLAP,
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    RUN_ONCE,
    SKIP,
    CronSchedule,
    InvalidSchedule,
    Plan,
    default_timezone_name,
    plan,
    resolve_timezone,
)
from .schedules import (
    RecurringSpec,
    SyncReport,
    current_leader,
    prepare_for_save,
    recurring,
    registered,
    run_now,
    sync_after_migrate,
    sync_recurring,
    unregister,
    validate_schedule,
)

__all__ = [
    "ALLOW",
    "CRON_HINT",
    "DEFAULT_MISFIRE",
    "DEFAULT_OVERLAP",
    "MISFIRE_POLICIES",
    "OVERLAP_POLICIES",
    "RUN_ONCE",
    "SKIP",
    "CronSchedule",
    "InvalidSchedule",
    "Plan",
    "RecurringSpec",
    "SyncReport",
    "current_leader",
    "default_timezone_name",
    "plan",
    "prepare_for_save",
    "recurring",
    "registered",
    "resolve_timezone",
    "run_now",
    "sync_after_migrate",
    "sync_recurring",
    "unregister",
    "validate_schedule",
]
