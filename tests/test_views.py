"""BI views (migration 0004): exact units, snapshot semantics, index use, read-only role.

Small hand-made snapshots go through the real loader (staging, then
publish) to pin down what each view means. A realistic volume, in a
database of its own so the ``db`` fixture never empties it, shows with
EXPLAIN ANALYZE that dashboard queries read the indexes of the partitions
they need and no other.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.errors
import pytest
from alembic import command
from psycopg2 import sql

from extractors.records import MOVEMENT_KINDS, ROW_COLUMNS, BalanceRow
from loaders import partitions, publish, runs, staging
from loaders.statuses import MovementStatus, ReconciliationStatus, RunStatus
from loaders.db import connect
from loaders.migrate import alembic_config, current_revision, upgrade
from tests.conftest import fetch

VIEWS = ("balance_history_units", "balance_latest", "balance_daily_close", "balance_changes",
         "source_freshness", "reconciliation_breaks_detail", "reconciliation_breaks_daily",
         "pipeline_runs", "rejection_reasons", "balances_latest", "balances_daily_close",
         "balance_rollforward", "balance_movements_detail")
BALANCE_VIEWS = VIEWS[:5]  # of 0004 (two renamed in 0013)
BALANCE_VIEWS_BEFORE_0013 = ("balance_history_units", "balances_latest", "balances_daily_close",
                             "balance_changes",
                             "source_freshness")
BASE_TABLES = ("balance_history", "snapshot_runs", "rejected_records", "aggregate_balances",
               "request_budgets", "reconciliation_runs", "reconciliation_breaks", "run_leases",
               "source_locks", "movement_runs", "balance_movements", "rejected_movements")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


T1, T2, T3 = utc(2026, 3, 2, 10), utc(2026, 3, 3, 10), utc(2026, 3, 4, 10)


def _staged(conn, source: str, as_of: datetime, rows: list[BalanceRow]) -> int:
    run_id = runs.start_run(conn, source, "hedera", as_of)
    runs.set_snapshot(conn, run_id, as_of, as_of.isoformat())
    writer = staging.StagingWriter(conn, run_id, 0)
    writer.add(rows)
    writer.close()
    return run_id


def publish_snapshot(conn, source: str, as_of: datetime, rows: list[BalanceRow]) -> int:
    """One snapshot through staging and publish, as a crawl would land it."""
    run_id = _staged(conn, source, as_of, rows)
    publish.publish(conn, run_id)
    return run_id


def published_at_old_revision(conn, source: str, as_of: datetime, rows: list[BalanceRow]) -> None:
    """A published snapshot written with plain SQL, for a schema older than the loaders.

    The loaders need the newest schema (publish takes its turn in
    ``source_locks``, migration 0008); an upgrade-in-place test loads its
    rows at the revision it upgrades from.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT balance_history_ensure_partition(%s)", (as_of,))
        cur.execute("INSERT INTO snapshot_runs (source, provider, scheduled_for, status, as_of, as_of_raw)"
                    " VALUES (%s, 'hedera', %s, 'published', %s, %s) RETURNING run_id",
                    (source, as_of, as_of, as_of.isoformat()))
        run_id = cur.fetchone()[0]
        for r in rows:
            cur.execute("INSERT INTO balance_history (source, provider, account, asset, balance, as_of,"
                        " as_of_raw, scheduled_for, run_id) VALUES (%s, 'hedera', %s, %s, %s, %s, %s, %s, %s)",
                        (source, r.account, r.asset, r.balance, as_of, as_of.isoformat(), as_of, run_id))
    conn.commit()


def failed_run(conn, source: str, scheduled_for: datetime, status: str = "failed") -> int:
    run_id = runs.start_run(conn, source, "hedera", scheduled_for)
    runs.set_snapshot(conn, run_id, scheduled_for, scheduled_for.isoformat())
    runs.finish(conn, run_id, status, error="provider said 503")
    return run_id


# --- what the views mean -------------------------------------------------------------


