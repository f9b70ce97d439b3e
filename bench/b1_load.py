"""B1: loading normalised balance rows into balance_history.

Side by side, on the same rows:
* ours — StagingWriter (COPY into an unlogged staging table) + publish
  (one INSERT ... SELECT in key order into the partitioned, indexed
  history table, in one transaction);
* raw COPY FROM STDIN of the same rows into an empty table with the same
  columns and no indexes: the server's limit;
* raw COPY into an empty table with balance_history's primary key and
  index: the limit for any loader that keeps rows unique;
* Airflow ``PostgresHook.insert_rows`` (pipelined executemany on psycopg 3);
* pandas ``DataFrame.to_sql(method="multi")``.
The slow baselines insert a 20,000-row sample into a table already holding
the rest of the rows, and are compared per row. Also timed: an idempotent
rerun of the same snapshot.
"""
from __future__ import annotations

import io
import os
import time
from datetime import datetime, timezone
from decimal import Decimal

from bench.db import bench_database, full_history_table, reset
from extractors.records import BalanceRow
from loaders import runs
from loaders.db import connect
from loaders.publish import publish
from loaders.staging import StagingWriter

AS_OF = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
# The collation most production databases default to (ICU's, as glibc's
# en_US may not be installed); the id columns are "C" since migration 0006.
LINGUISTIC = "en-x-icu"
COLUMNS = ("source", "provider", "account", "asset", "balance", "decimals", "available_balance",
           "spark_factor", "as_of", "as_of_raw", "scheduled_for", "run_id")


def make_rows(n: int) -> list[BalanceRow]:
    rows = []
    for i in range(n):
        if i % 10 == 9:
            rows.append(BalanceRow(f"0.0.{i // 10 * 10}", "0.0.5000", i * 7, 6))
        else:
            rows.append(BalanceRow(f"0.0.{i}", "HBAR", 5_000_000_000_000_000_000 - i if i == 0 else i * 100_000_000 + i, 8))
    return rows


def ours(url: str, rows: list[BalanceRow], page: int = 100) -> tuple[float, int]:
    conn = connect(url)
    run_id = runs.start_run(conn, "bench", "hedera", AS_OF)
    runs.set_snapshot(conn, run_id, AS_OF, "1793880000.000000000")
    started = time.perf_counter()
    writer = StagingWriter(conn, run_id, 0)
    for i in range(0, len(rows), page):
        writer.add(rows[i:i + page])
    writer.close()
    result = publish(conn, run_id)
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, result.rows_published


def raw_copy(url: str, rows: list[BalanceRow], *, with_keys: bool = False,
             ids_collation: str | None = None) -> float:
    """COPY straight into an empty table: no staging, no publish, no conflict check.

    ``with_keys`` gives the table the same primary key and index as
    balance_history: the limit for any loader that must stay idempotent.
    ``ids_collation`` replaces the "C" collation of its id columns (what
    migration 0006 saves, measured).
    """
    conn = connect(url)
    with conn.cursor() as cur:
        full_history_table(cur, "bench_raw", keys=with_keys)
        if ids_collation:
            cur.execute("ALTER TABLE bench_raw " + ", ".join(
                f'ALTER COLUMN {c} TYPE text COLLATE "{ids_collation}"'
                for c in ("source", "account", "asset")))
    conn.commit()
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY bench_raw ({', '.join(COLUMNS)}) FROM STDIN", io.BytesIO(_copy_text(rows)))
    conn.commit()
    elapsed = time.perf_counter() - started
    with conn.cursor() as cur:
        cur.execute("DROP TABLE bench_raw")
    conn.commit()
    conn.close()
    return elapsed


def _copy_text(rows: list[BalanceRow]) -> bytes:
    fixed = f"\t{AS_OF.isoformat()}\t1793880000.000000000\t{AS_OF.isoformat()}\t1\n"
    return "".join(f"bench\thedera\t{r.account}\t{r.asset}\t{r.balance}\t{r.decimals}\t\\N\t\\N{fixed}"
                   for r in rows).encode()


