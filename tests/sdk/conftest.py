"""Fixtures for the SDK tests: a scripted fake orchestrator and clients of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from squire import AsyncClient, Client

from .fake_orchestrator import FakeOrchestrator, FakeServer


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    """A fresh fake orchestrator; script it through ``fake.servicer.script``."""
    server = FakeServer(FakeOrchestrator())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(fake: FakeServer) -> Iterator[Client]:
    # the fake scripts RunDirective only; the session path is tested end to end
    with Client(fake.target, session=False) as c:
        yield c


@pytest.fixture
async def aclient(fake: FakeServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(fake.target) as c:
        yield c
