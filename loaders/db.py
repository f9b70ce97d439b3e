"""Opening connections to the balances database."""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator
from urllib.parse import unquote, urlsplit

import psycopg2
import psycopg2.extensions

# NUMERIC comes back as Decimal (psycopg2's default); keep it that way and
# make sure no caller registers a float caster for it.

# Every wait on the database has an end. The longest statement the pipeline
# runs is the publish of a whole snapshot in one INSERT ... SELECT (1 M rows
# in 10 to 30 s on the 2-core test machine, docs/RELIABILITY.md): 15 minutes
# leaves room for 30 times that. A lock is never legitimately held long against us: readers take no
# lock we wait for, and our own long waits (a second publish of one source)
# raise their limit for that one statement. A timeout is an error naming
# the setting (``canceling statement due to lock timeout``), and the run
# records it as its failure.
STATEMENT_TIMEOUT = timedelta(minutes=15)
LOCK_TIMEOUT = timedelta(seconds=30)


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not ready; one clear line."""


def session_options(statement_timeout: timedelta = STATEMENT_TIMEOUT,
                    lock_timeout: timedelta = LOCK_TIMEOUT) -> str:
    """libpq ``options`` that set the session's time limits from its first statement."""
    return (f"-c statement_timeout={_milliseconds(statement_timeout)}"
            f" -c lock_timeout={_milliseconds(lock_timeout)}")


def _milliseconds(value: timedelta) -> int:
    return int(value.total_seconds() * 1000)


def connect(url: str, *, application_name: str = "balance-snapshots",
            statement_timeout: timedelta = STATEMENT_TIMEOUT,
            lock_timeout: timedelta = LOCK_TIMEOUT) -> psycopg2.extensions.connection:
    """Connect with a ``postgresql://`` URL (any SQLAlchemy driver suffix is ignored).

    The session gets ``statement_timeout`` and ``lock_timeout`` (see
    :data:`STATEMENT_TIMEOUT`, :data:`LOCK_TIMEOUT`).
    """
    parts = urlsplit(url)
    if not parts.scheme.startswith(("postgres", "postgresql")):
        raise DatabaseError(f"database URL must start with postgresql://, got {parts.scheme}://")
    try:
        conn = psycopg2.connect(
            host=parts.hostname or None,
            port=parts.port or None,
            dbname=unquote(parts.path.lstrip("/")) or None,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            application_name=application_name,
            connect_timeout=10,
            options=session_options(statement_timeout, lock_timeout),
        )
    except psycopg2.OperationalError as exc:
        # libpq's message can quote the DSN; keep only its first line, which
        # names host and reason, and never the password.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
        raise DatabaseError(f"cannot connect to the balances database at {describe_url(url)}: {first}") from None
    return conn


def reconnect_like(conn, *, application_name: str) -> psycopg2.extensions.connection:
    """A second connection with the same server, credentials and TLS settings as ``conn``.

    Every connection parameter ``conn`` was opened with is kept (``sslmode``,
    ``sslrootcert`` and the rest: a second connection must not be less
    protected than the first); the password, which libpq does not list
    with them, is taken from the connection. A closed ``conn`` (a connection
    lost, being replaced) no longer lists them: then the parameters it was
    given are used, and libpq reads its environment again for the rest.
    """
    try:
        params = dict(conn.info.dsn_parameters)
    except psycopg2.InterfaceError:
        params = psycopg2.extensions.parse_dsn(conn.dsn)
    params.update(password=conn.info.password or None, application_name=application_name,
                  connect_timeout=10, options=session_options())
    return psycopg2.connect(**params)


def describe_url(url: str) -> str:
    """The database URL as a user types it, without the password: ``postgresql://user@host:port/db``."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"postgresql://{user}{host}:{parts.port or 5432}/{parts.path.lstrip('/')}"


def sqlalchemy_url(url: str) -> str:
    """The same URL with the psycopg2 driver SQLAlchemy should use."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg2://{rest}"


@contextmanager
def transaction(conn) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor inside one transaction: commit on success, roll back on error."""
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
