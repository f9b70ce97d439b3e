"""Months split by source (migration 0016): a keyframe built apart holds exactly what was staged.

The first snapshot of a source in a month is stored whole in a table of
its own, filled and indexed before it is attached. Each test checks the
history against the rows that were staged (never against another of our
own answers alone): the keyframe built apart, a keyframe into the
source's table made earlier, and one into a month stored before 0016 (one
table for every source) must read back identically and as staged; a
refused keyframe leaves no table; readers holding the views open and a
second source's keyframe in the same month do not hold it up; and the
migration keeps months with rows as they are, splits empty ones, and its
downgrade gives every row back.
"""
from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext

import psycopg2.errors
import pytest
from alembic import command
from psycopg2 import sql

from extractors.records import BalanceRow
from loaders import publish
from loaders.db import connect
from loaders.migrate import alembic_config, upgrade
from tests.conftest import fetch
from tests.test_history_storage import ALL, exact, publish_snapshot
from tests.test_views import scratch_database

MAY = datetime(2031, 5, 10, tzinfo=timezone.utc)
JUNE = datetime(2031, 6, 10, tzinfo=timezone.utc)
HOLDING = "account, asset, balance, decimals, available_balance, spark_factor"


def _no_months(conn) -> None:
    """Every month of the history dropped (all empty): each test makes its own, as in a new database."""
    with conn.cursor() as cur:
        cur.execute("SELECT inhrelid::regclass::text FROM pg_inherits"
                    " WHERE inhparent = 'balance_history_store'::regclass")
        for (name,) in cur.fetchall():
            cur.execute(f"DROP TABLE {name}")
    conn.commit()


@pytest.fixture
def history(db):
    _no_months(db)
    return db


def _rows(rng: random.Random, n: int, prefix: str = "0.0.") -> list[BalanceRow]:
    """Holdings as a provider reports them: big and small amounts, scales kept, optional columns."""
    rows = []
    for i in rng.sample(range(1, 10 * n), n):
        balance = rng.choice([Decimal(rng.randrange(10**30)), Decimal(rng.randrange(10**6)) / 100,
                              Decimal("12.50"), Decimal(0)])
        asset = rng.choice(["HBAR", "0.0.7001", "0.0.7002"])
        rows.append(BalanceRow(f"{prefix}{i}", asset, balance, rng.choice([None, 0, 8, 18]),
                               available_balance=rng.choice([None, balance]),
                               spark_factor=rng.choice([None, 100_000_000])))
    rng.shuffle(rows)
    return rows


def _plus(amount: Decimal, n: int) -> Decimal:
    """Exactly, whatever the digits (the default context keeps 28)."""
    with localcontext() as exact_context:
        exact_context.prec = 100
        return amount + n


def _as_staged(rows: list[BalanceRow]) -> list[tuple]:
    """One holding per (account, asset), as the history must show it, exactly (scale included)."""
    def amount(v):  # NUMERIC reads back as Decimal; an int's is of scale 0
        return None if v is None else Decimal(v)

    unique = {(r.account, r.asset): r for r in rows}
    return sorted(tuple(repr(v) for v in (r.account, r.asset, amount(r.balance), r.decimals,
                                          amount(r.available_balance), amount(r.spark_factor)))
                  for r in unique.values())


def _shown(conn, source: str, as_of: datetime) -> list[tuple]:
    return exact(conn, f"SELECT {HOLDING} FROM balance_history WHERE source = %s AND as_of = %s"
                       " ORDER BY account, asset", (source, as_of))


def _table_of(conn, source: str, at: datetime) -> tuple | None:
    """The source's table of the month: (name, kind, bound, indexes, TRUNCATE triggers), None if missing."""
    month = f"balance_history_{at:%Y_%m}"
    found = fetch(conn, """
        SELECT c.relname, c.relkind, pg_get_expr(c.relpartbound, c.oid),
               (SELECT count(*) FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid
                 WHERE x.indrelid = c.oid AND x.indisunique),
               (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'balance_history_truncated')
          FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
         WHERE i.inhparent = to_regclass(%s) AND pg_get_expr(c.relpartbound, c.oid) = format('FOR VALUES IN (%%L)', %s)
        """, (month, source))
    return found[0] if found else None


