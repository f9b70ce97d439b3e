"""B5: history stored by changes (migration 0010) against full snapshots, in the same run.

One source of ``holdings`` holdings is snapshotted ``snapshots`` times
within one month; before each snapshot a fraction ``churn`` of the
holdings gets a new balance. Each snapshot is staged once
(``StagingWriter``) and published twice from the same staging table:

* **full** — today's storage until 0010: every holding of every snapshot
  in a plain table with the old primary key ``(source, account, asset,
  as_of)`` and index ``(source, as_of)``, written with the old publish SQL
  (count the staging, check the snapshot is new, one ``INSERT ... SELECT
  DISTINCT ON`` in key order);
* **changes** — ``loaders.publish.publish``: the month's keyframe, then
  only what changed.

Measured: bytes on disk (tables and indexes), publish time per snapshot,
the balance of one holding at a random time (``as_of <= T ORDER BY as_of
DESC LIMIT 1``, the same SQL on ``balance_history`` and on the full
table), and every holding at one snapshot (``WHERE source AND as_of``,
fetched to the client), at the middle and the last snapshot.
"""
from __future__ import annotations

import random
import statistics
import time
from datetime import datetime, timedelta, timezone

from bench.db import bench_database, full_history_table, reset
from extractors.records import BalanceRow
from loaders import runs
from loaders.db import connect
from loaders.publish import publish
from loaders.staging import StagingWriter, table_name

SOURCE = "bench_b5"
FIRST = datetime(2026, 11, 1, 0, 15, tzinfo=timezone.utc)
LOOKUPS = 300


def _holding(i: int) -> tuple[str, str, int]:
    """Hedera-like: nine in ten rows are HBAR, the tenth a token of an account."""
    if i % 10 == 9:
        return f"0.0.{1000 + i // 10 * 10}", "0.0.5000", 6
    return f"0.0.{1000 + i}", "HBAR", 8


def _full_publish(conn, run_id: int, as_of: datetime, as_of_raw: str) -> float:
    """What publish did before 0010, on the same staging table."""
    staged = table_name(run_id, 0).as_string(conn)
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("SET LOCAL work_mem = '256MB'")
        cur.execute(f"SELECT count(*) FROM {staged}")
        cur.execute("SELECT EXISTS (SELECT 1 FROM bench_full WHERE source = %s AND as_of = %s)", (SOURCE, as_of))
        cur.execute(
            f"""
            INSERT INTO bench_full (source, provider, account, asset, balance, decimals, available_balance,
                                    spark_factor, as_of, as_of_raw, scheduled_for, run_id)
            SELECT DISTINCT ON (s.account, s.asset) %s, 'hedera', s.account, s.asset, s.balance, s.decimals,
                   s.available_balance, s.spark_factor, %s, %s, %s, %s
              FROM {staged} s ORDER BY s.account, s.asset
            """,
            (SOURCE, as_of, as_of_raw, as_of, run_id),
        )
    conn.commit()
    return time.perf_counter() - started


def _bytes(conn, tables: list[str], *, cache: bool = False) -> int:
    """Tables and indexes, their partitions, and with ``cache`` the kept staging of the newest snapshot."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE (n.nspname = 'public' AND c.relname = ANY(%s))
                OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = ANY(%s::regclass[]))
                OR (%s AND n.nspname = 'balance_staging' AND c.relname LIKE 'latest\\_%%' AND c.relkind = 'r')
            """,
            (tables, [t for t in tables if t.startswith("balance_history")], cache),
        )
        return cur.fetchone()[0]


def _timed(conn, query: str, params: tuple) -> tuple[float, int]:
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(query, params)
        rows = len(cur.fetchall())
    conn.commit()
    return time.perf_counter() - started, rows


def _lookups(conn, table: str, rng: random.Random, holdings: int, last: datetime) -> list[float]:
    query = (f"SELECT as_of, balance FROM {table} WHERE source = %s AND account = %s AND asset = %s"
             " AND as_of <= %s ORDER BY as_of DESC LIMIT 1")
    times = []
    for _ in range(LOOKUPS):
        account, asset, _ = _holding(rng.randrange(holdings))
        at = FIRST + (last - FIRST) * rng.random()
        times.append(_timed(conn, query, (SOURCE, account, asset, at))[0])
    return times


