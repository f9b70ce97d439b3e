"""History stored by changes (migration 0010) answers exactly what full storage answered.

A seeded, randomised sequence of snapshots for three sources (balances
changing, holdings disappearing and coming back, decimals and spark factors
changing, a balance changing only its scale, an empty snapshot, snapshots
across three months) is published through the real path (staging, then
publish) in a shuffled order: backfills land between, before and after
snapshots already held; and again in time order, where every publish
compares against the kept staging of the snapshot before (0011); and
concurrently: two sessions publishing in the shuffled order while a third
writes through the ``balance_history`` view (0012: each waits for the
source's turn). Identical reruns add nothing, a rerun that brings one more
holding adds it, and a rerun with another balance fails and changes
nothing.

Beside it, every successful publish is mirrored into a plain full table
``balance_history`` in the schema ``eq_expected``, with the views of
migration 0004 over it. Each question (every view, row for row; the
README's queries; the balance of a holding at many times; every
reconciliation check) is asked twice with the same SQL text, once with
``search_path`` on the new storage and once on the full table, and the
answers must be identical, value by value (scale included) and in the
same order.
"""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg2
import pytest

from extractors.records import BalanceRow
from loaders import publish, runs, staging
from loaders.db import connect
from reconciliation.checks import AggregateCheck, ContinuityCheck, Holding, PairCheck
from reconciliation.reconcile import find_breaks
from tests.conftest import fetch

SEED = 20261130
SCHEMA = "eq_expected"
SOURCES = {"eq_alpha": 16, "eq_beta": 12, "eq_gamma": 9}  # snapshots each
START = datetime(2026, 1, 24, 9, 30, tzinfo=timezone.utc)

OLD_TABLE = f"""
CREATE TABLE {SCHEMA}.balance_history (
    source text COLLATE "C" NOT NULL, provider text NOT NULL, account text COLLATE "C" NOT NULL,
    asset text COLLATE "C" NOT NULL, balance numeric NOT NULL, decimals smallint,
    available_balance numeric, spark_factor numeric, as_of timestamptz NOT NULL, as_of_raw text NOT NULL,
    scheduled_for timestamptz NOT NULL, run_id bigint NOT NULL, loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, account, asset, as_of))
"""


def _old_views() -> list[str]:
    """The reader views as migration 0004 (and 0006) defined them, over the full table."""
    import importlib

    m = importlib.import_module("migrations.versions.0010_history_by_changes")
    return [m.OLD_UNITS_VIEW, m.LATEST_VIEW, m.DAILY_CLOSE_VIEW, m.OLD_CHANGES_VIEW]


# --- the snapshots --------------------------------------------------------------------------


def _evolve(rng: random.Random, state: dict, universe: list[tuple[str, str]]) -> dict:
    """The next snapshot of a source: a few holdings move, go or come back."""
    new = {}
    for key in universe:
        row = state.get(key)
        if row is None:
            if rng.random() < 0.25:
                new[key] = _fresh(rng, key)
            continue
        roll = rng.random()
        if roll < 0.06:
            continue  # gone
        if roll < 0.20:
            row = _replace(row, balance=_amount(rng))
        elif roll < 0.23 and row.decimals is not None:
            row = _replace(row, decimals=row.decimals + 1)
        elif roll < 0.26:
            # Same number, another scale: 12.5 -> 12.50 must show as such.
            text = format(Decimal(row.balance), "f")
            row = _replace(row, balance=Decimal(text + ("0" if "." in text else ".0")))
        elif roll < 0.28 and row.spark_factor is not None:
            row = _replace(row, spark_factor=rng.choice([3, 1000, 7]))
        elif roll < 0.31:
            row = _replace(row, available_balance=None if row.available_balance is not None else _amount(rng))
        new[key] = row
    return new


def _replace(row: BalanceRow, **changes) -> BalanceRow:
    values = {f: getattr(row, f) for f in ("account", "asset", "balance", "decimals", "available_balance",
                                           "spark_factor")}
    values.update(changes)
    return BalanceRow(**values)


