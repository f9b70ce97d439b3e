"""Reconciliation checks against known histories in the real Postgres."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from reconciliation.checks import KINDS, load_checks, parse_checks, parse_duration
from pipeline.config import ConfigError, parse_config, parse_source
from reconciliation.reconcile import reconcile
from tests.conftest import REPO, fetch, load_dag, write_config

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
FROM, TO = T0, T0 + timedelta(hours=5, minutes=30)

CONFIG = """
[sources.formance_main]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "@hourly"
start_date = 2025-01-01

[sources.hedera_mainnet]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "@hourly"
start_date = 2025-01-01

[checks.treasury_hbar]
kind = "pair"
left = { source = "formance_main", account = "treasury:hedera", asset = "HBAR/8" }
right = { source = "hedera_mainnet", account = "0.0.1234", asset = "HBAR" }
abs_tolerance = "0.000001"
rel_tolerance = "0"
max_skew = "1h"

[checks.formance_totals]
kind = "aggregate"
source = "formance_main"

[checks.formance_continuity]
kind = "continuity"
source = "formance_main"
allow_negative = ["world"]
"""


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def snapshot(conn, source: str, scheduled_for: datetime, *, as_of: datetime | None = None,
             rows: list[tuple] = (), aggregates: list[tuple] = (), status: str = "published") -> int:
    """One run of ``source``; rows are (account, asset, balance, decimals[, available])."""
    as_of = as_of or scheduled_for
    published = status == "published"
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO snapshot_runs (source, provider, scheduled_for, status, as_of, as_of_raw)"
            " VALUES (%s, 'test', %s, %s, %s, %s) RETURNING run_id",
            (source, scheduled_for, status, as_of if published else None, as_of.isoformat() if published else None),
        )
        run_id = cur.fetchone()[0]
        cur.execute("SELECT balance_history_ensure_partition(%s)", (as_of,))
        for account, asset, balance, decimals, *available in rows:
            cur.execute(
                "INSERT INTO balance_history (source, provider, account, asset, balance, decimals,"
                " available_balance, as_of, as_of_raw, scheduled_for, run_id)"
                " VALUES (%s, 'test', %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (source, account, asset, Decimal(balance), decimals, Decimal(available[0]) if available else None,
                 as_of, as_of.isoformat(), scheduled_for, run_id),
            )
        for asset, balance, decimals in aggregates:
            cur.execute(
                "INSERT INTO aggregate_balances (source, provider, asset, balance, decimals, as_of, as_of_raw,"
                " scheduled_for, run_id) VALUES (%s, 'test', %s, %s, %s, %s, %s, %s, %s)",
                (source, asset, Decimal(balance), decimals, as_of, as_of.isoformat(), scheduled_for, run_id),
            )
    conn.commit()
    return run_id


def seed(conn) -> None:
    """Known histories: every kind of break once, and near misses that are not breaks."""
    f, hd = "formance_main", "hedera_mainnet"
    hbar = [("HBAR/8", "0", 8)]
    snapshot(conn, f, h(0), rows=[("treasury:hedera", "HBAR/8", "100000000", 8),
                                  ("world", "HBAR/8", "-100000000", 8)], aggregates=hbar)
    snapshot(conn, f, h(1), rows=[("treasury:hedera", "HBAR/8", "150000000", 8),
                                  ("world", "HBAR/8", "-150000000", 8)], aggregates=hbar)
    snapshot(conn, f, h(2), status="failed")  # 02:00 a gap; 03:00 no run at all: a gap
    snapshot(conn, f, h(4), rows=[("treasury:hedera", "HBAR/8", "200000000", 8),
                                  ("world", "HBAR/8", "-200000000", 8),
                                  ("user:1", "USD/2", "-500", 2),
                                  ("user:2", "USD/2", "1000", 2, "1500")],
             aggregates=[("HBAR/8", "5", 8), ("USD/2", "500", 2)])
    snapshot(conn, f, h(5), status="no_snapshot")  # not a gap: the provider had nothing
    # 00:00 beyond tolerance; 01:00 within it (0.0000005 < 0.000001); at 04:00 the
    # latest right snapshot is from 02:30, 1h30 older than the left one.
    snapshot(conn, hd, h(0), rows=[("0.0.1234", "HBAR", "99000000", 8)])
    snapshot(conn, hd, h(1), rows=[("0.0.1234", "HBAR", "150000050", 8)])
    snapshot(conn, hd, h(3), as_of=h(2.5), rows=[("0.0.1234", "HBAR", "200000000", 8)])


def breaks(conn) -> dict[tuple, tuple]:
    rows = fetch(conn, """
        SELECT check_name, kind, subject, check_time, left_value, right_value, difference, tolerance, status
          FROM reconciliation_breaks""")
    return {(r[0], r[1], json.dumps(r[2], sort_keys=True), r[3]): r[4:] for r in rows}


def subject(**keys) -> str:
    return json.dumps(keys, sort_keys=True)


PAIR = subject(left={"source": "formance_main", "account": "treasury:hedera", "asset": "HBAR/8"},
               right={"source": "hedera_mainnet", "account": "0.0.1234", "asset": "HBAR"})
F = {"source": "formance_main"}
D = Decimal
EXPECTED = {
    ("treasury_hbar", "mismatch", PAIR, h(0)): (D("1"), D("0.99"), D("0.01"), D("0.000001"), "open"),
    ("treasury_hbar", "skew", PAIR, h(4)): (D("2"), D("2"), D("0"), None, "open"),
    ("formance_totals", "mismatch", subject(source="formance_main", asset="HBAR/8"), h(4)):
        (D("0.00000005"), D("0"), D("0.00000005"), D("0"), "open"),
    ("formance_continuity", "gap", subject(**F), h(2)): (None, None, None, None, "open"),
    ("formance_continuity", "gap", subject(**F), h(3)): (None, None, None, None, "open"),
    # Default max_staleness: twice the hourly schedule. 01:00 -> 04:00 is 3h.
    ("formance_continuity", "stale", subject(**F), h(3)): (D(10800), None, D(3600), D(7200), "open"),
    ("formance_continuity", "negative_balance", subject(**F, account="user:1", asset="USD/2"), h(4)):
        (D("-5"), None, D("-5"), D("0"), "open"),
    ("formance_continuity", "available_above_balance", subject(**F, account="user:2", asset="USD/2"), h(4)):
        (D("15"), D("10"), D("5"), D("0"), "open"),
}


@pytest.fixture
def checks():
    return load_checks(parse_config(__import__("tomllib").loads(CONFIG)))


def test_reconcile_finds_exactly_the_seeded_breaks_and_reruns_idempotently(db, checks):
    seed(db)
    first = reconcile(db, checks, FROM, TO)
    assert breaks(db) == EXPECTED
    assert (first.status, first.checks_run, first.breaks_open, first.breaks_new, first.breaks_resolved) == \
        ("succeeded", 3, 8, 8, 0)
    seen = dict(fetch(db, "SELECT break_id, last_seen FROM reconciliation_breaks"))

    second = reconcile(db, checks, FROM, TO)
    assert breaks(db) == EXPECTED  # no duplicates
    assert (second.breaks_open, second.breaks_new, second.breaks_resolved) == (8, 0, 0)
    rows = fetch(db, "SELECT break_id, first_seen, last_seen, first_run_id, last_run_id"
                           " FROM reconciliation_breaks")
    for break_id, first_seen, last_seen, first_run, last_run in rows:
        assert first_seen == seen[break_id] < last_seen
        assert (first_run, last_run) == (first.run_id, second.run_id)
    assert fetch(db, "SELECT run_id, status, checks_run, breaks_open, breaks_new, breaks_resolved,"
                           " window_from, window_to FROM reconciliation_runs ORDER BY run_id") == [
        (1, "succeeded", 3, 8, 8, 0, FROM, TO), (2, "succeeded", 3, 8, 0, 0, FROM, TO)]


def test_dashboards_read_the_breaks_through_views(db, checks, reader):
    seed(db)
    reconcile(db, checks, FROM, TO)
    with reader.cursor() as cur:
        cur.execute("SELECT check_name, kind, subject_label, left_text, right_text, difference_text,"
                    " status FROM reconciliation_breaks_detail"
                    " WHERE kind IN ('mismatch', 'negative_balance') ORDER BY check_time, check_name")
        detail = cur.fetchall()
        cur.execute("SELECT day, check_name, open, resolved, total FROM reconciliation_breaks_daily"
                    " ORDER BY check_name")
        daily = cur.fetchall()
    reader.rollback()
    assert detail == [
        ("treasury_hbar", "mismatch", "formance_main treasury:hedera HBAR/8 vs hedera_mainnet 0.0.1234 HBAR",
         "1.00000000", "0.99000000", "0.01000000", "open"),
        ("formance_continuity", "negative_balance", "formance_main user:1 USD/2", "-5.00", None, "-5.00",
         "open"),
        ("formance_totals", "mismatch", "formance_main HBAR/8", "0.00000005", "0.00000000", "0.00000005",
         "open"),
    ]
    day = T0.date()
    assert daily == [(day, "formance_continuity", 5, 0, 5), (day, "formance_totals", 1, 0, 1),
                     (day, "treasury_hbar", 2, 0, 2)]


def test_fixed_data_resolves_the_break(db, checks):
    seed(db)
    reconcile(db, checks, FROM, TO)
    with db.cursor() as cur:
        cur.execute("UPDATE balance_history SET balance = 100000000 WHERE source = 'hedera_mainnet' AND as_of = %s",
                    (h(0),))
        cur.execute("UPDATE snapshot_runs SET status = 'published', as_of = %s, as_of_raw = 'x'"
                    " WHERE source = 'formance_main' AND scheduled_for = %s", (h(2), h(2)))
    db.commit()
    run = reconcile(db, checks, FROM, TO)
    assert (run.breaks_open, run.breaks_new, run.breaks_resolved) == (6, 1, 3)
    found = breaks(db)
    resolved = {k for k, v in found.items() if v[-1] == "resolved"}
    # 02:00 is published now: its gap is gone and the stale stretch is 02:00 -> 04:00,
    # which is within the allowed 2h: the 03:00 stale break is resolved too.
    assert resolved == {("treasury_hbar", "mismatch", PAIR, h(0)),
                        ("formance_continuity", "gap", subject(**F), h(2)),
                        ("formance_continuity", "stale", subject(**F), h(3))}
    # The 02:00 snapshot has no treasury row: a new break of its own kind.
    assert found[("treasury_hbar", "missing", PAIR, h(2))][-1] == "open"
    assert fetch(db, "SELECT count(*) FROM reconciliation_breaks WHERE status = 'resolved'"
                           " AND resolved_at IS NOT NULL AND last_run_id = %s", (run.run_id,)) == [(3,)]


def test_breaks_outside_the_window_are_left_alone(db, checks):
    seed(db)
    reconcile(db, checks, FROM, TO)
    run = reconcile(db, checks, h(3.5), TO)  # only 04:00 and later is looked at again
    assert run.breaks_resolved == 0
    assert all(v[-1] == "open" for v in breaks(db).values())


def test_exact_numerics_beyond_float_and_28_digits(db):
    config = parse_config(__import__("tomllib").loads(CONFIG.replace('"0.000001"', '"0"')))
    checks = load_checks(config, ["treasury_hbar"])
    big = "123456789012345678901234567890"
    snapshot(db, "formance_main", h(0), rows=[("treasury:hedera", "HBAR/8", big, 18)])
    snapshot(db, "hedera_mainnet", h(0), rows=[("0.0.1234", "HBAR", big[:-1] + "1", 18)])
    reconcile(db, checks, FROM, TO)
    assert fetch(db, "SELECT left_value, right_value, difference FROM reconciliation_breaks") == [
        (D("123456789012.345678901234567890"), D("123456789012.345678901234567891"),
         D("-0.000000000000000001"))]


def test_relative_tolerance_allows_either_tolerance(db):
    config = parse_config(__import__("tomllib").loads(
        CONFIG.replace('rel_tolerance = "0"', 'rel_tolerance = "0.01"')))
    checks = load_checks(config, ["treasury_hbar"])
    snapshot(db, "formance_main", h(0), rows=[("treasury:hedera", "HBAR/8", "100000000", 8)])
    snapshot(db, "formance_main", h(1), rows=[("treasury:hedera", "HBAR/8", "100000000", 8)])
    snapshot(db, "hedera_mainnet", h(0), rows=[("0.0.1234", "HBAR", "99000000", 8)])  # 1% of 1: allowed
    snapshot(db, "hedera_mainnet", h(1), rows=[("0.0.1234", "HBAR", "98999999", 8)])  # just beyond
    reconcile(db, checks, FROM, TO)
    assert fetch(db, "SELECT check_time, difference, tolerance FROM reconciliation_breaks") == [
        (h(1), D("0.01000001"), D("0.01"))]


SOURCES = {"s": parse_source("s", {"provider": "hedera", "base_url": "http://x", "schedule": "*/15 * * * *"}),
           "manual": parse_source("manual", {"provider": "hedera", "base_url": "http://x", "schedule": "none"})}
PAIR_TABLE = {"kind": "pair", "left": {"source": "s", "account": "a", "asset": "X"},
              "right": {"source": "s", "account": "b", "asset": "X"}, "max_skew": "1h"}


@pytest.mark.parametrize("table, message", [
    ({"kind": "nope"}, "checks.c.kind: unknown kind 'nope'"),
    ({"source": "s"}, "checks.c.kind: missing"),
    ({**PAIR_TABLE, "left": {"source": "nope", "account": "a", "asset": "X"}},
     "checks.c.left.source: unknown source 'nope' (configured: manual, s)"),
    ({**PAIR_TABLE, "right": {"source": "s", "asset": "X"}}, "checks.c.right.account: missing"),
    ({**PAIR_TABLE, "abs_tolerance": 0.1}, "checks.c.abs_tolerance: expected a decimal written as a string"),
    ({**PAIR_TABLE, "rel_tolerance": "-1"}, "checks.c.rel_tolerance: must be a finite decimal of at least 0"),
    ({**PAIR_TABLE, "abs_tolerance": "lots"}, "checks.c.abs_tolerance: expected a decimal"),
    ({**PAIR_TABLE, "max_skew": "1 hour"}, "checks.c.max_skew: '1 hour' is not a duration"),
    ({k: v for k, v in PAIR_TABLE.items() if k != "max_skew"}, "checks.c.max_skew: missing"),
    ({"kind": "aggregate", "source": "s", "colour": "red"}, "checks.c.colour: unknown key for a aggregate check"),
    ({"kind": "aggregate"}, "checks.c.source: missing"),
    ({"kind": "continuity", "source": "manual"}, "checks.c.max_staleness: required: source 'manual' has no"),
    ({"kind": "continuity", "source": "s", "allow_negative": "yes"}, "checks.c.allow_negative: expected true"),
    ({"kind": "continuity", "source": "s", "max_staleness": "0s"}, "checks.c.max_staleness: must be longer"),
    ({"kind": "rollforward"}, "checks.c.source: missing"),
    ({"kind": "rollforward", "source": "s", "tolerance": 0.5}, "checks.c.tolerance: expected a decimal"),
    ({"kind": "rollforward", "source": "s", "tolerance": "-1"}, "checks.c.tolerance: must be a finite decimal"),
    ({"kind": "rollforward", "source": "s", "accounts": []}, "checks.c.accounts: empty list (leave the key out to "
                                                            "check every account)"),
    ({"kind": "rollforward", "source": "s", "abs_tolerance": "1"}, "checks.c.abs_tolerance: unknown key for a "
                                                                  "rollforward check"),
])
def test_config_errors_name_the_check_and_key(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_checks({"c": table}, SOURCES)
    assert message in str(caught.value)


# The smallest table of each kind, and the key it cannot do without.
SMALLEST = {"pair": (PAIR_TABLE, "max_skew"),
            "aggregate": ({"kind": "aggregate", "source": "s"}, "source"),
            "continuity": ({"kind": "continuity", "source": "s"}, "source"),
            "rollforward": ({"kind": "rollforward", "source": "s"}, "source")}
KEYS = {"pair": "abs_tolerance, kind, left, max_skew, rel_tolerance, right",
        "aggregate": "abs_tolerance, assets, kind, source",
        "continuity": "allow_negative, kind, max_staleness, source",
        "rollforward": "accounts, assets, kind, source, tolerance"}


def test_every_kind_of_check_is_known():
    assert sorted(KINDS) == sorted(SMALLEST) == sorted(KEYS)


@pytest.mark.parametrize("kind", sorted(SMALLEST))
def test_each_kind_refuses_an_unknown_key_and_a_missing_one_in_one_line(kind):
    table, required = SMALLEST[kind]
    assert parse_checks({"c": table}, SOURCES)["c"].kind == kind
    with pytest.raises(ConfigError) as caught:
        parse_checks({"c": {**table, "colour": "red"}}, SOURCES)
    assert str(caught.value) == f"checks.c.colour: unknown key for a {kind} check (known: {KEYS[kind]})"
    with pytest.raises(ConfigError) as caught:
        parse_checks({"c": {k: v for k, v in table.items() if k != required}}, SOURCES)
    assert str(caught.value) == f"checks.c.{required}: missing"


@pytest.mark.parametrize("table, message", [
    ({**PAIR_TABLE, "left": {"source": "s", "account": "a", "asset": "X", "assets": "Y"}},
     "checks.c.left.assets: unknown key (did you mean 'asset'?) (known: account, asset, source)"),
    ({**PAIR_TABLE, "right": "s"}, "checks.c.right: expected a table, got 's'"),
    ({**PAIR_TABLE, "max_skew": 60}, 'checks.c.max_skew: expected a duration written as a string such as "1h", got 60'),
    ({**PAIR_TABLE, "rel_tolerance": "2"}, "checks.c.rel_tolerance: must be 0 or between 1E-30 and 1, got '2'"),
    ({"kind": "aggregate", "source": "s", "asets": ["X"]},
     "checks.c.asets: unknown key for a aggregate check (did you mean 'assets'?) "
     "(known: abs_tolerance, assets, kind, source)"),
    ({"kind": "aggregate", "source": "s", "assets": []},
     "checks.c.assets: empty list (leave the key out to check every asset)"),
    ({"kind": "continuity", "source": "s", "allow_negative": ["world", 2]},
     "checks.c.allow_negative[1]: expected a non-empty string, got 2"),
    ({"kind": "rollforward", "source": 7}, "checks.c.source: expected a non-empty string, got 7"),
])
def test_a_check_mistake_is_exactly_one_line(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_checks({"c": table}, SOURCES)
    assert str(caught.value) == message


def test_a_rollforward_check_reads_its_filters_and_whether_the_provider_offers_movements():
    bitfront = parse_source("b", {"provider": "bitfront", "schedule": "none"})
    checks = parse_checks({"r": {"kind": "rollforward", "source": "s", "accounts": ["0.0.98"], "assets": ["HBAR"],
                                 "tolerance": "0.00000001"},
                           "n": {"kind": "rollforward", "source": "b"}}, {**SOURCES, "b": bitfront})
    assert (checks["r"].accounts, checks["r"].assets, checks["r"].tolerance, checks["r"].available) == (
        ("0.0.98",), ("HBAR",), Decimal("0.00000001"), True)
    assert (checks["n"].tolerance, checks["n"].available, checks["n"].provider) == (Decimal(0), False, "bitfront")


def test_durations_and_default_staleness():
    assert [parse_duration(t) for t in ("90s", "15m", "1h", "2d", "1h30m")] == [
        timedelta(seconds=90), timedelta(minutes=15), timedelta(hours=1), timedelta(days=2),
        timedelta(minutes=90)]
    with pytest.raises(ValueError):
        parse_duration("1.5h")
    weekdays = parse_source("w", {"provider": "hedera", "base_url": "http://x", "schedule": "0 9 * * 1-5"})
    checks = parse_checks({"q": {"kind": "continuity", "source": "s"},
                           "w": {"kind": "continuity", "source": "w", "allow_negative": True}},
                          {**SOURCES, "w": weekdays})
    assert checks["q"].max_staleness == timedelta(minutes=30)
    assert checks["w"].max_staleness == timedelta(days=6)  # twice Friday 09:00 -> Monday 09:00


def test_cli_reconcile_prints_the_summary_and_exits_0_with_breaks(db, database_url, tmp_path):
    seed(db)
    config = tmp_path / "balances.toml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(BALANCES_DB_URL=database_url)
    result = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(config), "reconcile",
                             "--from", FROM.isoformat(), "--to", TO.isoformat(), "--check", "treasury_hbar"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 check(s): 2 open, 2 new, 0 resolved" in result.stdout
    assert "treasury_hbar mismatch" in result.stdout and "difference=0.01000000" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(config), "reconcile",
                          "--check", "nope"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "no check named 'nope'" in bad.stderr


@pytest.mark.airflow
def test_reconciliation_dag_runs_on_the_source_assets(airflow_env, db):
    seed(db)
    write_config(CONFIG)
    dag = load_dag("reconcile_balances")
    assert {a.uri for a in dag.timetable.asset_condition.objects} == {
        "balances://snapshots/formance_main", "balances://snapshots/hedera_mainnet"}
    dag_run = dag.test(run_after=TO, logical_date=None)
    assert dag_run.state == "success"
    assert fetch(db, "SELECT window_from, window_to, status, breaks_open, dag_run_id"
                           " FROM reconciliation_runs") == [(TO - timedelta(days=3), TO, "succeeded", 8,
                                                             dag_run.run_id)]
    assert breaks(db) == EXPECTED


def test_the_newest_scheduled_run_is_no_gap_until_the_next_one_is_due(db, checks):
    """A reconciliation triggered by another source's publish just after 05:00 must not report
    the 05:00 run, still crawling, as missed; once 06:00 is due, a 05:00 that never came is a gap."""
    continuity = {"formance_continuity": checks["formance_continuity"]}
    snapshot(db, "formance_main", h(4), rows=[("world", "HBAR/8", "-1", 8)])
    snapshot(db, "formance_main", h(5), status="running")
    reconcile(db, continuity, h(3.5), h(5) + timedelta(seconds=20))
    assert [k for k in breaks(db) if k[1] == "gap"] == []
    reconcile(db, continuity, h(3.5), h(6) + timedelta(seconds=20))
    assert [k[3] for k in breaks(db) if k[1] == "gap"] == [h(5)]


@pytest.mark.airflow
def test_the_reconciliation_dag_also_runs_when_a_rollforward_sources_window_is_published(airflow_env, db):
    write_config(CONFIG + """
[checks.hedera_rollforward]
kind = "rollforward"
source = "hedera_mainnet"
""")
    dag = load_dag("reconcile_balances")
    assert {a.uri for a in dag.timetable.asset_condition.objects} == {
        "balances://snapshots/formance_main", "balances://snapshots/hedera_mainnet",
        "balances://movements/hedera_mainnet"}
