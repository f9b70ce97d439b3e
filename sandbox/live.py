"""Moving sandboxes for ``balances demo --serve``: books that change every minute.

The demo's sandboxes hold still, which is what their tests want; a live
dashboard needs balances that change from run to run and a break that
appears and resolves. Each live app here wraps the public classes of a
sandbox module and, before answering a request, brings its book up to the
current minute. What a book holds follows from the minute alone, so every
run of a minute sees the same balances.

The story the books tell: the Hedera treasury (0.0.1234) and the Formance
ledger's ``treasury:hedera`` move together every third minute. The ledger
books a move at once; the mirror node (answering slowly, a second per page)
is usually crawled after it, so for a moment the newest ledger snapshot
meets the previous mirror snapshot: the pair check opens a mismatch, and
resolves it when the mirror's snapshot of the same minute lands.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable

from sandbox.server import Request, Response

MINUTE = 60
HISTORY_MINUTES = 24 * 60  # snapshots the live mirror keeps answering for
TREASURY_STEP = 250 * 10**8  # 250 HBAR in tinybars


def minute_now() -> int:
    """The current minute, as minutes since the epoch."""
    return int(time.time()) // MINUTE


def treasury_move(minute: int) -> int:
    """What the treasury holds above its base at ``minute``: changes every third minute."""
    return (minute // 3) % 7 * TREASURY_STEP


class _Moving:
    """Calls ``advance(minute)`` before each request; one request at a time."""

    def __init__(self, app: Callable[[Request], Response], clock: Callable[[], int] = minute_now):
        self.app = app
        self.clock = clock
        self._lock = threading.Lock()
        self._minute: int | None = None

    def __call__(self, request: Request) -> Response:
        with self._lock:
            minute = self.clock()
            if minute != self._minute:
                self.advance(minute, self._minute)
                self._minute = minute
            return self.app(request)

    def advance(self, minute: int, previous: int | None) -> None:
        raise NotImplementedError


class LiveHedera(_Moving):
    """A mirror node with a balance snapshot every minute, a second before the minute.

    ``page_delay`` seconds per answer: the real mirror node is not instant,
    and parallel shards then visibly overlap. Each minute's changes are one
    transaction, half a minute before its snapshot: 0.0.2 (the treasury of
    this make-believe network, holding what the others do not) pays or
    receives every account's drift, in HBAR and in 0.0.5001, so the
    movements explain every snapshot, as on a real network.
    """

    def __init__(self, accounts: int = 240, *, page_delay: float = 1.0,
                 clock: Callable[[], int] = minute_now):
        from sandbox.hedera import HederaMirror

        super().__init__(HederaMirror([], {"0.0.5001": 6, "0.0.5002": 2}), clock)
        self.accounts = accounts
        self.page_delay = page_delay

    def __call__(self, request: Request) -> Response:
        response = super().__call__(request)
        if request.path == "/api/v1/balances" and self.page_delay:
            time.sleep(self.page_delay)
        return response

    # What 0.0.2 and the others hold together: 0.0.2 holds the rest (above 2**53: exact only if
    # never a float).
    SUPPLY, TOKEN_SUPPLY = 5_000_000_000_000_000_000, 10**12

    def nums(self) -> list[int]:
        return sorted(set(range(3, self.accounts + 2)) | {1234})

    def hbar(self, num: int, minute: int) -> int:
        from sandbox.hedera import TREASURY_TINYBARS

        if num == 1234:
            return TREASURY_TINYBARS + treasury_move(minute)
        # Each account drifts on its own rhythm, up and down.
        return num * 100_000_000 + ((minute * (num % 13 + 1)) % 50) * 1_000_000

    @staticmethod
    def token(num: int, minute: int) -> int | None:
        return num * 1_000_000 + (minute * num) % 997 if num % 10 == 0 else None

    def snapshot(self, minute: int):
        from sandbox.hedera import Account, Snapshot

        others = sum(self.hbar(n, minute) for n in self.nums())
        tokens = sum(t for n in self.nums() if (t := self.token(n, minute)) is not None)

        def account(num: int) -> Account:
            if num == 2:
                return Account(balance=self.SUPPLY - others, tokens=[("0.0.5001", self.TOKEN_SUPPLY - tokens)])
            held = self.token(num, minute)
            return Account(balance=self.hbar(num, minute), tokens=[] if held is None else [("0.0.5001", held)])

        at = minute * MINUTE - 1
        return Snapshot(f"{at}.{500_000_000 + minute % 1000:09d}", [2, *self.nums()], account)

    def transaction(self, minute: int):
        """The minute's one transaction: everything that moved since the minute before."""
        from sandbox.hedera import Tx

        hbar = [(n, self.hbar(n, minute) - self.hbar(n, minute - 1)) for n in self.nums()]
        hbar = [(n, d) for n, d in hbar if d]
        token = [("0.0.5001", n, self.token(n, minute) - self.token(n, minute - 1)) for n in self.nums()
                 if self.token(n, minute) is not None and self.token(n, minute) != self.token(n, minute - 1)]
        legs = sorted([(2, -sum(d for _, d in hbar)), *hbar])
        tokens = sorted([("0.0.5001", 2, -sum(d for _, _, d in token)), *token])
        return Tx(f"{minute * MINUTE - 30}.000000000", 2, transfers=tuple((n, d) for n, d in legs if d),
                  token_transfers=tuple(t for t in tokens if t[2]))

    def advance(self, minute: int, previous: int | None) -> None:
        first = minute - HISTORY_MINUTES if previous is None else previous + 1
        mirror = self.app
        new = [self.snapshot(m) for m in range(max(first, minute - HISTORY_MINUTES), minute + 1)]
        mirror.snapshots = (mirror.snapshots + new)[-HISTORY_MINUTES:]
        mirror.transactions = _LiveTransactions(self, minute)