def _fresh_target(url: str, name: str, preload: list[BalanceRow] = ()) -> None:
    """An indexed table like balance_history, already holding ``preload``.

    The slow baselines insert a sample; preloading the rest of the snapshot
    makes each of their rows cost what it would at full size (index depth,
    cache), so the per-row comparison is fair.
    """
    conn = connect(url)
    with conn.cursor() as cur:
        full_history_table(cur, name)
        if preload:
            cur.copy_expert(f"COPY {name} ({', '.join(COLUMNS)}) FROM STDIN", io.BytesIO(_copy_text(preload)))
    conn.commit()
    conn.close()


def _tuples(rows):
    return [("bench", "hedera", r.account, r.asset, Decimal(r.balance), r.decimals, None, None, AS_OF,
             "1793880000.000000000", AS_OF, 1) for r in rows]


def insert_rows(url: str, rows: list[BalanceRow], preload: list[BalanceRow] = ()) -> float:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    os.environ["AIRFLOW_CONN_BALANCES_BENCH"] = url
    _fresh_target(url, "bench_insert_rows", preload)
    hook = PostgresHook(postgres_conn_id="balances_bench")
    data = _tuples(rows)
    started = time.perf_counter()
    hook.insert_rows("bench_insert_rows", data, target_fields=list(COLUMNS), commit_every=1000)
    return time.perf_counter() - started


def to_sql(url: str, rows: list[BalanceRow], preload: list[BalanceRow] = ()) -> float:
    import pandas as pd
    from sqlalchemy import create_engine

    from loaders.db import sqlalchemy_url

    _fresh_target(url, "bench_to_sql", preload)
    engine = create_engine(sqlalchemy_url(url))
    frame = pd.DataFrame(_tuples(rows), columns=list(COLUMNS))
    started = time.perf_counter()
    frame.to_sql("bench_to_sql", engine, if_exists="append", index=False, method="multi", chunksize=1000)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def run(n: int = 1_000_000, sample: int = 20_000) -> dict:
    url = bench_database()
    reset(url)
    rows = make_rows(n)
    raw_s = raw_copy(url, rows)
    raw_keyed_s = raw_copy(url, rows, with_keys=True)
    raw_keyed_linguistic_s = raw_copy(url, rows, with_keys=True, ids_collation=LINGUISTIC)
    ours_s, published = ours(url, rows)
    assert published == n
    rerun_s, again = ours(url, rows)
    assert again == 0
    subset, rest = rows[:sample], rows[sample:]
    insert_s = insert_rows(url, subset, rest)
    to_sql_s = to_sql(url, subset, rest)
    per_row = {"ours": ours_s / n, "raw_copy": raw_s / n, "insert_rows": insert_s / sample,
               "to_sql": to_sql_s / sample}
    return {
        "benchmark": "B1 load", "rows": n, "sample_for_slow_baselines": sample,
        "ours_s": round(ours_s, 2), "ours_rows_per_s": round(n / ours_s),
        "raw_copy_s": round(raw_s, 2), "raw_copy_with_same_keys_s": round(raw_keyed_s, 2),
        "raw_copy_with_same_keys_ids_in_en_us_s": round(raw_keyed_linguistic_s, 2),
        "ids_c_vs_en_us": round(raw_keyed_linguistic_s / raw_keyed_s, 2),
        "rerun_same_snapshot_s": round(rerun_s, 2),
        "insert_rows_rows_per_s": round(sample / insert_s), "to_sql_rows_per_s": round(sample / to_sql_s),
        "ratio_vs_raw_copy": round(per_row["raw_copy"] / per_row["ours"], 3),
        "ratio_vs_raw_copy_with_same_keys": round(raw_keyed_s / ours_s, 3),
        "ratio_vs_insert_rows": round(per_row["insert_rows"] / per_row["ours"], 1),
        "ratio_vs_to_sql": round(per_row["to_sql"] / per_row["ours"], 1),
        "targets": ">= 0.7x raw COPY, >= 20x insert_rows, >= 5x to_sql",
    }


if __name__ == "__main__":
    print(run())
