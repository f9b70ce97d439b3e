"""Movements and the roll-forward: windows loaded whole or not at all, in any order, once.

Against the real sandboxes (a Formance ledger with history, a Hedera mirror
node whose snapshots follow from its transactions, BitFront and CoreLedger
without movements) and a real PostgreSQL: the roll-forward statement holds
exactly on random books, one altered movement is exactly one break,
windows load in shuffled order and a backfilled snapshot splits the window
it falls in, reruns add nothing, a failed window stores nothing, and hostile
movements (duplicates, foreign links, bombs, page floods) are bounded as
balances are.
"""
from __future__ import annotations

import json
import random
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import psycopg2

from extractors.credentials import Credentials
from extractors.errors import PaginationError, ResponseTooLarge
from extractors.records import Window
from loaders.publish import PublishError
from pipeline import movements
from pipeline.snapshot import take_snapshot
from reconciliation.checks import RollforwardCheck
from reconciliation.reconcile import reconcile
from sandbox.formance import FormanceStack, Ledger, Move
from sandbox.server import Fault, Response, json_response
from tests.conftest import fetch, make_source, staging_tables
from tests.hedera_data import BIG_PAYEE, T1, T2, T3, moving_mirror
from tests.sandboxes import now, start

CLIENT, SECRET = "movements-test", "movements-secret-5b1e"
CREDS = Credentials(login=CLIENT, password=SECRET)
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
ASSETS = {"USD/2": 2, "EUR/2": 2, "COIN": 0, "ETH/18": 18}
GIB = 1024**3


def ledger_source(server, name: str = "ledger", **keys):
    return make_source(name, provider="formance", base_url=server.url, ledger="main", api="v2", page_size=7,
                       pit_margin=0, **keys)


def random_ledger(rng: random.Random, transfers: int = 120) -> Ledger:
    """Transfers among 12 accounts in four assets over two days, some inserted late (backdated)."""
    ledger = Ledger()
    accounts = [f"users:{i:03d}" for i in range(12)]
    for _ in range(transfers):
        at = T0 + timedelta(seconds=rng.randrange(0, 2 * 86_400), microseconds=rng.randrange(1_000_000))
        inserted = at + timedelta(seconds=rng.choice([0, 0, 0, rng.randrange(1, 20_000)]))
        asset = rng.choice(list(ASSETS))
        source = rng.choice(["world"] + accounts)
        destination = rng.choice([a for a in accounts if a != source])
        amount = rng.randrange(1, 10**rng.randrange(1, 30))
        ledger.transfer(at, source, destination, asset, amount, inserted=inserted)
    return ledger


def load_around(db, source, as_of: datetime, credentials=CREDS) -> list[dict]:
    """What the DAG does after a publish: the windows the snapshot bounds, planned, crawled, published."""
    summaries = []
    for window in movements.windows_around(db, source, as_of):
        summaries += movements.load_windows(db, source, [window], credentials=credentials)
    return summaries


def statement(db, source: str = "ledger") -> list[tuple]:
    return fetch(db, """
        SELECT period_start, period_end, account, asset, opening, inflow, outflow, closing, unexplained, status
          FROM balance_rollforward WHERE source = %s ORDER BY period_end, account, asset""", (source,))


def held_windows(db, source: str = "ledger") -> list[tuple]:
    return fetch(db, "SELECT period_start, period_end FROM movement_runs WHERE source = %s"
                     " AND status IN ('published', 'not_available') ORDER BY period_end", (source,))


def published_times(db, source: str = "ledger") -> list[datetime]:
    return [r[0] for r in fetch(db, "SELECT as_of FROM balance_snapshots WHERE source = %s ORDER BY as_of",
                                (source,))]


def expected_flows(ledger: Ledger, start: datetime, end: datetime) -> dict:
    """(account, asset) -> (inflow, outflow) of the moves inserted in (start, end], from the fake's own book."""
    flows: dict = {}
    for move in ledger.moves:
        if start < move.inserted_at <= end:
            inflow, outflow = flows.get((move.account, move.asset), (0, 0))
            flows[(move.account, move.asset)] = ((inflow + move.amount, outflow) if move.amount >= 0
                                                 else (inflow, outflow - move.amount))
    return flows


