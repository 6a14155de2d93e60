"""``squire-orchestrator``: run the orchestrator service.

Every flag can also be set by an environment variable ``SQUIRE_<FLAG>``
(e.g. ``SQUIRE_PORT=50051``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from orchestrator_service._durable import Retention
from orchestrator_service._journal import StoreError
from orchestrator_service._journal_types import DEFAULT_LEASE_TTL
from orchestrator_service._metrics import DEFAULT_METRICS_PORT
from orchestrator_service._model import RouterConfig
from orchestrator_service._security import (
    SecurityConfigError,
    add_arguments,
    limits_from_args,
    security_from_args,
)
from orchestrator_service._server import Orchestrator, OrchestratorConfig
from squire_kernel import loop as event_loop
from squire_kernel.flags import EnvHelpFormatter, port_number
from squire_kernel.logs import configure_logging

DEFAULT_PORT = 50051


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SQUIRE_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    d = RouterConfig()
    p = argparse.ArgumentParser(
        prog="squire-orchestrator",
        description="The Squire orchestrator: routes tasks to workers and results to directives. "
        "Every flag can also be set as an environment variable SQUIRE_<FLAG>, upper case with "
        "underscores (each shown at the end of its flag's help); a flag on the command line wins.",
        formatter_class=EnvHelpFormatter,
    )
    p.add_argument("--host", default=_env("host", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=port_number, default=_env("port", str(DEFAULT_PORT)),
                   help=f"gRPC port, 0 for any free port (default {DEFAULT_PORT})")
    p.add_argument("--port-file", default=_env("port_file", ""),
                   help="write the bound port to this file once serving")
    p.add_argument("--grace", type=float, default=_env("grace", "30"),
                   help="seconds running directives get on SIGTERM (default 30)")
    p.add_argument("--store", default=_env("store", ""),
                   help="the journal of accepted directives and completed results: "
                   "sqlite:///PATH/journal.db (durable: survives a crash or restart), "
                   "add ?synchronous=full to survive power loss too; "
                   "postgresql://USER@HOST:PORT/DB (shared: several replicas, one leads; "
                   "the password from SQUIRE_STORE_PASSWORD_FILE, SQUIRE_STORE_PASSWORD or "
                   "PGPASSWORD); memory: keeps nothing (default: sqlite in --state-dir)")
    p.add_argument("--state-dir", default=_env("state_dir", default_state_dir()),
                   help="where the default journal lives (default %(default)s)")
    p.add_argument("--advertise", default=_env("advertise", ""),
                   help="with a shared store (postgresql://): the address standbys name as "
                   "the leader's, host:port (default --host:--port)")
    p.add_argument("--lease-ttl", type=float,
                   default=_env("lease_ttl", str(DEFAULT_LEASE_TTL)),
                   help="with a shared store: the leader lease's TTL, renewed every third of "
                   "it; a standby takes over within it after the leader dies "
                   "(default %(default)s s)")
    p.add_argument("--reattach-grace", type=float,
                   default=_env("reattach_grace", str(Retention().reattach_grace)),
                   help="after a restart, a directive whose caller does not reattach within "
                   "this is cancelled; detached ones wait for ever (default %(default)s s)")
    p.add_argument("--retention", type=float,
                   default=_env("retention", str(Retention().retention)),
                   help="a finished directive's results nobody has read are kept this long "
                   "(default %(default)s s)")
    p.add_argument("--adoption-grace", type=float,
                   default=_env("adoption_grace", str(d.adoption_grace)),
                   help="after a restart, dispatch waits this long for workers to reconnect "
                   "with the tasks they ran on, so those are not run again (default %(default)s s)")
    p.add_argument("--lease-timeout", type=float,
                   default=_env("lease_timeout", str(d.lease_timeout)),
                   help="a worker silent this long loses its tasks (default %(default)s s)")
    p.add_argument("--heartbeat-interval", type=float,
                   default=_env("heartbeat_interval", str(d.heartbeat_interval)),
                   help="how often workers must send a heartbeat (default %(default)s s)")
    p.add_argument("--no-worker-timeout", type=float,
                   default=_env("no_worker_timeout", str(d.no_worker_timeout)),
                   help="fail tasks no connected worker offers after this (default %(default)s s)")
    p.add_argument("--poison-threshold", type=int,
                   default=_env("poison_threshold", str(d.poison_threshold)),
                   help="a task that crashed its worker this often fails (default %(default)s)")
    p.add_argument("--max-queued-per-channel", type=int,
                   default=_env("max_queued_per_channel", str(d.max_queued_per_channel)),
                   help="tasks of one channel waiting for a worker; publishing more waits "
                   "(backpressure) until some are dispatched (default %(default)s)")
    p.add_argument("--directive-window", type=int,
                   default=_env("directive_window", str(d.directive_window)),
                   help="elements a directive keeps in flight (default %(default)s)")
    p.add_argument("--max-workers", type=int,
                   default=_env("max_workers", str(d.max_workers)),
                   help="workers connected at once (default %(default)s)")
    p.add_argument("--metrics-port", type=port_number,
                   default=_env("metrics_port", str(DEFAULT_METRICS_PORT)),
                   help="serve Prometheus /metrics on this port, 0 to disable "
                   f"(default {DEFAULT_METRICS_PORT})")
    p.add_argument("--metrics-host", default=_env("metrics_host", "0.0.0.0"),
                   help="address of the /metrics endpoint (default 0.0.0.0)")
    p.add_argument("--log-level", default=_env("log_level", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default=_env("log_format", "text"),
                   help="text, or one JSON object per line (default %(default)s)")
    add_arguments(p, _env)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "squire")


def store_url(args: argparse.Namespace) -> str:
    if args.store:
        return str(args.store)
    state = Path(args.state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'journal.db'}"


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)  # atomic: a reader never sees a partial file


async def serve(args: argparse.Namespace) -> None:
    config = OrchestratorConfig(
        host=args.host,
        port=args.port,
        grace=args.grace,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_message_bytes=args.max_message_bytes,
        security=security_from_args(args),
        limits=limits_from_args(args),
        health_port=args.health_port,
        store=store_url(args),
        retention=Retention(reattach_grace=args.reattach_grace, retention=args.retention),
        advertise=args.advertise,
        lease_ttl=args.lease_ttl,
        router=RouterConfig(
            adoption_grace=args.adoption_grace,
            lease_timeout=args.lease_timeout,
            heartbeat_interval=args.heartbeat_interval,
            no_worker_timeout=args.no_worker_timeout,
            poison_threshold=args.poison_threshold,
            max_queued_per_channel=args.max_queued_per_channel,
            directive_window=args.directive_window,
            max_workers=args.max_workers,
            max_pending_per_channel=args.max_pending_per_channel,
        ),
    )
    orchestrator = Orchestrator(config)
    port = await orchestrator.start()
    if args.port_file:
        await asyncio.to_thread(_write_port_file, Path(args.port_file), port)
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(
            sig, lambda: stopping.add(asyncio.ensure_future(orchestrator.shutdown()))
        )
    # SIGHUP: read the token files and the tenants file again now.
    reloading: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(orchestrator.reload_credentials())
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await orchestrator.wait_closed()
    finally:
        for task in stopping:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if orchestrator.deposed:
        # It led and lost the lease: exit non-zero, to come back as a standby.
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    event_loop.tune_gc()
    try:
        event_loop.run(serve(args), os.environ.get("SQUIRE_EVENT_LOOP", "auto"))
    except (OSError, SecurityConfigError, StoreError, ValueError) as exc:
        logging.getLogger("squire.orchestrator").error("cannot start: %s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
