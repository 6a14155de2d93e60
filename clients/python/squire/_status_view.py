"""``squire status`` as rich tables, rendered from ``Client.status()`` data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def render_status(status: Mapping[str, Any], *, target: str = "") -> RenderableType:
    """Workers, queues, channels and directives, one table each."""
    state = status.get("state") or "unknown"
    version = status.get("version")
    header = Text.assemble(
        ("orchestrator ", "bold"),
        (target + " " if target else "", "cyan"),
        (state, "green" if state == "running" else "yellow"),
        (f"  version {version}" if version else "", "dim"),
        (f"  queue depth {status.get('queue_depth', 0)}", ""),
    )
    return Group(
        header,
        _workers(status.get("workers", [])),
        _queues(status.get("queues", [])),
        _channels(status.get("channels", [])),
        _directives(status.get("directives", [])),
        *_waiting(status.get("directives", [])),
    )


_COUNTS = {
    "capacity",
    "in flight",
    "leased",
    "exec/buf",
    "completed",
    "depth",
    "published",
    "queued",
    "running",
    "skipped",
    "age",
}


_IDS = {"worker", "channel", "directive"}  # cut short rather than wrapped


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in _COUNTS else "left",
                         no_wrap=column in _IDS)
    return table


def _workers(workers: list[Mapping[str, Any]]) -> Table:
    # leased = executing + buffered at the worker + results on their way back
    table = _table("workers", "worker", "operations", "capacity", "leased", "exec/buf",
                   "completed", "peer")
    for w in workers:
        offered = [*w.get("operations", []), *(f"{m} (monoid)" for m in w.get("monoids", []))]
        table.add_row(
            w.get("worker_id", ""),
            ", ".join(offered),
            str(w.get("capacity", 0)),
            str(w.get("in_flight", 0)),
            f'{w.get("executing", 0)}/{w.get("buffered", 0)}',
            str(w.get("completed", 0)),
            w.get("peer", ""),
        )
    if not workers:
        table.caption = "no worker connected"
    return table


def _queues(queues: list[Mapping[str, Any]]) -> Table:
    table = _table("queues", "operation", "depth")
    for q in queues:
        table.add_row(q.get("operation", ""), str(q.get("depth", 0)))
    if not queues:
        table.caption = "no queued tasks"
    return table


def _channels(channels: list[Mapping[str, Any]]) -> Table:
    table = _table(
        "channels", "channel", "kind", "sender", "published", "completed", "queued", "leased"
    )
    for c in channels:
        table.add_row(
            c.get("channel_id", ""),
            "directive" if c.get("directive") else "client",
            "closed" if c.get("sender_closed") else "open",
            str(c.get("published", 0)),
            str(c.get("completed", 0)),
            str(c.get("queued", 0)),
            str(c.get("in_flight", 0)),
        )
    if not channels:
        table.caption = "no leased channels"
    return table


def _directives(directives: list[Mapping[str, Any]]) -> Table:
    table = _table(
        "directives", "directive", "plan", "progress", "skipped", "queued", "leased", "age"
    )
    for d in directives:
        p = d.get("progress", {})
        completed, total = p.get("completed", 0), p.get("total", 0)
        shown = f"{completed}/{total} ({100 * completed // total}%)" if total else f"{completed}/?"
        table.add_row(
            d.get("directive_id", ""),
            d.get("plan", ""),
            shown,
            str(p.get("skipped", 0)),
            str(p.get("queued", 0)),
            str(p.get("leased", 0)),
            f"{d.get('age_seconds', 0.0):.1f}s",
        )
    if not directives:
        table.caption = "no active directives"
    return table


def _waiting(directives: list[Mapping[str, Any]]) -> list[Text]:
    """What each waiting directive waits for, a whole line each under the
    table (a column that narrow would wrap it a word per line)."""
    return [
        Text.assemble((d.get("directive_id", "")[:8], "bold"), ": ",
                      (d["progress"]["waiting"], "red"))
        for d in directives
        if d.get("progress", {}).get("waiting")
    ]