def test_units_are_exact_whatever_the_scale(db):
    publish_snapshot(db, "units", T1, [
        BalanceRow("big", "USD", 123456789012345678901234567, decimals=2, available_balance=5),
        BalanceRow("wei", "ETH", 5, decimals=18),
        BalanceRow("sparks", "GOLD", 25000, spark_factor=1000),
        BalanceRow("thirds", "SILVER", 25000, spark_factor=3),
        BalanceRow("plain", "EUR", Decimal("12.50")),
    ])
    rows = {r[0]: r[1:] for r in fetch(
        db, "SELECT account, balance_units, balance_text, available_units, available_text"
            " FROM balance_history_units")}
    # Plain numeric division would keep ~16 digits and drop the cents here.
    assert rows["big"] == (Decimal("1234567890123456789012345.67"), "123456789012345678901234567",
                           Decimal("0.05"), "5")
    assert str(rows["big"][0]) == "1234567890123456789012345.67"
    assert rows["wei"][0] == Decimal("0.000000000000000005")
    assert rows["sparks"][0] == 25
    # A SparkFactor that is no power of ten: the quotient is cut at 40 places.
    assert rows["thirds"][0] == Decimal("8333." + "3" * 40)
    assert rows["plain"] == (Decimal("12.50"), "12.50", None, None)


def test_latest_is_the_newest_published_snapshot_of_each_source(db):
    publish_snapshot(db, "exchange", T1, [BalanceRow("a", "BTC", 100), BalanceRow("b", "BTC", 200)])
    publish_snapshot(db, "exchange", T2, [BalanceRow("a", "BTC", 150)])
    publish_snapshot(db, "ledger", T1, [BalanceRow("x", "HBAR", 7, decimals=8)])
    # A backfill of an older snapshot and a later failed run change nothing.
    publish_snapshot(db, "exchange", T1 - timedelta(days=1), [BalanceRow("c", "BTC", 5)])
    failed_run(db, "exchange", T3)
    rows = fetch(db, "SELECT source, account, balance, as_of, balance_units FROM balance_latest"
                     " ORDER BY source, account")
    # b is not in the newest snapshot: it is not shown with its old balance.
    assert rows == [("exchange", "a", 150, T2, 150), ("ledger", "x", 7, T1, Decimal("0.00000007"))]
    columns = fetch(db, "SELECT table_name, array_agg(column_name::text ORDER BY ordinal_position)"
                        " FROM information_schema.columns WHERE table_name = ANY(%s) GROUP BY 1",
                    (["balance_latest", "balance_history_units"],))
    assert columns[0][1] == columns[1][1]


def test_daily_close_is_the_last_snapshot_of_each_utc_day(db):
    late_evening = utc(2026, 3, 1, 23, 30)  # already 2 March in Paris
    just_after_midnight = utc(2026, 3, 2, 0, 30)
    publish_snapshot(db, "daily", utc(2026, 3, 1, 8),
                     [BalanceRow("a", "EUR", 1, decimals=2), BalanceRow("b", "EUR", 2, decimals=2)])
    publish_snapshot(db, "daily", late_evening, [BalanceRow("a", "EUR", 3, decimals=2)])
    publish_snapshot(db, "daily", just_after_midnight,
                     [BalanceRow("a", "EUR", 4, decimals=2), BalanceRow("b", "EUR", 5, decimals=2)])
    fetch(db, "SELECT set_config('TimeZone', 'Europe/Paris', false)")  # days stay UTC days
    rows = fetch(db, "SELECT day, account, balance, balance_units, balance_text, as_of"
                     " FROM balance_daily_close ORDER BY day, account")
    assert rows == [
        (date(2026, 3, 1), "a", 3, Decimal("0.03"), "3", late_evening),
        (date(2026, 3, 2), "a", 4, Decimal("0.04"), "4", just_after_midnight),
        (date(2026, 3, 2), "b", 5, Decimal("0.05"), "5", just_after_midnight),
    ]


def test_changes_pair_each_snapshot_with_the_previous_one(db):
    publish_snapshot(db, "moves", T1, [BalanceRow("a", "USD", 100, decimals=2)])
    publish_snapshot(db, "moves", T2, [BalanceRow("a", "USD", 250, decimals=2),
                                       BalanceRow("b", "USD", 7, decimals=2)])
    publish_snapshot(db, "moves", T3, [BalanceRow("a", "USD", 250, decimals=2),
                                       BalanceRow("b", "USD", 12345678901234567890123, decimals=2)])
    rows = fetch(db, "SELECT account, as_of, previous_as_of, previous_balance, delta, delta_units,"
                     " delta_text FROM balance_changes ORDER BY account, as_of")
    assert rows == [
        ("a", T1, None, None, None, None, None),
        ("a", T2, T1, 100, 150, Decimal("1.50"), "150"),
        ("a", T3, T2, 250, 0, Decimal("0.00"), "0"),
        ("b", T2, None, None, None, None, None),
        ("b", T3, T2, 7, 12345678901234567890116, Decimal("123456789012345678901.16"),
         "12345678901234567890116"),
    ]


