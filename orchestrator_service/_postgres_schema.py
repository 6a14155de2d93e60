"""The Postgres journal's schema, its migrations and the statements the store
runs. Every table lives in one Postgres schema (``squire`` unless the URL
says ``?schema=``)::

    schema_version (version PRIMARY KEY, application, applied_at)
                   -- one row per migration applied; 'squire-journal'
    lease   (name PRIMARY KEY, holder, address, epoch, expires_at)
            -- the one row 'leader': epoch + 1 each time leadership is taken
    commits (epoch PRIMARY KEY, batches)  -- the writer's last transaction per epoch
    streams (seq bigserial PRIMARY KEY, id UNIQUE, kind, header, created_at,
             detached, finished_at, summary)           -- seq: creation order
    entries (id bigserial PRIMARY KEY, stream_id, kind, payload)
            + index entries_by_stream (stream_id, id)  -- id: global append order

``prepare`` runs at startup in one transaction under an advisory lock (so two
replicas starting on an empty database do not both create it): it refuses a
schema that is not Squire's or is newer than this code, and applies each
missing migration. Migrations must stay additive: during a rolling upgrade
the old leader keeps writing while the new replica has already migrated.

A write transaction (``apply``) is a fixed number of statements whatever its
size: the fence (the lease row ``FOR SHARE``, which a takeover's ``UPDATE``
waits behind, plus the ``commits`` marker), then at most one statement per
kind of op, each carrying all its rows as arrays (``unnest``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from orchestrator_service._journal_types import (
    Append,
    Entry,
    FinishStream,
    OpenStream,
    RemoveStream,
    StoredStream,
    StoreIncompatible,
    StreamKind,
    Write,
)

APPLICATION = "squire-journal"
LOCK_KEY = 0x5351_5245_4A4E_4C00  # "SQREJNL": the advisory lock migrations run under

# MIGRATIONS[v] takes the schema from version v to v + 1; ``{s}`` is the schema.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE {s}.lease (name text PRIMARY KEY, holder text, address text,"
        " epoch bigint NOT NULL, expires_at timestamptz NOT NULL)",
        "INSERT INTO {s}.lease VALUES ('leader', NULL, NULL, 0, '-infinity')",
        "CREATE TABLE {s}.commits (epoch bigint PRIMARY KEY, batches bigint NOT NULL)",
        "CREATE TABLE {s}.streams (seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE,"
        " kind smallint NOT NULL, header bytea NOT NULL, created_at double precision NOT NULL,"
        " detached boolean NOT NULL, finished_at double precision, summary bytea)",
        "CREATE TABLE {s}.entries (id bigserial PRIMARY KEY, stream_id text NOT NULL,"
        " kind integer NOT NULL, payload bytea NOT NULL)",
        "CREATE INDEX entries_by_stream ON {s}.entries (stream_id, id)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
STREAM_COLUMNS = "id, kind, header, created_at, detached, finished_at, summary"


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement, with the schema filled in once."""

    schema: str
    take: str  # the lease, if free or expired: the compare-and-set of a campaign
    peek: str  # the lease as it is, with seconds left
    renew: str
    release: str
    epoch: str
    fence: str  # the lease FOR SHARE + this writer's commit marker
    batches: str
    open_streams: str
    append: str
    finish: str
    remove_entries: str
    remove_streams: str
    all_streams: str
    all_entries: str
    one_stream: str
    one_stream_entries: str
    size: str
    vacuum: str

    @classmethod
    def of(cls, schema: str) -> Statements:
        s = f'"{schema}"'
        until = "clock_timestamp() + make_interval(secs => $3)"
        return cls(
            schema=schema,
            take=f"UPDATE {s}.lease SET holder = $1, address = $2, epoch = epoch + 1,"
                 f" expires_at = {until} WHERE name = 'leader'"
                 " AND (holder IS NULL OR expires_at <= clock_timestamp()) RETURNING epoch",
            peek="SELECT holder, address, epoch, (extract(epoch FROM expires_at) -"
                 " extract(epoch FROM clock_timestamp()))::float8 AS left"
                 f" FROM {s}.lease WHERE name = 'leader'",
            renew=f"UPDATE {s}.lease SET expires_at = clock_timestamp() +"
                  " make_interval(secs => $2) WHERE name = 'leader' AND epoch = $1"
                  " AND holder IS NOT NULL RETURNING epoch",
            release=f"UPDATE {s}.lease SET holder = NULL, address = NULL,"
                    " expires_at = '-infinity' WHERE name = 'leader' AND epoch = $1",
            epoch=f"SELECT epoch FROM {s}.lease WHERE name = 'leader'",
            fence=f"WITH lease AS (SELECT epoch FROM {s}.lease WHERE name = 'leader' FOR SHARE)"
                  f" INSERT INTO {s}.commits SELECT $1::int8, $2::int8 FROM lease"
                  " WHERE lease.epoch = $1"
                  " ON CONFLICT (epoch) DO UPDATE SET batches = excluded.batches"
                  " RETURNING batches",
            batches=f"SELECT batches FROM {s}.commits WHERE epoch = $1",
            open_streams=f"INSERT INTO {s}.streams (id, kind, header, created_at, detached)"
                         " SELECT i, k, h, c, d FROM unnest($1::text[], $2::int2[],"
                         " $3::bytea[], $4::float8[], $5::bool[]) WITH ORDINALITY"
                         " AS t(i, k, h, c, d, o) ORDER BY o",
            append=f"INSERT INTO {s}.entries (stream_id, kind, payload)"
                   " SELECT i, k, p FROM unnest($1::text[], $2::int4[], $3::bytea[])"
                   " WITH ORDINALITY AS t(i, k, p, o) ORDER BY o",
            finish=f"UPDATE {s}.streams SET finished_at = t.f, summary = t.m FROM"
                   " unnest($1::text[], $2::float8[], $3::bytea[]) AS t(i, f, m)"
                   f" WHERE {s}.streams.id = t.i",
            remove_entries=f"DELETE FROM {s}.entries WHERE stream_id = ANY($1::text[])",
            remove_streams=f"DELETE FROM {s}.streams WHERE id = ANY($1::text[])",
            all_streams=f"SELECT {STREAM_COLUMNS} FROM {s}.streams ORDER BY seq",
            all_entries=f"SELECT stream_id, kind, payload FROM {s}.entries ORDER BY id",
            one_stream=f"SELECT {STREAM_COLUMNS} FROM {s}.streams WHERE id = $1",
            one_stream_entries=f"SELECT kind, payload FROM {s}.entries WHERE stream_id = $1"
                               " ORDER BY id",
            size="SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c"
                 " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1"
                 " AND c.relkind = 'r'",
            vacuum=f"VACUUM {s}.entries, {s}.streams",
        )


