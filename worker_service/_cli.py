"""``squire-worker``: flags, each also settable as an environment variable."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from squire_kernel import loop as event_loop
from squire_kernel.flags import EnvHelpFormatter, port_number
from squire_kernel.listen import ListenError
from squire_kernel.logs import configure_logging as shared_configure_logging
from worker_service import _credentials
from worker_service._config import (
    ExecutorKind,
    LogFormat,
    WorkerConfig,
    default_concurrency,
    default_worker_id,
)
from worker_service._errors import HelloRejected, OpsLoadError
from worker_service._probe import DEFAULT_METRICS_PORT
from worker_service._runtime import run_worker

log = logging.getLogger("worker_service")

EXIT_OK = 0
EXIT_CONFIG = 2    # also argparse's code for bad flags
EXIT_REJECTED = 3

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _number(kind: type[int] | type[float], text: str) -> int | float:
    # argparse would name the function in its message ("invalid _positive_int value")
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(_number(int, text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(_number(int, text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(_number(float, text))
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    def env(name: str, default: str | None = None) -> str | None:
        return environ.get(f"SQUIRE_{name}", default)

    parser = argparse.ArgumentParser(
        prog="squire-worker",
        description="Execute Squire tasks for an orchestrator. Every flag can also be "
        "set as an environment variable SQUIRE_<FLAG>, upper case with underscores "
        "(e.g. SQUIRE_OPS, SQUIRE_WORKER_ID; each shown at the end of its flag's help); flags win.",
        formatter_class=EnvHelpFormatter,
    )
    parser.add_argument(
        "--orchestrator", default=env("ORCHESTRATOR", "127.0.0.1:50051"),
        help="orchestrator address host:port, or its replicas on a shared store "
        "host1:port1,host2:port2 (the worker follows the leader; default %(default)s)",
    )
    parser.add_argument(
        "--ops", action="append", default=None, metavar="MODULE",
        help="module whose operations and monoids this worker offers: a dotted name "
        "importable from the current folder or installed (my_ops, pkg.ops), or a "
        "file path (./my_ops.py); repeat or comma-separate for several (required)",
    )
    parser.add_argument(
        "--concurrency", type=_positive_int,
        default=env("CONCURRENCY", str(default_concurrency())),
        help="tasks executed at once (default: CPU count, %(default)s)",
    )
    parser.add_argument(
        "--executor", type=ExecutorKind, choices=list(ExecutorKind),
        default=env("EXECUTOR", ExecutorKind.PROCESS.value),
        help="process (CPU-bound), thread (I/O or GIL-releasing) or inline "
        "(trivial operations) (default %(default)s)",
    )
    parser.add_argument(
        "--prefetch", type=_non_negative_int, default=env("PREFETCH"),
        help="tasks buffered beyond concurrency (default: same as concurrency)",
    )
    parser.add_argument(
        "--worker-id", default=env("WORKER_ID"),
        help="unique worker id (default: hostname-pid)",
    )
    parser.add_argument(
        "--drain-grace", type=_non_negative_float, default=env("DRAIN_GRACE", "30"),
        help="seconds running tasks may take to finish when draining (default %(default)s)",
    )
    parser.add_argument(
        "--abort-memory", type=_non_negative_float, default=env("ABORT_MEMORY", "300"),
        help="seconds an aborted routing key is remembered (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port", type=port_number, default=env("METRICS_PORT"),
        help="HTTP port for /metrics, /healthz and /readyz; 0 disables (default "
        f"{DEFAULT_METRICS_PORT}, or when another process holds it the next free port "
        "above it, logged; a port given here or in SQUIRE_METRICS_PORT must be free)",
    )
    parser.add_argument(
        "--metrics-host", default=env("METRICS_HOST", "0.0.0.0"),
        help="address of the HTTP endpoint (default %(default)s)",
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=_LOG_LEVELS, default=env("LOG_LEVEL", "INFO"),
        help="the least severe log records shown (default %(default)s)",
    )
    parser.add_argument(
        "--log-format", type=LogFormat, choices=list(LogFormat),
        default=env("LOG_FORMAT", LogFormat.TEXT.value),
        help="text, or one JSON object per line (default %(default)s)",
    )
    _credentials.add_arguments(parser, env)
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    """Flags and environment to a WorkerConfig; exits with usage on bad input."""
    return _parse(argv, environ)[0]


def _parse(
    argv: Sequence[str] | None, environ: Mapping[str, str] | None
) -> tuple[WorkerConfig, bool]:
    """The config, and whether the metrics port is the default (which may
    fall back to a free port) rather than one the user chose."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    given = args.ops if args.ops is not None else [environ.get("SQUIRE_OPS", "")]
    ops = tuple(name.strip() for item in given for name in item.split(",") if name.strip())
    if not ops:
        parser.error("name the ops module(s) with --ops or SQUIRE_OPS")
    try:
        config = WorkerConfig(
            ops=ops,
            orchestrator=args.orchestrator,
            concurrency=args.concurrency,
            executor=args.executor,
            prefetch=args.prefetch,
            worker_id=args.worker_id or default_worker_id(),
            drain_grace=args.drain_grace,
            abort_memory=args.abort_memory,
            log_level=args.log_level,
            log_format=args.log_format,
            metrics_port=(
                DEFAULT_METRICS_PORT if args.metrics_port is None else args.metrics_port
            ),
            metrics_host=args.metrics_host,
            **_credentials.config_fields(args, environ),
        )
        _credentials.check(config)
    except ValueError as exc:  # inconsistent or unreadable security settings
        parser.error(str(exc))
    return config, args.metrics_port is None


def configure_logging(level: str, log_format: LogFormat, worker_id: str | None = None) -> None:
    context: dict[str, object] = {"worker_id": worker_id} if worker_id else {}
    shared_configure_logging(level, log_format.value, context)


def main(argv: Sequence[str] | None = None) -> int:
    # The current folder comes first on the path, as with ``python -m``, so
    # ``squire-worker --ops my_ops`` finds my_ops.py where it is run (a
    # console script's path starts with its own bin folder instead). The
    # process-pool children are spawned with this path.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    config, default_metrics_port = _parse(argv, None)
    configure_logging(config.log_level, config.log_format, config.worker_id)
    event_loop.tune_gc()
    try:
        event_loop.run(
            run_worker(config, metrics_port_fallback=default_metrics_port),
            os.environ.get("SQUIRE_EVENT_LOOP", "auto"),
        )
    except (OpsLoadError, ListenError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except HelloRejected as exc:
        log.error("%s", exc)
        return EXIT_REJECTED
    finally:
        _join_pool_threads(POOL_THREADS_JOIN_SECONDS)
    return EXIT_OK


POOL_THREADS_JOIN_SECONDS = 5.0


def _join_pool_threads(timeout: float) -> None:
    """Let a shut-down process pool's manager thread finish before exit.

    Python 3.11's interpreter exit wakes every pool manager thread through a
    pipe that thread may be closing at that moment, which prints "Exception
    ignored ... OSError: [Errno 9] Bad file descriptor" (fixed in 3.12). The
    executor has shut its pool down by now, so the thread ends within
    milliseconds; the timeout only bounds a pool that would not.
    """
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if type(thread).__name__ == "_ExecutorManagerThread":
            thread.join(max(0.0, deadline - time.monotonic()))
