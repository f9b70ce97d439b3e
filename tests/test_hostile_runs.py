"""Hostile runs: locks, failures, reruns (issue 17, the database side).

What a hostile provider, a careless operator and a read-only dashboard
login tried, each against the real PostgreSQL of the session and the
sandbox fakes:

* a login in ``balances_reader`` takes every plausible advisory lock and
  holds an open transaction on every view: snapshot, publish, partition
  creation and reconcile still complete promptly, and every stronger lock
  it tries is refused;
* every wait on the database has an end (``statement_timeout``,
  ``lock_timeout``), and a run that hits one ends ``failed`` saying so;
* a NUL (and a lone surrogate) in a provider's error text: the run ends
  ``failed`` with the real error, also when the database connection is
  gone while the failure is recorded, and the 400 is never retried;
* a killed reconciliation is reaped by the next one, as snapshot runs are;
* a second run of a present-only interval stores nothing and says so;
* a 1970 snapshot for a 2024 request is refused.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg2
import psycopg2.errors
import pytest
from alembic import command
from airflow.sdk.exceptions import AirflowFailException

from extractors.credentials import Credentials
from extractors.errors import MalformedResponseError, ProviderError, TransportError
from extractors.records import BalanceRow
from loaders import leases, partitions, runs
from loaders.db import LOCK_TIMEOUT, STATEMENT_TIMEOUT, connect, reconnect_like
from loaders.migrate import alembic_config, current_revision, upgrade
from loaders.publish import PublishError, publish
from loaders.staging import StagingWriter
from pipeline import tasks
from reconciliation.checks import parse_checks
from pipeline.config import ConfigError
from reconciliation.reconcile import reconcile
from pipeline.snapshot import SnapshotTooFar, begin, check_snapshot_age, crawl, take_snapshot
from pipeline.snapshot import publish as publish_run
from sandbox.bitfront import SANDBOX_KEY, SANDBOX_SECRET, BitfrontExchange, holding
from sandbox.hedera import HederaMirror, Snapshot
from sandbox.server import Fault, json_response
from tests.conftest import REPO, fetch, load_dag, make_source, staging_tables, wait_for, write_config
from tests.hedera_data import book, mirror
from tests.test_views import scratch_database

AFTER_T3 = datetime(2023, 11, 14, 23, 0, tzinfo=timezone.utc)
BITFRONT = Credentials(login=SANDBOX_KEY, password=SANDBOX_SECRET)
# Generous for a 2-core machine shared with other test runs; a blocked
# lock would take LOCK_TIMEOUT (30 s) and then fail instead.
PROMPT = 20.0


def now() -> datetime:
    return datetime.now(timezone.utc)


def gone(db, conn) -> None:
    """Close ``conn`` and wait until the server has ended its session (that is asynchronous)."""
    pid = conn.info.backend_pid
    conn.close()
    wait_for(lambda: fetch(db, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(0,)],
             what=f"backend {pid} to exit")


def stage(conn, source: str, as_of: datetime, rows: list[BalanceRow]) -> int:
    run_id = runs.start_run(conn, source, "hedera", as_of)
    runs.set_snapshot(conn, run_id, as_of, as_of.isoformat())
    writer = StagingWriter(conn, run_id, 0)
    writer.add(rows)
    writer.close()
    return run_id


# --- every wait has an end ------------------------------------------------------------------


def test_every_session_has_a_statement_and_a_lock_timeout(db):
    budget_conn = reconnect_like(db, application_name="balances-budget")
    try:
        for conn in (db, budget_conn):
            assert fetch(conn, "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')") \
                == [("15min", "30s")]
    finally:
        budget_conn.close()
    assert (STATEMENT_TIMEOUT, LOCK_TIMEOUT) == (timedelta(minutes=15), timedelta(seconds=30))


def test_a_statement_that_runs_too_long_is_cancelled_with_a_clear_error(database_url):
    conn = connect(database_url, statement_timeout=timedelta(seconds=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(psycopg2.errors.QueryCanceled, match="statement timeout"):
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 10
    finally:
        conn.close()


def test_a_publish_that_waits_too_long_for_a_lock_fails_saying_so_then_a_retry_publishes(db, database_url):
    as_of = datetime(2023, 11, 14, 22, 50, tzinfo=timezone.utc)
    run_id = stage(db, "waits", as_of, [BalanceRow(f"0.0.{i}", "HBAR", i, 8) for i in range(100)])
    partitions.ensure_partition(db, as_of)
    blocker = connect(database_url)
    publisher = connect(database_url, lock_timeout=timedelta(seconds=1))
    try:
        with blocker.cursor() as cur:  # an operator's maintenance, say: inserts must wait
            cur.execute("LOCK TABLE balance_history IN SHARE MODE")
        started = time.monotonic()
        with pytest.raises(psycopg2.errors.LockNotAvailable, match="lock timeout"):
            publish(publisher, run_id)
        assert time.monotonic() - started < 10
        (status, error), = fetch(db, "SELECT status, error FROM snapshot_runs")
        assert status == "failed" and error.startswith("LockNotAvailable: canceling statement due to lock timeout")
        assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]

        blocker.rollback()
        result = publish(publisher, run_id)  # the task's retry: the failed run is picked up again
        assert (result.status, result.rows_published) == ("published", 100)
        assert fetch(db, "SELECT status, error FROM snapshot_runs") == [("published", None)]
    finally:
        blocker.close()
        publisher.close()


# --- locks a reader cannot take or block ----------------------------------------------------

READER_VIEWS = ("balance_history_units", "balance_latest", "balance_daily_close", "balance_changes",
                "source_freshness", "reconciliation_breaks_detail", "reconciliation_breaks_daily",
                "pipeline_runs", "rejection_reasons", "balances_latest", "balances_daily_close")


def refused(conn, statement: str) -> Exception:
    """Run ``statement`` in a savepoint of the reader's open transaction; return its error."""
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT attempt")
        try:
            cur.execute(statement)
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT attempt")
            return exc
    raise AssertionError(f"the reader was allowed: {statement}")


