"""Fixtures of the fault-injection suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import Figures, Ledger, fault_env

_FIGURES = Figures()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    directory = tmp_path / "ledger"
    directory.mkdir()
    return Ledger(directory)


@pytest.fixture
def env(ledger: Ledger) -> dict[str, str]:
    """Environment of the cluster's processes (ops module path, ledger directory)."""
    return fault_env(ledger.dir)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Process logs outside the cluster's own temp dir, so a failure keeps them."""
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


@pytest.fixture
def figures() -> Iterator[Figures]:
    yield _FIGURES
    _FIGURES.flush()
