"""Known Hedera histories for the tests."""
from __future__ import annotations

from sandbox.hedera import Account, HederaMirror, Snapshot, Transactions, Tx, payment, rolled_snapshots

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


# A mirror whose snapshots follow from its transactions (rest/balances.js and the importer's
# reconciliation: a snapshot is every transaction up to its timestamp). Transactions sit on the
# edges: one a nanosecond after T1, one exactly at T2 (in the first window), one a nanosecond
# after T2 (in the second).
def moving_transactions() -> list[Tx]:
    txs = [
        payment("1700000000.000000002", 1005, 1010, 7_000),
        payment(T2, 1010, 1020, 500),
        payment("1700000900.123456790", 1020, 1005, 250, fee=2_000),
        Tx("1700001000.000000000", 1015, transfers=((3, 800), (98, 200), (1015, -1_000)),
           token_transfers=(("0.0.7001", 1015, -40), ("0.0.7001", 1030, 40)), charged_tx_fee=1_000),
        # A staking reward: paid out of 0.0.800 inside the transfers, listed again on its own.
        Tx("1700001100.000000000", 1025, transfers=((3, 800), (98, 200), (800, -5_000), (1025, 4_000)),
           staking_rewards=((1025, 5_000),), charged_tx_fee=1_000),
        Tx("1700001200.000000000", 1040, transfers=((3, 800), (98, 200), (1040, -1_000)),
           nft_transfers=(("0.0.9001", None, 1040, 1), ("0.0.9001", None, 1040, 2)), charged_tx_fee=1_000,
           name="TOKENMINT"),
        payment(T3, 1001, BIG_PAYEE, 2**62),  # exact beyond 2**53, at the window's very end
    ]
    return txs


BIG_PAYEE = 1050


def moving_mirror(accounts: int = 57) -> HederaMirror:
    start = book(1, accounts)
    start[3], start[98], start[800] = Account(10**12), Account(10**12), Account(10**15)
    start[1001] = Account(2**63 - 1)
    transactions = moving_transactions()
    return HederaMirror(rolled_snapshots(start, transactions, [T1, T2, T3]),
                        tokens={"0.0.7001": 4, "0.0.9001": 0}, transactions=Transactions(transactions))
