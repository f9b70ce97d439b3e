"""Known Hedera histories for the tests."""
from __future__ import annotations

from sandbox.hedera import Account, HederaMirror, Snapshot

T1 = "1700000000.000000001"
T2 = "1700000900.123456789"
T3 = "1700001800.999999999"
BIG = 2**62 + 12345  # above 2**53: a float would change it


def book(step: int, accounts: int = 57) -> dict[int, Account]:
    holdings = {}
    for num in range(1001, 1001 + accounts):
        tokens = [("0.0.7001", num * 10 + step)] if num % 5 == 0 else []
        holdings[num] = Account(balance=num * 1_000 + step, tokens=tokens)
    holdings[2] = Account(balance=BIG + step)
    return holdings


def mirror(accounts: int = 57) -> HederaMirror:
    return HederaMirror(
        [Snapshot.of(T1, book(1, accounts)), Snapshot.of(T2, book(2, accounts)),
         Snapshot.of(T3, book(3, accounts))],
        tokens={"0.0.7001": 4},
    )


# The network of the trial: 250 accounts (the treasury, 0.0.98 and
# 0.0.1001 to 0.0.1248), two snapshots. 100 of them are at or below 0.0.1098,
# so "lte:0.0.1098" with the default limit of 100 ends on a full page.
NETWORK_NUMS = [2, 98] + list(range(1001, 1249))


def network_book(step: int) -> dict[int, Account]:
    holdings = {}
    for num in NETWORK_NUMS:
        tokens = [("0.0.7001", num * 10 + step)] if num % 50 == 0 else []
        holdings[num] = Account(balance=num * 1_000 + step, tokens=tokens)
    holdings[2] = Account(balance=BIG + step)
    return holdings


def network() -> HederaMirror:
    return HederaMirror([Snapshot.of(T1, network_book(1)), Snapshot.of(T2, network_book(2))],
                        tokens={"0.0.7001": 4})