def test_a_reader_login_cannot_stall_a_snapshot_publish_partition_or_reconcile(db, reader, serve):
    reader_pid = reader.info.backend_pid
    with reader.cursor() as cur:
        # Every advisory key the pipeline ever used or might: run ids are
        # predictable (the table was just emptied, the next run is 1).
        cur.execute("SELECT pg_advisory_lock(ns, k) FROM generate_series(7310, 7316) ns,"
                    " generate_series(0, 64) k")
        cur.execute("SELECT pg_advisory_lock(hashtext('balance_history_' || to_char(m, 'YYYY_MM')))"
                    " FROM generate_series(timestamp '2023-01-01', timestamp '2045-12-01', interval '1 month') m")
        cur.execute("SELECT pg_advisory_lock(k) FROM generate_series(0, 200) k")
        # A dashboard that left a transaction open on every view.
        for view in READER_VIEWS:
            cur.execute(f"SELECT count(*) FROM {view}")
    # Anything stronger than reading is refused, and the transaction stays open.
    attempts = [f"LOCK TABLE {view} IN {mode} MODE" for view in READER_VIEWS
                for mode in ("ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE",
                             "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE")]
    attempts += [f"SELECT * FROM {view} {lock}" for view in READER_VIEWS
                 for lock in ("FOR UPDATE", "FOR NO KEY UPDATE", "FOR SHARE", "FOR KEY SHARE")]
    attempts += [f"LOCK TABLE {table} IN ACCESS SHARE MODE"
                 for table in ("balance_history", "snapshot_runs", "run_leases", "source_locks",
                               "reconciliation_runs", "reconciliation_breaks", "request_budgets")]
    attempts += ["SELECT * FROM run_leases", "SELECT * FROM source_locks FOR UPDATE",
                 "INSERT INTO run_leases VALUES ('snapshot', 1, -1, pg_backend_pid(), now(), 10)",
                 "INSERT INTO source_locks VALUES ('hostile')",
                 "SELECT balance_history_ensure_partition('2044-04-01')",
                 "SELECT balance_history_take_turn('hostile')"]  # the writers' turn (0012)
    for statement in attempts:
        error = refused(reader, statement)
        assert isinstance(error, psycopg2.errors.InsufficientPrivilege), (statement, error)

    server = serve(mirror(accounts=120))
    source = make_source("hostile_reader", provider="hedera", base_url=server.url, limit=25)
    new_month = datetime(2044, 7, 1, tzinfo=timezone.utc)
    assert fetch(db, "SELECT to_regclass('balance_history_2044_07')") == [(None,)]

    started = time.monotonic()
    summary = take_snapshot(db, source, AFTER_T3)
    snapshot_seconds = time.monotonic() - started
    assert summary["status"] == "published" and summary["rows_inserted"] == 121 + 24
    assert snapshot_seconds < PROMPT

    started = time.monotonic()
    name = partitions.ensure_partition(db, new_month)  # CREATE TABLE + ATTACH, not PARTITION OF
    partition_seconds = time.monotonic() - started
    assert name == "balance_history_2044_07" and partition_seconds < PROMPT
    assert fetch(db, "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'balance_history_2044_07'::regclass"
                     " AND inhparent = 'balance_history_store'::regclass") == [(1,)]

    run_id = stage(db, "hostile_reader", new_month + timedelta(days=3),
                   [BalanceRow("0.0.98", "HBAR", 5, 8), BalanceRow("0.0.99", "HBAR", 7, 8)])
    started = time.monotonic()
    assert publish(db, run_id).rows_published == 2
    publish_seconds = time.monotonic() - started
    assert publish_seconds < PROMPT

    checks = parse_checks({"hostile_continuity": {"kind": "continuity", "source": source.name}},
                          {source.name: source})
    started = time.monotonic()
    result = reconcile(db, checks, AFTER_T3 - timedelta(days=1), AFTER_T3 + timedelta(hours=1))
    reconcile_seconds = time.monotonic() - started
    assert result.status == "succeeded" and reconcile_seconds < PROMPT

    # The reader really was there all along: its transaction and locks are still held.
    held = fetch(db, "SELECT count(*) FILTER (WHERE locktype = 'advisory'),"
                     " count(*) FILTER (WHERE locktype = 'relation' AND relation = 'balance_history'::regclass)"
                     " FROM pg_locks WHERE pid = %s AND granted", (reader_pid,))
    assert held[0][0] == 7 * 65 + 276 + 201 and held[0][1] == 1
    assert fetch(db, "SELECT state FROM pg_stat_activity WHERE pid = %s", (reader_pid,)) == [("idle in transaction",)]
    print(f"\nwith a hostile reader: snapshot {snapshot_seconds:.2f} s, partition {partition_seconds:.3f} s, "
          f"publish {publish_seconds:.3f} s, reconcile {reconcile_seconds:.3f} s")
    reader.rollback()


