"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Any]:
    """`manage.py reproq worker` processes on the test database (tests.test_flow.Cluster),
    stopped at the end; their logs are printed (pytest shows them when the test failed)."""
    from tests.test_flow import Cluster

    harness = Cluster(tmp_path)
    try:
        yield harness
    finally:
        harness.stop_all()
        print(harness.logs())