async def prepare(conn: asyncpg.Connection, schema: str, shown: str) -> int:
    """Create or migrate the journal's schema; returns the version found."""
    where = f"journal {shown} (schema {schema!r})"
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        tables = [r["relname"] for r in await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1",
            schema)]
        version = 0
        if "schema_version" in tables:
            try:
                rows = await conn.fetch(f'SELECT version, application FROM "{schema}".'
                                        "schema_version ORDER BY version")
            except asyncpg.PostgresError as exc:
                raise StoreIncompatible(f"{where} has a schema_version table that is not "
                                        f"Squire's ({exc}); point the URL's ?schema= elsewhere"
                                        ) from exc
            foreign = {r["application"] for r in rows} - {APPLICATION}
            if foreign or not rows:
                whose = (f"another application ({', '.join(sorted(foreign))})" if foreign
                         else "nobody (an empty schema_version table)")
                raise StoreIncompatible(f"{where} belongs to {whose}, not {APPLICATION}; "
                                        "point the URL's ?schema= elsewhere")
            version = max(r["version"] for r in rows)
        elif tables:
            raise StoreIncompatible(
                f"{where} holds tables that are not a Squire journal ({', '.join(tables[:5])}"
                f"{', ...' if len(tables) > 5 else ''}); point the URL's ?schema= at a new "
                "schema or at a Squire journal")
        if version > SCHEMA_VERSION:
            raise StoreIncompatible(
                f"{where} has schema version {version}, newer than this Squire reads "
                f"(up to {SCHEMA_VERSION}); run the Squire that wrote it or a newer one")
        if version == 0:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                f'CREATE TABLE "{schema}".schema_version (version integer PRIMARY KEY,'
                " application text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for v in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[v]:
                await conn.execute(statement.format(s=f'"{schema}"'))
            await conn.execute(f'INSERT INTO "{schema}".schema_version (version, application)'
                               " VALUES ($1, $2)", v + 1, APPLICATION)
    return version