def test_a_live_holder_keeps_its_run_and_its_end_lets_the_run_be_reaped(db, database_url):
    holder = connect(database_url)
    run_id = runs.start_run(holder, "leased", "hedera", AFTER_T3, hold=True)
    assert runs.reap_abandoned(db, "leased") == []
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("running",)]
    gone(db, holder)  # the process died: its session, and so its lease, is gone
    assert runs.reap_abandoned(db, "leased") == [run_id]
    assert fetch(db, "SELECT status, error FROM snapshot_runs") == [
        ("abandoned", "the process taking this snapshot stopped before publishing it")]
    assert fetch(db, "SELECT count(*) FROM run_leases") == [(0,)]


def test_a_retried_shard_waits_for_a_live_predecessor_and_gives_up_saying_why(db, database_url):
    run_id = runs.start_run(db, "zombie", "hedera", AFTER_T3, shards=2)
    zombie = connect(database_url)
    retry = connect(database_url)
    try:
        leases.claim(zombie, leases.SNAPSHOT, run_id, 0)
        leases.claim(retry, leases.SNAPSHOT, run_id, 1)  # another shard: side by side
        started = time.monotonic()
        with pytest.raises(leases.RunBusy, match=r"shard 0: another session \(database pid [0-9]+\)"):
            leases.claim(retry, leases.SNAPSHOT, run_id, 0, wait=timedelta(seconds=1))
        assert 1 <= time.monotonic() - started < 10
        with pytest.raises(leases.RunBusy, match="whole run|shard 0"):
            leases.claim(retry, leases.SNAPSHOT, run_id, wait=timedelta(seconds=0.3))
        assert runs.reap_abandoned(db, "zombie") == []
        zombie.close()
        started = time.monotonic()
        leases.claim(retry, leases.SNAPSHOT, run_id, 0, wait=timedelta(seconds=30))
        assert time.monotonic() - started < 5  # at once: the zombie's session is gone
    finally:
        zombie.close()
        retry.close()


# --- the failure path cannot fail -----------------------------------------------------------

HOSTILE_MESSAGE = "bad\x00request \ud800 for 0.0.98"


