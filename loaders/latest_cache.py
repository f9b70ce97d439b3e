"""The newest snapshot of each source, kept as it was staged, for the next publish to compare against.

Storing a snapshot by changes means comparing it with the previous one.
Reading the previous one back out of the history (the month's keyframe
and its changes, the newest row per holding) costs as much again as the
comparison; the staging tables that snapshot was published from already
hold it, one row per holding, in a compact heap that is read straight
through. So instead of dropping them, publish keeps them (renamed
``latest_<run>_shard_<n>``) and records them in ``balance_latest_cache``
(migration 0011), replacing those of the snapshot before.

A cache, never the record: :func:`previous_holdings` hands them out only
while they provably hold the snapshot asked for (see the migration), and
the caller falls back to the history otherwise.
"""
from __future__ import annotations

from datetime import datetime

from psycopg2 import sql

from loaders import staging


def _name(run_id: int, shard: int) -> str:
    # Built from integers we generated, never from input.
    return f"latest_{int(run_id)}_shard_{int(shard)}"


def table_name(run_id: int, shard: int) -> sql.Identifier:
    return sql.Identifier(staging.SCHEMA, _name(run_id, shard))


def previous_holdings(cur, source: str, as_of: datetime, provider: str) -> sql.Composable | None:
    """The holdings of ``source`` at snapshot ``as_of``, reported by ``provider``, from the cache.

    A query with the columns of a staged row, one row per holding; None if
    the cache cannot vouch for them (then read the history).
    """
    cur.execute("SELECT run_id, shards, holdings FROM balance_latest_cache"
                " WHERE source = %s AND as_of = %s AND provider = %s AND valid", (source, as_of, provider))
    entry = cur.fetchone()
    if entry is None:
        return None
    run_id, shards, holdings = entry
    tables = [table_name(run_id, shard) for shard in range(shards)]
    cur.execute("SELECT count(*) FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NOT NULL",
                ([t.as_string(cur) for t in tables],))
    if cur.fetchone()[0] != shards:
        return None
    cached = sql.SQL(" UNION ALL ").join(sql.SQL("SELECT * FROM {}").format(t) for t in tables)
    # UNLOGGED: crash recovery leaves them empty. Counting costs a fraction
    # of the comparison and also proves one row per holding.
    cur.execute(sql.SQL("SELECT count(*) FROM ({}) c").format(cached))
    if cur.fetchone()[0] != holdings:
        return None
    return cached


def keep(cur, source: str, as_of: datetime, run_id: int, shards: int, provider: str, holdings: int) -> None:
    """Make the run's staging tables, one row per holding of snapshot ``as_of``, the source's cache,
    in place of any it had."""
    forget(cur, source)
    for shard in range(shards):
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
            staging.table_name(run_id, shard), sql.Identifier(_name(run_id, shard))))
    cur.execute("INSERT INTO balance_latest_cache (source, as_of, run_id, shards, provider, holdings)"
                " VALUES (%s, %s, %s, %s, %s, %s)", (source, as_of, run_id, shards, provider, holdings))


def forget(cur, source: str) -> None:
    """Drop the source's cache, if any."""
    cur.execute("DELETE FROM balance_latest_cache WHERE source = %s RETURNING run_id, shards", (source,))
    for run_id, shards in cur.fetchall():
        for shard in range(shards):
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table_name(run_id, shard)))
