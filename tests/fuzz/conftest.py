"""Hypothesis profiles of the fuzz suite: ``ci`` (the default) runs 1,000 examples per target,
``dev`` 100 (``HYPOTHESIS_PROFILE=dev``). DB-backed targets draw batches of rows per example and
scale their example count from the profile (`tests.fuzz.strategies.batches`)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.function_scoped_fixture,
                              HealthCheck.filter_too_much],
}
settings.register_profile("ci", max_examples=1000, **_COMMON)
settings.register_profile("dev", max_examples=100, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