# --- the roll-forward holds, and sees one wrong movement ------------------------------------


@pytest.mark.parametrize("seed", [7, 2027])
def test_random_books_roll_forward_exactly_and_one_altered_movement_is_one_break(db, serve, seed):
    rng = random.Random(seed)
    ledger = random_ledger(rng)
    server = serve(FormanceStack({"main": ledger}, clients={CLIENT: SECRET}))
    source = ledger_source(server)
    times = sorted(T0 + timedelta(seconds=rng.randrange(3_600, 3 * 86_400), microseconds=rng.randrange(10**6))
                   for _ in range(6))
    # Backfilled in shuffled order, each publish followed by its windows as the DAG loads them:
    # a snapshot landing inside a loaded window splits it.
    for at in rng.sample(times, len(times)):
        assert take_snapshot(db, source, at, credentials=CREDS)["status"] == "published"
        load_around(db, source, at)
    assert held_windows(db) == list(zip(times, times[1:]))
    superseded = fetch(db, "SELECT count(*) FROM movement_runs WHERE status = 'superseded'")[0][0]
    rows = statement(db)
    assert rows and {r[9] for r in rows} == {"explained"} and {r[8] for r in rows} == {0}
    # Each window's flows are the fake's own book of moves inserted in it, to the last unit.
    for start, end in zip(times, times[1:]):
        flows = {(r[2], r[3]): (r[5], r[6]) for r in rows if r[1] == end and (r[5] or r[6])}
        assert flows == {k: v for k, v in expected_flows(ledger, start, end).items() if v != (0, 0)}
    assert superseded >= 0  # how many depends on the order; the windows held are exactly the consecutive ones

    check = {"ledger_roll": RollforwardCheck("ledger_roll", "ledger", "formance")}
    assert reconcile(db, check, times[0], times[-1]).breaks_open == 0
    # One movement altered by d: exactly one break, on its holding, at its window's end, of -d.
    [(movement_id, account, asset, end)] = fetch(db, """
        SELECT m.movement_id, m.account, m.asset, r.period_end FROM balance_movements m
          JOIN movement_runs r USING (run_id) ORDER BY m.movement_id OFFSET %s LIMIT 1""",
                                                 (rng.randrange(fetch(db, "SELECT count(*) FROM balance_movements")[0][0]),))
    d = rng.randrange(1, 10**20)
    fetch(db, "UPDATE balance_movements SET amount = amount + %s WHERE movement_id = %s RETURNING 1", (d, movement_id))
    run = reconcile(db, check, times[0], times[-1])
    assert run.breaks_open == 1
    [(kind, subject, check_time, left, right, difference)] = fetch(db, """
        SELECT kind, subject, check_time, left_value, right_value, difference FROM reconciliation_breaks
         WHERE status = 'open'""")
    assert (kind, subject, check_time) == ("unexplained_change", {"source": "ledger", "account": account,
                                                                  "asset": asset}, end)
    assert difference == left - right == -Decimal(d).scaleb(-ASSETS[asset])
    # Put back: the break resolves.
    fetch(db, "UPDATE balance_movements SET amount = amount - %s WHERE movement_id = %s RETURNING 1", (d, movement_id))
    run = reconcile(db, check, times[0], times[-1])
    assert (run.breaks_open, run.breaks_resolved) == (0, 1)


