"""Crashes and races: killed processes, a restarted database, two runs at once.

Whatever happens, balance_history holds each row exactly once, a reader
never sees part of a snapshot, and every run ends with the right status.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from extractors.records import BalanceRow
from loaders import runs
from loaders.db import connect
from loaders.publish import PublishError, publish
from loaders.staging import StagingWriter
from devtools import devdb
from pipeline.snapshot import take_snapshot
from sandbox.server import Fault
from tests.conftest import PG_DATA, REPO, fetch, make_source, staging_tables, wait_for
from tests.hedera_data import mirror

AFTER_T3 = datetime(2023, 11, 14, 23, 0, tzinfo=timezone.utc)


def cli(config, database_url, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["BALANCES_DB_URL"] = database_url
    return subprocess.Popen([sys.executable, "-m", "cli.main", "--config", str(config), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Kill points: after this many of the crawl's ~50 requests (seeded, so a failure replays).
KILL_POINTS = sorted(random.Random(20261125).sample(range(1, 48), 4))


@pytest.mark.parametrize("kill_after", KILL_POINTS)
def test_sigkill_mid_crawl_then_rerun_loads_every_row_once(db, database_url, serve, tmp_path, kill_after):
    server = serve(mirror(accounts=400))
    server.inject(Fault("delay", times=10_000, seconds=0.02, path="/api/v1/balances"))
    config = tmp_path / "sources.toml"
    config.write_text(f'[sources.killed]\nprovider = "hedera"\nbase_url = "{server.url}"\nlimit = 10\n')
    proc = cli(config, database_url, "snapshot", "killed", "--at", AFTER_T3.isoformat())
    wait_for(lambda: server.request_count >= kill_after, what="the crawl to get going")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("running",)]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
    # The dead process's leases are still recorded, but name a session that is gone.
    wait_for(lambda: fetch(db, "SELECT count(*) FROM run_leases l JOIN pg_stat_activity a USING (pid)")
             == [(0,)], what="the killed process's session to end")
    assert fetch(db, "SELECT shard FROM run_leases ORDER BY shard LIMIT 1") == [(-1,)]

    server.clear()
    rerun = cli(config, database_url, "snapshot", "killed", "--at", AFTER_T3.isoformat())
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert fetch(db, "SELECT status FROM snapshot_runs ORDER BY run_id") == [("abandoned",), ("published",)]
    total, distinct = fetch(db, "SELECT count(*), count(DISTINCT (account, asset)) FROM balance_history")[0]
    assert total == distinct == 401 + 80
    assert staging_tables(db) == 0
    assert fetch(db, "SELECT count(*) FROM run_leases") == [(0,)]  # reaped, and released


def _stage_big_run(db, rows: int) -> int:
    run_id = runs.start_run(db, "big", "hedera", AFTER_T3)
    runs.set_snapshot(db, run_id, AFTER_T3, "1700002800.000000000")
    writer = StagingWriter(db, run_id, 0)
    batch = [BalanceRow(f"0.0.{i}", "HBAR", i * 100_000_000 + 7, 8) for i in range(rows)]
    for i in range(0, rows, 1000):
        writer.add(batch[i:i + 1000])
    writer.close()
    return run_id


class Reader(threading.Thread):
    """Counts balance_history rows from a second connection, over and over."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.seen, self.stop = url, set(), threading.Event()

    def run(self) -> None:
        conn = connect(self.url)
        conn.autocommit = True
        while not self.stop.is_set():
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM balance_history")
                self.seen.add(cur.fetchone()[0])
        conn.close()


def inserting(db) -> bool:
    """A publish INSERT (into the history, or straight into its month's partition) runs on another connection."""
    return fetch(db, "SELECT count(*) FROM pg_stat_activity WHERE query ~ '^\\s*INSERT INTO \"?balance_history'"
                     " AND state = 'active' AND pid <> pg_backend_pid()")[0][0] > 0


def waiting_for_a_lock(db) -> bool:
    """The publish finished its INSERT and waits to drop (or keep, renamed) the held staging table."""
    return fetch(db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                     " AND query ~ '^\\s*(DROP|ALTER) TABLE' AND pid <> pg_backend_pid()")[0][0] > 0


