"""Staging COPYs full batches behind the crawl, on a connection of its own (loaders.staging.CopyBuffer).

What may change is only who waits for PostgreSQL: every row must still be
staged exactly once, a batch that fails must fail the crawl, and a crawl
thrown away must leave nothing behind.
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal

import psycopg2
import pytest

from extractors.records import BalanceRow
from loaders import runs, staging
from loaders.db import connect
from loaders.staging import StagingWriter, table_name
from pipeline.snapshot import take_snapshot
from tests.conftest import fetch, make_source, wait_for
from tests.hedera_data import BIG, T3, book, mirror

AS_OF = datetime(2026, 11, 2, tzinfo=timezone.utc)
BATCH = 2048  # bytes: a few dozen rows a batch


def page(first: int, size: int = 40) -> list[BalanceRow]:
    return [BalanceRow(f"0.0.{n}", "HBAR", BIG + n, 8) for n in range(first, first + size)]


def copiers(conn) -> int:
    rows = fetch(conn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'balances-staging'")
    conn.commit()
    return rows[0][0]


def no_copier_left(conn) -> None:
    # A closed connection's backend leaves pg_stat_activity a moment after the client closed it.
    wait_for(lambda: copiers(conn) == 0, timeout=10, what="the copier's connection to close")


def staged_in_batches(db, monkeypatch, source: str, rows: int) -> tuple[int, StagingWriter]:
    """A run of ``source`` whose writer was given ``rows`` rows, 40 a page, in batches of BATCH bytes."""
    monkeypatch.setattr(staging, "FLUSH_BYTES", BATCH)
    run_id = runs.start_run(db, source, "hedera", AS_OF)
    writer = StagingWriter(db, run_id, 0)
    for first in range(0, rows, 40):
        writer.add(page(first))
    return run_id, writer


def dropped(db, run_id: int) -> bool:
    return fetch(db, "SELECT to_regclass(%s) IS NULL", (table_name(run_id, 0).as_string(db),)) == [(True,)]


def test_rows_past_one_batch_are_staged_exactly_once_through_the_second_connection(db, monkeypatch):
    run_id, writer = staged_in_batches(db, monkeypatch, "copied", 4000)
    assert copiers(db) == 1  # the batches so far went through it
    writer.close()
    no_copier_left(db)
    staged = fetch(db, f"SELECT account, balance FROM {table_name(run_id, 0).as_string(db)}")
    assert len(staged) == 4000
    assert Counter(a for a, _ in staged) == Counter(f"0.0.{n}" for n in range(4000))
    assert sum(b for _, b in staged) == sum(Decimal(BIG + n) for n in range(4000))
    assert staging.staged_counts(db.cursor(), run_id)[0][0] == 4000


def test_a_small_crawl_opens_no_second_connection(db, monkeypatch):
    no_copier_left(db)  # none left closing by an earlier test
    run_id = runs.start_run(db, "small", "hedera", AS_OF)
    writer = StagingWriter(db, run_id, 0)
    writer.add(page(0))
    writer.close()
    assert copiers(db) == 0
    assert fetch(db, f"SELECT count(*) FROM {table_name(run_id, 0).as_string(db)}") == [(40,)]


def test_without_a_second_connection_to_be_had_every_batch_is_copied_on_the_crawls_own(db, monkeypatch, caplog):
    def refused(conn, *, application_name):
        raise psycopg2.OperationalError("FATAL:  sorry, too many clients already")

    monkeypatch.setattr(staging, "reconnect_like", refused)
    with caplog.at_level("WARNING", logger="loaders.staging"):
        run_id, writer = staged_in_batches(db, monkeypatch, "crowded", 4000)
        writer.close()
    assert copiers(db) == 0
    assert fetch(db, f"SELECT count(*), sum(balance) FROM {table_name(run_id, 0).as_string(db)}") == \
        [(4000, sum(Decimal(BIG + n) for n in range(4000)))]
    assert caplog.text.count("a second one could not be opened") == 1
    assert "too many clients" in caplog.text


def test_a_batch_that_fails_fails_the_crawl_and_abort_still_cleans_up(db, database_url, monkeypatch):
    run_id, writer = staged_in_batches(db, monkeypatch, "broken", 80)  # the copier has started
    other = connect(database_url)
    with other.cursor() as cur:  # the staging table goes from under it
        cur.execute(f"DROP TABLE {table_name(run_id, 0).as_string(other)}")
    other.commit()
    other.close()
    with pytest.raises(psycopg2.errors.UndefinedTable):
        for first in range(80, 4000, 40):
            writer.add(page(first))
        writer.close()
    writer.abort()  # quiet: the failure is already raised
    no_copier_left(db)
    assert dropped(db, run_id)


def test_a_crawl_thrown_away_mid_batch_stops_its_copier_and_drops_the_table(db, monkeypatch):
    run_id, writer = staged_in_batches(db, monkeypatch, "aborted", 400)
    writer.abort()
    no_copier_left(db)
    assert dropped(db, run_id)


def test_a_snapshot_crawled_ahead_and_copied_behind_holds_what_the_mirror_holds(db, serve, monkeypatch):
    # No rate limit, so each next page is asked for ahead; batches of 2 KB, so most go through the copier.
    monkeypatch.setattr(staging, "FLUSH_BYTES", BATCH)
    server = serve(mirror(accounts=3000))
    source = make_source("ahead", provider="hedera", base_url=server.url, limit=50)
    take_snapshot(db, source, datetime(2023, 11, 14, 23, 0, tzinfo=timezone.utc))
    expected = {}
    for num, account in book(3, 3000).items():
        expected[(f"0.0.{num}", "HBAR")] = account.balance
        for token, amount in account.tokens:
            expected[(f"0.0.{num}", token)] = amount
    stored = {(a, t): b for a, t, b in fetch(db, "SELECT account, asset, balance FROM balance_history"
                                                 " WHERE source = 'ahead'")}
    assert stored == expected
    assert fetch(db, "SELECT as_of_raw, status FROM snapshot_runs") == [(T3, "published")]
    pages = Counter(r.raw_query for r in server.requests if r.path == "/api/v1/balances")
    assert max(pages.values()) == 1, "a page was asked for twice"


def test_the_second_connection_is_opened_with_the_first_ones_settings(database_url, monkeypatch):
    # TLS and the rest as the first connection got them (here from libpq's environment), not libpq's defaults.
    from loaders.db import reconnect_like

    monkeypatch.setenv("PGSSLMODE", "disable")
    first = connect(database_url)
    monkeypatch.delenv("PGSSLMODE")
    second = reconnect_like(first, application_name="balances-staging")
    try:
        assert first.info.dsn_parameters["sslmode"] == "disable"
        assert second.info.dsn_parameters["sslmode"] == "disable"
        assert second.info.dsn_parameters["application_name"] == "balances-staging"
        assert fetch(second, "SHOW statement_timeout") == fetch(first, "SHOW statement_timeout")
    finally:
        first.close()
        second.close()


def test_a_broken_connection_is_replaced_with_the_parameters_it_was_given(db, database_url):
    # A connection lost mid-way is replaced this way (the alerts' settling, the request budget).
    from loaders.db import reconnect_like

    first = connect(database_url, application_name="first")
    fetch(db, "SELECT pg_terminate_backend(%s)", (first.get_backend_pid(),))
    with pytest.raises(psycopg2.OperationalError):
        fetch(first, "SELECT 1")
    assert first.closed
    second = reconnect_like(first, application_name="second")
    try:
        assert fetch(second, "SELECT current_database(), current_setting('application_name')") == \
            fetch(db, "SELECT current_database(), 'second'")
        assert fetch(second, "SHOW lock_timeout") == [("30s",)]
    finally:
        second.close()