def test_freshness_per_source(db):
    publish_snapshot(db, "fresh", T1, [BalanceRow("a", "BTC", 1)])
    publish_snapshot(db, "fresh", T2, [BalanceRow("a", "BTC", 2)])
    failed_run(db, "fresh", T3)
    old = failed_run(db, "fresh", T1 - timedelta(days=3), status="abandoned")
    fetch(db, "UPDATE snapshot_runs SET finished_at = now() - interval '2 days' WHERE run_id = %s"
              " RETURNING run_id", (old,))
    never = runs.start_run(db, "never", "hedera", T3)
    rows = fetch(db, """
        SELECT source, provider, last_published_as_of, last_scheduled_for, last_run_status,
               last_run_error, failed_runs_24h, age = now() - last_published_as_of,
               age_seconds = extract(epoch FROM now() - last_published_as_of), last_run_id
          FROM source_freshness ORDER BY source""")
    assert rows == [
        ("fresh", "hedera", T2, T3, "failed", "provider said 503", 1, True, True, rows[0][-1]),
        ("never", "hedera", None, T3, "running", None, 0, None, None, never),
    ]


# --- the read-only role ----------------------------------------------------------------


def refused(conn, statement: str) -> Exception:
    with pytest.raises(psycopg2.Error) as caught:
        with conn.cursor() as cur:
            cur.execute(statement)
    conn.rollback()
    return caught.value


def test_reader_reads_every_view_without_rights_on_the_tables(db, reader):
    publish_snapshot(db, "readable", T1, [BalanceRow("a", "HBAR", 10, decimals=1)])
    publish_snapshot(db, "readable", T2, [BalanceRow("a", "HBAR", 30, decimals=1)])
    counts = {}
    with reader.cursor() as cur:
        for view in VIEWS:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(view)))
            counts[view] = cur.fetchone()[0]
        cur.execute("SELECT balance_units FROM balance_latest")
        assert cur.fetchall() == [(Decimal("3.0"),)]
        cur.execute("SELECT delta_units FROM balance_changes WHERE previous_as_of IS NOT NULL")
        assert cur.fetchall() == [(Decimal("2.0"),)]
    reader.rollback()
    assert counts == {"balance_history_units": 2, "balance_latest": 1, "balance_daily_close": 2,
                      "balance_changes": 2, "source_freshness": 1, "reconciliation_breaks_detail": 0,
                      "reconciliation_breaks_daily": 0, "pipeline_runs": 2, "rejection_reasons": 0,
                      "balances_latest": 1, "balances_daily_close": 2, "balance_rollforward": 0,
                      "balance_movements_detail": 0}
    # Exactly SELECT on the views: nothing on the tables behind them.
    grants = fetch(db, "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
                       " WHERE grantee = 'balances_reader'")
    assert {view for view, _ in grants} >= set(VIEWS)
    assert {privilege for _, privilege in grants} == {"SELECT"}
    assert not {table for table, _ in grants} & set(BASE_TABLES)


def test_reader_cannot_read_tables_or_write_anything(db, reader):
    publish_snapshot(db, "guarded", T1, [BalanceRow("a", "HBAR", 10)])
    partition = partitions.ensure_partition(db, T1)
    denied = [
        "SELECT * FROM balance_history",
        f"SELECT * FROM {partition}",
        "SELECT * FROM snapshot_runs",
        "SELECT * FROM rejected_records",
        "SELECT * FROM aggregate_balances",
        "SELECT * FROM request_budgets",
        "SELECT * FROM reconciliation_runs",
        "SELECT * FROM reconciliation_breaks",
        "UPDATE reconciliation_breaks_detail SET status = 'resolved'",
        "DELETE FROM reconciliation_breaks_detail",
        "SELECT * FROM balance_staging.anything",
        "INSERT INTO balance_history (source, provider, account, asset, balance, as_of, as_of_raw,"
        " scheduled_for, run_id) VALUES ('s', 'p', 'a', 'x', 1, now(), 'now', now(), 1)",
        "UPDATE balance_history SET balance = 0",
        "DELETE FROM balance_history",
        "UPDATE snapshot_runs SET status = 'failed'",
        # PostgreSQL 15 grants CREATE on public to nobody but its owner.
        "CREATE TABLE public.reader_scratch (x int)",
        "SELECT balance_history_ensure_partition('2031-01-01')",
        # A simple view is automatically updatable: only the missing grant stops these.
        "INSERT INTO balance_history_units (source, provider, account, asset, balance, as_of,"
        " as_of_raw, scheduled_for, run_id) VALUES ('s', 'p', 'a', 'x', 1, now(), 'now', now(), 1)",
        "UPDATE balance_history_units SET balance = 0",
        "DELETE FROM balance_history_units",
    ]
    for statement in denied:
        error = refused(reader, statement)
        assert isinstance(error, psycopg2.errors.InsufficientPrivilege), (statement, error)
    # Joins, windows, aggregates: not updatable at all.
    not_updatable = [(view, "source") for view in BALANCE_VIEWS[1:]]
    not_updatable.append(("reconciliation_breaks_daily", "check_name"))
    for view, column in not_updatable:
        for statement in (f"INSERT INTO {view} ({column}) VALUES ('s')",
                          f"UPDATE {view} SET {column} = 's'", f"DELETE FROM {view}"):
            error = refused(reader, statement)
            # The rewriter refuses before privileges are even checked.
            assert isinstance(error, psycopg2.errors.ObjectNotInPrerequisiteState), \
                (statement, error)
            assert "cannot" in str(error) and "view" in str(error)
    assert fetch(db, "SELECT account, balance FROM balance_history") == [("a", 10)]
    assert fetch(db, "SELECT to_regclass('public.reader_scratch')") == [(None,)]