def hold_staging(database_url: str, run_id: int):
    """A connection whose open transaction keeps the publish from finishing (not from inserting)."""
    holder = connect(database_url)
    with holder.cursor() as cur:
        cur.execute(f"LOCK TABLE balance_staging.run_{int(run_id)}_shard_0 IN ACCESS SHARE MODE")
    return holder


@pytest.mark.parametrize("point", ["INSERT started", "0.15 s into the INSERT", "INSERT done, before commit"])
def test_sigkill_during_publish_leaves_nothing_then_publish_completes(db, database_url, point):
    rows = 300_000
    run_id = _stage_big_run(db, rows)
    holder = hold_staging(database_url, run_id) if point.endswith("before commit") else None
    reader = Reader(database_url)
    reader.start()
    wait_for(lambda: 0 in reader.seen, what="the reader to start")
    code = ("import sys; from loaders.db import connect; from loaders.publish import publish; "
            f"publish(connect(sys.argv[1]), {run_id})")
    proc = subprocess.Popen([sys.executable, "-c", code, database_url], cwd=REPO)
    if holder is not None:
        wait_for(lambda: waiting_for_a_lock(db), what="the publish to finish inserting")
    else:
        wait_for(lambda: inserting(db), what="the publish INSERT to start")
        time.sleep(0.15 if point.startswith("0.15") else 0.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if holder is not None:
        holder.close()
    wait_for(lambda: not inserting(db) and not waiting_for_a_lock(db),
             what="the server to abort the killed publish")
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("running",)]

    result = publish(db, run_id)
    wait_for(lambda: rows in reader.seen, what="the reader to see the snapshot")
    reader.stop.set()
    reader.join()
    assert result.rows_published == rows
    assert fetch(db, "SELECT status, rows FROM snapshot_runs") == [("published", rows)]
    # The second connection saw an empty table or the whole snapshot, never a part.
    assert reader.seen == {0, rows}


def test_database_restart_mid_crawl_then_rerun(db, database_url, serve):
    if os.environ.get("BALANCES_TEST_DB_URL"):
        pytest.skip("needs the private cluster this test session controls")
    server = serve(mirror(accounts=400))
    server.inject(Fault("delay", times=10_000, seconds=0.02, path="/api/v1/balances"))
    source = make_source("restarted", provider="hedera", base_url=server.url, limit=10)
    crawl_conn = connect(database_url)
    errors = []

    def crawl_in_thread():
        try:
            take_snapshot(crawl_conn, source, AFTER_T3)
        except Exception as exc:  # the restart must surface as an error, not a hang
            errors.append(exc)

    worker = threading.Thread(target=crawl_in_thread)
    worker.start()
    wait_for(lambda: server.request_count >= 10, what="the crawl to get going")
    db.close()
    devdb.restart(PG_DATA)
    worker.join(timeout=120)
    assert not worker.is_alive() and errors, "the crawl should fail when the database goes away"

    server.clear()
    conn = connect(database_url)
    summary = take_snapshot(conn, source, AFTER_T3)
    assert summary["status"] == "published"
    assert fetch(conn, "SELECT status FROM snapshot_runs ORDER BY run_id") == [("abandoned",), ("published",)]
    assert fetch(conn, "SELECT count(*), count(DISTINCT (account, asset)) FROM balance_history") == [(481, 481)]
    assert staging_tables(conn) == 0
    conn.close()


