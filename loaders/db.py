"""Opening connections to the balances database."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator
from urllib.parse import unquote, urlsplit

import psycopg2
import psycopg2.extensions

# NUMERIC comes back as Decimal (psycopg2's default); keep it that way and
# make sure no caller registers a float caster for it.


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not ready; one clear line."""


def connect(url: str, *, application_name: str = "balance-snapshots") -> psycopg2.extensions.connection:
    """Connect with a ``postgresql://`` URL (any SQLAlchemy driver suffix is ignored)."""
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
        )
    except psycopg2.OperationalError as exc:
        # libpq's message can quote the DSN; keep only its first line, which
        # names host and reason, and never the password.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
        raise DatabaseError(f"cannot connect to the balances database at {describe(url)}: {first}") from None
    return conn


def reconnect_like(conn, *, application_name: str) -> psycopg2.extensions.connection:
    """A second connection with the same server and credentials as ``conn``."""
    info = conn.info
    return psycopg2.connect(host=info.host, port=info.port, dbname=info.dbname, user=info.user,
                            password=info.password or None, application_name=application_name,
                            connect_timeout=10)


def describe(url: str) -> str:
    """``host:port/db`` of a URL, without credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}/{parts.path.lstrip('/')}"


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