def test_a_change_the_movements_do_not_explain_is_a_break_with_both_sides(db, serve):
    ledger = Ledger().transfer(T0, "world", "users:001", "USD/2", 10_000)
    ledger.transfer(T0 + timedelta(hours=2), "users:001", "users:002", "USD/2", 2_500)
    app = FormanceStack({"main": ledger}, clients={CLIENT: SECRET})
    server = serve(app)
    source = ledger_source(server)
    first, second = T0 + timedelta(hours=1), T0 + timedelta(hours=3)
    take_snapshot(db, source, first, credentials=CREDS)
    # Between the window's crawl and the reconciliation nothing changes; but the ledger's listing of
    # the window misses one move, as a provider that loses a posting would.
    app.ledgers["main"].moves.append(Move(T0 + timedelta(hours=2, minutes=30), "users:002", "USD/2", 99))
    take_snapshot(db, source, second, credentials=CREDS)
    app.ledgers["main"].moves.pop()
    load_around(db, source, second)
    rows = {(r[2], r[3]): r[4:] for r in statement(db)}
    assert rows[("users:002", "USD/2")] == (None, 2_500, 0, 2_599, 99, "unexplained")
    check = RollforwardCheck("ledger_roll", "ledger", "formance", tolerance=Decimal("0.5"))
    reconcile(db, {"ledger_roll": check}, first, second)
    [(kind, left, right, difference, tolerance, detail)] = fetch(db, """
        SELECT kind, left_value, right_value, difference, tolerance, detail FROM reconciliation_breaks""")
    assert (kind, left, right, difference, tolerance) == ("unexplained_change", Decimal("25.99"), Decimal("25.00"),
                                                          Decimal("0.99"), Decimal("0.5"))
    assert "explain 25.00" in detail
    # Within a wider tolerance, or filtered to other accounts: no break.
    for wider in (RollforwardCheck("ledger_roll", "ledger", "formance", tolerance=Decimal("0.99")),
                  RollforwardCheck("ledger_roll", "ledger", "formance", accounts=("users:001",)),
                  RollforwardCheck("ledger_roll", "ledger", "formance", assets=("EUR/2",))):
        assert reconcile(db, {"ledger_roll": wider}, first, second).breaks_open == 0


def test_movements_on_a_holding_no_snapshot_lists_are_their_own_break(db, serve):
    ledger = Ledger().transfer(T0, "world", "users:001", "USD/2", 10_000)
    app = FormanceStack({"main": ledger}, clients={CLIENT: SECRET})

    def ghost(request):
        response = app(request)
        if request.path.endswith("/volumes") and any(k == "startTime" for k, _ in request.query):
            body = json.loads(response.body)
            body["cursor"]["data"].append({"account": "ghost:1", "asset": "USD/2", "input": 7, "output": 3,
                                           "balance": 4})
            response = json_response(body)
        return response

    server = serve(ghost)
    source = ledger_source(server)
    for hours in (1, 2):
        take_snapshot(db, source, T0 + timedelta(hours=hours), credentials=CREDS)
    load_around(db, source, T0 + timedelta(hours=2))
    check = RollforwardCheck("ledger_roll", "ledger", "formance")
    reconcile(db, {"ledger_roll": check}, T0, T0 + timedelta(hours=2))
    assert fetch(db, "SELECT kind, subject->>'account', left_value, right_value, difference FROM reconciliation_breaks"
                 ) == [("movement_without_holding", "ghost:1", None, Decimal("0.04"), None)]


# --- windows: any order, once, whole ---------------------------------------------------------


def test_windows_load_in_any_order_and_reruns_add_nothing(db, serve):
    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url, limit=2)
    for ts in (T3, T1, T2):  # published in any order
        assert take_snapshot(db, source, _after(ts))["status"] == "published"
    windows = movements.missing_windows(db, source)
    assert [(w.start_raw, w.end_raw) for w in windows] == [(T1, T2), (T2, T3)]
    movements.load_windows(db, source, windows[::-1])  # the later window first
    first = fetch(db, "SELECT run_id, movements FROM movement_runs ORDER BY run_id")
    stored = fetch(db, "SELECT count(*), sum(amount) FROM balance_movements")
    # (T2, T3] first: five transactions, 22 legs; then (T1, T2]: two payments, 8 legs.
    assert [r[1] for r in first] == [22, 8]
    requests = server.request_count
    # A rerun: nothing missing, nothing read, nothing stored twice.
    assert movements.load_windows(db, source, movements.missing_windows(db, source)) == []
    assert movements.load_windows(db, source, windows) == []
    assert server.request_count == requests
    assert fetch(db, "SELECT run_id, movements FROM movement_runs ORDER BY run_id") == first
    assert fetch(db, "SELECT count(*), sum(amount) FROM balance_movements") == stored
    assert {r[9] for r in statement(db, "mirror")} == {"explained"}


