"""Fixtures for real services (Redis, PostgreSQL) and the Kubernetes API emulator.

The fixtures are defined beside their helpers (tests/services.py, tests/emulator.py) and made visible
to every test here.
"""

import asyncio

import pytest

from tests.emulator import k8s  # noqa: F401
from tests.services import (  # noqa: F401
    postgres_dsn,
    postgres_private,
    postgres_server,
    redis_private,
    redis_server,
    redis_url,
)


@pytest.fixture(scope="session", autouse=True)
def _no_implicit_event_loop() -> None:
    """Make sync tests find no event loop instead of creating one.

    looptime's plugin asks the event loop policy for the current loop before every test, sync ones too;
    on Python 3.11 the policy then creates a loop that nobody closes (a ResourceWarning at exit).
    Once a loop has been set explicitly (even to None) the policy raises instead, which looptime handles.
    """
    asyncio.set_event_loop(None)
