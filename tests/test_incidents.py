"""Incidents: consecutive breaks of one check, kind and subject as one problem.

The grouping rule itself (reconciliation/incidents.py ``follow``) is checked
on plain times, without a database; then real reconciliations over known
histories in PostgreSQL, the views a dashboard reads, and the
``balances incidents`` command.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg2
import psycopg2.errors
import pytest

from pipeline.config import parse_config
from reconciliation.checks import load_checks
from reconciliation.incidents import Span, acknowledge, episodes, follow
from reconciliation.reconcile import default_window, reconcile
from tests.conftest import REPO, fetch
from tests.test_reconcile import CONFIG, FROM, TO, h, seed, snapshot

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


def t(n: int) -> datetime:
    """The n-th check time, 15 minutes apart."""
    return T0 + timedelta(minutes=15 * n)


def times(*numbers: int) -> list[datetime]:
    return [t(n) for n in numbers]


def spans(*tuples) -> list[Span]:
    """Incidents as stored: (opened, last_seen, resolved or None[, reopened])."""
    found = []
    for i, (opened, last, resolved, *reopened) in enumerate(tuples, 1):
        span = Span(t(opened), t(last), None if resolved is None else t(resolved), *(reopened or [0]),
                    incident_id=i)
        span.recorded = span.state
        found.append(span)
    return found


def shape(found: list[Span]) -> list[tuple]:
    return [(s.opened_at, s.last_seen, s.resolved_at, s.reopened) for s in found]


def test_episodes_are_runs_of_consecutive_broken_times():
    assert episodes(times(2, 3, 4, 7), times(*range(10))) == [
        _episode((2, 3, 4), 5), _episode((7,), 8)]
    assert episodes(times(8, 9), times(*range(10))) == [_episode((8, 9), None)]
    assert episodes([], times(1, 2)) == []


def _episode(numbers, cleared):
    from reconciliation.incidents import Episode

    return Episode(tuple(times(*numbers)), None if cleared is None else t(cleared))


# (stored incidents, broken, checked, flap window in steps) -> incidents afterwards, which incident each break joins
CASES = {
    "a problem over many check times is one incident, resolved where it holds again": (
        [], range(2, 7), range(10), 0, [(2, 6, 7, 0)], {n: 0 for n in range(2, 7)}),
    "still broken at the newest time examined: open": (
        [], range(5, 10), range(10), 0, [(5, 9, None, 0)], {n: 0 for n in range(5, 10)}),
    "a rerun of the same window changes nothing": (
        [(2, 6, 7)], range(2, 7), range(10), 0, [(2, 6, 7, 0)], {n: 0 for n in range(2, 7)}),
    "the next run extends the open incident": (
        [(5, 9, None)], range(5, 12), range(2, 12), 0, [(5, 11, None, 0)], {n: 0 for n in range(5, 12)}),
    "the window's start moved past its opening: the incident goes on": (
        [(1, 9, None)], range(5, 12), range(5, 12), 0, [(1, 11, None, 0)], {n: 0 for n in range(5, 12)}),
    "its breaks before the window are not looked at again, and it holds now: resolved": (
        [(1, 4, None)], [], range(5, 12), 0, [(1, 4, 5, 0)], {}),
    "a break no longer found at its own time (the other side arrived) resolves it there": (
        [(9, 9, None)], [], range(5, 10), 0, [(9, 9, 9, 0)], {}),
    "back after it resolved: a new incident": (
        [(2, 6, 7)], [*range(2, 7), 9, 10], range(12), 0, [(2, 6, 7, 0), (9, 10, 11, 0)],
        {**{n: 0 for n in range(2, 7)}, 9: 1, 10: 1}),
    "back within flap_window: the old one reopens": (
        [(2, 6, 7)], [*range(2, 7), 8, 9], range(12), 1, [(2, 9, 10, 1)], {n: 0 for n in [*range(2, 7), 8, 9]}),
    "back after flap_window: a new one": (
        [(2, 6, 7)], [*range(2, 7), 9, 10], range(12), 1, [(2, 6, 7, 0), (9, 10, 11, 0)],
        {**{n: 0 for n in range(2, 7)}, 9: 1, 10: 1}),
    "flapping within one window, every comeback within flap_window": (
        [], [1, 2, 4, 6, 7], range(10), 1, [(1, 7, 8, 2)], {n: 0 for n in [1, 2, 4, 6, 7]}),
    "flapping without flap_window: one incident each time": (
        [], [1, 2, 4, 6, 7], range(10), 0, [(1, 2, 3, 0), (4, 4, 5, 0), (6, 7, 8, 0)],
        {1: 0, 2: 0, 4: 1, 6: 2, 7: 2}),
    "an older window's breaks running into the open incident join it": (
        [(10, 12, None)], range(3, 6), range(6), 0, [(3, 12, None, 0)], {n: 0 for n in range(3, 6)}),
    "an older window's problem that ended is an incident of its own, already resolved": (
        [(10, 12, None)], [1, 2], range(6), 0, [(1, 2, 3, 0), (10, 12, None, 0)], {1: 0, 2: 0}),
    "an older window inside a resolved incident adds its breaks to it": (
        [(1, 8, 9)], range(3, 6), range(3, 6), 0, [(1, 8, 9, 0)], {n: 0 for n in range(3, 6)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_follow(case):
    stored, broken, checked, flap_steps, expected, joins = CASES[case]
    found = spans(*stored)
    owner = follow(found, times(*broken), times(*checked), timedelta(minutes=15 * flap_steps))
    assert shape(found) == [(t(a), t(b), None if c is None else t(c), r) for a, b, c, r in expected]
    assert {when: found.index(span) for when, span in owner.items()} == {t(n): i for n, i in joins.items()}
    assert sum(s.is_open for s in found) <= 1


def test_follow_tells_what_changed():
    found = spans((2, 6, 7))
    follow(found, times(*range(2, 7)), times(*range(10)))
    assert not found[0].changed
    follow(found, times(*range(2, 9)), times(*range(10)))
    assert found[0].changed and found[0].state == (t(2), t(8), t(9), 0)


# -- real reconciliations ---------------------------------------------------------------

@pytest.fixture
def checks():
    return load_checks(parse_config(tomllib.loads(CONFIG)))


def incidents(conn) -> dict[tuple, tuple]:
    rows = fetch(conn, """SELECT check_name, kind, subject_label, status, opened_at, last_seen, resolved_at, breaks,
                                 worst_difference FROM reconciliation_incidents""")
    return {r[:3]: r[3:] for r in rows}


F = "formance_main"
PAIR = "formance_main treasury:hedera HBAR/8 vs hedera_mainnet 0.0.1234 HBAR"
D = Decimal
# test_reconcile's seeded history: formance_main published at 00:00, 01:00 and 04:00.
SEEDED = {
    ("treasury_hbar", "mismatch", PAIR): ("resolved", h(0), h(0), h(1), 1, D("0.01")),
    ("treasury_hbar", "skew", PAIR): ("open", h(4), h(4), None, 1, D("0")),
    ("formance_totals", "mismatch", "formance_main HBAR/8"): ("open", h(4), h(4), None, 1, D("0.00000005")),
    # 02:00 and 03:00 are consecutive scheduled times: one incident of two breaks.
    ("formance_continuity", "gap", F): ("resolved", h(2), h(3), h(4), 2, None),
    ("formance_continuity", "stale", F): ("resolved", h(3), h(3), h(4), 1, D(3600)),
    ("formance_continuity", "negative_balance", "formance_main user:1 USD/2"): ("open", h(4), h(4), None, 1, D(-5)),
    ("formance_continuity", "available_above_balance", "formance_main user:2 USD/2"):
        ("open", h(4), h(4), None, 1, D(5)),
}


def test_the_seeded_breaks_are_seven_incidents_and_a_rerun_changes_nothing(db, checks):
    seed(db)
    reconcile(db, checks, FROM, TO)
    assert incidents(db) == SEEDED
    assert fetch(db, "SELECT count(*) FROM reconciliation_breaks WHERE incident_id IS NULL") == [(0,)]
    stored = fetch(db, "SELECT * FROM break_incidents ORDER BY incident_id")
    reconcile(db, checks, FROM, TO)
    assert fetch(db, "SELECT * FROM break_incidents ORDER BY incident_id") == stored


def test_a_problem_over_100_snapshots_is_one_incident_with_100_breaks(db):
    checks = load_checks(parse_config(tomllib.loads(LEDGER)))
    for n in range(100):
        snapshot(db, "ledger", t(n), rows=[("users:005", "USD/2", str(-1500 - n), 2)])
        reconcile(db, checks, *default_window(t(n) + timedelta(minutes=1)))
    assert incidents(db) == {("ledger_continuity", "negative_balance", "ledger users:005 USD/2"):
                             ("open", t(0), t(99), None, 100, D("-15.99"))}
    snapshot(db, "ledger", t(100), rows=[("users:005", "USD/2", "0", 2)])
    reconcile(db, checks, *default_window(t(100) + timedelta(minutes=1)))
    assert incidents(db) == {("ledger_continuity", "negative_balance", "ledger users:005 USD/2"):
                             ("resolved", t(0), t(99), t(100), 100, D("-15.99"))}
    # Breaks stay the evidence, each pointing at its incident.
    assert fetch(db, "SELECT count(DISTINCT incident_id), count(*) FROM reconciliation_breaks") == [(1, 100)]


LEDGER = """
[sources.ledger]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "*/15 * * * *"
start_date = 2025-03-01