def test_a_snapshot_backfilled_inside_a_loaded_window_splits_it(db, serve):
    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url)
    for ts in (T1, T3):
        take_snapshot(db, source, _after(ts))
    [wide] = load_around(db, source, _time(T3))
    assert (wide["start_raw"], wide["end_raw"], wide["status"]) == (T1, T3, "published")
    wide_movements = fetch(db, "SELECT count(*) FROM balance_movements")[0][0]
    take_snapshot(db, source, _after(T2))
    # The windows on either side of T2, and the wide one gone with its movements, in the same transaction
    # as the first of them.
    halves = load_around(db, source, _time(T2))
    assert [(h["start_raw"], h["end_raw"], h["status"]) for h in halves] == [(T1, T2, "published"),
                                                                             (T2, T3, "published")]
    assert fetch(db, "SELECT status, error FROM movement_runs WHERE run_id = %s", (wide["run_id"],)) == [
        ("superseded", f"superseded by run {halves[0]['run_id']}, window ({T1}, {T2}]")]
    assert sum(h["movements"] for h in halves) == wide_movements == fetch(db, "SELECT count(*) FROM balance_movements"
                                                                           )[0][0]
    assert held_windows(db, "mirror") == [(_time(T1), _time(T2)), (_time(T2), _time(T3))]
    assert {r[9] for r in statement(db, "mirror")} == {"explained"}


def test_a_window_no_longer_a_window_when_it_publishes_is_skipped(db, serve):
    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url)
    for ts in (T1, T3):
        take_snapshot(db, source, _after(ts))
    [window] = movements.missing_windows(db, source)
    [planned] = movements.plan(db, source, [window])
    movements.crawl(db, source, planned["movement_run"])
    take_snapshot(db, source, _after(T2))  # lands inside the window while it was being read
    result = movements.publish(db, source, planned["movement_run"])
    assert result.status == "skipped" and "a snapshot at" in result.reason and "was published inside it" in result.reason
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]
    assert staging_tables(db) == 0


def test_a_failed_window_stores_nothing_and_the_next_try_loads_it(db, serve):
    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url, limit=1, max_attempts=1)
    for ts in (T1, T2):
        take_snapshot(db, source, _after(ts))
    # The second page of the window's two transactions: the node fails, after the first was staged.
    server.inject(Fault("status", path="/api/v1/transactions", after=1, response=Response(status=400, body=b"{}")))
    with pytest.raises(Exception, match="HTTP 400"):
        movements.load_windows(db, source, movements.missing_windows(db, source))
    assert fetch(db, "SELECT status, pages FROM movement_runs") == [("failed", 1)]
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]
    assert staging_tables(db) == 0
    assert statement(db, "mirror") == []  # no window, no statement: never a partial one
    [summary] = movements.load_windows(db, source, movements.missing_windows(db, source))
    assert summary["status"] == "published" and summary["movements"] > 0
    assert {r[9] for r in statement(db, "mirror")} == {"explained"}


# --- what the statement says, and who may read it --------------------------------------------


def test_the_statement_is_exact_and_readable_by_balances_reader(db, serve, reader):
    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url)
    for ts in (T2, T3):
        take_snapshot(db, source, _after(ts))
    movements.load_windows(db, source, movements.missing_windows(db, source))
    with reader.cursor() as cur:
        cur.execute("""SELECT opening, inflow, outflow, closing, unexplained, closing_text, unexplained_units, status
                         FROM balance_rollforward WHERE account = %s AND asset = 'HBAR'""", (f"0.0.{BIG_PAYEE}",))
        [row] = cur.fetchall()
        cur.execute("SELECT count(*), min(kind), max(kind) FROM balance_movements_detail WHERE account = %s",
                    (f"0.0.{BIG_PAYEE}",))
        detail = cur.fetchone()
        # The tables stay the pipeline's.
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("SELECT * FROM balance_movements")
    reader.rollback()
    assert row == (Decimal(1_050_001), Decimal(2**62), Decimal(0), Decimal(1_050_001 + 2**62), Decimal(0),
                   str(1_050_001 + 2**62), Decimal(0), "explained")
    assert detail == (1, "transfer", "transfer")


# --- providers without movements ------------------------------------------------------------


