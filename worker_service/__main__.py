"""``python -m worker_service`` / ``squire-worker``."""

from __future__ import annotations

import sys

from worker_service._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