[checks.ledger_continuity]
kind = "continuity"
source = "ledger"
"""


def ledger_history(db, broken_steps: set[int], steps: int, flap_window: timedelta) -> None:
    """A snapshot every 15 minutes, users:005 below zero at ``broken_steps``, reconciled after each."""
    checks = load_checks(parse_config(tomllib.loads(LEDGER)))
    for n in range(steps):
        snapshot(db, "ledger", t(n), rows=[("users:005", "USD/2", "-100" if n in broken_steps else "100", 2)])
        reconcile(db, checks, *default_window(t(n) + timedelta(minutes=1)), flap_window=flap_window)


@pytest.mark.parametrize("flap_window, expected", [
    (timedelta(0), [(t(0), t(3), t(4), 0), (t(5), t(7), t(8), 0), (t(12), t(12), None, 0)]),
    (timedelta(minutes=30), [(t(0), t(7), t(8), 1), (t(12), t(12), None, 0)]),
])
def test_a_problem_back_within_flap_window_reopens_its_incident(db, flap_window, expected):
    ledger_history(db, {0, 1, 2, 3, 5, 6, 7, 12}, 13, flap_window)
    assert fetch(db, "SELECT opened_at, last_seen, resolved_at, reopened FROM break_incidents"
                     " ORDER BY opened_at") == expected


def test_a_stale_source_is_one_incident_until_it_publishes_again(db):
    checks = load_checks(parse_config(tomllib.loads(LEDGER)))
    snapshot(db, "ledger", t(0))
    for n in range(1, 8):  # nothing published for two hours: stale from 00:30 on
        reconcile(db, checks, *default_window(t(n) + timedelta(minutes=1)))
    (stale,) = [v for k, v in incidents(db).items() if k[1] == "stale"]
    assert stale[:4] == ("open", t(2), t(2), None)
    snapshot(db, "ledger", t(8))
    reconcile(db, checks, *default_window(t(8) + timedelta(minutes=1)))
    (stale,) = [v for k, v in incidents(db).items() if k[1] == "stale"]
    assert stale[:4] == ("resolved", t(2), t(2), t(8))


def test_dashboards_read_incidents_through_views(db, checks, reader):
    seed(db)
    reconcile(db, checks, FROM, TO)
    with reader.cursor() as cur:
        cur.execute("SELECT kind, status, breaks, worst_difference_text, subject_label FROM reconciliation_incidents"
                    " WHERE check_name = 'formance_continuity' ORDER BY opened_at, kind")
        rows = cur.fetchall()
        cur.execute("SELECT day, check_name, kind, opened, still_open FROM reconciliation_incidents_daily"
                    " ORDER BY check_name, kind")
        daily = cur.fetchall()
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("SELECT * FROM break_incidents")
    reader.rollback()
    assert rows == [("gap", "resolved", 2, None, F), ("stale", "resolved", 1, "3600", F),
                    ("available_above_balance", "open", 1, "5.00", "formance_main user:2 USD/2"),
                    ("negative_balance", "open", 1, "-5.00", "formance_main user:1 USD/2")]
    day = h(0).date()
    assert daily == [(day, "formance_continuity", "available_above_balance", 1, 1),
                     (day, "formance_continuity", "gap", 1, 0), (day, "formance_continuity", "negative_balance", 1, 1),
                     (day, "formance_continuity", "stale", 1, 0), (day, "formance_totals", "mismatch", 1, 1),
                     (day, "treasury_hbar", "mismatch", 1, 0), (day, "treasury_hbar", "skew", 1, 1)]


def test_acknowledgements_are_appended_never_changed(db, checks):
    seed(db)
    reconcile(db, checks, FROM, TO)
    (open_id,), (resolved_id,) = fetch(db, "SELECT incident_id FROM break_incidents WHERE kind IN"
                                           " ('negative_balance', 'gap') ORDER BY kind DESC")
    first = acknowledge(db, open_id, "  client pays back on Monday ", "alice")
    assert (first["status"], first["acknowledged_by"], first["acknowledgement_note"]) == \
        ("acknowledged", "alice", "client pays back on Monday")
    second = acknowledge(db, open_id, "still waiting", "bob")
    assert (second["acknowledged_by"], second["acknowledgement_note"]) == ("bob", "still waiting")
    assert fetch(db, "SELECT acknowledged_by, note FROM incident_acknowledgements ORDER BY acknowledgement_id") == [
        ("alice", "client pays back on Monday"), ("bob", "still waiting")]
    for statement in ("UPDATE incident_acknowledgements SET note = 'nothing happened'",
                      "DELETE FROM incident_acknowledgements"):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="audit trail"):
            fetch(db, statement)
        db.rollback()
    assert fetch(db, "SELECT count(*) FROM incident_acknowledgements") == [(2,)]
    with pytest.raises(ValueError, match=f"incident {resolved_id} resolved at .*: nothing to acknowledge"):
        acknowledge(db, resolved_id, "late", "alice")
    with pytest.raises(LookupError, match="no incident 999"):
        acknowledge(db, 999, "typo", "alice")
    with pytest.raises(ValueError, match="--note"):
        acknowledge(db, open_id, "   ", "alice")


def run_cli(*args: str, database_url: str, config) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(BALANCES_DB_URL=database_url, BALANCES_CONFIG=str(config), USER="carol", LOGNAME="carol")
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_cli_lists_and_acknowledges_incidents(db, database_url, checks, tmp_path):
    seed(db)
    config = tmp_path / "balances.toml"
    config.write_text(CONFIG)
    # The same overdrafts half an hour later, and an account id as a provider
    # may write it: a terminal escape and a newline.
    snapshot(db, "formance_main", h(4.5), rows=[("user:1", "USD/2", "-500", 2), ("user:2", "USD/2", "1000", 2, "1500"),
                                                 ("user:\x1b[31m9\nfake", "USD/2", "-1", 2)])
    reconcile(db, checks, FROM, TO)
    listed = run_cli("incidents", database_url=database_url, config=config)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["incident", "status", "check", "kind", "subject", "opened_at", "last_seen",
                                "resolved_at", "breaks", "worst_difference", "acknowledged_by"]
    assert len(lines) == 1 + 5  # the five unresolved ones, newest first
    assert "\x1b" not in listed.stdout and "user:\\x1b[31m9\\nfake" in lines[1]
    assert " gap " not in listed.stdout
    everything = run_cli("incidents", "--all", "--source", "hedera_mainnet", database_url=database_url, config=config)
    assert [line.split()[1:4] for line in everything.stdout.splitlines()[1:]] == [
        ["open", "treasury_hbar", "skew"], ["resolved", "treasury_hbar", "mismatch"]]

    (negative,) = fetch(db, "SELECT incident_id FROM break_incidents WHERE kind = 'negative_balance'"
                            " AND subject ->> 'account' = 'user:1'")[0]
    acked = run_cli("--quiet", "incidents", "ack", str(negative), "--note", "known: client overdraft",
                    database_url=database_url, config=config)
    assert acked.returncode == 0, acked.stderr
    assert acked.stdout.startswith(f"incident {negative} acknowledged by carol at ")
    assert acked.stdout.splitlines()[0].endswith(": known: client overdraft")
    assert f"{negative}  acknowledged  formance_continuity  negative_balance" in acked.stdout
    by_option = run_cli("incidents", "ack", str(negative), "--note", "again", "--by", "dave", "--db-url",
                        database_url, database_url="postgresql://nobody@127.0.0.1:9/x", config=config)
    assert by_option.returncode == 0, by_option.stderr
    assert fetch(db, "SELECT acknowledged_by, note FROM incident_acknowledgements ORDER BY 1") == [
        ("carol", "known: client overdraft"), ("dave", "again")]

    for args, code, says in [
        (("incidents", "ack", "999", "--note", "x"), 1, "balances: no incident 999\n"),
        (("incidents", "ack", str(negative)), 2, "the following arguments are required: --note"),
        (("incidents", "ack", str(negative), "--note", " "), 2, "argument --note: expected 1 to 2000 characters"),
        (("incidents", "--source", "nope"), 2, "no source named 'nope'"),
        (("incidents", "--open", "--all"), 2, "not allowed with argument"),
    ]:
        done = run_cli(*args, database_url=database_url, config=config)
        assert done.returncode == code and says in done.stderr, (args, done.stderr)


def test_migration_0014_goes_down_and_up_again(database_url):
    """A database of its own: 0014 removed leaves 0013's schema, and applied again rebuilds it."""
    from alembic import command

    from loaders.migrate import alembic_config, current_revision, upgrade

    admin = psycopg2.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS balances_incidents_migration")
        cur.execute("CREATE DATABASE balances_incidents_migration")
    url = database_url.rsplit("/", 1)[0] + "/balances_incidents_migration"
    try:
        upgrade(url)
        tables = """SELECT count(*) FROM pg_class WHERE relname IN ('break_incidents', 'incident_acknowledgements',
                    'incident_notifications', 'reconciliation_incidents', 'reconciliation_incidents_daily')"""
        column = """SELECT count(*) FROM information_schema.columns
                     WHERE table_name = 'reconciliation_breaks' AND column_name = 'incident_id'"""
        conn = psycopg2.connect(url)
        assert fetch(conn, tables) == [(5,)] and fetch(conn, column) == [(1,)]
        command.downgrade(alembic_config(url), "0013")
        assert current_revision(url) == "0013"
        assert fetch(conn, tables) == [(0,)] and fetch(conn, column) == [(0,)]
        upgrade(url)
        assert fetch(conn, tables) == [(5,)] and fetch(conn, column) == [(1,)]
        conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE balances_incidents_migration WITH (FORCE)")
        admin.close()