# --- migration up and down, in a database of its own -------------------------------------


@contextmanager
def scratch_database(database_url: str, name: str) -> Iterator[str]:
    admin = connect(database_url)
    admin.autocommit = True
    database = sql.Identifier(f"{name}_{os.getpid()}")
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database)
    try:
        with admin.cursor() as cur:
            cur.execute(drop)
            create = sql.SQL("CREATE DATABASE {}").format(database)
            # With the test database's default collation (see devdb).
            cur.execute("SELECT datlocprovider = 'i', daticulocale FROM pg_database"
                        " WHERE datname = current_database()")
            icu, locale = cur.fetchone()
            if icu:
                create += sql.SQL(" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE {}").format(
                    sql.Literal(locale))
            cur.execute(create)
    except psycopg2.errors.InsufficientPrivilege:
        admin.close()
        pytest.skip("the test database user may not create databases")
    parts = urlsplit(database_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{database.string}"))
    finally:
        with admin.cursor() as cur:
            cur.execute(drop)
        admin.close()


def _column_types(conn, schema: str, table: str) -> dict[str, tuple[str, bool, str | None]]:
    return {name: (type_, nullable, collation) for name, type_, nullable, collation in fetch(
        conn,
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull, c.collname"
        "  FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation AND c.collname <> 'default'"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (f"{schema}.{table}",))}


def test_a_history_row_is_declared_as_balance_history_and_staging_have_it(db):
    """ROW_COLUMNS, the one declaration of a row, agrees with the migrations and builds staging."""
    history = _column_types(db, "public", "balance_history")
    run_id = runs.start_run(db, "s", "hedera", T1)
    staging.StagingWriter(db, run_id, 0)
    staged = _column_types(db, staging.SCHEMA, f"run_{run_id}_shard_0")
    assert tuple(staged) == staging.COLUMNS == tuple(c.name for c in ROW_COLUMNS)
    for c in ROW_COLUMNS:
        base_type, _, collation = c.sql_type.partition(" COLLATE ")
        expected = (base_type, c.nullable, collation.strip('"') or None)
        assert history[c.name][::2] == expected[::2], c.name  # a view's columns carry no NOT NULL
        assert staged[c.name] == expected, c.name


def test_run_statuses_are_the_ones_the_schema_allows(db):
    def allowed(constraint: str) -> set[str]:
        (definition,) = fetch(db, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s",
                              (constraint,))[0]
        return set(re.findall(r"'([a-z_]+)'::text", definition))

    assert allowed("snapshot_runs_status_check") == set(RunStatus)
    assert allowed("reconciliation_runs_status_check") == set(ReconciliationStatus)
    assert allowed("movement_runs_status_check") == set(MovementStatus)
    assert allowed("balance_movements_kind_check") == MOVEMENT_KINDS


def test_the_movements_migration_goes_down_and_up_again(database_url):
    with scratch_database(database_url, "movements_downgrade") as url:
        upgrade(url)
        conn = connect(url)
        try:
            command.downgrade(alembic_config(url), "-1")
            names = ["movement_runs", "balance_movements", "rejected_movements", "balance_rollforward",
                     "balance_movements_detail"]
            assert fetch(conn, "SELECT count(to_regclass(n)) FROM unnest(%s::text[]) n", (names,)) == [(0,)]
            assert fetch(conn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                               " WHERE conname = 'reconciliation_breaks_check_kind_check'")[0][0].count("'") == 6
        finally:
            conn.close()
        upgrade(url)
        conn = connect(url)
        try:
            assert fetch(conn, "SELECT count(*) FROM unnest(%s::text[]) v"
                               " WHERE has_table_privilege('balances_reader', v, 'SELECT')",
                         (["balance_rollforward", "balance_movements_detail"],)) == [(2,)]
        finally:
            conn.close()


def test_downgrade_drops_the_views_and_keeps_a_role_still_in_use(database_url):
    reader_on_public = ("SELECT coalesce(array_to_string(nspacl, ' ') ~ 'balances_reader=', false)"
                        " FROM pg_namespace WHERE nspname = 'public'")
    with scratch_database(database_url, "views_downgrade") as url:
        upgrade(url, "0004")
        conn = connect(url)
        try:
            assert fetch(conn, reader_on_public) == [(True,)]
            command.downgrade(alembic_config(url), "0003")
            assert current_revision(url) == "0003"
            names = [*BALANCE_VIEWS_BEFORE_0013, "snapshot_runs_published"]
            assert fetch(conn, "SELECT count(to_regclass(n)) FROM unnest(%s::text[]) n",
                         (names,)) == [(0,)]
            assert fetch(conn, "SELECT to_regprocedure("
                               "'balance_whole_units(numeric, smallint, numeric)')") == [(None,)]
            assert fetch(conn, reader_on_public) == [(False,)]
            # The test database's grants still depend on the cluster-wide role.
            assert fetch(conn, "SELECT rolname FROM pg_roles"
                               " WHERE rolname = 'balances_reader'") == [("balances_reader",)]
        finally:
            conn.close()
        assert upgrade(url, "0004") == "0004"  # the role already exists: still fine


def test_ids_compare_byte_by_byte_after_an_upgrade_in_place(database_url):
    """0006 gives ids the "C" collation on a database whose default is linguistic."""
    ids = ("source", "account", "asset")
    collations = ("SELECT table_name, column_name, coalesce(collation_name, 'default')"
                  " FROM information_schema.columns WHERE table_schema = 'public'"
                  " AND table_name IN ('balance_history', 'aggregate_balances', 'snapshot_runs')"
                  " AND column_name = ANY(%s) ORDER BY 1, 2")
    c_everywhere = [("aggregate_balances", "asset", "C"), ("aggregate_balances", "source", "C"),
                    ("balance_history", "account", "C"), ("balance_history", "asset", "C"),
                    ("balance_history", "source", "C"), ("snapshot_runs", "source", "C")]
    # Upper case sorts before lower case byte by byte, after it in en-US.
    accounts = ["acct:b", "ACCT:A", "acct:C"]
    by_bytes = sorted(accounts)
    with scratch_database(database_url, "collation") as url:
        conn = connect(url)
        try:
            if fetch(conn, "SELECT datlocprovider FROM pg_database"
                           " WHERE datname = current_database()") != [("i",)]:
                pytest.skip("this server has no ICU: the default collation is C already")
            upgrade(url, "0005")
            published_at_old_revision(conn, "s", T1, [BalanceRow(a, "X", 1) for a in accounts])
            latest = "SELECT account FROM balances_latest ORDER BY account"  # its name before 0013
            assert [a for (a,) in fetch(conn, latest)] != by_bytes  # the linguistic default

            assert upgrade(url, "0006") == "0006"
            assert fetch(conn, collations, (list(ids),)) == c_everywhere
            assert [a for (a,) in fetch(conn, latest)] == by_bytes
            # Same rows, views recreated, still readable by the reader role only.
            assert fetch(conn, "SELECT count(*) FROM balance_history") == [(3,)]
            assert fetch(conn, "SELECT count(*) FROM unnest(%s::text[]) v"
                               " WHERE has_table_privilege('balances_reader', v, 'SELECT')",
                         (list(BALANCE_VIEWS_BEFORE_0013),)) == [(len(BALANCE_VIEWS_BEFORE_0013),)]
            published_at_old_revision(conn, "s", T2, [BalanceRow(a, "X", 2) for a in accounts])
            assert fetch(conn, "SELECT count(*) FROM balance_changes WHERE delta = 1") == [(3,)]

            command.downgrade(alembic_config(url), "0005")
            assert {c for *_, c in fetch(conn, collations, (list(ids),))} == {"default"}
            assert fetch(conn, "SELECT count(*) FROM balances_latest") == [(3,)]
        finally:
            conn.close()


# --- query plans on a realistic volume -----------------------------------------------------

SOURCES = ("alpha", "beta", "gamma")
ACCOUNTS = 10_000
FIRST_SNAPSHOT = utc(2026, 1, 17)
SNAPSHOTS = 30  # daily, 17 January to 15 February: two monthly partitions
JAN, FEB, MAR = "balance_history_2026_01", "balance_history_2026_02", "balance_history_2026_03"
MONTHS = ((JAN, utc(2026, 1, 1), utc(2026, 2, 1)), (FEB, utc(2026, 2, 1), utc(2026, 3, 1)))
INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}


