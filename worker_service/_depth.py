"""How many tasks a pool executor holds beyond the ones it runs.

A process child, or a thread pool, runs its tasks one after another; to
keep it busy while a result travels back and the next task comes, it holds
a short queue behind the running task. The queue is sized from estimated
run times (``learn``: per operation, from the run times measured, quick to
rise and slow to fall), so that a drain, an abort or a timeout barely
notices it: about ``TARGET_SECONDS`` of estimated work per consumer, at
most ``MAX_DEPTH`` tasks, and always one task waiting behind a running one
when both are shorter than ``SHORT_SECONDS`` (a loaded machine makes that
round trip slow, and run times measured on it look long). A task of an
operation never seen yet goes only to an idle consumer, and counts as
``UNSEEN_SECONDS`` of work, so nothing waits behind it. When the runs
ahead of a queue turn out much slower than estimated, the queue is taken
back (``STALL_SECONDS``) and goes back to the scheduler's FIFO.
"""

from __future__ import annotations

TARGET_SECONDS = 0.05
MAX_DEPTH = 512
SHORT_SECONDS = 0.1
UNSEEN_SECONDS = 1.0
# A queue behind runs that have reported nothing for this long (or for
# STALL_FACTOR times what they were expected to take) is taken back: those
# runs are slower than estimated. Checked every STALL_CHECK seconds.
STALL_SECONDS = 0.25
STALL_FACTOR = 4
STALL_CHECK = 0.05


def room(held: int, backlog: float, estimate: float | None, consumers: int = 1) -> int:
    """How many more tasks of ``estimate`` seconds fit where ``consumers``
    share ``held`` tasks of ``backlog`` estimated seconds (None: not seen yet)."""
    if estimate is None:
        return max(0, consumers - held)
    target = TARGET_SECONDS * consumers
    by_target = int((target + 1e-9 - backlog) / estimate) if estimate > 0 else MAX_DEPTH
    short = estimate <= SHORT_SECONDS and backlog <= SHORT_SECONDS * consumers
    pair = 2 * consumers - held if short else 0
    idle = consumers - held
    return max(0, min(MAX_DEPTH * consumers - held, max(by_target, pair, idle)))


def learn(estimate: float | None, seconds: float) -> float:
    """Quick to rise, slow to fall: a queue behind a task slower than expected
    costs more than a round trip too many costs a fast one."""
    if estimate is None or seconds > estimate:
        return seconds
    return estimate + 0.1 * (seconds - estimate)