def test_a_keyframe_is_built_apart_attached_and_read_as_staged(history):
    rng = random.Random(16)
    first = _rows(rng, 400)
    result = publish_snapshot(history, "kf_alpha", MAY, first)
    assert (result.rows_published, result.rows_stored) == (400, 400)
    # Its own table, in the month, under the history's unique key, with the TRUNCATE check.
    assert _table_of(history, "kf_alpha", MAY) == (
        "balance_history_2031_05_kf_alpha", "r", "FOR VALUES IN ('kf_alpha')", 1, 1)
    assert _shown(history, "kf_alpha", MAY) == _as_staged(first)

    # The next snapshot stores only what changed, into the same table.
    later = [*first[:390], *_rows(rng, 5, prefix="0.9.")]
    later[0] = BalanceRow(later[0].account, later[0].asset, _plus(later[0].balance, 1), later[0].decimals)
    result = publish_snapshot(history, "kf_alpha", MAY + timedelta(hours=1), later)
    assert result.rows_stored == 1 + 5 + 10  # changed, new, gone
    assert fetch(history, "SELECT count(*) FROM balance_history_2031_05_kf_alpha") == [(416,)]
    assert _shown(history, "kf_alpha", MAY + timedelta(hours=1)) == _as_staged(later)
    assert _shown(history, "kf_alpha", MAY) == _as_staged(first)

    # Another source's first snapshot of the month: a table of its own, the first one untouched.
    other = _rows(rng, 50)
    publish_snapshot(history, "kf_beta", MAY + timedelta(minutes=30), other)
    assert _table_of(history, "kf_beta", MAY)[:2] == ("balance_history_2031_05_kf_beta", "r")
    assert fetch(history, "SELECT count(*) FROM balance_history_2031_05_kf_alpha") == [(416,)]
    assert _shown(history, "kf_beta", MAY + timedelta(minutes=30)) == _as_staged(other)


def test_every_way_of_storing_a_keyframe_reads_back_the_same(history):
    """Built apart; into the source's table made before; into a month stored before 0016."""
    rng = random.Random(1616)
    snapshots = [_rows(rng, 300)]
    for k in range(1, 4):
        nxt = [r if rng.random() > 0.1 else BalanceRow(r.account, r.asset, _plus(r.balance, 3), r.decimals)
               for r in snapshots[-1] if rng.random() > 0.05]
        snapshots.append(nxt + _rows(rng, 7, prefix=f"0.{k}."))
    with history.cursor() as cur:
        # kf_made: its table of May exists (empty) before its first snapshot.
        cur.execute("SELECT balance_history_ensure_source_month('kf_made', %s)", (MAY,))
        # June as a month was made before 0016: one plain table for every source.
        cur.execute("CREATE TABLE balance_history_2031_06 (LIKE balance_history_store INCLUDING DEFAULTS"
                    " INCLUDING CONSTRAINTS)")
        cur.execute("ALTER TABLE balance_history_store ATTACH PARTITION balance_history_2031_06"
                    " FOR VALUES FROM ('2031-06-01 00:00+00') TO ('2031-07-01 00:00+00')")
    history.commit()
    ways = {"kf_apart": MAY, "kf_made": MAY, "kf_plain": JUNE}
    for source, start in ways.items():
        for k, rows in enumerate(snapshots):
            publish_snapshot(history, source, start + timedelta(hours=k), rows)
    assert _table_of(history, "kf_apart", MAY)[1] == "r"
    assert fetch(history, "SELECT relkind FROM pg_class WHERE relname = 'balance_history_2031_06'") == [("r",)]
    assert _table_of(history, "kf_plain", JUNE) is None
    for k, rows in enumerate(snapshots):
        for source, start in ways.items():
            assert _shown(history, source, start + timedelta(hours=k)) == _as_staged(rows), (source, k)
    stored = fetch(history, "SELECT source, array_agg(stored ORDER BY as_of), array_agg(keyframe ORDER BY as_of)"
                            " FROM balance_snapshots GROUP BY source ORDER BY source")
    # Each stored the same rows per snapshot: the keyframe whole, then the same changes.
    assert [r[0] for r in stored] == sorted(ways) and all(r[1:] == stored[0][1:] for r in stored)
    assert stored[0][1][0] == len(_as_staged(snapshots[0])) and stored[0][2] == [True, False, False, False]


def test_a_refused_keyframe_leaves_no_table_and_a_repeated_holding_is_stored_once(history):
    rows = [BalanceRow(f"0.0.{i}", "HBAR", i, 8) for i in range(1, 40)]
    clash = [*rows, BalanceRow("0.0.7", "HBAR", 8, 8)]
    with pytest.raises(publish.PublishError, match="different balances for the same holding: 0.0.7/HBAR"):
        publish_snapshot(history, "kf_dup", MAY, clash)
    assert _table_of(history, "kf_dup", MAY) is None
    assert fetch(history, "SELECT to_regclass('balance_history_2031_05_kf_dup')") == [(None,)]
    assert fetch(history, "SELECT count(*) FROM balance_snapshots WHERE source = 'kf_dup'") == [(0,)]
    assert fetch(history, "SELECT status FROM snapshot_runs WHERE source = 'kf_dup'") == [("failed",)]

    # The same holding twice alike: one holding, in the source's table.
    result = publish_snapshot(history, "kf_dup", MAY, [*rows, rows[6], rows[0]])
    assert (result.rows_published, result.rows_stored) == (39, 39)
    assert _shown(history, "kf_dup", MAY) == _as_staged(rows)
    assert _table_of(history, "kf_dup", MAY) is not None


