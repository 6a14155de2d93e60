"""Embedded mode: an orchestrator and N workers as local child processes.

The same entry points and code paths as a distributed deployment, bound to
127.0.0.1 on a free port, for tests and the quick start::

    with squire.embedded(workers=2) as cluster:
        IndexedStream.from_iterable(range(10)).map("fib_at").run(cluster.client)

Each child runs in its own process group, so a Ctrl-C in the terminal reaches
only this process, which then shuts the children down in order: SIGTERM the
workers, then the orchestrator, wait up to ``grace`` seconds each, SIGKILL
(the whole process group) whatever is left. That cleanup runs on every exit
path, exceptions and KeyboardInterrupt included.

The services are quiet by default: their logs go to a file in a temporary
folder, whose end is quoted if a child fails to start. ``log=sys.stderr``
shows them as they run; a path keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from squire._client import AsyncClient, Client
from squire._credentials import without_security_env
from squire._errors import RpcError, SquireError

ClientT = TypeVar("ClientT", Client, AsyncClient)

LogTarget = str | os.PathLike[str] | int | IO[Any] | None
_POLL_SECONDS = 0.05
_QUOTED_LOG_LINES = 20


@dataclass(frozen=True)
class Embedded(Generic[ClientT]):
    """A running embedded cluster: its client, address and child process ids."""

    client: ClientT
    target: str  # "127.0.0.1:<port>"
    port: int
    orchestrator_pid: int
    worker_pids: tuple[int, ...]


class _Processes:
    """The child processes and their files; the blocking and asyncio drivers
    below only add the waiting."""

    def __init__(
        self,
        *,
        workers: int,
        ops: Sequence[str],
        concurrency: int,
        executor: str,
        log: LogTarget,
        prefetch: int | None = None,
    ) -> None:
        if workers < 0 or concurrency < 1:
            raise ValueError("need workers >= 0 and concurrency >= 1")
        if isinstance(ops, str) or not ops or any(not op or "," in op for op in ops):
            raise ValueError(f"ops must be a sequence of module names, got {ops!r}")
        self._worker_count = workers
        self._ops = ",".join(ops)
        self._concurrency = concurrency
        self._executor = executor
        self._prefetch = () if prefetch is None else ("--prefetch", str(prefetch))
        self._log_file: IO[Any] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="squire-embedded-")
        self._port_file = Path(self._tmp.name) / "port"
        # Quiet by default: a log file of our own, quoted on start-up failure.
        self._quiet_log = Path(self._tmp.name) / "services.log" if log is None else None
        self._log_where = self._describe(log)
        self._stdout, self._stderr = self._log_targets(
            log if self._quiet_log is None else self._quiet_log
        )
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _describe(log: LogTarget) -> str:
        if log is None:
            return ""
        if isinstance(log, str | os.PathLike):
            return f"; see its output in {os.fspath(log)}"
        return "; see its output in the log given to embedded()"

    def _log_targets(self, log: LogTarget) -> tuple[int | IO[Any], int | IO[Any] | None]:
        if log is sys.stderr or log is sys.__stderr__:
            # Children's stdout goes to our stderr too: stdout stays the caller's.
            fd = sys.__stderr__.fileno() if sys.__stderr__ else subprocess.DEVNULL
            return fd, fd
        if isinstance(log, str | os.PathLike):
            self._log_file = open(log, "ab")  # closed in close()
            return self._log_file, self._log_file
        if log is None:  # not reached: None is the quiet log file by now
            return subprocess.DEVNULL, subprocess.DEVNULL
        return log, log

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            env={**without_security_env(os.environ), "PYTHONUNBUFFERED": "1"},
            process_group=0,
        )

    def start_orchestrator(self) -> None:
        # Metrics endpoints are off: N processes on one host would fight over
        # their default ports. Flag pairs are kept on one line each.
        self.orchestrator = self._spawn(
            "orchestrator_service",
            *("--host", "127.0.0.1"),
            *("--port", "0"),
            *("--port-file", str(self._port_file)),
            *("--metrics-port", "0"),
            # Its own journal, gone with the cluster: the embedded cluster
            # runs the durable default, and never meets another's directives.
            *("--state-dir", str(Path(self._tmp.name) / "state")),
        )

    def port(self) -> int | None:
        """The orchestrator's port once it wrote the port file, else None."""
        self.check_alive()
        try:
            text = self._port_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() and int(text) > 0 else None

    def start_workers(self, port: int) -> None:
        for i in range(self._worker_count):
            self.workers.append(
                self._spawn(
                    "worker_service",
                    *("--orchestrator", f"127.0.0.1:{port}"),
                    *("--ops", self._ops),
                    *("--concurrency", str(self._concurrency)),
                    *("--executor", self._executor),
                    *("--worker-id", f"embedded-{i}"),
                    *("--metrics-port", "0"),
                    *self._prefetch,
                )
            )

    def check_alive(self) -> None:
        """Raise if a child exited during start-up."""
        for name, proc in self._named():
            code = proc.poll()
            if code is not None:
                raise SquireError(
                    f"embedded {name} (pid {proc.pid}) exited with code {code} during start-up"
                    + (self._log_where or self._quoted_log())
                )

    def _quoted_log(self) -> str:
        assert self._quiet_log is not None
        if self._log_file is not None:
            self._log_file.flush()
        try:
            lines = self._quiet_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        tail = "\n".join("    " + line for line in lines[-_QUOTED_LOG_LINES:])
        return f"; the end of the services' output:\n{tail}" if tail else ""

    def _named(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        named = [(f"worker {i}", proc) for i, proc in enumerate(self.workers)]
        if self.orchestrator is not None:
            named.append(("orchestrator", self.orchestrator))
        return named

    def shutdown_order(self) -> list[list[subprocess.Popen[bytes]]]:
        """Workers first (they drain into the orchestrator), then the orchestrator."""
        return [self.workers, [self.orchestrator] if self.orchestrator else []]

    @staticmethod
    def terminate(group: list[subprocess.Popen[bytes]]) -> None:
        for proc in group:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    def kill_leftovers(self) -> None:
        """SIGKILL each child's process group and reap the children.

        The group also holds what a child started itself (a worker's executor
        processes), which would outlive a worker that was SIGKILLed.
        """
        for _, proc in self._named():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
        self._tmp.cleanup()

    def embedded(self, client: ClientT, port: int) -> Embedded[ClientT]:
        assert self.orchestrator is not None
        return Embedded(
            client=client,
            target=f"127.0.0.1:{port}",
            port=port,
            orchestrator_pid=self.orchestrator.pid,
            worker_pids=tuple(proc.pid for proc in self.workers),
        )


def _deadline_passed(deadline: float, timeout: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"embedded mode: no {what} within {timeout:g} seconds")


@contextlib.contextmanager
def embedded(
    workers: int = 2,
    *,
    ops: Sequence[str] = ("squire_examples.ops",),
    concurrency: int = 1,
    executor: str = "process",
    prefetch: int | None = None,
    timeout: float = 30.0,
    grace: float = 10.0,
    log: LogTarget = None,
) -> Iterator[Embedded[Client]]:
    """Start an orchestrator and ``workers`` workers offering ``ops``; yield an :class:`Embedded`.

    - ``ops``: the modules whose operations and monoids the workers offer, as
      ``squire-worker --ops`` takes them: dotted names importable from the
      current folder or installed, or ``.py`` paths (default: the demo's
      ``squire_examples.ops``).
    - ``concurrency``, ``executor`` (``"process"``, ``"thread"`` or
      ``"inline"``) and ``prefetch`` are each worker's flags of those names
      (``prefetch``: tasks buffered beyond ``concurrency``; raise it for
      trivial operations).
    - ``timeout``: seconds to wait for every worker to connect, else
      TimeoutError; ``grace``: seconds each child gets to stop on exit.
    - ``log``: where the services' logs go. By default nowhere you see them
      (a temporary file, quoted in the error if a child fails to start);
      ``sys.stderr`` to watch them; a path (appended to), a file or a
      descriptor to keep them.

    On exit the children are stopped as the module says.
    """
    procs = _Processes(
        workers=workers, ops=ops, concurrency=concurrency, executor=executor, log=log,
        prefetch=prefetch,
    )
    try:
        deadline = time.monotonic() + timeout
        procs.start_orchestrator()
        while (port := procs.port()) is None:
            _deadline_passed(deadline, timeout, "orchestrator port file")
            time.sleep(_POLL_SECONDS)
        procs.start_workers(port)
        with Client(f"127.0.0.1:{port}") as client:
            while True:
                procs.check_alive()
                with contextlib.suppress(RpcError):
                    if len(client.status_proto(timeout=2.0).workers) >= workers:
                        break
                _deadline_passed(deadline, timeout, f"{workers} connected workers")
                time.sleep(_POLL_SECONDS)
            yield procs.embedded(client, port)
    finally:
        try:
            for group in procs.shutdown_order():
                procs.terminate(group)
                stop_by = time.monotonic() + grace
                for proc in group:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.0, stop_by - time.monotonic()))
        finally:
            procs.kill_leftovers()
            procs.close()


