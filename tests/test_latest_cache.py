"""The newest snapshot's staging, kept for the next publish (migration 0011), is used only while it is true.

Each test publishes through the real path and then checks the stored
history against the snapshots it was given: every holding at every
snapshot, and how many rows each publish stored. The cache is proven to
be *used* by altering it behind the loader's back: a publish that read it
stores a change that did not happen. Every way a kept snapshot can stop
being true (crash recovery emptying it, a backfill, a rerun adding a
holding, a write through the view, a TRUNCATE, a holding staged twice) is
then shown to make the next publish read the history instead, and store
exactly the right rows.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from extractors.records import BalanceRow
from loaders import latest_cache, publish, runs, staging
from tests.conftest import fetch
from tests.test_history_storage import publish_snapshot

SOURCE = "cache_src"
T1 = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)


def rows(n: int = 6, **balances) -> list[BalanceRow]:
    out = [BalanceRow(f"0.0.{1000 + i}", "HBAR", Decimal(1000 + i), 8) for i in range(n)]
    return [BalanceRow(r.account, r.asset, Decimal(balances.get(r.account.replace(".", "_"), r.balance)), 8)
            for r in out]


def held(conn, as_of: datetime) -> list[tuple]:
    return fetch(conn, "SELECT account, asset, balance::text FROM balance_history WHERE source = %s AND as_of = %s"
                       " ORDER BY account, asset", (SOURCE, as_of))


def expected(snapshot: list[BalanceRow]) -> list[tuple]:
    return sorted((r.account, r.asset, format(r.balance, "f")) for r in snapshot)


def cache_entry(conn):
    found = fetch(conn, "SELECT as_of, run_id, shards, holdings, valid FROM balance_latest_cache WHERE source = %s",
                  (SOURCE,))
    return found[0] if found else None


def tamper(conn) -> None:
    """Change one cached balance behind the loader's back."""
    _, run_id, _, _, _ = cache_entry(conn)
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {latest_cache.table_name(run_id, 0).as_string(cur)} SET balance = -1"
                    " WHERE account = '0.0.1000'")
    conn.commit()