def test_a_reader_holding_the_views_open_does_not_hold_up_a_keyframe(history, database_url):
    publish_snapshot(history, "kf_read", MAY, _rows(random.Random(3), 20))
    reader = connect(database_url)
    try:
        with reader.cursor() as cur:
            # A dashboard's open transaction on the history, the month included.
            cur.execute("SELECT count(*) FROM balance_history WHERE as_of >= '2031-05-01'")
            cur.execute("SELECT count(*) FROM balances_latest")
        with history.cursor() as cur:
            cur.execute("SET lock_timeout = '5s'")
        history.commit()
        rows = _rows(random.Random(4), 30)
        result = publish_snapshot(history, "kf_new", MAY + timedelta(hours=2), rows)
        assert result.rows_stored == 30
        reader.rollback()
        assert _shown(reader, "kf_new", MAY + timedelta(hours=2)) == _as_staged(rows)
    finally:
        reader.close()
        with history.cursor() as cur:
            cur.execute("RESET lock_timeout")
        history.commit()


def test_two_sources_first_snapshots_of_one_month_at_once(history, database_url):
    rng = random.Random(5)
    snapshots = {f"kf_twin_{n}": _rows(rng, 3000) for n in range(2)}
    errors = []

    def load(source: str) -> None:
        conn = connect(database_url)
        try:
            publish_snapshot(conn, source, MAY, snapshots[source])
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=load, args=(s,)) for s in snapshots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for source, rows in snapshots.items():
        assert _table_of(history, source, MAY)[:2] == (f"balance_history_2031_05_{source}", "r")
        assert _shown(history, source, MAY) == _as_staged(rows)


def test_long_source_names_get_tables_of_their_own(history):
    common = "kf_" + "x" * 40
    names = [common + "_first_of_two_sources", common + "_second_of_two_sources"]
    for n, name in enumerate(names):
        publish_snapshot(history, name, MAY, [BalanceRow("0.0.1", "HBAR", n + 1, 8)])
    tables = [_table_of(history, name, MAY)[0] for name in names]
    assert len(set(tables)) == 2 and all(len(t) <= 63 for t in tables)
    assert fetch(history, "SELECT source, balance FROM balance_history ORDER BY source") == [
        (names[0], Decimal(1)), (names[1], Decimal(2))]
    with history.cursor() as cur:
        # A table with the name a source's table would have, but another's bounds, is never taken for it.
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO kf_aside").format(sql.Identifier(tables[0])))
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(tables[1]),
                                                                  sql.Identifier(tables[0])))
        with pytest.raises(psycopg2.errors.RaiseException, match="is not the partition of balance_history_2031_05"):
            cur.execute("SELECT balance_history_ensure_source_month(%s, %s)", (names[0], MAY))
    history.rollback()


def test_the_migration_splits_empty_months_keeps_full_ones_and_goes_back(database_url):
    with scratch_database(database_url, "source_months") as url:
        config = alembic_config(url)
        command.upgrade(config, "0015")
        conn = connect(url)
        try:
            rows = _rows(random.Random(6), 25)
            with conn.cursor() as cur:
                cur.execute("SELECT balance_history_ensure_partition(%s)", (JUNE,))  # made ahead, empty
                for r in rows:  # May written through the view, as before 0016
                    cur.execute(
                        "INSERT INTO balance_history (source, provider, account, asset, balance, decimals,"
                        " available_balance, spark_factor, as_of, as_of_raw, scheduled_for, run_id)"
                        " VALUES ('kf_old', 'hedera', %s, %s, %s, %s, %s, %s, %s, 'raw', %s, 1)",
                        (r.account, r.asset, r.balance, r.decimals, r.available_balance, r.spark_factor, MAY, MAY))
            conn.commit()
            before = exact(conn, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset")
            assert len(before) == len(_as_staged(rows)) and _shown(conn, "kf_old", MAY) == _as_staged(rows)

            upgrade(url)
            kinds = "SELECT relname, relkind FROM pg_class WHERE relname IN ('balance_history_2031_05'," \
                    " 'balance_history_2031_06') ORDER BY 1"
            assert fetch(conn, kinds) == [("balance_history_2031_05", "r"), ("balance_history_2031_06", "p")]
            assert exact(conn, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset") == before
            # At head: a snapshot into the old month (one table for all), a keyframe built apart in June.
            later = rows[:20]
            publish_snapshot(conn, "kf_old", MAY + timedelta(days=1), later)
            june = _rows(random.Random(7), 30)
            publish_snapshot(conn, "kf_new", JUNE, june)
            assert _table_of(conn, "kf_new", JUNE)[:2] == ("balance_history_2031_06_kf_new", "r")
            assert _table_of(conn, "kf_old", MAY) is None
            assert _shown(conn, "kf_old", MAY + timedelta(days=1)) == _as_staged(later)
            everything = exact(conn, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset")
            conn.commit()

            command.downgrade(config, "0015")
            assert fetch(conn, kinds) == [("balance_history_2031_05", "r"), ("balance_history_2031_06", "r")]
            assert exact(conn, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset") \
                == everything
            conn.commit()
            upgrade(url)
            assert exact(conn, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset") \
                == everything
        finally:
            conn.close()
