"""The moving sandboxes that ``scripts/demo --serve`` schedules (the stack itself:
``tests/test_entry_points.py``, which runs the command as typed)."""
from __future__ import annotations

import os

import psycopg2
import pytest

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