def _stream(row: asyncpg.Record) -> StoredStream:
    return StoredStream(row[0], StreamKind(row[1]), row[2], row[3], row[4], row[5], row[6], [])


async def load_all(conn: asyncpg.Connection, st: Statements) -> list[StoredStream]:
    """Every stream with its log, from one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        streams = {s.stream_id: s for s in map(_stream, await conn.fetch(st.all_streams))}
        for sid, kind, payload in await conn.fetch(st.all_entries):
            streams[sid].entries.append((kind, payload))
    return list(streams.values())


async def load_one(conn: asyncpg.Connection, st: Statements, stream_id: str
                   ) -> StoredStream | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(st.one_stream, stream_id)
        if row is None:
            return None
        stream = _stream(row)
        stream.entries = [(r[0], r[1]) for r in await conn.fetch(st.one_stream_entries, stream_id)]
    return stream


async def list_all(conn: asyncpg.Connection, st: Statements) -> list[StoredStream]:
    return list(map(_stream, await conn.fetch(st.all_streams)))


def plan(writes: Sequence[Sequence[Write]]) -> tuple[
        list[str], list[OpenStream], list[Entry], dict[str, FinishStream]]:
    """The batch as set operations with the same outcome as applying every op
    in order: the rows of each removed stream are deleted first, and of
    every op on a stream only those after its last removal are kept."""
    ops = [op for group in writes for op in group]
    last_removal = {op.stream_id: i for i, op in enumerate(ops) if type(op) is RemoveStream}
    opens: list[OpenStream] = []
    entries: list[Entry] = []
    finishes: dict[str, FinishStream] = {}  # the last one per stream wins
    for i, op in enumerate(ops):
        if type(op) is Append:
            if last_removal:
                entries.extend(e for e in op.entries if last_removal.get(e.stream_id, -1) < i)
            else:
                entries.extend(op.entries)
        elif last_removal.get(op.stream_id, -1) >= i:  # type: ignore[union-attr]
            continue
        elif type(op) is OpenStream:
            opens.append(op)
        elif type(op) is FinishStream:
            finishes[op.stream_id] = op
    return list(last_removal), opens, entries, finishes


async def apply(conn: asyncpg.Connection, st: Statements, writes: Sequence[Sequence[Write]]
                ) -> None:
    """The batch's statements, inside the caller's transaction."""
    removed, opens, entries, finishes = plan(writes)
    if removed:
        await conn.execute(st.remove_entries, removed)
        await conn.execute(st.remove_streams, removed)
    if opens:
        await conn.execute(st.open_streams, [o.stream_id for o in opens],
                           [int(o.kind) for o in opens], [o.header for o in opens],
                           [o.created_at for o in opens], [o.detached for o in opens])
    if entries:
        await conn.execute(st.append, [e.stream_id for e in entries],
                           [e.kind for e in entries], [e.payload for e in entries])
    if finishes:
        ends = list(finishes.values())
        await conn.execute(st.finish, [f.stream_id for f in ends],
                           [f.finished_at for f in ends], [f.summary for f in ends])
