"""The benchmark database: ``$BALANCES_BENCH_DB_URL`` or the private cluster."""
from __future__ import annotations

import os

from loaders.db import connect
from loaders.migrate import upgrade
from devtools import devdb


def bench_database() -> str:
    url = os.environ.get("BALANCES_BENCH_DB_URL") or devdb.start(database="balances_bench")
    upgrade(url)
    return url


def reset(url: str) -> None:
    conn = connect(url)
    with conn.cursor() as cur:
        # balance_history is a view over the first two since migration 0010.
        cur.execute("TRUNCATE balance_history_store, balance_snapshots, balance_latest_cache, aggregate_balances,"
                    " rejected_records, snapshot_runs, request_budgets, balance_movements, rejected_movements,"
                    " movement_runs, reconciliation_breaks, reconciliation_runs RESTART IDENTITY CASCADE")
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'balance_staging'")
        for (name,) in cur.fetchall():
            cur.execute(f'DROP TABLE balance_staging."{name}"')
    conn.commit()
    conn.close()


def full_history_table(cur, name: str, *, keys: bool = True) -> None:
    """Create ``name`` shaped as ``balance_history`` was stored until migration 0010.

    Every holding of every snapshot in one plain table; with ``keys``, its
    primary key ``(source, account, asset, as_of)`` and index ``(source,
    as_of)``: the baseline the loaders are measured against (B1, B5).
    """
    cur.execute(f"DROP TABLE IF EXISTS {name}")
    cur.execute(f"""
        CREATE TABLE {name} (
            source text COLLATE "C" NOT NULL, provider text NOT NULL, account text COLLATE "C" NOT NULL,
            asset text COLLATE "C" NOT NULL, balance numeric NOT NULL, decimals smallint,
            available_balance numeric, spark_factor numeric, as_of timestamptz NOT NULL,
            as_of_raw text NOT NULL, scheduled_for timestamptz NOT NULL, run_id bigint NOT NULL,
            loaded_at timestamptz NOT NULL DEFAULT now())""")
    if keys:
        cur.execute(f"ALTER TABLE {name} ADD PRIMARY KEY (source, account, asset, as_of)")
        cur.execute(f"CREATE INDEX ON {name} (source, as_of)")
