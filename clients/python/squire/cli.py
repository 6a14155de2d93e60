"""The ``squire`` command.

    squire demo [--workers 2] [--executor process]
        start an embedded orchestrator and workers, run fib_at over 1..10
        folded with sum, show live progress; prints 143
    squire status [--target HOST:PORT] [--json] [--watch [--interval 1]]
        what the orchestrator is doing (target: $SQUIRE_TARGET, else
        127.0.0.1:50051)
    squire directives [--json]
        the directives the orchestrator holds: running, and finished ones
        kept for a caller to read (detached, or left by their caller)
    squire results ID
        attach to directive ID and print its results as JSON lines:
        {"index": i, "value": v} (or "skipped": error) per item, then
        {"fold": v} for a fold; exit 0 once it is done
    squire cancel ID
        cancel directive ID (a finished one is dropped with its results)

Exit codes: 0 success (Ctrl-C ends ``--watch`` successfully), 1 a Squire
error (message on stderr), 130 Ctrl-C otherwise (one line on stderr; a
directive running is cancelled, embedded services are stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from squire._client import Client
from squire._embedded import embedded
from squire._errors import PayloadError, RpcError, SquireError, Unavailable
from squire._model import FoldValue, ItemBatch, Skipped
from squire._status_view import render_status
from squire._stream import IndexedStream
from squire_kernel.serde import Serializer, encode

DEFAULT_TARGET = "127.0.0.1:50051"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.command(args)
    except KeyboardInterrupt:
        # Cancelling the call and stopping embedded services happened on the
        # way out; the traceback (through grpc's internals) would say nothing.
        print("squire: interrupted", file=sys.stderr, flush=True)
        return 130
    except TimeoutError as exc:
        print(f"squire: {exc}", file=sys.stderr)
        return 1
    except RpcError as exc:
        print(f"squire: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except SquireError as exc:
        print(f"squire: {exc}", file=sys.stderr)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squire", description="Route distributed tasks and their results."
    )
    commands = parser.add_subparsers(required=True, metavar="command")

    demo = commands.add_parser(
        "demo", help="run fib_at over 1..10, folded with sum, on an embedded cluster"
    )
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument(
        "--executor",
        default="process",
        choices=("process", "thread"),
        help="how workers run operations (default process)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--verbose", action="store_true", help="show the services' logs as they run")
    demo.set_defaults(command=_demo)

    status = commands.add_parser("status", help="show workers, queues, channels, directives")
    status.add_argument(
        "--target",
        default=os.environ.get("SQUIRE_TARGET", DEFAULT_TARGET),
        help=f"orchestrator host:port (default $SQUIRE_TARGET or {DEFAULT_TARGET})",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    env = os.environ.get
    status.add_argument("--tls-ca", default=env("SQUIRE_TLS_CA"),
                        help="PEM CA of the orchestrator's certificate; enables TLS "
                        "(default $SQUIRE_TLS_CA)")
    status.add_argument("--tls-cert", default=env("SQUIRE_TLS_CERT"),
                        help="PEM client certificate (default $SQUIRE_TLS_CERT)")
    status.add_argument("--tls-key", default=env("SQUIRE_TLS_KEY"),
                        help="PEM key of --tls-cert (default $SQUIRE_TLS_KEY)")
    status.add_argument("--token-file", default=env("SQUIRE_TOKEN_FILE"),
                        help="file holding a client token (default $SQUIRE_TOKEN_FILE, "
                        "else the token in $SQUIRE_CLIENT_TOKEN)")
    status.set_defaults(command=_status)

    listing = commands.add_parser("directives", help="list the directives the orchestrator holds")
    _connection_flags(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per directive")
    listing.set_defaults(command=_directives)
    results = commands.add_parser("results", help="stream a directive's results as JSON lines")
    _connection_flags(results)
    results.add_argument("directive_id", metavar="ID", help="the directive's id")
    results.set_defaults(command=_results)
    cancel = commands.add_parser("cancel", help="cancel a directive by id")
    _connection_flags(cancel)
    cancel.add_argument("directive_id", metavar="ID", help="the directive's id")
    cancel.set_defaults(command=_cancel)
    return parser


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--target", default=env("SQUIRE_TARGET", DEFAULT_TARGET),
        help=f"orchestrator host:port (default $SQUIRE_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument("--tls-ca", default=env("SQUIRE_TLS_CA"),
                        help="PEM CA of the orchestrator's certificate (default $SQUIRE_TLS_CA)")
    parser.add_argument("--tls-cert", default=env("SQUIRE_TLS_CERT"),
                        help="PEM client certificate (default $SQUIRE_TLS_CERT)")
    parser.add_argument("--tls-key", default=env("SQUIRE_TLS_KEY"),
                        help="PEM key of --tls-cert (default $SQUIRE_TLS_KEY)")
    parser.add_argument("--token-file", default=env("SQUIRE_TOKEN_FILE"),
                        help="file holding a client token (default $SQUIRE_TOKEN_FILE, "
                        "else the token in $SQUIRE_CLIENT_TOKEN)")


def _client(args: argparse.Namespace) -> Client:
    try:
        token = (
            Path(args.token_file).read_text().strip()
            if args.token_file
            else os.environ.get("SQUIRE_CLIENT_TOKEN") or None
        )
        return Client(args.target, tls_ca=args.tls_ca or None, tls_cert=args.tls_cert or None,
                      tls_key=args.tls_key or None, token=token)
    except (OSError, ValueError) as exc:  # an unreadable or malformed file
        raise SquireError(f"cannot set up the connection: {exc}") from exc


def _directives(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.directives()
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    if not rows:
        print("no directives")
        return 0
    print(f"{'directive':32}  {'state':9}  {'detached':8}  {'done':>13}  plan")
    for row in rows:
        done = f"{row.get('completed', 0)}/{row.get('received', 0)}"
        print(f"{row['directive_id']:32}  {row['state']:9}  "
              f"{'yes' if row.get('detached') else 'no':8}  {done:>13}  {row.get('plan', '')}")
    return 0


def _results(args: argparse.Namespace) -> int:
    with _client(args) as client, client.attach(args.directive_id) as run:
        for event in run:
            if isinstance(event, ItemBatch):
                for index, value in event.items:
                    if isinstance(value, Skipped):
                        line = {"index": index, "skipped": value.error}
                    else:
                        line = {"index": index, "value": value}
                    print(_json_line(line), flush=False)
                sys.stdout.flush()
            elif isinstance(event, FoldValue):
                print(_json_line({"fold": event.value}), flush=True)
    return 0


def _json_line(row: dict[str, object]) -> str:
    try:
        # The payloads' own JSON: integers of any size exact (json.dumps
        # stops at Python's 4,300-digit limit).
        return encode(row, Serializer.JSON).decode()
    except PayloadError:
        # What JSON cannot carry (bytes, NaN from MessagePack), as text.
        return json.dumps(row, default=str)


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.cancel(args.directive_id)
    print(f"cancelled {args.directive_id}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
    err = Console(stderr=True)
    err.print(f"starting an orchestrator and {args.workers} workers ({args.executor} executor)")
    with tempfile.TemporaryDirectory(prefix="squire-demo-") as tmp:
        # The services' logs would garble the live progress bar: keep them in
        # a file, shown only if something goes wrong (or with --verbose).
        log: Path | TextIO = sys.stderr if args.verbose else Path(tmp) / "services.log"
        try:
            with embedded(workers=args.workers, executor=args.executor, log=log) as cluster:
                err.print(f"orchestrator at {cluster.target}; {stream.describe()} over 1..10")
                value = stream.run(cluster.client, progress=not args.no_progress)
        except (SquireError, TimeoutError):
            if isinstance(log, Path) and log.exists():
                err.print("[bold]service logs:[/]", log.read_text(errors="replace")[-8000:])
            raise
    print(value, flush=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise SquireError("--interval must be positive")
    try:
        token = (
            Path(args.token_file).read_text().strip()
            if args.token_file
            else os.environ.get("SQUIRE_CLIENT_TOKEN") or None
        )
        client = Client(args.target, tls_ca=args.tls_ca or None, tls_cert=args.tls_cert or None,
                        tls_key=args.tls_key or None, token=token)
    except (OSError, ValueError) as exc:  # an unreadable or malformed file
        raise SquireError(f"cannot set up the connection: {exc}") from exc
    with client:
        if not args.watch:
            try:
                status = client.status()
            except Unavailable as exc:
                raise SquireError(f"no orchestrator answers at {args.target}: {exc}") from exc
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                Console().print(render_status(status, target=args.target))
            return 0
        try:
            if args.json:
                _watch_json(client, args.interval)
            else:
                _watch_tables(client, args.target, args.interval)
        except KeyboardInterrupt:  # the way to stop watching
            return 0
    return 0


def _watch_json(client: Client, interval: float) -> None:
    # One JSON document per line and refresh (JSON Lines).
    while True:
        print(json.dumps(client.status()), flush=True)
        _pause(interval)


def _watch_tables(client: Client, target: str, interval: float) -> None:
    if not sys.stdout.isatty():
        _watch_plain(client, target, interval)
        return
    with Live(Text("connecting..."), refresh_per_second=4) as live:
        while True:
            try:
                live.update(render_status(client.status(), target=target))
            except SquireError as exc:  # keep watching while the orchestrator is away
                live.update(Text(f"{target}: {exc}", style="red"))
            _pause(interval)


def _watch_plain(client: Client, target: str, interval: float) -> None:
    # Redirected (a file, a pipe, `| tee`): a live display would redraw in
    # place and reach the file only at exit, so each refresh is printed as
    # plain lines after a timestamp, and flushed.
    console = Console(no_color=True, highlight=False)
    while True:
        frame: RenderableType
        try:
            frame = render_status(client.status(), target=target)
        except SquireError as exc:  # keep watching while the orchestrator is away
            frame = Text(f"{target}: {exc}")
        console.print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}", markup=False)
        console.print(frame)
        sys.stdout.flush()
        _pause(interval)


def _pause(seconds: float) -> None:
    time.sleep(seconds)


if __name__ == "__main__":
    sys.exit(main())
