"""Acme's own tests: what is particular to it, against its sandbox (no database needed)."""
from __future__ import annotations

from decimal import Decimal

from tests.harness import crawl
from tests.sandboxes import now, start


def test_every_holding_lands_exactly(serve):
    result = crawl(start("acme", serve))
    assert [row[:3] for row in result.rows] == [
        ("vault-1", "EUR", Decimal("99.99")), ("vault-1", "USD", Decimal("1250.50")),
        ("vault-2", "USD", Decimal("0.01"))]
    assert result.rejected == [] and result.requests == 1
    assert abs((result.pages[0].as_of - now()).total_seconds()) < 60
