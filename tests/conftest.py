"""Test-wide settings."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def usage_written_by_the_test(settings):
    """Usage rows are flushed by the test itself: a writer thread could not see the test's
    transaction (and SQLite would lock)."""
    settings.USAGE_WRITER_THREAD = False
