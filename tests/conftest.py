"""Test-wide settings."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import ServiceUnavailable, redis_server, require_service, under_services_wrapper


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "requires_service(name, available, reason): skip without the service, fail with CI=true"
    )


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("requires_service"):
        require_service(*mark.args, **mark.kwargs)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis for one module: the wrapper's (python -m tests.services) or a throwaway server."""
    from django.conf import settings

    if settings.REDIS_URL and under_services_wrapper():
        yield settings.REDIS_URL
        return
    try:
        with redis_server() as server:
            yield server.url
    except ServiceUnavailable as exc:
        require_service("Redis", False, str(exc))


@pytest.fixture(scope="module")
def gateway_stack(request, tmp_path_factory) -> Iterator:
    """FastChat's controller, demo workers and gateway processes for the end-to-end tests of
    one module, as its module-level STACK (a tests.gateway_process.StackSpec) describes them
    (tests/stacks.py running_stack); stopped after the module's last test."""
    from tests.gateway_process import StackSpec
    from tests.stacks import running_stack

    spec = getattr(request.module, "STACK", StackSpec())
    tmp = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    try:
        context = running_stack(tmp, spec)
        stack = context.__enter__()
    except ServiceUnavailable as exc:
        require_service("PostgreSQL and Redis", False, str(exc))
    try:
        yield stack
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, driven by Playwright) for the browser tests of a module."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(autouse=True, scope="session")
def keep_the_test_transactions_connection():
    """A TestCase runs inside a transaction (autocommit off), which close_old_connections()
    takes for a broken connection and closes: on PostgreSQL that ends the test's transaction
    (SQLite ignores closing its in-memory test database). Django's test client disconnects
    close_old_connections from the request signals for this reason; the gateway also calls it
    directly (openai_api/auth.py load_key), and so does channels' database_sync_to_async (the
live view's consumer), so connections inside a transaction are kept."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    original = BaseDatabaseWrapper.close_if_unusable_or_obsolete

    def close_unless_in_a_transaction(self):
        if not self.in_atomic_block:
            original(self)

    BaseDatabaseWrapper.close_if_unusable_or_obsolete = close_unless_in_a_transaction
    yield
    BaseDatabaseWrapper.close_if_unusable_or_obsolete = original


@pytest.fixture(autouse=True)
def usage_written_by_the_test(settings):
    """Usage rows are flushed by the test itself: a writer thread could not see the test's
    transaction (and SQLite would lock)."""
    settings.USAGE_WRITER_THREAD = False


@pytest.fixture(autouse=True)
def empty_redis(settings):
    """Under `python -m tests.services` (PostgreSQL + Redis) every test starts with an empty
    Redis, so no limit counted by an earlier test (or gateway process) leaks into it. Only the
    throwaway Redis that wrapper started is flushed, never one REDIS_URL merely points at."""
    if settings.REDIS_URL and under_services_wrapper():
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            client.flushdb()
        finally:
            client.close()
