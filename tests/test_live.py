"""The moving sandboxes that ``scripts/demo --serve`` schedules (the stack itself:
``tests/test_entry_points.py``, which runs the command as typed)."""
from __future__ import annotations


def test_moving_sandboxes_agree_on_the_treasury_minute_by_minute():
    """The pair the dashboard shows: both books move together, every third minute."""
    from decimal import Decimal

    from sandbox.formance import LiveFormance
    from sandbox.hedera import TREASURY_TINYBARS, LiveHedera
    from sandbox.live import treasury_move

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
