"""Rejected records: what a provider sent that could not be read, and the rejection threshold.

Rejections are kept in ``rejected_records`` (a movement run's in
``rejected_movements``: ``table``) with the raw text and the reason,
whatever becomes of the run; a source's ``max_rejected`` says how
many a snapshot may have and still be published. Text from a provider goes
through :func:`extractors.text.safe_text` here, at the storage boundary.
"""
from __future__ import annotations

from typing import Iterable

from psycopg2 import sql
from psycopg2.extras import execute_values

from extractors.records import Rejection
from extractors.text import safe_text

# Stored text is cut to these lengths (characters).
MAX_REASON_CHARS = 2_000
MAX_RAW_CHARS = 100_000
# Where each kind of run keeps its rejections.
SNAPSHOTS = "rejected_records"
MOVEMENTS = "rejected_movements"


class RejectedRecordsError(RuntimeError):
    """More records were rejected than the source allows; nothing is published."""


def check_threshold(run_id: int, source: str, rejected: int, max_rejected: int, table: str = SNAPSHOTS) -> None:
    """Raise :class:`RejectedRecordsError` if ``rejected`` is more than ``max_rejected``.

    A crawl checks its own shard's count, so a bad shard fails at once; the
    publish checks the run's total, which the shards make together.
    """
    if rejected > max_rejected:
        raise RejectedRecordsError(
            f"{rejected} record(s) rejected, more than the {max_rejected} source {source} allows; "
            f"nothing published (see {table} for run {run_id})"
        )


def clear(cur, run_id: int, shard: int, table: str = SNAPSHOTS) -> None:
    """A retried shard replaces what its earlier attempt recorded."""
    cur.execute(sql.SQL("DELETE FROM {} WHERE run_id = %s AND shard = %s").format(sql.Identifier(table)),
                (run_id, shard))


def add(cur, run_id: int, shard: int, rejections: Iterable[Rejection], table: str = SNAPSHOTS) -> None:
    """Keep rejected records with their raw text, the reason and its code."""
    execute_values(
        cur,
        sql.SQL("INSERT INTO {} (run_id, shard, raw, reason, reason_code) VALUES %s")
        .format(sql.Identifier(table)).as_string(cur),
        [(run_id, shard, safe_text(r.raw, MAX_RAW_CHARS), safe_text(r.reason, MAX_REASON_CHARS), r.code)
         for r in rejections],
    )


def count(cur, run_id: int, table: str = SNAPSHOTS) -> int:
    cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE run_id = %s").format(sql.Identifier(table)), (run_id,))
    return cur.fetchone()[0]
