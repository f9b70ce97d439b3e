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
        cur.execute("TRUNCATE balance_history, aggregate_balances, rejected_records, snapshot_runs,"
                    " request_budgets RESTART IDENTITY CASCADE")
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'balance_staging'")
        for (name,) in cur.fetchall():
            cur.execute(f'DROP TABLE balance_staging."{name}"')
    conn.commit()
    conn.close()