def test_the_newest_snapshot_is_kept_and_the_next_publish_compares_against_it(db):
    first = publish_snapshot(db, SOURCE, T1, rows())
    entry = cache_entry(db)
    assert entry == (T1, first.run_id, 1, 6, True)
    assert fetch(db, "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NULL",
                 (latest_cache.table_name(first.run_id, 0).as_string(db),
                  staging.table_name(first.run_id, 0).as_string(db))) == [(True, True)]

    second = rows(**{"0_0_1003": "7"})[:-1] + [BalanceRow("0.0.2000", "HBAR", Decimal(5), 8)]
    result = publish_snapshot(db, SOURCE, T1 + timedelta(hours=1), second)
    # One changed, one new, one gone (a tombstone).
    assert (result.rows_published, result.rows_stored) == (6, 3)
    assert held(db, T1 + timedelta(hours=1)) == expected(second)
    assert held(db, T1) == expected(rows())
    assert cache_entry(db)[:2] == (T1 + timedelta(hours=1), result.run_id)
    assert fetch(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'balance_staging'") == [(1,)]

    # Used, not just kept: a balance altered in the cache reads as a change.
    tamper(db)
    third = publish_snapshot(db, SOURCE, T1 + timedelta(hours=2), second)
    assert third.rows_stored == 1


def test_a_kept_snapshot_emptied_by_crash_recovery_is_not_trusted(db):
    publish_snapshot(db, SOURCE, T1, rows())
    _, run_id, _, _, _ = cache_entry(db)
    with db.cursor() as cur:
        # What crash recovery does to an UNLOGGED table.
        cur.execute(f"TRUNCATE {latest_cache.table_name(run_id, 0).as_string(cur)}")
    db.commit()
    result = publish_snapshot(db, SOURCE, T1 + timedelta(hours=1), rows(**{"0_0_1001": "3"}))
    assert result.rows_stored == 1
    assert held(db, T1 + timedelta(hours=1)) == expected(rows(**{"0_0_1001": "3"}))


def test_every_change_to_the_kept_snapshot_makes_the_next_publish_read_the_history(db):
    at = [T1 + timedelta(hours=k) for k in range(8)]
    truth = {at[0]: rows()}
    publish_snapshot(db, SOURCE, at[0], truth[at[0]])

    # A write through the view changes the newest snapshot.
    with db.cursor() as cur:
        cur.execute("UPDATE balance_history SET balance = 42 WHERE source = %s AND as_of = %s AND account = '0.0.1002'",
                    (SOURCE, at[0]))
    db.commit()
    truth[at[0]] = rows(**{"0_0_1002": "42"})
    assert cache_entry(db)[-1] is False
    tamper(db)  # would show as a change, were it read
    truth[at[1]] = rows(**{"0_0_1002": "42"})
    assert publish_snapshot(db, SOURCE, at[1], truth[at[1]]).rows_stored == 0
    assert cache_entry(db)[0] == at[1] and cache_entry(db)[-1] is True

    # A rerun that adds a holding to the newest snapshot.
    truth[at[1]] = truth[at[1]] + [BalanceRow("0.0.3000", "HBAR", Decimal(9), 8)]
    assert publish_snapshot(db, SOURCE, at[1], truth[at[1]]).rows_published == 1
    assert cache_entry(db)[-1] is False
    tamper(db)
    truth[at[2]] = truth[at[1]]
    assert publish_snapshot(db, SOURCE, at[2], truth[at[2]]).rows_stored == 0

    # A backfill between two held snapshots rewrites the later one's stored rows.
    truth[at[4]] = truth[at[2]]
    publish_snapshot(db, SOURCE, at[4], truth[at[4]])
    truth[at[3]] = rows(**{"0_0_1004": "1"})
    publish_snapshot(db, SOURCE, at[3], truth[at[3]])
    assert cache_entry(db)[-1] is False
    tamper(db)
    truth[at[5]] = truth[at[4]]
    assert publish_snapshot(db, SOURCE, at[5], truth[at[5]]).rows_stored == 0

    # A holding staged twice (alike) is one holding; its staging is not kept.
    twice = truth[at[5]] + truth[at[5]][:1]
    truth[at[6]] = truth[at[5]]
    assert publish_snapshot(db, SOURCE, at[6], twice).rows_published == len(truth[at[6]])
    assert cache_entry(db) is None
    truth[at[7]] = truth[at[6]][1:]
    assert publish_snapshot(db, SOURCE, at[7], truth[at[7]]).rows_stored == 1  # one tombstone

    for when, snapshot in truth.items():
        assert held(db, when) == expected(snapshot), when


def test_truncating_the_history_invalidates_every_kept_snapshot(db):
    publish_snapshot(db, SOURCE, T1, rows())
    publish_snapshot(db, "cache_other", T1, rows())
    with db.cursor() as cur:
        cur.execute("TRUNCATE balance_history_store, balance_snapshots")
    db.commit()
    assert fetch(db, "SELECT count(*), bool_or(valid) FROM balance_latest_cache") == [(2, False)]
    # The same snapshot time again, with other balances: compared with nothing stale.
    publish_snapshot(db, SOURCE, T1, rows(**{"0_0_1000": "1"}))
    assert publish_snapshot(db, SOURCE, T1 + timedelta(hours=1), rows(**{"0_0_1000": "1"})).rows_stored == 0
    assert held(db, T1) == held(db, T1 + timedelta(hours=1)) == expected(rows(**{"0_0_1000": "1"}))


def test_a_sharded_snapshot_is_kept_whole(db):
    def publish_sharded(as_of: datetime, snapshot: list[BalanceRow]):
        run_id = runs.start_run(db, SOURCE, "hedera", as_of, shards=3)
        runs.set_snapshot(db, run_id, as_of, f"{as_of.timestamp():.9f}")
        for shard in range(3):
            writer = staging.StagingWriter(db, run_id, shard)
            writer.add(snapshot[shard::3])
            writer.close()
        return publish.publish(db, run_id)

    first = publish_sharded(T1, rows(9))
    assert cache_entry(db) == (T1, first.run_id, 3, 9, True)
    second = rows(9, **{"0_0_1007": "70"})[1:]
    result = publish_sharded(T1 + timedelta(hours=1), second)
    assert (result.rows_published, result.rows_stored) == (8, 2)
    assert held(db, T1 + timedelta(hours=1)) == expected(second)
    assert fetch(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'balance_staging'") == [(3,)]


def test_a_holding_staged_twice_against_the_kept_snapshot_is_one_holding_or_refused(db):
    publish_snapshot(db, SOURCE, T1, rows())
    changed = rows(**{"0_0_1001": "5"})
    twice = changed + [changed[1]]
    result = publish_snapshot(db, SOURCE, T1 + timedelta(hours=1), twice)
    assert (result.rows_published, result.rows_stored) == (6, 1)
    assert held(db, T1 + timedelta(hours=1)) == expected(changed)

    clash = changed + [BalanceRow("0.0.1001", "HBAR", Decimal(6), 8)]
    try:
        publish_snapshot(db, SOURCE, T1 + timedelta(hours=2), clash)
    except publish.PublishError as exc:
        assert "0.0.1001/HBAR" in str(exc)
    else:
        raise AssertionError("two balances for one holding were published")
    assert held(db, T1 + timedelta(hours=2)) == []
    # A new holding listed twice, alike, with another gone.
    extra = BalanceRow("0.0.5000", "HBAR", Decimal(1), 8)
    third = changed[1:] + [extra, extra]
    result = publish_snapshot(db, SOURCE, T1 + timedelta(hours=3), third)
    assert (result.rows_published, result.rows_stored) == (6, 2)
    assert held(db, T1 + timedelta(hours=3)) == expected(changed[1:] + [extra])


def test_a_rerun_of_the_newest_snapshot_is_answered_by_the_kept_snapshot_or_else_by_the_history(db):
    first = publish_snapshot(db, SOURCE, T1, rows())
    entry = cache_entry(db)
    again = publish_snapshot(db, SOURCE, T1, list(reversed(rows())))
    assert (again.status, again.rows_published, again.rows_stored) == ("published", 0, 0)
    assert held(db, T1) == expected(rows())
    # The kept snapshot stays the first run's; the rerun's staging is dropped.
    assert cache_entry(db) == entry and entry[1] == first.run_id
    assert fetch(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'balance_staging'") == [(1,)]

    # Used, not just kept: with a balance altered in the cache, a rerun
    # bringing that balance matches it and is published adding nothing,
    # where the history would have refused it.
    tamper(db)
    assert publish_snapshot(db, SOURCE, T1, rows(**{"0_0_1000": "-1"})).rows_published == 0
    assert held(db, T1) == expected(rows())
    # A rerun the kept snapshot does not match is the history's to judge:
    # as held, nothing to add (the cache is what differs) ...
    assert publish_snapshot(db, SOURCE, T1, rows()).rows_published == 0
    # ... with other balances, refused, naming what the history holds ...
    try:
        publish_snapshot(db, SOURCE, T1, rows(**{"0_0_1001": "7"}))
    except publish.PublishError as exc:
        assert "0.0.1001/HBAR: stored 1001, now 7" in str(exc)
    else:
        raise AssertionError("a rerun with another balance was published")
    # ... and with a holding more, added.
    extra = BalanceRow("0.0.4000", "HBAR", Decimal(3), 8)
    assert publish_snapshot(db, SOURCE, T1, rows() + [extra]).rows_published == 1
    assert held(db, T1) == expected(rows() + [extra])
