"""The worker's executors alone, without the network: ``python bench/executor.py``.

Feeds each executor no-op tasks the way a scheduler would (submit what its
capacity allows, again after every ExecutionFinished) and prints tasks/s
and the CPU each task costs in the worker process and in its children.
Operations from ``bench_ops``; timing figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p
)

from squire_kernel.serde import Serializer, encode  # noqa: E402
from worker_service._executor import Executor, InlineExecutor, ThreadExecutor  # noqa: E402
from worker_service._model import TaskSpec  # noqa: E402
from worker_service._process import ProcessExecutor  # noqa: E402
from worker_service._runtime import load_registry  # noqa: E402
from worker_service._scheduler_events import ExecutionFinished, PoolCrashed  # noqa: E402


def _children_cpu() -> float:
    pid, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _tasks(n: int, operation: str, params: bytes) -> list[TaskSpec]:
    return [TaskSpec("rk", i, operation, 0, params, encode(i, Serializer.JSON), (), 0, b"",
                     1, i, 0.0) for i in range(n)]


async def _drive(executor: Executor, tasks: list[TaskSpec]) -> tuple[float, float, float]:
    """Seconds, worker CPU seconds, children CPU seconds to run ``tasks``."""
    queue = list(reversed(tasks))
    done = asyncio.Event()
    ended = 0

    def pump() -> None:
        free = executor.capacity - executor.busy
        if free > 0 and queue:
            batch = [queue.pop() for _ in range(min(free, len(queue)))]
            executor.submit(batch)

    def sink(event: ExecutionFinished | PoolCrashed) -> None:
        nonlocal ended
        if isinstance(event, ExecutionFinished):
            ended += len(event.results)
            queue.extend(reversed(event.returned))
        if ended == len(tasks):
            done.set()
        else:
            asyncio.get_running_loop().call_soon(pump)

    executor.attach(sink)
    start, cpu, kids = time.perf_counter(), time.process_time(), _children_cpu()
    pump()
    await done.wait()
    return time.perf_counter() - start, time.process_time() - cpu, _children_cpu() - kids


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    registry = load_registry(("bench_ops",))
    executors: dict[str, Executor] = {
        "process": ProcessExecutor(["bench_ops"], args.concurrency),
        "thread": ThreadExecutor(registry, args.concurrency),
        "inline": InlineExecutor(registry, 1024),
    }
    for executor in executors.values():
        await executor.start()
        await _drive(executor, _tasks(2_000, "noop", b""))  # warm up, learn estimates
    try:
        for _ in range(args.rounds):  # alternating, so a busy spell hits all alike
            for name, executor in executors.items():
                seconds, cpu, kids = await _drive(executor, _tasks(args.n, "noop", b""))
                print(f"{name:8} {args.n / seconds:>10,.0f} tasks/s   worker "
                      f"{cpu / args.n * 1e6:5.2f} µs/task   children {kids / args.n * 1e6:5.2f}"
                      f" µs/task   capacity {executor.capacity}")
    finally:
        for executor in executors.values():
            await executor.close(1.0)


if __name__ == "__main__":
    asyncio.run(main())