def run(holdings: int, snapshots: int = 30, churn: float = 0.01, seed: int = 5) -> dict:
    url = bench_database()
    reset(url)
    conn = connect(url)
    with conn.cursor() as cur:
        full_history_table(cur, "bench_full")
    conn.commit()
    rng = random.Random(seed)
    balances = [rng.randrange(10 ** 12) for _ in range(holdings)]
    full_times, ours_times, stored, times = [], [], [], []
    as_of = FIRST
    for k in range(snapshots):
        if k:
            for i in rng.sample(range(holdings), int(holdings * churn)):
                balances[i] = rng.randrange(10 ** 12)
        as_of = FIRST + timedelta(hours=k * 23)
        times.append(as_of)
        raw = f"{as_of.timestamp():.9f}"
        run_id = runs.start_run(conn, SOURCE, "hedera", as_of)
        runs.set_snapshot(conn, run_id, as_of, raw)
        writer = StagingWriter(conn, run_id, 0)
        page = []
        for i in range(holdings):
            account, asset, decimals = _holding(i)
            page.append(BalanceRow(account, asset, balances[i], decimals))
            if len(page) == 1000:
                writer.add(page)
                page = []
        writer.add(page)
        writer.close()
        full_times.append(_full_publish(conn, run_id, as_of, raw))
        started = time.perf_counter()
        result = publish(conn, run_id)
        ours_times.append(time.perf_counter() - started)
        stored.append(result.rows_stored)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT format('balance_staging.%I', tablename) FROM pg_tables"
                    " WHERE schemaname = 'balance_staging' AND tablename LIKE 'latest\\_%'")
        kept = [name for (name,) in cur.fetchall()]
        for table in ("bench_full", "balance_history_store", "balance_snapshots", "balance_latest_cache", *kept):
            cur.execute(f"VACUUM ANALYZE {table}")
    conn.autocommit = False
    full_bytes = _bytes(conn, ["bench_full"])
    ours_bytes = _bytes(conn, ["balance_history_store", "balance_snapshots", "balance_latest_cache"], cache=True)
    kept_bytes = _bytes(conn, ["balance_latest_cache"], cache=True)
    last = times[-1]
    # Warm both, then measure.
    _lookups(conn, "bench_full", random.Random(1), holdings, last)
    _lookups(conn, "balance_history", random.Random(1), holdings, last)
    full_lookup = _lookups(conn, "bench_full", random.Random(2), holdings, last)
    ours_lookup = _lookups(conn, "balance_history", random.Random(2), holdings, last)
    reads = {}
    for label, at in (("middle", times[len(times) // 2]), ("last", last)):
        query = "SELECT account, asset, balance FROM {} WHERE source = %s AND as_of = %s"
        for table in ("bench_full", "balance_history"):
            _timed(conn, query.format(table), (SOURCE, at))
        full = min(_timed(conn, query.format("bench_full"), (SOURCE, at))[0] for _ in range(3))
        ours_t, rows = min(_timed(conn, query.format("balance_history"), (SOURCE, at)) for _ in range(3))
        assert rows == holdings
        reads[label] = {"full_s": round(full, 3), "changes_s": round(ours_t, 3)}
    with conn.cursor() as cur:
        cur.execute("DROP TABLE bench_full")
    conn.commit()
    conn.close()
    later_full = statistics.mean(full_times[1:])
    later_ours = statistics.mean(ours_times[1:])
    return {
        "benchmark": "b5_storage",
        "holdings": holdings,
        "snapshots": snapshots,
        "churn": churn,
        "bytes_full": full_bytes,
        "bytes_changes": ours_bytes,
        "bytes_ratio": round(ours_bytes / full_bytes, 4),
        "bytes_changes_kept_staging": kept_bytes,  # included in bytes_changes
        "rows_stored_keyframe": stored[0],
        "rows_stored_per_later_snapshot": round(statistics.mean(stored[1:])),
        "publish_full_s_keyframe": round(full_times[0], 3),
        "publish_changes_s_keyframe": round(ours_times[0], 3),
        "publish_full_s_mean_later": round(later_full, 3),
        "publish_changes_s_mean_later": round(later_ours, 3),
        "publish_ratio_later": round(later_ours / later_full, 3),
        "publish_full_s_mean_all": round(statistics.mean(full_times), 3),
        "publish_changes_s_mean_all": round(statistics.mean(ours_times), 3),
        "lookup_full_ms_p50": round(statistics.median(full_lookup) * 1000, 2),
        "lookup_changes_ms_p50": round(statistics.median(ours_lookup) * 1000, 2),
        "lookup_full_ms_p95": round(sorted(full_lookup)[int(LOOKUPS * 0.95)] * 1000, 2),
        "lookup_changes_ms_p95": round(sorted(ours_lookup)[int(LOOKUPS * 0.95)] * 1000, 2),
        "snapshot_read": reads,
    }


def run_all(quick: bool = False) -> dict:
    """The published figures: 1 M holdings at 1% churn, and how they grow (100 k at 1% and 10%)."""
    if quick:
        return {"runs": [run(20_000, 10, 0.01), run(20_000, 10, 0.10)]}
    return {"runs": [run(100_000, 30, 0.01), run(100_000, 30, 0.10), run(1_000_000, 30, 0.01)]}