def hostile_400() -> Fault:
    body = json_response({"_status": {"messages": [{"message": HOSTILE_MESSAGE}]}}, status=400)
    return Fault("status", times=1, path="/api/v1/", response=body)


def test_a_nul_in_the_providers_error_fails_the_run_with_the_real_error_and_is_not_retried(db, serve):
    server = serve(mirror(accounts=50))
    server.inject(hostile_400())
    source = make_source("nul_error", provider="hedera", base_url=server.url, limit=10)
    with pytest.raises(AirflowFailException) as raised:
        with tasks.fatal_errors_fail_fast():
            take_snapshot(db, source, AFTER_T3)
    assert isinstance(raised.value.__cause__, ProviderError) and raised.value.__cause__.status == 400
    assert server.request_count == 1
    (status, error), = fetch(db, "SELECT status, error FROM snapshot_runs")
    assert status == "failed" and "bad\ufffdrequest \ufffd for 0.0.98" in error and "400" in error
    assert "\x00" not in error
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)] and staging_tables(db) == 0


def test_a_lost_connection_while_recording_a_failure_keeps_the_real_error(db, database_url, serve):
    crawler = connect(database_url)
    app = mirror(accounts=50)

    def cut_the_database_then_answer(request):
        # The provider's 400 arrives just after the pipeline's session died.
        if "timestamp" in request.raw_query and not getattr(app, "cut", False):
            app.cut = True
            fetch(db, "SELECT pg_terminate_backend(%s)", (crawler.info.backend_pid,))
            return json_response({"_status": {"messages": [{"message": HOSTILE_MESSAGE}]}}, status=400)
        return app(request)

    server = serve(cut_the_database_then_answer)
    source = make_source("cut_off", provider="hedera", base_url=server.url, limit=10)
    with pytest.raises(AirflowFailException) as raised:
        with tasks.fatal_errors_fail_fast():
            take_snapshot(crawler, source, AFTER_T3)
    assert tasks.not_retriable(raised.value.__cause__).status == 400
    crawler.close()
    # Nobody could record it, but nobody holds it either: the next run reaps it.
    server.app = app
    summary = take_snapshot(db, source, AFTER_T3)
    assert summary["status"] == "published"
    assert fetch(db, "SELECT status FROM snapshot_runs ORDER BY run_id") == [("abandoned",), ("published",)]