def _amount(rng: random.Random) -> Decimal:
    sign = -1 if rng.random() < 0.05 else 1
    return Decimal(sign * rng.randint(0, 10 ** rng.randint(1, 30))).scaleb(-rng.choice([0, 0, 1, 2]))


def _fresh(rng: random.Random, key: tuple[str, str]) -> BalanceRow:
    account, asset = key
    if asset == "GOLD":
        return BalanceRow(account, asset, _amount(rng), spark_factor=1000)
    if asset == "USD":
        balance = _amount(rng)
        return BalanceRow(account, asset, balance, decimals=2, available_balance=balance + rng.randint(-5, 5))
    return BalanceRow(account, asset, _amount(rng), decimals=8 if asset == "HBAR" else 2)


def history(rng: random.Random) -> dict[str, list[tuple[datetime, list[BalanceRow]]]]:
    """Each source's snapshots in time order (the truth, whatever order they load in)."""
    out = {}
    for n, (source, count) in enumerate(SOURCES.items()):
        universe = [(f"0.0.{1000 + i}", asset) for i in range(25) for asset in ("HBAR", "0.0.7001")]
        universe += [(f"acct:{i}", asset) for i in range(6) for asset in ("GOLD", "USD")]
        state = {key: _fresh(rng, key) for key in universe if rng.random() < 0.7}
        at = START + timedelta(hours=n)
        snapshots = []
        for i in range(count):
            at += timedelta(days=rng.choice([1, 2, 3, 5]), minutes=rng.randint(0, 600))
            state = _evolve(rng, state, universe)
            rows = [] if (source, i) == ("eq_beta", 5) else list(state.values())
            rng.shuffle(rows)
            snapshots.append((at, rows))
            if (source, i) == ("eq_beta", 5):
                state = {}
        out[source] = snapshots
    return out


# --- loading both ---------------------------------------------------------------------------


def stage_snapshot(conn, source: str, as_of: datetime, rows: list[BalanceRow], *,
                   scheduled_for: datetime | None = None) -> int:
    """A run with ``rows`` staged as snapshot ``as_of``, ready to publish; its id."""
    run_id = runs.start_run(conn, source, "hedera", scheduled_for or as_of)
    runs.set_snapshot(conn, run_id, as_of, f"{as_of.timestamp():.9f}")
    writer = staging.StagingWriter(conn, run_id, 0)
    writer.add(rows)
    writer.close()
    return run_id


def publish_snapshot(conn, source: str, as_of: datetime, rows: list[BalanceRow], *,
                     scheduled_for: datetime | None = None) -> publish.PublishResult:
    return publish.publish(conn, stage_snapshot(conn, source, as_of, rows, scheduled_for=scheduled_for))


def mirror(conn, run_id: int, rows: list[BalanceRow]) -> None:
    """What the pre-0010 publish stored for this run: its rows, ON CONFLICT DO NOTHING."""
    with conn.cursor() as cur:
        for r in rows:
            cur.execute(
                f"""
                INSERT INTO {SCHEMA}.balance_history
                SELECT source, provider, %s, %s, %s, %s, %s, %s, as_of, as_of_raw, scheduled_for, run_id, finished_at
                  FROM snapshot_runs WHERE run_id = %s
                ON CONFLICT DO NOTHING
                """,
                (r.account, r.asset, r.balance, r.decimals, r.available_balance, r.spark_factor, run_id),
            )
    conn.commit()