def test_two_runs_of_the_same_snapshot_at_once_store_one_copy(db, database_url, serve):
    server = serve(mirror(accounts=300))
    source = make_source("twice", provider="hedera", base_url=server.url, limit=10)
    results, errors = [], []

    def one_run():
        conn = connect(database_url)
        try:
            results.append(take_snapshot(conn, source, AFTER_T3))
        except Exception as exc:
            errors.append(exc)
        finally:
            conn.close()

    workers = [threading.Thread(target=one_run) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    assert sorted(r["status"] for r in results) == ["published", "published"]
    assert sorted(r["rows_inserted"] for r in results) == [0, 361]
    assert fetch(db, "SELECT count(*), count(DISTINCT (account, asset)) FROM balance_history") == [(361, 361)]


def test_database_restart_mid_publish_then_publish_again(db, database_url):
    if os.environ.get("BALANCES_TEST_DB_URL"):
        pytest.skip("needs the private cluster this test session controls")
    rows = 300_000
    run_id = _stage_big_run(db, rows)
    errors = []

    def publish_in_thread():
        conn = connect(database_url)
        try:
            publish(conn, run_id)
        except Exception as exc:
            errors.append(exc)

    holder = hold_staging(database_url, run_id)  # so the publish cannot commit before the restart
    worker = threading.Thread(target=publish_in_thread)
    worker.start()
    wait_for(lambda: waiting_for_a_lock(db), what="the publish to finish inserting")
    db.close()
    devdb.restart(PG_DATA)
    worker.join(timeout=120)
    holder.close()  # already cut off by the restart
    assert not worker.is_alive() and errors, "the publish should fail when the database goes away"

    conn = connect(database_url)
    assert fetch(conn, "SELECT count(*) FROM balance_history") == [(0,)]
    # Staging is UNLOGGED, so crash recovery emptied it: publishing what is
    # left would pass off an empty snapshot as whole. It must refuse.
    with pytest.raises(PublishError, match="database restarted"):
        publish(conn, run_id)
    assert fetch(conn, "SELECT status FROM snapshot_runs") == [("failed",)]
    assert fetch(conn, "SELECT count(*) FROM balance_history") == [(0,)]
    conn.close()


class Concurrency:
    """The mirror, slowed down, counting how many shards' page requests it serves at once.

    By shard, not by request: one shard may have two requests in flight
    itself (its next page, sent ahead, and a token lookup).
    """

    def __init__(self, app, delay: float = 0.02):
        self.app, self.delay, self.most = app, delay, 0
        self.boundary: int | None = None  # the first account number of the second shard
        self.serving: list[int] = []
        self.lock = threading.Lock()

    def shard(self, request) -> int | None:
        if self.boundary is None or request.path != "/api/v1/balances":
            return None
        lows = [int(v.split(":")[1].rsplit(".", 1)[1]) for v in request.params("account.id")
                if v.startswith(("gt:", "gte:"))]
        return int(max(lows, default=0) >= self.boundary)

    def __call__(self, request):
        shard = self.shard(request)
        with self.lock:
            self.serving.append(shard)
            self.most = max(self.most, len(set(self.serving) - {None}))
        time.sleep(self.delay)
        if request.params("account.id"):
            # A shard's crawl may be a single short request: hold it (up to
            # 1 s) until another is in flight, so shards that can overlap do
            # meet however the machine schedules them. A lock serialising the
            # shards would keep the second out for that whole second.
            deadline = time.monotonic() + 1.0
            while self.most < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        try:
            return self.app(request)
        finally:
            with self.lock:
                self.serving.remove(shard)


def test_the_shards_of_one_run_crawl_side_by_side(db, database_url, serve):
    from pipeline.snapshot import begin, crawl, plan_shards

    app = Concurrency(mirror(accounts=200))
    server = serve(app)
    source = make_source("sharded", provider="hedera", base_url=server.url, limit=10, shards=2)
    run_id = begin(db, source, AFTER_T3)
    shards = plan_shards(db, source, run_id)
    app.boundary = int(shards[1]["account_range"][0].rsplit(".", 1)[1])
    results, errors = [], []

    def crawl_shard(shard):
        conn = connect(database_url)
        try:
            results.append(crawl(conn, source, run_id, shard=shard["shard"],
                                 account_range=shard["account_range"]))
        except Exception as exc:
            errors.append(exc)
        finally:
            conn.close()

    workers = [threading.Thread(target=crawl_shard, args=(s,)) for s in shards]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    assert sorted(r.shard for r in results) == [0, 1]
    assert app.most == 2, "the second shard waited for the first: the run lock serialised them"