def test_recording_a_failure_never_raises(db, database_url):
    conn = connect(database_url)
    run_id = runs.start_run(conn, "recorded", "hedera", AFTER_T3)
    assert runs.record_failure(conn, run_id, "ProviderError: " + HOSTILE_MESSAGE * 10_000) is True
    (error,), = fetch(db, "SELECT error FROM snapshot_runs")
    assert len(error) == runs.MAX_ERROR_CHARS and "\x00" not in error
    fetch(db, "SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    assert runs.record_failure(conn, run_id, "TransportError: gone") is False  # logged, not raised
    conn.close()
    assert runs.record_failure(conn, run_id, "TransportError: gone") is False


class Wrapped(RuntimeError):
    pass


def _chain(outer: type[BaseException], inner: BaseException, *, how: str) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            if how == "from":
                raise outer("wrapped") from exc
            raise outer("while handling")
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("exc, fatal", [
    (ProviderError("bad request", status=400), True),
    (ProviderError("unavailable", status=503, retriable=True), False),
    (TransportError("reset"), False),
    (MalformedResponseError("not JSON", raw="<html>"), True),
    (_chain(Wrapped, ProviderError("bad request", status=400), how="from"), True),
    (_chain(psycopg2.DataError, ProviderError("bad\x00request", status=400), how="context"), True),
    (_chain(Wrapped, TransportError("reset"), how="from"), False),
    (_chain(Wrapped, PublishError("changed history"), how="context"), True),
    (_chain(ProviderError, TransportError("reset"), how="from"), True),  # the outermost verdict counts
    (Wrapped("nothing known"), False),
])
def test_a_non_retriable_answer_fails_the_task_whatever_carries_it(exc, fatal):
    with pytest.raises(AirflowFailException if fatal else type(exc)):
        with tasks.fatal_errors_fail_fast():
            raise exc


# --- reconciliations end, whatever happens --------------------------------------------------


def continuity(source_name: str = "recon_src"):
    source = make_source(source_name, provider="hedera", base_url="http://127.0.0.1:9")
    return parse_checks({"recon_continuity": {"kind": "continuity", "source": source_name}},
                        {source_name: source})


def test_a_killed_reconcile_is_reaped_by_the_next_one(db, database_url, tmp_path):
    config = tmp_path / "balances.toml"
    config.write_text('[sources.recon_src]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n\n'
                      '[checks.recon_continuity]\nkind = "continuity"\nsource = "recon_src"\n')
    blocker = connect(database_url)
    with blocker.cursor() as cur:  # keeps the reconcile waiting, so it can be killed mid-run
        cur.execute("LOCK TABLE reconciliation_breaks IN EXCLUSIVE MODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["BALANCES_DB_URL"] = database_url
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--config", str(config), "reconcile"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: fetch(db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                   " AND query ~ 'reconciliation_breaks'")[0][0] == 1,
                 what="the reconcile to wait for the table")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        blocker.close()
    # The server notices the client is gone once the lock is granted and it
    # has something to send; until then the lease's session is still there.
    wait_for(lambda: fetch(db, "SELECT count(*) FROM run_leases l JOIN pg_stat_activity a USING (pid)")
             == [(0,)], what="the killed reconcile's session to end")
    assert fetch(db, "SELECT status FROM reconciliation_runs") == [("running",)]

    result = reconcile(db, continuity(), AFTER_T3 - timedelta(days=1), AFTER_T3)
    assert result.status == "succeeded"
    assert fetch(db, "SELECT run_id, status, error FROM reconciliation_runs ORDER BY run_id") == [
        (1, "abandoned", "the process running this reconciliation stopped before finishing it"),
        (2, "succeeded", None)]
    assert fetch(db, "SELECT count(*) FROM run_leases") == [(0,)]


def test_a_running_reconcile_is_left_alone_and_a_failing_one_ends_failed(db, database_url):
    live = connect(database_url, lock_timeout=timedelta(seconds=3))
    blocker = connect(database_url)
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE reconciliation_breaks IN EXCLUSIVE MODE")
        errors = []

        def waiting_reconcile():
            try:
                reconcile(live, continuity(), AFTER_T3 - timedelta(days=1), AFTER_T3)
            except Exception as exc:
                errors.append(exc)

        worker = threading.Thread(target=waiting_reconcile)
        worker.start()
        wait_for(lambda: fetch(db, "SELECT count(*) FROM reconciliation_runs")[0][0] == 1, what="the first run")
        # While it waits, the next reconcile must not take it for dead.
        from reconciliation.reconcile import reap_abandoned
        assert reap_abandoned(db) == []
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert [type(e) for e in errors] == [psycopg2.errors.LockNotAvailable]
        (status, error), = fetch(db, "SELECT status, error FROM reconciliation_runs")
        assert status == "failed" and error.startswith("LockNotAvailable: canceling statement due to lock timeout")
        assert fetch(db, "SELECT count(*) FROM run_leases") == [(0,)]
    finally:
        blocker.close()
        live.close()


# --- present-only reruns add nothing --------------------------------------------------------


def bitfront(server, name: str = "bitfront_rerun"):
    return make_source(name, provider="bitfront", base_url=server.url, conn_id="bitfront_rerun",
                       rate_limit=1000.0)


WALLET = [holding("BTC", "3999974992.35615", "3999970806.72614"), holding("ETH", "1000107794.9999858")]


def test_a_second_run_of_a_present_only_interval_stores_nothing_and_says_so(db, serve):
    server = serve(BitfrontExchange(WALLET))
    source = bitfront(server)
    at = now()
    first = take_snapshot(db, source, at, credentials=BITFRONT)
    assert (first["status"], first["rows_inserted"]) == ("published", 2)
    requests = server.request_count

    second = take_snapshot(db, source, at, credentials=BITFRONT)
    assert second["status"] == "skipped" and second["rows_inserted"] == 0
    assert f"already published by run {first['run_id']}" in second["error"]
    assert "--force" in second["error"]
    assert server.request_count == requests  # nothing fetched
    assert fetch(db, "SELECT count(*), count(DISTINCT as_of) FROM balance_history") == [(2, 1)]
    assert staging_tables(db) == 0

    forced = take_snapshot(db, source, at, credentials=BITFRONT, force=True)
    assert (forced["status"], forced["rows_inserted"]) == ("published", 2)
    assert fetch(db, "SELECT count(*), count(DISTINCT as_of) FROM balance_history") == [(4, 2)]
    assert fetch(db, "SELECT status FROM snapshot_runs ORDER BY run_id") == [
        ("published",), ("skipped",), ("published",)]


def test_two_present_only_runs_of_one_interval_at_once_publish_one_snapshot(db, serve):
    server = serve(BitfrontExchange(WALLET))
    source = bitfront(server)
    at = now()
    first, second = begin(db, source, at, hold=True), begin(db, source, at, hold=True)
    for run_id in (first, second):
        assert crawl(db, source, run_id, credentials=BITFRONT).status == "staged"
    assert publish_run(db, source, first).status == "published"
    assert publish_run(db, source, second).status == "skipped"
    assert fetch(db, "SELECT status, error FROM snapshot_runs WHERE run_id = %s", (second,)) == [
        ("skipped", f"run {first} published the interval ending {at.isoformat()} first; this provider "
                    "reports only the present, so this later snapshot is not stored as a second one")]
    assert fetch(db, "SELECT count(*), min(run_id) FROM balance_history") == [(2, first)]
    assert staging_tables(db) == 0


def test_the_cli_says_a_rerun_did_nothing(db, database_url, serve, tmp_path, monkeypatch, capsys):
    from urllib.parse import quote

    from cli.main import main

    server = serve(BitfrontExchange(WALLET))
    config = tmp_path / "balances.toml"
    config.write_text(f'[sources.bitfront_cli]\nprovider = "bitfront"\nbase_url = "{server.url}"\n'
                      'conn_id = "bitfront_cli"\nrate_limit = 1000\n')
    monkeypatch.setenv("BALANCES_DB_URL", database_url)
    monkeypatch.setenv("AIRFLOW_CONN_BITFRONT_CLI",
                       f"bitfront://{quote(SANDBOX_KEY, safe='')}:{quote(SANDBOX_SECRET, safe='')}@bitfront")
    at = now().isoformat()
    assert main(["--config", str(config), "snapshot", "bitfront_cli", "--at", at]) == 0
    assert "status: published" in capsys.readouterr().out
    assert main(["--config", str(config), "snapshot", "bitfront_cli", "--at", at]) == 0
    out = capsys.readouterr().out
    assert "status: skipped" in out and "already published by run 1" in out
    assert fetch(db, "SELECT status FROM snapshot_runs ORDER BY run_id") == [("published",), ("skipped",)]
    assert fetch(db, "SELECT count(DISTINCT as_of) FROM balance_history") == [(1,)]


# --- a snapshot far from the time asked -----------------------------------------------------


def test_a_1970_snapshot_for_a_2024_request_is_refused(db, serve):
    server = serve(HederaMirror([Snapshot.of("1.000000000", book(1, 20))], tokens={"0.0.7001": 4}))
    source = make_source("ancient", provider="hedera", base_url=server.url, limit=10)
    with pytest.raises(AirflowFailException) as raised:
        with tasks.fatal_errors_fail_fast():
            take_snapshot(db, source, datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert isinstance(raised.value.__cause__, SnapshotTooFar)
    (status, error), = fetch(db, "SELECT status, error FROM snapshot_runs")
    assert status == "failed"
    assert "snapshot 1970-01-01T00:00:01+00:00 is 19722 d 23 h before the time asked" in error
    assert "max_snapshot_age (1 d)" in error
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)] and staging_tables(db) == 0


