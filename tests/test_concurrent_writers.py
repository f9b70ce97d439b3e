"""Two writers of one source's history at once, interleaved at every step (migration 0012).

The writers: a publish of the source's newest snapshot, a backfill between
two snapshots already held, a write through the ``balance_history`` view
(an UPDATE, a DELETE) and ``TRUNCATE balance_history_store,
balance_snapshots``. Each pair runs in two real sessions. The first is
stopped before each of its statements in turn, and before its commit; the
second then runs until it has finished or waits for a lock the first holds
(``pg_blocking_pids``); then the first goes on. Whatever the interleaving,
the history must be what the two writes give one after the other, in the
order they committed, and the next publish, which compares against what
they left (through the kept staging where it is valid), must store exactly
its own snapshot.

The TRUNCATEs that would leave the history wrong (the catalog or the stored
rows alone, one month alone) are refused, also while a publish is in
flight, and a write through the view that read a row another transaction
has changed since is refused rather than losing that change.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable

import psycopg2
import psycopg2.extensions
import pytest

from extractors.records import BalanceRow
from loaders import publish
from loaders.db import connect, session_options
from tests.conftest import fetch, reset_database
from tests.test_history_storage import publish_snapshot, stage_snapshot

SOURCE = "race"
T1 = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)
T3 = T1 + timedelta(hours=10)
NEXT = T3 + timedelta(hours=5)  # published after each pair, against what it left
HOLDINGS = 50
WAIT = 30.0  # seconds: a session that neither finishes nor waits by then is a failure


def holdings(**changes) -> dict[str, Decimal]:
    """The provider's snapshot: account 0.0.(1000 + i) -> balance 1000 + i, unless ``h<i>`` changes it
    (None: gone)."""
    out = {f"0.0.{1000 + i}": Decimal(1000 + i) for i in range(HOLDINGS)}
    for key, value in changes.items():
        account = f"0.0.{1000 + int(key.removeprefix('h'))}"
        if value is None:
            del out[account]
        else:
            out[account] = Decimal(value)
    return out


def balance_rows(snapshot: dict[str, Decimal]) -> list[BalanceRow]:
    return [BalanceRow(account, "HBAR", balance, 8) for account, balance in snapshot.items()]


# --- sessions that stop before a given step ------------------------------------------------


class SteppedCursor(psycopg2.extensions.cursor):
    def execute(self, query, vars=None):
        self.connection.step()
        return super().execute(query, vars)


class Stepped(psycopg2.extensions.connection):
    """A session that stops before its statement (or commit) number ``stop_at`` until ``go`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = SteppedCursor
        self.steps = 0
        self.stop_at = -1
        self.stopped = threading.Event()
        self.go = threading.Event()

    def step(self) -> None:
        if self.steps == self.stop_at:
            self.stopped.set()
            if not self.go.wait(WAIT * 2):
                raise RuntimeError("never told to go on")
        self.steps += 1

    def commit(self) -> None:
        self.step()
        super().commit()


def stepped_session(database_url: str) -> Stepped:
    return psycopg2.connect(database_url, connection_factory=Stepped, options=session_options())


# --- the writers --------------------------------------------------------------------------

Model = dict[datetime, dict[str, Decimal]]


@dataclass
class Writer:
    """One write of the source's history: set up, run in one session, and what it does to the model."""

    name: str
    run: Callable  # (conn) -> None, commits
    apply: Callable[[Model], None]
    prepare: Callable = lambda conn: None  # before the interleaving, in another session
    state: dict = field(default_factory=dict)


def publishing(name: str, as_of: datetime, snapshot: dict[str, Decimal]) -> Writer:
    state: dict = {}

    def prepare(conn) -> None:
        state["run"] = stage_snapshot(conn, SOURCE, as_of, balance_rows(snapshot))

    def apply(model: Model) -> None:
        model[as_of] = dict(snapshot)

    return Writer(name, lambda conn: publish.publish(conn, state["run"]), apply, prepare, state)


def through_the_view(name: str, statement: str, account: str, change: Callable) -> Writer:
    def run(conn) -> None:
        with conn.cursor() as cur:
            cur.execute(statement, (SOURCE, T3, account))
        conn.commit()

    def apply(model: Model) -> None:
        if T3 in model:
            change(model[T3])

    return Writer(name, run, apply)


def truncating(name: str) -> Writer:
    def run(conn) -> None:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE balance_history_store, balance_snapshots")
        conn.commit()

    return Writer(name, run, lambda model: model.clear())


def writer(kind: str, n: int) -> Writer:
    """Writer ``kind``, instance ``n`` (1 or 2): two of a kind never write the same thing."""
    if kind == "publish":  # the newest snapshot: compared with T3's (kept staging or history)
        changes = {"h1": 2000 + n} | ({"h4": None} if n == 2 else {})
        return publishing(f"publish#{n}", T3 + timedelta(hours=n), holdings(**changes))
    if kind == "backfill":  # between T1 and T3: stored against T1, and T3 stored again against it
        return publishing(f"backfill#{n}", T1 + timedelta(hours=n), holdings(h2=3000 + n))
    if kind == "view":
        if n == 1:
            return through_the_view("update#1", "UPDATE balance_history SET balance = 999"
                                    " WHERE source = %s AND as_of = %s AND account = %s", "0.0.1000",
                                    lambda held: held.__setitem__("0.0.1000", Decimal(999)))
        return through_the_view("delete#2", "DELETE FROM balance_history"
                                " WHERE source = %s AND as_of = %s AND account = %s", "0.0.1003",
                                lambda held: held.pop("0.0.1003", None))
    return truncating(f"truncate#{n}")


KINDS = ("publish", "backfill", "view", "truncate")


# --- one interleaving ---------------------------------------------------------------------


def base(db) -> Model:
    """The source before each pair: snapshots T1 and T3 of one month, T3 kept as staged."""
    reset_database(db)
    model = {}
    for as_of in (T1, T3):
        model[as_of] = holdings()
        publish_snapshot(db, SOURCE, as_of, balance_rows(model[as_of]))
    return model


def blocked_by(observer, waiting: int, holder: int) -> bool:
    return fetch(observer, "SELECT %s = ANY(pg_blocking_pids(%s))", (holder, waiting))[0][0]


def wait_until_blocked(observer, waiting, holder, what: str) -> None:
    """Until session ``waiting`` waits for a lock ``holder`` holds."""
    deadline = time.monotonic() + WAIT
    while not blocked_by(observer, waiting.info.backend_pid, holder.info.backend_pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def in_thread(conn, statement: str, params=()) -> tuple[threading.Thread, dict]:
    """Run ``statement`` and commit in a thread; the outcome gets its ``error``, if any."""
    outcome: dict = {}

    def run() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
            conn.commit()
        except psycopg2.Error as exc:
            outcome["error"] = exc
            conn.rollback()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@dataclass
class Outcome:
    stopped: bool  # the first writer reached the step it was to stop before
    order: list[str]  # commit order
    errors: dict[str, BaseException]
    second_waited: bool


def interleave(database_url: str, observer, first: Writer, second: Writer, step: int) -> Outcome:
    """Run ``first`` stopped before its ``step``-th statement, ``second`` meanwhile, then both to the end."""
    a = stepped_session(database_url)
    b = connect(database_url)
    a.stop_at = step
    errors: dict[str, BaseException] = {}
    done: dict[str, threading.Event] = {first.name: threading.Event(), second.name: threading.Event()}

    def run(w: Writer, conn) -> None:
        try:
            w.run(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors[w.name] = exc
            conn.rollback()
        finally:
            done[w.name].set()

    try:
        ta = threading.Thread(target=run, args=(first, a))
        ta.start()
        deadline = time.monotonic() + WAIT
        while not (a.stopped.is_set() or done[first.name].is_set()):
            assert time.monotonic() < deadline, f"{first.name} neither stopped nor finished"
            time.sleep(0.005)
        stopped = a.stopped.is_set()
        tb = threading.Thread(target=run, args=(second, b))
        tb.start()
        waited = False
        deadline = time.monotonic() + WAIT
        while not done[second.name].is_set():
            if stopped and blocked_by(observer, b.info.backend_pid, a.info.backend_pid):
                waited = True
                break
            assert time.monotonic() < deadline, f"{second.name} neither finished nor waited for {first.name}"
            time.sleep(0.005)
        a.go.set()
        ta.join(WAIT)
        tb.join(WAIT)
        assert not ta.is_alive() and not tb.is_alive(), "a session hung"
        # The second committed first unless it waited for the first, still open.
        order = [first.name, second.name] if (waited or not stopped) else [second.name, first.name]
        return Outcome(stopped, order, errors, waited)
    finally:
        a.close()
        b.close()


def held(db) -> Model:
    found: Model = {}
    for as_of, account, balance in fetch(db, "SELECT as_of, account, balance FROM balance_history"
                                             " WHERE source = %s ORDER BY as_of, account", (SOURCE,)):
        found.setdefault(as_of, {})[account] = balance
    for (as_of,) in fetch(db, "SELECT as_of FROM balance_snapshots WHERE source = %s AND holdings = 0", (SOURCE,)):
        found.setdefault(as_of, {})
    return found


def check(db, model: Model, what: str) -> None:
    got = held(db)
    assert sorted(got) == sorted(model), what
    for as_of, expected in model.items():
        wrong = {a: (got[as_of].get(a), b) for a, b in expected.items() if got[as_of].get(a) != b}
        extra = set(got[as_of]) - set(expected)
        assert not wrong and not extra, f"{what}: at {as_of:%H:%M} held/expected {wrong}, not expected {extra}"
        assert [str(b) for b in got[as_of].values()] == [str(expected[a]) for a in got[as_of]], what
    counted = dict(fetch(db, "SELECT as_of, holdings FROM balance_snapshots WHERE source = %s", (SOURCE,)))
    assert counted == {as_of: len(h) for as_of, h in model.items()}, what


@pytest.mark.parametrize("second_kind", KINDS)
@pytest.mark.parametrize("first_kind", KINDS)
def test_two_writers_interleaved_at_every_step_leave_the_history_exact(db, database_url, first_kind, second_kind):
    observer = connect(database_url)
    try:
        step, waits = 0, 0
        while True:
            first, second = writer(first_kind, 1), writer(second_kind, 2)
            model = base(db)
            first.prepare(db)
            second.prepare(db)
            outcome = interleave(database_url, observer, first, second, step)
            what = f"{first.name} stopped before step {step}, {second.name} meanwhile"
            assert outcome.errors == {}, what
            for name in outcome.order:
                (first if name == first.name else second).apply(model)
            check(db, model, what)
            # The next publish compares against what the pair left, and stores exactly its snapshot.
            following = holdings(h5=5005)
            publish_snapshot(db, SOURCE, NEXT, balance_rows(following))
            model[NEXT] = following
            check(db, model, f"{what}, then the next publish")
            waits += outcome.second_waited
            if not outcome.stopped:
                break
            step += 1
    finally:
        observer.close()
    assert step >= 2  # every writer has at least a statement and a commit
    if first_kind != "truncate" or second_kind != "truncate":
        assert waits > 0  # some step held the second back: the pair did take turns


# --- what is refused ---------------------------------------------------------------------------


def test_a_write_through_the_view_of_a_row_changed_since_it_was_read_is_refused(db, database_url):
    """Two ``balance = balance - 1`` on one holding: the second would lose the first."""
    base(db)
    minus_one = ("UPDATE balance_history SET balance = balance - 1"
                 " WHERE source = %s AND as_of = %s AND account = '0.0.1000'")
    first, second = connect(database_url), connect(database_url)
    try:
        with first.cursor() as cur:
            cur.execute(minus_one, (SOURCE, T3))
        worker, result = in_thread(second, minus_one, (SOURCE, T3))
        wait_until_blocked(db, second, first, "the second write did not wait for the first")
        first.commit()
        worker.join(WAIT)
    finally:
        first.close()
        second.close()
    assert isinstance(result.get("error"), psycopg2.errors.SerializationFailure)
    assert "changed by another transaction since this statement read it" in str(result["error"])
    assert held(db)[T3]["0.0.1000"] == Decimal(999)
    # Run again, it reads the row as it is now.
    with db.cursor() as cur:
        cur.execute(minus_one, (SOURCE, T3))
    db.commit()
    assert held(db)[T3]["0.0.1000"] == Decimal(998)


@pytest.mark.parametrize("statement, refusal", [
    ("TRUNCATE balance_snapshots", "TRUNCATE balance_snapshots alone would orphan the stored history"),
    ("TRUNCATE balance_history_store", "would leave 3 snapshot(s) listed in balance_snapshots without their"),
    ("TRUNCATE balance_history_2026_11", "would leave 3 snapshot(s) of its month listed in balance_snapshots"),
])
def test_a_truncate_that_would_leave_the_history_wrong_is_refused_also_mid_publish(db, database_url, statement,
                                                                                   refusal):
    """The issue's cases: a publish in flight with the kept staging, and a TRUNCATE of one table."""
    model = base(db)
    following = holdings(h7=7)
    run_id = stage_snapshot(db, SOURCE, NEXT, balance_rows(following))
    a = stepped_session(database_url)
    a.stop_at = 20  # inside the publish: its turn taken, the kept staging read
    truncator = connect(database_url)
    outcome: dict = {}
    try:
        publisher = threading.Thread(target=lambda: outcome.setdefault("published", publish.publish(a, run_id)))
        publisher.start()
        assert a.stopped.wait(WAIT)
        worker, truncated = in_thread(truncator, statement)
        wait_until_blocked(db, truncator, a, "the TRUNCATE did not wait for the publish")
        a.go.set()
        publisher.join(WAIT)
        worker.join(WAIT)
    finally:
        a.close()
        truncator.close()
    assert outcome["published"].rows_stored == 1
    assert isinstance(truncated.get("error"), psycopg2.errors.RestrictViolation)
    message = truncated["error"].diag.message_primary
    assert refusal in message and "\n" not in message
    model[NEXT] = following
    check(db, model, statement)
    # And with nothing in flight, the same: refused, nothing changed.
    with pytest.raises(psycopg2.errors.RestrictViolation, match="would"):
        with db.cursor() as cur:
            cur.execute(statement)
    db.rollback()
    later = holdings(h7=8)
    assert publish_snapshot(db, SOURCE, NEXT + timedelta(hours=1), balance_rows(later)).rows_stored == 1
    model[NEXT + timedelta(hours=1)] = later
    check(db, model, f"{statement}, then the next publish")


def test_a_month_goes_with_its_snapshots_and_the_history_stays_exact(db):
    model = base(db)
    with db.cursor() as cur:
        cur.execute("DELETE FROM balance_snapshots WHERE month_start = '2026-11-01T00:00:00Z'")
        cur.execute("TRUNCATE balance_history_2026_11")
    db.commit()
    assert held(db) == {}
    model = {NEXT: holdings(h9=9)}
    assert publish_snapshot(db, SOURCE, NEXT, balance_rows(model[NEXT])).rows_stored == HOLDINGS  # a keyframe
    check(db, model, "after the month went")


@pytest.mark.parametrize("deleted, as_of", [
    ("all", NEXT),  # the newest of its month, with nothing before it listed: a keyframe
    ("first", T1 + timedelta(hours=1)),  # before T3, after T1's rows: a backfill becoming the keyframe
])
def test_stored_rows_no_snapshot_lists_are_refused_under_a_keyframe(db, deleted, as_of):
    """A catalog edited by hand (DELETE, which a TRUNCATE check cannot see) must not let old rows show through."""
    base(db)
    before = fetch(db, "SELECT count(*) FROM balance_history_store")
    with db.cursor() as cur:
        cur.execute("DELETE FROM balance_snapshots WHERE source = %s AND (%s = 'all' OR as_of = %s)",
                    (SOURCE, deleted, T1))
    db.commit()
    with pytest.raises(psycopg2.errors.DataCorrupted) as caught:
        publish_snapshot(db, SOURCE, as_of, balance_rows(holdings(h0=None)))
    assert f"balance_history_store holds rows of {SOURCE} before" in str(caught.value)
    assert fetch(db, "SELECT status, error LIKE '%%does not list%%' FROM snapshot_runs ORDER BY run_id DESC"
                     " LIMIT 1") == [("failed", True)]
    assert fetch(db, "SELECT count(*) FROM balance_history_store") == before
