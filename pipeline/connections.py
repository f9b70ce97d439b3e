"""Secrets and database settings, read from Airflow Connections.

Inside Airflow the Connection comes from the metadata DB or a secrets
backend; outside it, Airflow's own lookup still reads ``AIRFLOW_CONN_<ID>``
environment variables, so the CLI and the DAGs share one code path.
"""
from __future__ import annotations

import os

from extractors.credentials import Credentials
from extractors.redaction import mask
from extractors.text import safe_text

DB_CONN_ID = "balances_db"
DB_URL_ENV = "BALANCES_DB_URL"


class ConnectionMissing(LookupError):
    """A configured connection id is not defined anywhere."""


def get_connection(conn_id: str):
    # Imported here: Airflow costs seconds to import and the CLI often
    # needs no connection at all (BALANCES_DB_URL, sources without keys).
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise ConnectionMissing(
            f"Airflow connection {conn_id!r} is not defined (set AIRFLOW_CONN_{conn_id.upper()} "
            "or add it in Airflow)"
        ) from None


def credentials(conn_id: str | None) -> Credentials | None:
    """The key pair and extras of ``conn_id``; None when the source needs none."""
    if not conn_id:
        return None
    conn = get_connection(conn_id)
    return Credentials(login=conn.login or None, password=conn.password or None,
                       extra=dict(conn.extra_dejson or {}))


def database_url(*, allow_env_url: bool = True) -> str:
    """The balances database: ``$BALANCES_DB_URL`` (CLI only) or Connection ``balances_db``.

    (The CLI's ``--db-url`` comes before both.)
    """
    if allow_env_url and os.environ.get(DB_URL_ENV):
        return os.environ[DB_URL_ENV]
    conn = get_connection(DB_CONN_ID)
    uri = conn.get_uri()
    # Airflow writes postgres:// (its conn_type); libpq and SQLAlchemy want postgresql://.
    return "postgresql://" + uri.split("://", 1)[1] if uri.startswith("postgres://") else uri


def scrub(text: str, secrets: list[str]) -> str:
    """Remove every known secret from a message before it is logged or stored.

    The result is also storable: a provider's NUL or lone surrogate echoed
    in an error would otherwise make recording the error fail.
    """
    return safe_text(mask(text, [secret for secret in secrets if secret and len(secret) >= 4]))
