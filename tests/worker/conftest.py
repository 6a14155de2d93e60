"""Fixtures shared by the worker tests (helpers live in ``fakes``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .fakes import FakeOrchestrator
from .ops_for_tests import GATE


@pytest.fixture
async def orchestrator() -> AsyncIterator[FakeOrchestrator]:
    fake = FakeOrchestrator()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop(0)


@pytest.fixture(autouse=True)
def reset_gate() -> None:
    GATE.reset()