def load(db, rng: random.Random, mode: str = "shuffled", database_url: str | None = None) -> dict:
    truth = history(rng)
    order = [(source, i) for source, snaps in truth.items() for i in range(len(snaps))]
    if mode != "in time order":
        rng.shuffle(order)
    # In time order every snapshot after a source's first is compared with
    # the kept staging of the one before (0011); shuffled, most are not.
    # A rerun of a snapshot already held, now and then, with the same rows.
    for _ in range(5):
        order.insert(rng.randrange(len(order) // 2, len(order)), rng.choice(order[: len(order) // 2]))
    if mode == "concurrently":
        load_concurrently(db, database_url, rng, truth, order)
        return truth
    for source, i in order:
        as_of, rows = truth[source][i]
        result = publish_snapshot(db, source, as_of, rows)
        mirror(db, result.run_id, rows)
    return truth


# Writes through the view, made while the publishes run: on snapshots no
# rerun brings again (a rerun would rightly refuse their other balances),
# and not on eq_alpha, which the rerun test below loads again.
VIEW_WRITES = 12


def load_concurrently(db, database_url: str, rng: random.Random, truth: dict, order: list) -> None:
    """Two sessions publish the snapshots in ``order`` (backfills among them) while a third writes
    through the ``balance_history`` view, holding each write open a moment; the same writes are then
    made on the full table, in the order they committed."""
    import threading
    import time

    queue, lock = list(order), threading.Lock()
    published: list[tuple[int, list[BalanceRow]]] = []
    failures: list[BaseException] = []
    rerun = {item for item in order if order.count(item) > 1}
    writable = [(s, truth[s][i][0]) for s, n in SOURCES.items() for i in range(n)
                if s != "eq_alpha" and (s, i) not in rerun]
    writer_rng = random.Random(rng.random())

    def publisher() -> None:
        conn = connect(database_url)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    source, i = queue.pop(0)
                as_of, rows = truth[source][i]
                result = publish_snapshot(conn, source, as_of, rows)
                with lock:
                    published.append((result.run_id, rows))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            conn.close()

    writes: list[tuple] = []

    def view_writer() -> None:
        conn = connect(database_url)
        try:
            while len(writes) < VIEW_WRITES and any(t.is_alive() for t in publishers):
                held = fetch(conn, "SELECT source, as_of FROM balance_snapshots WHERE holdings > 0")
                targets = sorted(set(held) & set(writable))
                if not targets:
                    time.sleep(0.01)
                    continue
                source, as_of = writer_rng.choice(targets)
                [(account, asset)] = fetch(conn, "SELECT account, asset FROM balance_history WHERE source = %s"
                                                 " AND as_of = %s ORDER BY account, asset LIMIT 1 OFFSET %s",
                                           (source, as_of, writer_rng.randrange(5)))
                balance = _amount(writer_rng)
                with conn.cursor() as cur:
                    cur.execute("UPDATE balance_history SET balance = %s WHERE source = %s AND as_of = %s"
                                " AND account = %s AND asset = %s", (balance, source, as_of, account, asset))
                time.sleep(writer_rng.uniform(0.005, 0.05))  # open while the publishes go on
                conn.commit()
                writes.append((balance, source, as_of, account, asset))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            conn.close()

    publishers = [threading.Thread(target=publisher) for _ in range(2)]
    writer = threading.Thread(target=view_writer)
    for thread in (*publishers, writer):
        thread.start()
    for thread in (*publishers, writer):
        thread.join()
    if failures:
        raise failures[0]
    assert len(writes) >= VIEW_WRITES // 2, "the view writes did not overlap the publishes"
    # The first run to publish a snapshot is the one its rows name, as the full table's key kept it.
    first = {run for (run,) in fetch(db, "SELECT run_id FROM balance_snapshots")}
    for run_id, rows in sorted(published, key=lambda p: p[0] not in first):
        mirror(db, run_id, rows)
    with db.cursor() as cur:
        for write in writes:
            cur.execute(f"UPDATE {SCHEMA}.balance_history SET balance = %s WHERE source = %s AND as_of = %s"
                        " AND account = %s AND asset = %s", write)
    db.commit()


@pytest.fixture(params=["shuffled", "in time order", "concurrently"])
def loaded(request, db, database_url):
    with db.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cur.execute(f"CREATE SCHEMA {SCHEMA}")
        cur.execute(OLD_TABLE)
        cur.execute(f"SET search_path = {SCHEMA}, public")
        for view in _old_views():
            cur.execute(view)
        cur.execute("RESET search_path")
    db.commit()
    rng = random.Random(SEED)
    truth = load(db, rng, request.param, database_url)
    expected = connect(database_url)
    with expected.cursor() as cur:
        cur.execute(f"SET search_path = {SCHEMA}, public")
    expected.commit()
    try:
        yield db, expected, truth, rng
    finally:
        expected.close()
        with db.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        db.commit()


def exact(conn, query: str, params=()) -> list[tuple]:
    """Rows as exact values: Decimal('12.5') and Decimal('12.50') differ here."""
    return [tuple(repr(v) for v in row) for row in fetch(conn, query, params)]


def same(actual, expected, query: str, params=()) -> int:
    got, want = exact(actual, query, params), exact(expected, query, params)
    assert got == want, query
    return len(want)


ALL = "source, provider, account, asset, balance, decimals, available_balance, spark_factor, as_of," \
      " as_of_raw, scheduled_for, run_id, loaded_at"


def test_every_view_answers_as_full_storage_did(loaded):
    actual, expected, truth, rng = loaded
    total = sum(len(rows) for snaps in truth.values() for _, rows in snaps)
    assert same(actual, expected, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset") \
        == total
    assert same(actual, expected, "SELECT * FROM balance_history_units ORDER BY source, as_of, account, asset") \
        == total
    assert same(actual, expected, "SELECT * FROM balances_latest ORDER BY source, account, asset") > 0
    assert same(actual, expected, "SELECT * FROM balances_daily_close ORDER BY source, day, account, asset") > 0
    changes = same(actual, expected, "SELECT * FROM balance_changes ORDER BY source, as_of, account, asset")
    assert changes == total
    assert same(actual, expected, "SELECT count(*) FROM balance_changes WHERE previous_as_of IS NULL") == 1
    same(actual, expected, "SELECT source, last_published_as_of, last_run_status FROM source_freshness"
                           " ORDER BY source")
    # The README's and docs/SCHEMA.md's queries, with their filters.
    same(actual, expected, "SELECT as_of, balance_units FROM balance_history_units WHERE source = 'eq_alpha'"
                           " AND account = '0.0.1003' AND asset = 'HBAR' AND as_of >= %s AND as_of < %s"
                           " ORDER BY as_of", (START, START + timedelta(days=30)))
    same(actual, expected, "SELECT day, asset, balance_units, balance_text FROM balances_daily_close"
                           " WHERE source = 'eq_gamma' AND account = '0.0.1007' AND as_of >= %s"
                           " ORDER BY day, asset", (START,))
    same(actual, expected, "SELECT asset, sum(balance_units) AS total_units, count(*) AS holdings"
                           " FROM balances_latest GROUP BY asset ORDER BY asset")
    same(actual, expected, "SELECT account, asset, previous_balance, balance, delta_units, delta_text"
                           " FROM balance_changes WHERE source = 'eq_beta' AND as_of >= %s AND as_of < %s"
                           " AND delta <> 0 ORDER BY abs(delta_units) DESC, account, asset LIMIT 20",
         (START + timedelta(days=10), START + timedelta(days=25)))
    # The balance of one holding at any time (also between snapshots and before the first).
    holdings = fetch(expected, "SELECT DISTINCT source, account, asset FROM balance_history ORDER BY 1, 2, 3")
    for source, account, asset in rng.sample(holdings, 40):
        for _ in range(6):
            at = START + timedelta(minutes=rng.randint(0, 60 * 24 * 60))
            same(actual, expected, "SELECT as_of, balance, decimals, balance_text FROM balance_history_units"
                                   " WHERE source = %s AND account = %s AND asset = %s AND as_of <= %s"
                                   " ORDER BY as_of DESC LIMIT 1", (source, account, asset, at))
    # Every holding at every snapshot, one snapshot at a time.
    for source, snaps in truth.items():
        for as_of, rows in snaps:
            n = same(actual, expected, f"SELECT {ALL} FROM balance_history WHERE source = %s AND as_of = %s"
                                       " ORDER BY account, asset", (source, as_of))
            assert n == len(rows)


def test_reconciliation_finds_the_same_breaks(loaded):
    actual, expected, truth, _ = loaded
    t0, t1 = START, START + timedelta(days=70)
    some = sorted(fetch(expected, "SELECT DISTINCT account, asset FROM balance_history"
                                  " WHERE source = 'eq_alpha' AND asset = 'HBAR'"))[:4]
    checks = [PairCheck(f"pair_{i}", Holding("eq_alpha", a, x), Holding(other, a, x), timedelta(days=2))
              for i, ((a, x), other) in enumerate(zip(some, ("eq_beta", "eq_gamma", "eq_beta", "eq_gamma")))]
    checks += [AggregateCheck("agg", "eq_alpha")]
    checks += [ContinuityCheck(f"cont_{s}", s, timedelta(days=2), "0 9 * * *", START, allow)
               for s, allow in (("eq_alpha", False), ("eq_beta", ("acct:1", "acct:2")), ("eq_gamma", True))]
    found = 0
    for check in checks:
        got, want = find_breaks(actual, check, t0, t1), find_breaks(expected, check, t0, t1)
        assert [repr(b) for b in got] == [repr(b) for b in want], check.name
        found += len(want)
    assert found > 0


def test_reruns_add_nothing_and_a_changed_rerun_fails_and_changes_nothing(loaded):
    actual, expected, truth, rng = loaded
    before = exact(actual, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset")
    stored = fetch(actual, "SELECT count(*) FROM balance_history_store")
    source = "eq_alpha"
    as_of, rows = truth[source][7]
    again = publish_snapshot(actual, source, as_of, list(reversed(rows)), scheduled_for=as_of + timedelta(minutes=1))
    assert (again.status, again.rows_published, again.rows_stored) == ("published", 0, 0)
    assert exact(actual, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset") == before
    assert fetch(actual, "SELECT count(*) FROM balance_history_store") == stored

    changed = [_replace(rows[0], balance=Decimal(rows[0].balance) + 1), *rows[1:]]
    with pytest.raises(publish.PublishError, match="already loaded with other balances"):
        publish_snapshot(actual, source, as_of, changed)
    assert exact(actual, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset") == before
    assert fetch(actual, "SELECT count(*) FROM balance_history_store") == stored
    assert fetch(actual, "SELECT status FROM snapshot_runs ORDER BY run_id DESC LIMIT 1") == [("failed",)]

    # A rerun that brings one more holding adds it, as the full table's key did.
    extra = BalanceRow("0.0.9999", "HBAR", 42, 8)
    added = publish_snapshot(actual, source, as_of, [*rows, extra], scheduled_for=as_of + timedelta(minutes=2))
    mirror(actual, added.run_id, [*rows, extra])
    assert added.rows_published == 1
    same(actual, expected, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset")
    same(actual, expected, "SELECT * FROM balance_changes WHERE account = '0.0.9999' ORDER BY source, as_of")


def test_storage_grows_with_changes_not_holdings(loaded):
    actual, _, truth, _ = loaded
    [(snapshots, keyframes, holdings, stored)] = fetch(
        actual, "SELECT count(*), count(*) FILTER (WHERE keyframe), sum(holdings), sum(stored)"
                " FROM balance_snapshots")
    assert snapshots == sum(len(s) for s in truth.values())
    # One keyframe per source and month (three months), each self-contained.
    assert keyframes == fetch(actual, "SELECT count(DISTINCT (source, month_start)) FROM balance_snapshots")[0][0]
    assert fetch(actual, "SELECT count(*) FROM balance_history_store")[0][0] == stored
    assert stored * 10 < holdings * 6
    # A keyframe is the first snapshot of its month and holds no tombstone.
    assert fetch(actual, "SELECT count(*) FROM balance_snapshots s WHERE keyframe <> NOT EXISTS"
                         " (SELECT FROM balance_snapshots p WHERE p.source = s.source"
                         " AND p.month_start = s.month_start AND p.as_of < s.as_of)") == [(0,)]
    assert fetch(actual, "SELECT count(*) FROM balance_history_store h JOIN balance_snapshots s"
                         " USING (source, as_of) WHERE s.keyframe AND h.gone") == [(0,)]


def test_writing_through_the_view_keeps_the_snapshots_exact(loaded):
    """Maintenance SQL on balance_history (INSERT, UPDATE, DELETE) means what it meant on the table."""
    actual, expected, truth, _ = loaded
    source = "eq_gamma"
    (first, _), (second, _) = truth[source][2], truth[source][3]
    for conn in (actual, expected):
        with conn.cursor() as cur:
            cur.execute("UPDATE balance_history SET balance = 7 WHERE source = %s AND as_of = %s"
                        " AND account = '0.0.1004' AND asset = 'HBAR'", (source, first))
            cur.execute("DELETE FROM balance_history WHERE source = %s AND as_of = %s AND asset = 'GOLD'",
                        (source, second))
            cur.execute("INSERT INTO balance_history (source, provider, account, asset, balance, decimals,"
                        " as_of, as_of_raw, scheduled_for, run_id, loaded_at)"
                        " VALUES (%s, 'hedera', 'new:1', 'HBAR', 5.50, 8, %s, 'x', %s, 1, %s)",
                        (source, first, first, first))
        conn.commit()
    same(actual, expected, f"SELECT {ALL} FROM balance_history ORDER BY source, as_of, account, asset")
    same(actual, expected, "SELECT * FROM balance_changes ORDER BY source, as_of, account, asset")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        with actual.cursor() as cur:
            cur.execute("INSERT INTO balance_history (source, provider, account, asset, balance, as_of,"
                        " as_of_raw, scheduled_for, run_id) VALUES (%s, 'hedera', 'new:1', 'HBAR', 1, %s,"
                        " 'x', %s, 1)", (source, first, first))
    actual.rollback()


def test_a_holding_staged_twice_is_one_holding_alike_and_refused_otherwise(db):
    at = START + timedelta(days=3)
    rows = [BalanceRow(f"0.0.{i}", "HBAR", i, 8) for i in range(10)]
    # Alike, in the keyframe and in a later snapshot (new, changed and unchanged holdings).
    assert publish_snapshot(db, "dup", at, rows + rows[:2]).rows_published == 10
    later = [BalanceRow("0.0.0", "HBAR", 100, 8), BalanceRow("0.0.50", "HBAR", 5, 8), *rows[1:]]
    result = publish_snapshot(db, "dup", at + timedelta(hours=1), later + later[:3])
    assert (result.rows_published, result.rows_stored) == (11, 2)
    assert fetch(db, "SELECT count(*) FROM balance_history WHERE as_of = %s", (at + timedelta(hours=1),)) == [(11,)]
    for clash in ([*later, BalanceRow("0.0.0", "HBAR", 101, 8)], [*later, BalanceRow("0.0.3", "HBAR", 4, 8)]):
        with pytest.raises(publish.PublishError, match="different balances for the same holding"):
            publish_snapshot(db, "dup", at + timedelta(hours=2), clash)
    assert fetch(db, "SELECT count(*) FROM balance_snapshots WHERE source = 'dup'") == [(2,)]


def test_a_change_of_any_column_alone_is_stored_against_kept_staging_and_history(db):
    """Decimals, spark factor, available balance or only the scale: each alone is a change."""
    at = [START + timedelta(hours=k) for k in range(9)]
    base = BalanceRow("acct:1", "GOLD", Decimal("12.5"), decimals=2, available_balance=Decimal(3), spark_factor=1000)
    versions = [base, _replace(base, spark_factor=7), _replace(base, spark_factor=7, decimals=3),
                _replace(base, spark_factor=7, decimals=3, available_balance=None),
                _replace(base, spark_factor=7, decimals=3, available_balance=None, balance=Decimal("12.50"))]
    versions += list(reversed(versions[:-1]))
    for k, row in enumerate(versions):
        if k % 2:
            # Every other publish without the kept staging: read from the history.
            with db.cursor() as cur:
                cur.execute("UPDATE balance_latest_cache SET valid = false")
            db.commit()
        assert publish_snapshot(db, "eq_cols", at[k], [row]).rows_stored == 1
    got = fetch(db, "SELECT balance::text, decimals, available_balance, spark_factor FROM balance_history"
                    " WHERE source = 'eq_cols' ORDER BY as_of")
    assert got == [(format(r.balance, "f"), r.decimals, r.available_balance, r.spark_factor) for r in versions]