class _LiveTransactions:
    """A live mirror's transactions up to ``last`` (a minute), one a minute, made when asked for."""

    def __init__(self, live: LiveHedera, last: int) -> None:
        self.live, self.last = live, last

    def between(self, low: int, high: int, *, descending: bool):
        nanos = MINUTE * 10**9
        first, final = max(self.last - HISTORY_MINUTES, low // nanos), min(self.last, high // nanos + 1)
        minutes = range(final, first - 1, -1) if descending else range(first, final + 1)
        for minute in minutes:
            tx = self.live.transaction(minute)
            if low <= tx.nanos <= high:
                yield tx


class LiveFormance(_Moving):
    """The demo ledger, plus a treasury move every third minute and users paying each other.

    The overdrawn ``users:005`` pays its debt back after ``repay_after``
    minutes: the continuity check's negative-balance breaks stop there.
    """

    def __init__(self, *, repay_after: int = 10, clock: Callable[[], int] = minute_now):
        from sandbox import formance

        super().__init__(formance.demo_app(), clock)
        self.ledger = self.app.ledgers[formance.DEMO_LEDGER]
        self.started = clock()
        self.repay_after = repay_after
        self._repaid = False
        self._held = 0  # treasury_move already booked

    def advance(self, minute: int, previous: int | None) -> None:
        start = minute if previous is None else previous + 1
        for m in range(start, minute + 1):
            at = datetime.fromtimestamp(m * MINUTE - 1, timezone.utc)
            delta, self._held = treasury_move(m) - self._held, treasury_move(m)
            if delta > 0:
                self.ledger.transfer(at, "world", "treasury:hedera", "HBAR/8", delta)
            elif delta < 0:
                self.ledger.transfer(at, "treasury:hedera", "world", "HBAR/8", -delta)
            self.ledger.transfer(at, "users:001", "users:002", "USD/2", 100 + m % 50)
            self.ledger.transfer(at, "users:002", "users:001", "USD/2", 100 + (m * 7) % 50)
            if not self._repaid and m - self.started >= self.repay_after:
                self.ledger.transfer(at, "world", "users:005", "USD/2", 1_500)
                self._repaid = True


class LiveBitfront(_Moving):
    """The demo wallet with BTC and USDT drifting every minute."""

    def __init__(self, clock: Callable[[], int] = minute_now):
        from sandbox import bitfront

        super().__init__(bitfront.demo_app(), clock)

    def advance(self, minute: int, previous: int | None) -> None:
        from sandbox.bitfront import holding

        wallet = self.app.wallet
        step = minute % 20
        btc = Decimal("12.35615") + Decimal(step) / 100
        usdt = Decimal("1000000000") - Decimal(step * 1234) / 1000
        for i, record in enumerate(wallet):
            if record["currency"] == "BTC":
                wallet[i] = holding("BTC", str(btc), str(btc - 1))
            elif record["currency"] == "USDT":
                wallet[i] = holding("USDT", str(usdt), str(usdt - 1000))


class LiveCoreLedger(_Moving):
    """The demo TEOS book with every GOLD holding moving by the minute."""

    def __init__(self, clock: Callable[[], int] = minute_now):
        from sandbox import coreledger

        super().__init__(coreledger.demo_app(), clock)
        self.base = dict(self.app.balances)
        self.gold = coreledger.DEMO_ASSETS[0].id

    def advance(self, minute: int, previous: int | None) -> None:
        for (address, asset), amount in self.base.items():
            if asset == self.gold:
                self.app.balances[(address, asset)] = amount + (minute % 30) * 125


LIVE_APPS: dict[str, Callable[[], _Moving]] = {
    "hedera": LiveHedera,
    "formance": LiveFormance,
    "bitfront": LiveBitfront,
    "coreledger": LiveCoreLedger,
}


def live_app(name: str) -> _Moving:
    """The moving data set of a sandbox: from above, or the sandbox module's own ``live_app()``."""
    if name in LIVE_APPS:
        return LIVE_APPS[name]()
    from sandbox import apps

    return apps.sandbox(name).live_app()


def live_source(name: str, url: str, *, schedule: str = "* * * * *", shards: int = 3) -> dict:
    """The demo's ``[sources.<name>]`` keys, scheduled every minute (Hedera sharded)."""
    from sandbox import apps

    keys = apps.sandbox(name).demo_source(url)
    keys["schedule"] = schedule
    keys["task_retries"] = 1
    keys["task_retry_delay"] = 5
    if name == "hedera":
        keys["shards"] = shards
        keys["limit"] = 50
    return keys


def start_of_minute(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(second=0, microsecond=0) - timedelta(minutes=1)