@pytest.mark.parametrize("provider", ["bitfront", "coreledger"])
def test_a_provider_without_movements_is_not_available_and_never_a_break(db, serve, provider):
    live = start(provider, serve)
    for _ in range(2):
        assert take_snapshot(db, live.source, now(), credentials=live.credentials, force=True)["status"] == "published"
        time.sleep(0.02)  # two present-only snapshots, two times
    requests = live.server.request_count
    [window] = movements.missing_windows(db, live.source)
    assert movements.load_windows(db, live.source, [window], credentials=live.credentials) == []
    assert live.server.request_count == requests  # nothing asked of the provider
    [(status, note)] = fetch(db, "SELECT status, unexplainable->>'*' FROM movement_runs")
    assert status == "not_available" and note.startswith(f"{provider} offers no movement API")
    rows = fetch(db, "SELECT inflow, outflow, unexplained, status FROM balance_rollforward")
    assert rows and set(rows) == {(None, None, None, "not_available")}
    check = RollforwardCheck("roll", live.source.name, provider, available=False)
    run = reconcile(db, {"roll": check}, now() - timedelta(hours=1), now())
    assert run.breaks_open == 0 and run.notes == {"roll": f"roll-forward not available: {provider} offers no movements"}
    # Recorded once: a second look adds nothing.
    assert movements.load_windows(db, live.source, [window]) == []
    assert fetch(db, "SELECT count(*) FROM movement_runs") == [(1,)]


# --- hostile movements, bounded as balances are ----------------------------------------------


class Rewrite:
    """The mirror with each transactions page passed through ``change(body)``."""

    def __init__(self, app, change):
        self.app, self.change = app, change

    def __call__(self, request):
        response = self.app(request)
        if request.path == "/api/v1/transactions" and response.status == 200:
            response = json_response(self.change(json.loads(response.body)))
        return response


def hostile_window(db, serve, change, **keys):
    server = serve(Rewrite(moving_mirror(), change))
    source = make_source("mirror", provider="hedera", base_url=server.url, max_attempts=1, **keys)
    for ts in (T1, T2):
        take_snapshot(db, source, _after(ts))
    return server, source, movements.missing_windows(db, source)


def test_a_transaction_listed_twice_alike_is_stored_once(db, serve):
    _, source, windows = hostile_window(db, serve, lambda b: {**b, "transactions": b["transactions"] * 2})
    [summary] = movements.load_windows(db, source, windows)
    assert summary["status"] == "published"
    assert {r[9] for r in statement(db, "mirror")} == {"explained"}
    assert fetch(db, "SELECT count(*), count(DISTINCT movement_id) FROM balance_movements")[0] == (summary["movements"],) * 2


def test_a_movement_listed_twice_with_other_amounts_fails_the_window_naming_it(db, serve):
    def twice(body):
        if body["transactions"]:
            other = json.loads(json.dumps(body["transactions"][0]))
            other["transfers"][0]["amount"] -= 1
            other["transfers"][-1]["amount"] += 1
            body["transactions"].append(other)
        return body

    _, source, windows = hostile_window(db, serve, twice)
    with pytest.raises(PublishError, match=r"reported movement\(s\) '1700000000.000000002#hbar0'.* twice with "
                                           "different values"):
        movements.load_windows(db, source, windows)
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]
    assert staging_tables(db) == 0


def test_a_transaction_outside_the_window_asked_for_fails_it(db, serve):
    def late(body):
        if body["transactions"]:
            body["transactions"][-1]["consensus_timestamp"] = "1700001700.000000000"  # after the window's end
        return body

    _, source, windows = hostile_window(db, serve, late)
    with pytest.raises(Exception, match=f"asked for transactions after {T1} up to {T2}, got one at 1700001700"):
        movements.load_windows(db, source, windows)
    assert fetch(db, "SELECT status FROM movement_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) > 0 FROM rejected_movements") == [(True,)]  # the page kept, as balances' are


