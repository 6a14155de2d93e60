"""Retry strategies for transient errors and strategies for fatal ones."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FatalStrategy(enum.IntEnum):
    """Wire values equal ``squire.api.v1.FatalStrategy``."""

    TERMINATE = 0
    IGNORE = 1


@dataclass(frozen=True)
class Immediate:
    """Retry at once, up to ``max_retries`` times."""

    max_retries: int = 3

    def delay(self, retry: int) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None when exhausted."""
        return 0.0 if retry <= self.max_retries else None


@dataclass(frozen=True)
class After:
    """Retry after a fixed ``delay`` seconds, up to ``max_retries`` times."""

    max_retries: int
    delay_seconds: float

    def delay(self, retry: int) -> float | None:
        return self.delay_seconds if retry <= self.max_retries else None


@dataclass(frozen=True)
class Exponential:
    """Retry with doubling delays from ``min_delay`` while they stay within ``max_delay``."""

    min_delay: float
    max_delay: float

    def delay(self, retry: int) -> float | None:
        d = self.min_delay * (2 ** (retry - 1))
        return d if d <= self.max_delay else None


RetryStrategy = Immediate | After | Exponential
