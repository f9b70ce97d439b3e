"""Monthly partitions of the stored history (``balance_history_store`` since migration 0010).

Partitions are created on demand by the publish step (a backfill into an
old month just works) and ahead of time by ``balances partitions``, so a
month boundary never waits on DDL. The SQL function doing the work is
created by the migrations; creating a partition twice is a no-op.
"""
from __future__ import annotations

from datetime import datetime, timezone

from loaders.db import transaction


def ensure_partition(conn, at: datetime) -> str:
    """Create the partition holding ``at`` if it is missing; return its name."""
    with transaction(conn) as cur:
        cur.execute("SELECT balance_history_ensure_partition(%s)", (at,))
        return cur.fetchone()[0]


def ensure_ahead(conn, months: int, now: datetime | None = None) -> list[str]:
    """Partitions for this month and the next ``months`` months."""
    now = now or datetime.now(timezone.utc)
    names = []
    year, month = now.year, now.month
    for _ in range(months + 1):
        names.append(ensure_partition(conn, datetime(year, month, 1, tzinfo=timezone.utc)))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return names