def test_a_movement_another_window_holds_fails_the_window_naming_both(db, serve):
    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url)
    for ts in (T1, T2, T3):
        take_snapshot(db, source, _after(ts))
    first, second = movements.missing_windows(db, source)
    [loaded] = movements.load_windows(db, source, [first])
    # A row of the first window that carries an id the second will bring (a provider reusing ids).
    taken = "1700000900.123456790#hbar0"
    fetch(db, "UPDATE balance_movements SET movement_id = %s WHERE movement_id = %s RETURNING 1",
          (taken, f"{T2}#hbar0"))
    with pytest.raises(PublishError, match=f"already loaded by another window: '{taken}' "
                                           rf"\(window \({T1}, {T2}\], run {loaded['run_id']}\)"):
        movements.load_windows(db, source, [second])
    assert fetch(db, "SELECT status FROM movement_runs ORDER BY run_id") == [("published",), ("failed",)]
    assert fetch(db, "SELECT count(*) FROM balance_movements WHERE run_id <> %s", (loaded["run_id"],)) == [(0,)]


def test_a_next_link_to_another_host_is_refused_and_nothing_stored(db, serve):
    def foreign(body):
        body["links"]["next"] = "http://198.51.100.7/api/v1/transactions?limit=100&timestamp=gt:1"
        return body

    _, source, windows = hostile_window(db, serve, foreign)
    with pytest.raises(PaginationError, match="refusing to follow http://198.51.100.7/.*: it leaves the configured "
                                              "origin"):
        movements.load_windows(db, source, windows)
    assert fetch(db, "SELECT status FROM movement_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]


def test_a_bomb_of_a_transactions_page_fails_at_the_cap(db, serve):
    server, source, windows = hostile_window(db, serve, lambda b: b)
    server.inject(Fault("pad", path="/api/v1/transactions", size=GIB, encoding="gzip"))
    with pytest.raises(ResponseTooLarge, match="max_response_bytes"):
        movements.load_windows(db, source, windows)
    assert fetch(db, "SELECT status, requests FROM movement_runs") == [("failed", 1)]


def test_a_window_of_endless_pages_stops_at_the_page_cap(db, serve):
    def endless(body):  # a link that always leads on, never the same twice, within the window
        body["links"]["next"] = (f"/api/v1/transactions?limit=1&order=asc&timestamp=gt:{T1}&timestamp=lte:{T2}"
                                 f"&account.id=gte:0.0.{random.randrange(10**6)}")
        return body

    _, source, windows = hostile_window(db, serve, endless, max_pages=5)
    with pytest.raises(PaginationError, match="page cap reached: 5 pages"):
        movements.load_windows(db, source, windows)
    assert fetch(db, "SELECT status FROM movement_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]


def _time(raw: str) -> datetime:
    seconds, nanos = raw.split(".")
    return datetime.fromtimestamp(int(seconds), tz=timezone.utc).replace(microsecond=int(nanos) // 1000)


def _after(raw: str) -> datetime:
    """A run time that picks the snapshot ``raw``."""
    return _time(raw) + timedelta(seconds=1)


def test_windows_are_consecutive_published_snapshots():
    window = Window(_time(T1), T1, _time(T2), T2)
    assert str(window) == f"({T1}, {T2}]"


def test_the_cli_loads_the_windows_missing_and_says_what_each_did(db, serve, database_url, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    server = serve(moving_mirror())
    source = make_source("mirror", provider="hedera", base_url=server.url)
    for ts in (T1, T2, T3):
        take_snapshot(db, source, _after(ts))
    config = tmp_path / "balances.toml"
    config.write_text(f'[sources.mirror]\nprovider = "hedera"\nbase_url = "{server.url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(BALANCES_DB_URL=database_url)

    def balances(*args):
        return subprocess.run([sys.executable, "-m", "cli.main", "--config", str(config), "-q", *args],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=120)

    done = balances("movements", "mirror", "--to", _time(T2).isoformat())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"window ({T1}, {T2}]: published, 8 movement(s), 1 request(s)"]
    done = balances("movements", "mirror")
    assert done.stdout.splitlines() == [f"window ({T2}, {T3}]: published, 22 movement(s), 2 request(s)"]
    again = balances("movements", "mirror")
    assert (again.returncode, again.stdout.strip()) == (
        0, "mirror: no window to load (every window between its published snapshots is)")
