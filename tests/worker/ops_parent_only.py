"""An ops module that process-pool children cannot import (a start-up failure)."""

from __future__ import annotations

import multiprocessing

from squire import operation

if multiprocessing.parent_process() is not None:
    raise ImportError("this module refuses to load in a child process")


@operation("parent_echo")
def parent_echo(x: object) -> object:
    return x