@contextlib.asynccontextmanager
async def async_embedded(
    workers: int = 2,
    *,
    ops: Sequence[str] = ("squire_examples.ops",),
    concurrency: int = 1,
    executor: str = "process",
    prefetch: int | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - a start-up budget, same as embedded()
    grace: float = 10.0,
    log: LogTarget = None,
) -> AsyncIterator[Embedded[AsyncClient]]:
    """:func:`embedded` for asyncio: yields an :class:`Embedded` with an :class:`AsyncClient`."""
    procs = _Processes(
        workers=workers, ops=ops, concurrency=concurrency, executor=executor, log=log,
        prefetch=prefetch,
    )
    try:
        deadline = time.monotonic() + timeout
        procs.start_orchestrator()
        while (port := procs.port()) is None:
            _deadline_passed(deadline, timeout, "orchestrator port file")
            await asyncio.sleep(_POLL_SECONDS)
        procs.start_workers(port)
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            while True:
                procs.check_alive()
                with contextlib.suppress(RpcError):
                    if len((await client.status_proto(timeout=2.0)).workers) >= workers:
                        break
                _deadline_passed(deadline, timeout, f"{workers} connected workers")
                await asyncio.sleep(_POLL_SECONDS)
            yield procs.embedded(client, port)
    finally:
        try:
            for group in procs.shutdown_order():
                procs.terminate(group)
                stop_by = time.monotonic() + grace
                # Popen offers no awaitable exit, so poll.
                while any(p.poll() is None for p in group) and time.monotonic() < stop_by:  # noqa: ASYNC110
                    await asyncio.sleep(_POLL_SECONDS)
        finally:
            procs.kill_leftovers()
            procs.close()
