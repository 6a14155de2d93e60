"""Reaching Postgres: the store URL, the password (from the environment or
a file, never required in the URL), one connection per role that reconnects
after it broke, and what each failure means to callers.

- URL: ``postgresql://user@host:port/database`` or ``postgres://...``, with
  libpq's parameters as asyncpg reads them (``sslmode=``, ...) plus
  ``schema=NAME`` (default ``squire``): the Postgres schema holding the
  journal, so one database can keep several Squire deployments apart.
- Password, first found: a password in the URL; the file named by
  ``SQUIRE_STORE_PASSWORD_FILE`` (a Kubernetes Secret mounted as a file; one
  trailing newline is dropped); ``SQUIRE_STORE_PASSWORD``; ``PGPASSWORD``;
  then asyncpg's own ``~/.pgpass`` lookup.
- ``transient(exc)``: the failures that end when Postgres is back (connection
  refused or broken, a server shutting down or starting, timeouts, a
  read-only standby, serialization failures): retried. Anything else (a
  wrong password, a missing database, a bug) is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import asyncpg.exceptions as pgx

from orchestrator_service._journal_types import StoreError

SCHEMES = ("postgresql", "postgres")
DEFAULT_SCHEMA = "squire"
PASSWORD_ENV = ("SQUIRE_STORE_PASSWORD_FILE", "SQUIRE_STORE_PASSWORD", "PGPASSWORD")
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
CONNECT_TIMEOUT = 5.0

_TRANSIENT_PG = (
    pgx.PostgresConnectionError,  # class 08
    pgx.OperatorInterventionError,  # class 57: shutdown, starting up, statement timeout
    pgx.InsufficientResourcesError,  # class 53: disk full, too many connections
    pgx.TransactionRollbackError,  # class 40: serialization failure, deadlock
    pgx.ReadOnlySQLTransactionError,  # a standby server, after a Postgres failover
    pgx.IdleInTransactionSessionTimeoutError,
    pgx.LockNotAvailableError,
)


@dataclass(frozen=True, slots=True)
class PostgresURL:
    dsn: str  # what asyncpg connects to: the URL less Squire's own parameters
    schema: str
    shown: str  # the URL as logs and errors show it: no password


def parse_postgres_url(url: str) -> PostgresURL:
    """Raises ValueError naming what is wrong with ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"store URL {url!r}: not postgresql:// or postgres://")
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError(f"store URL {url!r}: no host")
    schema = DEFAULT_SCHEMA
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            schema = value
        else:
            query.append((key, value))
    if not IDENTIFIER.fullmatch(schema):
        raise ValueError(f"store URL {url!r}: schema must be a lower-case SQL identifier "
                         f"(letters, digits, _), not {schema!r}")
    dsn = urlunsplit(parts._replace(query=urlencode(query)))
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    shown = urlunsplit(parts._replace(netloc=netloc))
    return PostgresURL(dsn, schema, shown)


def find_password(url: str) -> tuple[str | None, str]:
    """The password to log in with and where it came from (for error messages)."""
    if urlsplit(url).password is not None:
        return None, "the URL"  # asyncpg reads it from the DSN
    if path := os.environ.get("SQUIRE_STORE_PASSWORD_FILE"):
        try:
            with open(path) as f:
                secret = f.read()
        except OSError as exc:
            raise StoreError("UNAVAILABLE", f"cannot read SQUIRE_STORE_PASSWORD_FILE "
                             f"{path}: {exc.strerror}") from exc
        return secret.removesuffix("\n"), f"SQUIRE_STORE_PASSWORD_FILE={path}"
    for name in PASSWORD_ENV[1:]:
        if (value := os.environ.get(name)) is not None:
            return value, name
    return None, "no password set (" + ", ".join(PASSWORD_ENV) + " are all unset)"


def transient(exc: BaseException) -> bool:
    # InterfaceError and InternalClientError are asyncpg's own: a connection
    # closed under it, or a protocol state left behind by one that broke mid
    # statement ("another operation is in progress"); a new connection cures both
    return isinstance(exc, (*_TRANSIENT_PG, pgx.InterfaceError, pgx.InternalClientError,
                            OSError, TimeoutError))


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, pgx.PostgresError) and exc.sqlstate:
        return f"{text} (SQLSTATE {exc.sqlstate})"
    return text


def classify(exc: BaseException, shown: str, password_from: str = "") -> StoreError:
    """A failed Postgres call as the status callers report."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, pgx.DiskFullError):
        return StoreError("RESOURCE_EXHAUSTED", f"journal {shown}: Postgres' disk is full")
    if isinstance(exc, pgx.InvalidAuthorizationSpecificationError):
        return StoreError("UNAVAILABLE", f"journal {shown}: {describe(exc)}; the password "
                          f"came from {password_from}")
    if transient(exc):
        return StoreError("UNAVAILABLE", f"journal {shown}: cannot reach Postgres: "
                          f"{describe(exc)}")
    return StoreError("UNAVAILABLE", f"journal {shown}: {describe(exc)}")


@dataclass(slots=True)
class Link:
    """One connection for one role (writer, lease, reader), used by one
    coroutine at a time, made on first use and again after it broke."""

    url: PostgresURL
    settings: dict[str, str]
    role: str
    conn: asyncpg.Connection | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    password_from: str = ""

    @contextlib.asynccontextmanager
    async def use(self, timeout: float = CONNECT_TIMEOUT  # noqa: ASYNC109 (the connect's)
                  ) -> AsyncIterator[asyncpg.Connection]:
        """The connection, exclusively; a transient failure inside drops it,
        so the next use reconnects."""
        async with self.lock:
            if self.conn is None or self.conn.is_closed():
                self.conn = None
                password, self.password_from = find_password(self.url.dsn)
                self.conn = await asyncpg.connect(
                    self.url.dsn, password=password, timeout=max(0.1, timeout),
                    server_settings={"application_name": f"squire-{self.role}", **self.settings},
                )
            try:
                yield self.conn
            except BaseException as exc:
                # only a server's error about a statement leaves the
                # connection as it was; after anything else start afresh
                if transient(exc) or not isinstance(exc, pgx.PostgresError):
                    self.drop()
                raise

    def drop(self) -> None:
        """Forget the connection at once, without waiting for the server."""
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except Exception:  # a broken connection, or no answer: no goodbye
                conn.terminate()
            except asyncio.CancelledError:
                conn.terminate()
                raise