@pytest.fixture(scope="module")
def volume(database_url):
    """3 sources x 10k accounts x 30 daily snapshots, loaded with generate_series."""
    with scratch_database(database_url, "views_volume") as url:
        upgrade(url)
        conn = connect(url)
        with conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO snapshot_runs (source, provider, scheduled_for, status, finished_at,
                                           as_of, as_of_raw, rows, rows_inserted)
                SELECT s, 'hedera', t, 'published', t + interval '4 minutes', t,
                       to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                       %(accounts)s, %(accounts)s
                  FROM unnest(%(sources)s::text[]) s,
                       generate_series(%(first)s, %(first)s + %(days)s * interval '1 day',
                                       interval '1 day') t
                """,
                {"accounts": ACCOUNTS, "sources": list(SOURCES), "first": FIRST_SNAPSHOT,
                 "days": SNAPSHOTS - 1},
            )
            # Filled before being attached, each month's indexes are built in
            # one sort instead of 450k inserts: three times faster. Every
            # balance moves at every snapshot, so each snapshot is stored
            # whole: what publish would store (0010).
            for name, start, end in MONTHS:
                cur.execute(sql.SQL("CREATE TABLE {} (LIKE balance_history_store INCLUDING DEFAULTS"
                                    " INCLUDING CONSTRAINTS)").format(sql.Identifier(name)))
                cur.execute(
                    sql.SQL(
                        """
                        INSERT INTO {} (source, provider, account, asset, balance, decimals, as_of)
                        SELECT r.source, r.provider, '0.0.' || (1000 + a), 'HBAR',
                               mod(a * 7919 + r.run_id * 104729, 1000000007) * 1000, 8, r.as_of
                          FROM snapshot_runs r
                         CROSS JOIN LATERAL generate_series(1, r.rows::integer) a
                         WHERE r.as_of >= %s AND r.as_of < %s
                        """
                    ).format(sql.Identifier(name)),
                    (start, end),
                )
                cur.execute(sql.SQL("ALTER TABLE balance_history_store ATTACH PARTITION {}"
                                    " FOR VALUES FROM (%s) TO (%s)").format(sql.Identifier(name)),
                            (start, end))
            cur.execute(
                """
                INSERT INTO balance_snapshots (source, as_of, month_start, provider, as_of_raw, scheduled_for,
                                               run_id, loaded_at, holdings, stored, keyframe)
                SELECT source, as_of, date_trunc('month', as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', provider,
                       as_of_raw, scheduled_for, run_id, finished_at, rows, rows,
                       row_number() OVER (PARTITION BY source, date_trunc('month', as_of AT TIME ZONE 'UTC')
                                          ORDER BY as_of) = 1
                  FROM snapshot_runs
                """
            )
        conn.commit()
        # March stays empty, as `balances partitions` creates months ahead.
        assert partitions.ensure_ahead(conn, 2, now=FIRST_SNAPSHOT) == [JAN, FEB, MAR]
        with conn.cursor() as cur:
            cur.execute("ANALYZE snapshot_runs")
            cur.execute("ANALYZE balance_history_store")
            cur.execute("ANALYZE balance_snapshots")
        conn.commit()
        try:
            yield conn
        finally:
            conn.close()


def history_scans(node: dict) -> list[dict]:
    """Every plan node reading a partition of balance_history."""
    found = [node] if node.get("Relation Name", "").startswith("balance_history") else []
    for child in node.get("Plans", []):
        found += history_scans(child)
    return found


def explain(conn, query: str, params: tuple = ()) -> list[dict]:
    [(plan,)] = fetch(conn, "EXPLAIN (ANALYZE, FORMAT JSON) " + query, params)
    return history_scans(plan[0]["Plan"])


def read(scans: list[dict]) -> dict[str, set[str]]:
    """Partition -> how it was read, for the partitions the executor did read."""
    out: dict[str, set[str]] = {}
    for scan in scans:
        if scan["Actual Loops"] > 0:
            out.setdefault(scan["Relation Name"], set()).add(scan["Node Type"])
    return out


def planned(scans: list[dict]) -> set[str]:
    return {scan["Relation Name"] for scan in scans}


def test_latest_of_one_source_reads_one_snapshot_by_index(volume):
    scans = explain(volume, "SELECT account, balance_units FROM balance_latest WHERE source = %s",
                    ("beta",))
    # Which partition holds the newest snapshot is known only at run time:
    # the others are pruned then, and show as never executed.
    assert read(scans).keys() == {FEB}
    assert read(scans)[FEB] <= INDEX_SCANS
    [(rows,)] = fetch(volume, "SELECT count(*) FROM balance_latest WHERE source = 'beta'")
    assert rows == ACCOUNTS


def test_one_account_over_a_time_range_reads_only_that_month(volume):
    query = ("SELECT as_of, balance_units FROM balance_history_units"
             " WHERE source = %s AND account = %s AND as_of >= %s AND as_of < %s ORDER BY as_of")
    params = ("alpha", "0.0.1234", utc(2026, 1, 20), utc(2026, 1, 27))
    scans = explain(volume, query, params)
    assert read(scans).keys() == {JAN}  # the other months pruned at run time (0010)
    assert read(scans)[JAN] <= INDEX_SCANS
    assert len(fetch(volume, query, params)) == 7


def test_daily_close_of_one_account_across_a_month_boundary(volume):
    query = ("SELECT day, balance_units FROM balance_daily_close"
             " WHERE source = %s AND account = %s AND as_of >= %s AND as_of < %s ORDER BY day")
    params = ("gamma", "0.0.5000", utc(2026, 1, 25), utc(2026, 2, 5))
    scans = explain(volume, query, params)
    assert read(scans).keys() == {JAN, FEB}  # not the empty March (pruned at run time since 0010)
    assert all(kinds <= INDEX_SCANS for kinds in read(scans).values())
    days = [day for day, _ in fetch(volume, query, params)]
    assert days == [date(2026, 1, 25) + timedelta(days=n) for n in range(11)]


def test_changes_of_one_account_and_top_movers_of_one_day(volume):
    february = ("beta", utc(2026, 2, 1), utc(2026, 2, 8))
    one_account = ("SELECT as_of, previous_as_of, delta_units FROM balance_changes"
                   " WHERE source = %s AND account = '0.0.1999' AND as_of >= %s AND as_of < %s"
                   " ORDER BY as_of")
    scans = explain(volume, one_account, february)
    # The first February row looks back into January for its previous snapshot.
    assert read(scans).keys() == {JAN, FEB}
    assert all(kinds <= INDEX_SCANS for kinds in read(scans).values())
    rows = fetch(volume, one_account, february)
    assert [r[1] for r in rows] == [r[0] - timedelta(days=1) for r in rows] and len(rows) == 7

    top_movers = ("SELECT account, delta_units FROM balance_changes"
                  " WHERE source = %s AND as_of >= %s AND as_of < %s AND delta <> 0"
                  " ORDER BY abs(delta_units) DESC LIMIT 10")
    one_day = ("alpha", utc(2026, 2, 10), utc(2026, 2, 11))
    scans = explain(volume, top_movers, one_day)
    assert read(scans).keys() == {FEB}
    assert all(kinds <= INDEX_SCANS for kinds in read(scans).values())
    assert len(fetch(volume, top_movers, one_day)) == 10


def test_freshness_on_the_volume(volume):
    rows = fetch(volume, "SELECT source, last_published_as_of, last_run_status, failed_runs_24h"
                         " FROM source_freshness ORDER BY source")
    last = FIRST_SNAPSHOT + timedelta(days=SNAPSHOTS - 1)
    assert rows == [(source, last, "published", 0) for source in SOURCES]


# --- history stored by changes (migration 0010) ----------------------------------------------


def test_reader_cannot_reach_the_stored_history(db, reader):
    publish_snapshot(db, "guarded", T1, [BalanceRow("a", "HBAR", 10)])
    publish_snapshot(db, "guarded", T2, [BalanceRow("a", "HBAR", 11)])
    partition = partitions.ensure_partition(db, T1)
    for statement in ("SELECT * FROM balance_history_store", f"SELECT * FROM {partition}",
                      "SELECT * FROM balance_snapshots", "LOCK TABLE balance_history_store IN ACCESS SHARE MODE",
                      "SELECT balance_history_put('guarded', now(), 'p', 'x', now(), 1, now())",
                      "TRUNCATE balance_history_store"):
        error = refused(reader, statement)
        assert isinstance(error, psycopg2.errors.InsufficientPrivilege), (statement, error)
    with reader.cursor() as cur:
        cur.execute("SELECT as_of, balance_units FROM balance_history_units WHERE source = 'guarded' ORDER BY as_of")
        assert [u for _, u in cur.fetchall()] == [Decimal("10"), Decimal("11")]
    reader.rollback()


def test_a_snapshot_stores_only_what_changed_and_reads_back_whole(db):
    first = [BalanceRow(f"0.0.{i}", "HBAR", i, 8) for i in range(100)]
    second = [BalanceRow(r.account, r.asset, r.balance + (1 if i < 3 else 0), 8) for i, r in enumerate(first[1:])]
    assert publish.publish(db, _staged(db, "delta", T1, first)).rows_stored == 100  # the month's keyframe
    result = publish.publish(db, _staged(db, "delta", T2, second))
    # Three changed (0.0.1 to 0.0.3), one gone (0.0.0); 99 holdings, as before 0010.
    assert (result.rows_published, result.rows_stored) == (99, 4)
    assert fetch(db, "SELECT rows, rows_inserted, rows_stored FROM snapshot_runs ORDER BY run_id") == [
        (100, 100, 100), (99, 99, 4)]
    assert fetch(db, "SELECT count(*), sum(balance) FROM balance_history WHERE as_of = %s", (T2,)) == [
        (99, sum(r.balance for r in second))]
    assert fetch(db, "SELECT account, balance FROM balance_history_store WHERE gone") == [("0.0.0", None)]


def test_the_names_before_0013_answer_as_the_new_ones(db):
    publish_snapshot(db, "renamed", T1, [BalanceRow("a", "HBAR", 10, decimals=1)])
    publish_snapshot(db, "renamed", T2, [BalanceRow("a", "HBAR", 30, decimals=1), BalanceRow("b", "X", 1)])
    for old, new in (("balances_latest", "balance_latest"), ("balances_daily_close", "balance_daily_close")):
        rows = fetch(db, f"SELECT * FROM {new} ORDER BY account")
        assert rows and fetch(db, f"SELECT * FROM {old} ORDER BY account") == rows


def test_pipeline_health_views_show_runs_and_rejections_but_no_provider_text(db, reader):
    from extractors.records import Rejection
    from loaders import rejections

    publish_snapshot(db, "healthy", T1, [BalanceRow("a", "HBAR", 10)])
    with db.cursor() as cur:
        cur.execute("INSERT INTO snapshot_runs (source, provider, scheduled_for, status, started_at, finished_at,"
                    " error, rejected) VALUES ('healthy', 'hedera', %s, 'failed', %s, %s,"
                    " 'HTTP 500: <img src=https://evil.example/beacon>', 2) RETURNING run_id",
                    (T2, T2, T2 + timedelta(seconds=90)))
        failed = cur.fetchone()[0]
        rejections.add(cur, failed, 0, [Rejection('{"account":"<b>x</b>"}', "account '<b>x</b>' is not an id",
                                                  "invalid_id"),
                                        Rejection('{"balance":"1e999999999"}', "balance is too large",
                                                  "amount_out_of_range")])
    db.commit()
    with reader.cursor() as cur:
        cur.execute("SELECT status, duration_seconds, rows, rejected FROM pipeline_runs"
                    " WHERE source = 'healthy' ORDER BY run_id")
        runs = cur.fetchall()
        cur.execute("SELECT * FROM pipeline_runs")
        run_columns = {d.name for d in cur.description}
        cur.execute("SELECT reason_code, day, rejections, runs FROM rejection_reasons WHERE source = 'healthy'"
                    " ORDER BY reason_code")
        reasons = cur.fetchall()
        cur.execute("SELECT * FROM rejection_reasons")
        reason_columns = {d.name for d in cur.description}
        cur.execute("SELECT string_agg(t::text, ' ') FROM pipeline_runs t")
        shown = cur.fetchone()[0]
        cur.execute("SELECT string_agg(t::text, ' ') FROM rejection_reasons t")
        shown += cur.fetchone()[0]
    reader.rollback()
    assert [r[0] for r in runs] == ["published", "failed"] and runs[1][1] == Decimal(90) and runs[1][3] == 2
    today = fetch(db, "SELECT (now() AT TIME ZONE 'UTC')::date")[0][0]
    assert reasons == [("amount_out_of_range", today, 1, 1), ("invalid_id", today, 1, 1)]
    assert not {"error", "raw", "reason"} & (run_columns | reason_columns)
    assert "evil" not in shown and "<" not in shown