def test_max_snapshot_age_is_per_source_and_applies_both_ways():
    asked = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    default = make_source("aged", provider="hedera", base_url="http://127.0.0.1:9")
    assert default.max_snapshot_age == 86_400
    check_snapshot_age(default, asked, asked - timedelta(hours=23, minutes=59))
    hourly = make_source("aged", provider="hedera", base_url="http://127.0.0.1:9", max_snapshot_age=3600)
    check_snapshot_age(hourly, asked, asked - timedelta(minutes=59))
    check_snapshot_age(hourly, asked, asked + timedelta(minutes=59))
    with pytest.raises(SnapshotTooFar, match="1 h 1 min before the time asked"):
        check_snapshot_age(hourly, asked, asked - timedelta(minutes=61))
    with pytest.raises(SnapshotTooFar, match="2 h after the time asked"):
        check_snapshot_age(hourly, asked, asked + timedelta(hours=2))
    for wrong in (0, -1, float("nan"), "1h"):
        with pytest.raises(ConfigError, match="sources.aged.max_snapshot_age: "):
            make_source("aged", provider="hedera", base_url="http://127.0.0.1:9", max_snapshot_age=wrong)


# --- the migration --------------------------------------------------------------------------


def test_migration_0008_goes_down_and_up_again(database_url, monkeypatch):
    from loaders import migrate

    with scratch_database(database_url, "leases_migration") as url:
        assert upgrade(url, "0008") == "0008"
        conn = connect(url)
        try:
            assert fetch(conn, "SELECT count(to_regclass(t)) FROM unnest(array['run_leases', 'source_locks']) t") \
                == [(2,)]
            assert fetch(conn, "SELECT has_function_privilege('balances_reader',"
                               " 'balance_history_ensure_partition(timestamptz)', 'EXECUTE')") == [(False,)]
            command.downgrade(alembic_config(url), "0007")
            assert current_revision(url) == "0007"
            assert fetch(conn, "SELECT count(to_regclass(t)) FROM unnest(array['run_leases', 'source_locks']) t") \
                == [(0,)]
            assert fetch(conn, "SELECT prosrc ~ 'PARTITION OF' FROM pg_proc"
                               " WHERE proname = 'balance_history_ensure_partition'") == [(True,)]
            # A dashboard's open transaction: the migration gives up instead of
            # waiting (and making every later reader wait behind it).
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM snapshot_runs")
            monkeypatch.setattr(migrate, "LOCK_TIMEOUT", timedelta(seconds=1))
            started = time.monotonic()
            with pytest.raises(Exception, match="lock timeout"):
                upgrade(url, "0008")
            assert time.monotonic() - started < 15
            conn.rollback()
            assert current_revision(url) == "0007"
        finally:
            conn.close()
        assert upgrade(url, "0008") == "0008"


