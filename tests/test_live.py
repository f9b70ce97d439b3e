"""The real Airflow services, as ``scripts/demo --serve`` starts them, on their schedule.

api-server, scheduler, dag-processor and triggerer with LocalExecutor and
the metadata in PostgreSQL run every sandbox source every minute (Hedera in
three shards) until each has published at least twice; then the test reads
both databases: every finished run published, the reconciliation DAG ran on
Asset events, the shards of one run crawled side by side, the pools exist.
Bounded: it gives up after ``LIVE_DEADLINE`` seconds, and every process it
started is stopped on the way out, also on failure.
"""
from __future__ import annotations

import json
import os
import time

import psycopg2
import pytest

from devtools.serve import SERVICES, live_stack
from sandbox import apps
from tests.conftest import fetch

pytestmark = pytest.mark.airflow

LIVE_DEADLINE = float(os.environ.get("BALANCES_LIVE_DEADLINE", "420"))
SHARDS = 3


def published_per_source(db, sources: list[str]) -> dict[str, int]:
    rows = fetch(db, """SELECT source, count(*) FROM snapshot_runs
                         WHERE status = 'published' AND dag_run_id LIKE 'scheduled\\_\\_%%'
                         GROUP BY source""")
    counts = dict(rows)
    return {s: counts.get(s, 0) for s in sources}


def metadata(stack, query: str, params=()) -> list[tuple]:
    url = stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def test_moving_sandboxes_agree_on_the_treasury_minute_by_minute():
    """The pair the dashboard shows: both books move together, every third minute."""
    from decimal import Decimal

    from sandbox.hedera import TREASURY_TINYBARS
    from sandbox.live import LiveFormance, LiveHedera, treasury_move

    clock = {"minute": 29_000_000}
    hedera = LiveHedera(page_delay=0, clock=lambda: clock["minute"])
    formance = LiveFormance(clock=lambda: clock["minute"])
    seen = set()
    for _ in range(7):
        minute = clock["minute"]
        formance.advance(minute, minute - 1 if minute > 29_000_000 else None)
        volumes = formance.ledger.volumes()["treasury:hedera"]["HBAR/8"]
        booked = volumes[0] - volumes[1]
        snapshot = hedera.snapshot(minute)
        assert snapshot.account(1234).balance == booked == TREASURY_TINYBARS + treasury_move(minute)
        assert Decimal(snapshot.timestamp) < minute * 60  # a snapshot of the minute lies before it
        seen.add(booked)
        clock["minute"] += 1
    assert len(seen) >= 2  # it moved


def diagnose(stack, db) -> str:
    """What went wrong, for the assertion message: runs, task states, errors logged by failed tasks."""
    runs = fetch(db, "SELECT source, status, left(coalesce(error, ''), 300) FROM snapshot_runs ORDER BY run_id")
    states = metadata(stack, """SELECT dag_id, task_id, state, count(*) FROM task_instance
                                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""")
    errors = []
    for log in sorted(stack.logs.glob("dag_id=*/**/attempt=*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        if lines:
            errors.append(f"{log.relative_to(stack.logs)}: {lines[-1][:600]}")
    return f"runs: {runs}\ntask states: {states}\nerrors: " + "\n".join(errors[-8:])


def test_services_run_every_source_on_its_schedule(database_url, db, tmp_path):
    started = time.monotonic()
    sandboxes = apps.available()
    sources = [f"{name}_sandbox" for name in sandboxes]
    pids: list[int] = []
    with live_stack(database_url, tmp_path / "live", shards=SHARDS) as stack:
        pids = [p.pid for p in stack.processes.values()]
        assert sorted(stack.processes) == sorted(SERVICES)
        ready = time.monotonic() - started
        pools = {p["pool"]: p for p in json.loads(stack.airflow("pools", "list", "-o", "json"))}
        for provider in {stack.sources[s]["provider"] for s in sources}:
            assert int(pools[f"balances_{provider}"]["slots"]) >= SHARDS

        deadline = started + LIVE_DEADLINE
        counts = published_per_source(db, sources)
        while min(counts.values()) < 2 and time.monotonic() < deadline:
            assert not stack.dead(), f"airflow {stack.dead()} stopped; see {stack.logs}"
            time.sleep(5)
            counts = published_per_source(db, sources)
        waited = time.monotonic() - started
        assert min(counts.values()) >= 2, (f"published scheduled runs after {waited:.0f}s: {counts}\n"
                                         + diagnose(stack, db))

        # Every run that finished published; none failed or was abandoned.
        statuses = fetch(db, "SELECT source, status, count(*) FROM snapshot_runs GROUP BY 1, 2 ORDER BY 1, 2")
        assert {s for _, s, _ in statuses} <= {"published", "running"}, diagnose(stack, db)
        failed = metadata(stack, """SELECT dag_id, run_id FROM dag_run
                                     WHERE dag_id LIKE 'balances\\_%%' AND state = 'failed'""")
        assert failed == [], diagnose(stack, db)

        # The reconciliation ran on the sources' Asset events and recorded its runs.
        triggered = metadata(stack, """SELECT run_id, state FROM dag_run
                                        WHERE dag_id = 'reconcile_balances' AND run_type = 'asset_triggered'""")
        for _ in range(24):
            if any(state == "success" for _, state in triggered):
                break
            time.sleep(5)
            triggered = metadata(stack, """SELECT run_id, state FROM dag_run
                                            WHERE dag_id = 'reconcile_balances'
                                              AND run_type = 'asset_triggered'""")
        assert any(state == "success" for _, state in triggered), triggered
        recorded = fetch(db, "SELECT dag_run_id, status FROM reconciliation_runs WHERE status = 'succeeded'")
        assert {r for r, _ in recorded} & {r for r, s in triggered if s == "success"}

        # The Hedera shards of one run were crawled side by side.
        shards = metadata(stack, """SELECT run_id, map_index, start_date, end_date FROM task_instance
                                     WHERE dag_id = 'balances_hedera_sandbox' AND task_id = 'crawl_snapshot'
                                       AND state = 'success' ORDER BY run_id, map_index""")
        by_run: dict[str, list] = {}
        for run_id, index, start, end in shards:
            by_run.setdefault(run_id, []).append((start, end))
        complete = {r: spans for r, spans in by_run.items() if len(spans) == SHARDS}
        assert complete, shards
        overlapped = [r for r, spans in complete.items()
                      if max(s for s, _ in spans) < min(e for _, e in spans)]
        assert overlapped, {r: [(s.isoformat(), e.isoformat()) for s, e in spans] for r, spans in complete.items()}
    print(f"\nlive: ready in {ready:.0f}s, two runs per source after {waited:.0f}s, "
          f"total {time.monotonic() - started:.0f}s")
    for pid in pids:  # every service's process group is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
