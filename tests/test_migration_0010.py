"""Migration 0010 converts full snapshots in place, losing nothing, and its downgrade expands them back.

A database at 0009 gets full snapshots written the old way (plain rows in
the ``balance_history`` table: three sources over three months, balances
changing, holdings disappearing and returning, a holding added by a rerun
with its own run id and load time, an empty month created ahead). Every
view and the table itself are read, the database is upgraded, and every
answer must be the same, value for value. The loaders then publish on the
converted history (a new snapshot and a backfill), and the downgrade must
give back exactly the full rows the views showed.
"""
from __future__ import annotations

import random
from datetime import timedelta

from alembic import command

from extractors.records import BalanceRow
from loaders.db import connect
from loaders.migrate import alembic_config, current_revision, head_revision, upgrade
from tests.conftest import fetch
from tests.test_history_storage import ALL, START, exact, history, publish_snapshot
from tests.test_views import scratch_database

QUERIES = [
    f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset",
    "SELECT * FROM balance_history_units ORDER BY source, as_of, account, asset",
    "SELECT * FROM balances_latest ORDER BY source, account, asset",
    "SELECT * FROM balances_daily_close ORDER BY source, day, account, asset",
    "SELECT * FROM balance_changes ORDER BY source, as_of, account, asset",
    "SELECT source, last_published_as_of, last_run_status FROM source_freshness ORDER BY source",
]


def answers(conn) -> list[list[tuple]]:
    return [exact(conn, q) for q in QUERIES]


def load_old_way(conn, truth) -> int:
    """Published snapshots as the pre-0010 publish left them: one full row per holding."""
    rows = 0
    with conn.cursor() as cur:
        for source, snapshots in truth.items():
            for as_of, holdings in snapshots:
                cur.execute("SELECT balance_history_ensure_partition(%s)", (as_of,))
                cur.execute("INSERT INTO snapshot_runs (source, provider, scheduled_for, status, as_of, as_of_raw,"
                            " finished_at, rows, rows_inserted) VALUES (%s, 'hedera', %s, 'published', %s, %s,"
                            " now(), %s, %s) RETURNING run_id, finished_at",
                            (source, as_of, as_of, f"{as_of.timestamp():.9f}", len(holdings), len(holdings)))
                run_id, loaded_at = cur.fetchone()
                for r in holdings:
                    cur.execute(
                        "INSERT INTO balance_history (source, provider, account, asset, balance, decimals,"
                        " available_balance, spark_factor, as_of, as_of_raw, scheduled_for, run_id, loaded_at)"
                        " VALUES (%s, 'hedera', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (source, r.account, r.asset, r.balance, r.decimals, r.available_balance, r.spark_factor,
                         as_of, f"{as_of.timestamp():.9f}", as_of, run_id, loaded_at))
                    rows += 1
        # A rerun of one snapshot that found one more holding: its row carries the rerun.
        as_of = truth["eq_alpha"][4][0]
        cur.execute("INSERT INTO balance_history (source, provider, account, asset, balance, decimals, as_of,"
                    " as_of_raw, scheduled_for, run_id, loaded_at) VALUES ('eq_alpha', 'hedera', '0.0.9999',"
                    " 'HBAR', 12.50, 8, %s, 'rerun', %s, 999, now() + interval '1 hour')",
                    (as_of, as_of + timedelta(minutes=5)))
        # A month created ahead, still empty.
        cur.execute("SELECT balance_history_ensure_partition('2026-09-15')")
    conn.commit()
    return rows + 1


def test_full_snapshots_convert_in_place_and_back(database_url):
    truth = history(random.Random(7))
    with scratch_database(database_url, "migration_0010") as url:
        upgrade(url, "0009")
        conn = connect(url)
        try:
            rows = load_old_way(conn, truth)
            before = answers(conn)
            assert len(before[0]) == rows

            assert upgrade(url, "0010") == "0010"
            assert answers(conn) == before
            [(stored, keyframes)] = fetch(conn, "SELECT sum(stored), count(*) FILTER (WHERE keyframe)"
                                                " FROM balance_snapshots")
            assert fetch(conn, "SELECT count(*) FROM balance_history_store") == [(stored,)]
            assert stored < rows
            assert keyframes == fetch(conn, "SELECT count(DISTINCT (source, month_start)) FROM balance_snapshots")[0][0]
            assert fetch(conn, "SELECT to_regclass('balance_history_2026_09') IS NOT NULL") == [(True,)]
            assert fetch(conn, "SELECT relkind FROM pg_class WHERE relname = 'balance_history'") == [("v",)]
            assert fetch(conn, "SELECT count(*) FROM unnest(%s::text[]) v"
                               " WHERE has_table_privilege('balances_reader', v, 'SELECT')",
                         (["balance_history_units", "balances_latest", "balances_daily_close",
                           "balance_changes"],)) == [(4,)]

            # The loaders (at head) work on the converted history: a new snapshot, and a backfill.
            assert upgrade(url) == head_revision()
            source = "eq_gamma"
            last_at, last_rows = truth[source][-1]
            moved = [BalanceRow(r.account, r.asset, 1, r.decimals) if i == 0 else r for i, r in enumerate(last_rows)]
            assert publish_snapshot(conn, source, last_at + timedelta(hours=1), moved).rows_published == len(moved)
            first_at, first_rows = truth[source][0]
            assert publish_snapshot(conn, source, first_at - timedelta(hours=1), first_rows[1:]).status == "published"
            after = answers(conn)
            assert len(after[0]) == rows + len(moved) + len(first_rows) - 1

            command.downgrade(alembic_config(url), "0009")
            assert current_revision(url) == "0009"
            assert fetch(conn, "SELECT relkind FROM pg_class WHERE relname = 'balance_history'") == [("p",)]
            assert answers(conn) == after
            assert upgrade(url, "0010") == "0010"
            assert answers(conn) == after
        finally:
            conn.close()
    assert START  # the same generator as the equivalence test