# --- under Airflow --------------------------------------------------------------------------


@pytest.mark.airflow
def test_under_airflow_a_400_with_a_nul_fails_without_a_retry_and_the_run_says_why(airflow_env, db, serve):
    server = serve(mirror(accounts=30))
    server.inject(hostile_400())  # once: a retry would succeed, so success would mean it was retried
    write_config(f'[sources.nul_dagtest]\nprovider = "hedera"\nbase_url = "{server.url}"\nlimit = 10\n'
                 'schedule = "*/15 * * * *"\nstart_date = 2023-01-01\ntask_retries = 2\n'
                 'task_retry_delay = 0\nbackoff_base = 0.01\n')
    dag_run = load_dag("balances_nul_dagtest").test(logical_date=datetime.fromtimestamp(1700001000, tz=timezone.utc))
    assert dag_run.state == "failed"
    assert server.request_count == 1
    (status, error), = fetch(db, "SELECT status, error FROM snapshot_runs")
    assert status == "failed" and "bad\ufffdrequest" in error and "\x00" not in error
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


@pytest.mark.airflow
def test_under_airflow_a_rerun_of_a_present_only_interval_is_skipped(airflow_env, db, serve, monkeypatch):
    from urllib.parse import quote

    server = serve(BitfrontExchange(WALLET))
    monkeypatch.setenv("AIRFLOW_CONN_BITFRONT_DAGTEST",
                       f"bitfront://{quote(SANDBOX_KEY, safe='')}:{quote(SANDBOX_SECRET, safe='')}@bitfront")
    # No schedule: a run's interval ends exactly at its logical date, the same for both runs.
    write_config(f'[sources.bitfront_dagtest]\nprovider = "bitfront"\nbase_url = "{server.url}"\n'
                 'conn_id = "bitfront_dagtest"\nrate_limit = 1000\nschedule = "none"\ntask_retries = 0\n')
    dag = load_dag("balances_bitfront_dagtest")
    logical = now()
    first = dag.test(logical_date=logical)
    assert first.state == "success"
    requests = server.request_count
    rerun = dag.test(logical_date=logical)
    assert rerun.state == "success"
    states = {ti.task_id: ti.state for ti in rerun.get_task_instances()}
    assert states == {"begin_run": "skipped", "plan_shards": "skipped", "crawl_snapshot": "skipped",
                      "publish_snapshot": "skipped", "plan_movements": "skipped", "crawl_movements": "skipped",
                      "publish_movements": "skipped"}
    assert server.request_count == requests
    assert fetch(db, "SELECT status FROM snapshot_runs ORDER BY run_id") == [("published",), ("skipped",)]
    assert fetch(db, "SELECT count(DISTINCT as_of) FROM balance_history") == [(1,)]
