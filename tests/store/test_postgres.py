"""The Postgres journal's own promises, on a real server: a group of writes
is one transaction (the rows' xmin says so), the schema is created and
migrated in one transaction and a foreign or newer one is refused, URLs and
passwords are read as documented."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pg import PASSWORD

from orchestrator_service import _postgres_schema as schema
from orchestrator_service._journal import (
    Append,
    Entry,
    FinishStream,
    OpenStream,
    PostgresStore,
    RemoveStream,
    StoreError,
    StoreIncompatible,
    StreamKind,
    open_store,
)
from orchestrator_service._postgres_conn import parse_postgres_url

from .conftest import OpenPg, pg_fetch, settled


def opened(sid: str) -> OpenStream:
    return OpenStream(sid, StreamKind.DIRECTIVE, b"plan", 1.0)


async def test_a_group_of_writes_is_one_transaction_in_order(make_pg: OpenPg, pg_url: str) -> None:
    store, _ = await make_pg()
    await settled(store.write([opened("s")]))
    commits = store.stats.commits
    # queued before the writer task runs again: one batch, one transaction
    futures = [store.write([Append([Entry("s", i % 3, f"{i}:{j}".encode()) for j in range(4)])])
               for i in range(500)]
    await asyncio.gather(*futures)  # type: ignore[arg-type]
    assert store.stats.commits == commits + 1
    assert store.stats.writes == 501 and store.stats.entries == 2000
    rows = await pg_fetch(pg_url, "SELECT count(DISTINCT xmin::text), count(*) FROM squire.entries")
    assert tuple(rows[0]) == (1, 2000)  # every row written by the same transaction
    got = await store.read("s")
    assert got is not None
    assert got.entries == [(i % 3, f"{i}:{j}".encode()) for i in range(500) for j in range(4)]


async def test_a_mixed_batch_means_what_its_ops_mean_in_order(make_pg: OpenPg) -> None:
    store, _ = await make_pg()
    await settled(store.write([opened("old"), Append([Entry("old", 1, b"gone")]), opened("kept")]))
    futures = [
        store.write([opened("a"), Append([Entry("a", 1, b"a-first"), Entry("kept", 1, b"k1")])]),
        store.write([RemoveStream("a"), RemoveStream("old"), opened("old")]),
        store.write([opened("a"), Append([Entry("a", 2, b"a-second"), Entry("old", 3, b"new")])]),
        store.write([FinishStream("kept", 5.0, b"first end"), FinishStream("kept", 6.0, b"last")]),
    ]
    await asyncio.gather(*futures)  # type: ignore[arg-type]
    await store.close()
    _, recovered = await make_pg()
    assert [(s.stream_id, s.entries, s.finished_at, s.summary) for s in recovered.streams] == [
        ("kept", [(1, b"k1")], 6.0, b"last"),
        ("old", [(3, b"new")], None, None),
        ("a", [(2, b"a-second")], None, None),
    ]


async def test_an_empty_database_gets_the_schema(make_pg: OpenPg, pg_url: str) -> None:
    _, recovered = await make_pg()
    assert recovered.epoch == 1
    rows = await pg_fetch(pg_url, "SELECT version, application FROM squire.schema_version")
    assert [tuple(r) for r in rows] == [(v + 1, "squire-journal")
                                        for v in range(schema.SCHEMA_VERSION)]
    tables = await pg_fetch(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'squire'"
                                    " ORDER BY 1")
    assert [r[0] for r in tables] == ["commits", "entries", "lease", "schema_version", "streams"]


async def test_replicas_starting_together_create_the_schema_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    try:
        leaders = await asyncio.gather(*(s.leader() for s in stores))
        assert leaders == [None] * 4
    finally:
        for s in stores:
            await s.close()
    rows = await pg_fetch(pg_url, "SELECT count(*) FROM squire.schema_version")
    assert rows[0][0] == schema.SCHEMA_VERSION


async def test_a_newer_schema_is_refused_and_left_alone(make_pg: OpenPg, pg_url: str) -> None:
    store, _ = await make_pg()
    await store.close()
    newer = schema.SCHEMA_VERSION + 1
    await pg_fetch(pg_url, "INSERT INTO squire.schema_version (version, application)"
                           " VALUES ($1, 'squire-journal')", newer)
    with pytest.raises(StoreIncompatible, match=(
            rf"journal {pg_url} \(schema 'squire'\) has schema version {newer}, newer than this Squire "
            rf"reads \(up to {schema.SCHEMA_VERSION}\); run the Squire that wrote it or a "
            "newer one")) as caught:
        await make_pg()
    assert caught.value.code == "FAILED_PRECONDITION"
    rows = await pg_fetch(pg_url, "SELECT max(version), (SELECT epoch FROM squire.lease)"
                                  " FROM squire.schema_version")
    assert tuple(rows[0]) == (newer, 1)  # no migration, no epoch taken


async def test_another_applications_tables_are_refused(make_pg: OpenPg, pg_url: str) -> None:
    await pg_fetch(pg_url, "CREATE SCHEMA squire")
    await pg_fetch(pg_url, "CREATE TABLE squire.invoices (id int PRIMARY KEY)")
    with pytest.raises(StoreIncompatible, match=(
            "holds tables that are not a Squire journal \\(invoices\\); point the URL's "
            "\\?schema= at a new schema or at a Squire journal")):
        await make_pg()
    # the same database, another schema: fine
    _, recovered = await make_pg(pg_url + "?schema=jobs")
    assert recovered.epoch == 1
    rows = await pg_fetch(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'squire'")
    assert [r[0] for r in rows] == ["invoices"]


async def test_a_foreign_schema_version_table_is_refused(make_pg: OpenPg, pg_url: str) -> None:
    await pg_fetch(pg_url, "CREATE SCHEMA squire")
    await pg_fetch(pg_url, "CREATE TABLE squire.schema_version (version int, application text)")
    await pg_fetch(pg_url, "INSERT INTO squire.schema_version VALUES (3, 'flyway')")
    with pytest.raises(StoreIncompatible, match="belongs to another application \\(flyway\\)"):
        await make_pg()


async def test_a_migration_is_one_transaction(make_pg: OpenPg, pg_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = await make_pg()
    await settled(store.write([opened("s"), Append([Entry("s", 1, b"kept")])]))
    await store.close()
    v2 = ("ALTER TABLE {s}.streams ADD COLUMN tenant text",
          "CREATE INDEX streams_by_tenant ON {s}.streams (tenant)")
    broken = (v2[0], "CREATE INDEX nonsense ON {s}.streams (no_such_column)")
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    with pytest.raises(StoreError, match='column "no_such_column" does not exist'):
        await make_pg()
    columns = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'streams'"
    before = (await pg_fetch(pg_url, columns))[0][0]
    assert before == 8  # the ALTER was rolled back with the failed index
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS[:-1], v2])
    _, recovered = await make_pg()
    assert recovered.streams[0].entries == [(1, b"kept")]
    assert (await pg_fetch(pg_url, columns))[0][0] == 9
    rows = await pg_fetch(pg_url, "SELECT max(version) FROM squire.schema_version")
    assert rows[0][0] == len(schema.MIGRATIONS)


@pytest.mark.parametrize(("url", "dsn", "schema_", "shown"), [
    ("postgresql://u@db:5432/squire", "postgresql://u@db:5432/squire", "squire",
     "postgresql://u@db:5432/squire"),
    ("postgres://u@db/j?schema=team_a&sslmode=require", "postgres://u@db/j?sslmode=require",
     "team_a", "postgres://u@db/j?schema=team_a&sslmode=require"),
    ("postgresql://u:s3cret@db/j", "postgresql://u:s3cret@db/j", "squire",
     "postgresql://u:***@db/j"),
])
def test_postgres_urls(url: str, dsn: str, schema_: str, shown: str) -> None:
    parsed = parse_postgres_url(url)
    assert (parsed.dsn, parsed.schema, parsed.shown) == (dsn, schema_, shown)
    store = open_store(url)
    assert isinstance(store, PostgresStore) and store.url == shown and store.durable


@pytest.mark.parametrize("source", ["SQUIRE_STORE_PASSWORD_FILE", "SQUIRE_STORE_PASSWORD",
                                    "PGPASSWORD", "url"])
async def test_the_password_comes_from_a_file_the_environment_or_the_url(
        make_pg: OpenPg, pg_url: str, source: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    for name in ("SQUIRE_STORE_PASSWORD_FILE", "SQUIRE_STORE_PASSWORD", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    url = pg_url
    if source == "SQUIRE_STORE_PASSWORD_FILE":
        (tmp_path / "secret").write_text(PASSWORD + "\n")
        monkeypatch.setenv(source, str(tmp_path / "secret"))
    elif source == "url":
        url = pg_url.replace("postgres@", f"postgres:{PASSWORD}@")
    else:
        monkeypatch.setenv(source, PASSWORD)
    store, recovered = await make_pg(url)
    assert recovered.epoch == 1 and PASSWORD not in store.url


async def test_a_wrong_password_fails_at_once_naming_its_source(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SQUIRE_STORE_PASSWORD_FILE")
    monkeypatch.setenv("SQUIRE_STORE_PASSWORD", "not it")
    store = PostgresStore(pg_url)
    with pytest.raises(StoreError) as caught:
        await asyncio.wait_for(store.open(), 10)
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.message.startswith(f"journal {pg_url}: password authentication failed")
    assert caught.value.message.endswith("the password came from SQUIRE_STORE_PASSWORD")
    assert store.state.value == "closed"
