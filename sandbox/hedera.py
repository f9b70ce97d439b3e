"""A fake Hedera mirror node: ``/api/v1/balances`` and ``/api/v1/tokens/{id}``.

Behaves as the mirror node's OpenAPI spec and docs say: default order
``desc``; ``limit`` defaults to 25 and larger values are cut to 100 without
a word; ``timestamp`` picks the latest snapshot at or before the bound (and
``null`` before the first snapshot); ``links.next`` is a relative, unencoded
path repeating the query with ``account.id=lt:<last>`` (or ``gt:`` for
``asc``) and is null only when a page is short, so an exactly full last
page is followed by an empty one; unknown parameters get 400 with the
``_status`` error body; token ``decimals`` is a string.
"""
from __future__ import annotations

import bisect
import time
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from sandbox.server import Request, Response, json_response

ALLOWED = {"account.id", "account.balance", "account.publickey", "limit", "order", "timestamp"}
_OP = re.compile(r"^(?:(eq|ne|lt|lte|gt|gte):)?(.+)$")
_ID = re.compile(r"^(?:(\d{1,10})\.)?(?:(\d{1,10})\.)?(\d{1,10})$")
_TS = re.compile(r"^(\d{1,12})(?:\.(\d{1,9}))?$")


@dataclass(slots=True)
class Account:
    balance: int
    tokens: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Snapshot:
    """Balances of every account at one consensus ``timestamp`` (seconds.nanos).

    ``nums`` is a sorted sequence of account numbers (a list, or a range for
    generated million-account snapshots) and ``account(num)`` gives each one.
    """

    timestamp: str
    nums: Sequence[int]
    account: Callable[[int], Account]

    @classmethod
    def of(cls, timestamp: str, accounts: dict[int, Account]) -> "Snapshot":
        nums = sorted(accounts)
        return cls(timestamp, nums, accounts.__getitem__)

    @property
    def nanos(self) -> int:
        return timestamp_nanos(self.timestamp)


def timestamp_nanos(text: str) -> int:
    match = _TS.match(text)
    if not match:
        raise ValueError(text)
    return int(match[1]) * 10**9 + int((match[2] or "0").ljust(9, "0"))


def error(status: int, message: str) -> Response:
    return json_response({"_status": {"messages": [{"message": message}]}}, status=status)


class HederaMirror:
    """The fake's application; ``snapshots`` may be changed between requests."""

    def __init__(self, snapshots: list[Snapshot], tokens: dict[str, int] | None = None,
                 shard: int = 0, realm: int = 0) -> None:
        self.snapshots = sorted(snapshots, key=lambda s: s.nanos)
        self.tokens = dict(tokens or {})
        self.shard, self.realm = shard, realm

    def __call__(self, request: Request) -> Response:
        if request.method != "GET":
            return error(405, "Method not allowed")
        if request.path == "/api/v1/balances":
            return self.balances(request)
        if request.path.startswith("/api/v1/tokens/"):
            return self.token(request.path.rsplit("/", 1)[1])
        return error(404, "Not Found")

    def token(self, token_id: str) -> Response:
        if token_id not in self.tokens:
            return error(404, "Not found")
        return json_response({
            "token_id": token_id, "decimals": str(self.tokens[token_id]),
            "name": f"Token {token_id}", "symbol": f"T{token_id.rsplit('.', 1)[1]}",
            "type": "FUNGIBLE_COMMON",
        })

    def balances(self, request: Request) -> Response:
        for name, _ in request.query:
            if name not in ALLOWED:
                return error(400, f"Unknown query parameter: {name}")
        try:
            limit = min(int(request.params("limit")[-1]), 100) if request.params("limit") else 25
            if limit < 1:
                raise ValueError
        except ValueError:
            return error(400, "Invalid parameter: limit")
        order = (request.params("order") or ["desc"])[-1]
        if order not in ("asc", "desc"):
            return error(400, "Invalid parameter: order")
        try:
            snapshot = self._choose(request.params("timestamp"))
            low, high, excluded, exact = self._account_bounds(request.params("account.id"))
        except ValueError as exc:
            return error(400, f"Invalid parameter: {exc}")
        if snapshot is None:
            return json_response({"timestamp": None, "balances": [], "links": {"next": None}})
        nums = snapshot.nums
        start = bisect.bisect_left(nums, low)
        stop = bisect.bisect_right(nums, high)
        picked: list[int] = []
        indices = range(start, stop) if order == "asc" else range(stop - 1, start - 1, -1)
        for i in indices:
            num = nums[i]
            if num in excluded or (exact is not None and num not in exact):
                continue
            picked.append(num)
            if len(picked) == limit:
                break
        balances = []
        for num in picked:
            account = snapshot.account(num)
            balances.append({
                "account": self._id(num),
                "balance": account.balance,
                "tokens": [{"token_id": t, "balance": b} for t, b in account.tokens],
            })
        next_link = None
        if len(picked) == limit:
            next_link = self._next_link(request, order, picked[-1])
        return json_response({"timestamp": snapshot.timestamp, "balances": balances,
                              "links": {"next": next_link}})

    def _id(self, num: int) -> str:
        return f"{self.shard}.{self.realm}.{num}"

    def _choose(self, params: list[str]) -> Snapshot | None:
        upper = None  # (nanos, inclusive)
        lower = None
        for param in params:
            op, value = _OP.match(param).groups()
            try:
                nanos = timestamp_nanos(value)
            except ValueError:
                raise ValueError("timestamp") from None
            if op in (None, "eq", "lte"):  # eq behaves as lte for balances
                upper = (nanos, True)
            elif op == "lt":
                upper = (nanos, False)
            elif op in ("gt", "gte"):
                lower = (nanos, op == "gte")
            else:
                raise ValueError("timestamp")
        candidates = self.snapshots
        if upper is not None:
            candidates = [s for s in candidates if s.nanos < upper[0] or (upper[1] and s.nanos == upper[0])]
        if lower is not None:
            candidates = [s for s in candidates if s.nanos > lower[0] or (lower[1] and s.nanos == lower[0])]
        return candidates[-1] if candidates else None

    def _account_bounds(self, params: list[str]):
        low, high = 0, 10**12
        excluded: set[int] = set()
        exact: set[int] | None = None
        for param in params:
            op, value = _OP.match(param).groups()
            match = _ID.match(value)
            if not match:
                raise ValueError("account.id")
            num = int(match[3])
            if op in (None, "eq"):
                exact = (exact or set()) | {num}
            elif op == "ne":
                excluded.add(num)
            elif op == "lt":
                high = min(high, num - 1)
            elif op == "lte":
                high = min(high, num)
            elif op == "gt":
                low = max(low, num + 1)
            elif op == "gte":
                low = max(low, num)
        return low, high, excluded, exact

    def _next_link(self, request: Request, order: str, last: int) -> str:
        # The real node repeats the query as received, values unencoded, with
        # the paging bound replaced: lt:<last> for desc, gt:<last> for asc.
        cursor_ops = ("lt", "lte") if order == "desc" else ("gt", "gte")
        kept = [(k, v) for k, v in request.query
                if not (k == "account.id" and _OP.match(v).group(1) in cursor_ops)]
        kept.append(("account.id", f"{'lt' if order == 'desc' else 'gt'}:{self._id(last)}"))
        return request.path + "?" + "&".join(f"{k}={v}" for k, v in kept)


def generated_snapshot(timestamp: str, accounts: int, *, tokens_every: int = 0,
                       token_ids: Sequence[str] = ("0.0.5000",)) -> Snapshot:
    """A snapshot of accounts 1..N computed on the fly (no memory per account)."""
    def account(num: int) -> Account:
        tokens = []
        if tokens_every and num % tokens_every == 0:
            tokens = [(t, num * 7 + i) for i, t in enumerate(token_ids)]
        return Account(balance=num * 100_000_000 + (num % 97), tokens=tokens)

    return Snapshot(timestamp, range(1, accounts + 1), account)


TREASURY_TINYBARS = 12_345_678_900_000_000


def demo_mirror(now_seconds: int, accounts: int = 240) -> HederaMirror:
    """Three snapshots 15 minutes apart, the latest at or before ``now_seconds``.

    A snapshot's balances follow from its time alone, as on a real mirror
    node: a demo run next hour serves the same book for 10:15 as this one did.
    """
    latest = now_seconds - now_seconds % 900
    tokens = {"0.0.5001": 6, "0.0.5002": 2}
    snapshots = []
    for at in (latest - 1800, latest - 900, latest):
        tick = at // 900 % 1000
        book = {}
        for num in range(2, accounts + 2):
            holdings = []
            if num % 10 == 0:
                holdings.append(("0.0.5001", num * 1_000_000 + tick))
            if num % 25 == 0:
                holdings.append(("0.0.5002", num * 100))
            book[num] = Account(balance=num * 100_000_000 + tick * 1_000, tokens=holdings)
        # A treasury balance above 2**53: exact only if never a float.
        book[2] = Account(balance=5_000_000_000_000_000_000 - tick)
        # The account the Formance sandbox books as treasury:hedera (HBAR/8):
        # the demo's pair check compares the two.
        book[1234] = Account(balance=TREASURY_TINYBARS)
        snapshots.append(Snapshot.of(f"{at}.{123456789 + tick % 10:09d}", book))
    return HederaMirror(snapshots, tokens)


def demo_app() -> HederaMirror:
    return demo_mirror(int(time.time()))


def demo_source(url: str) -> dict:
    return {"provider": "hedera", "base_url": url, "schedule": "*/15 * * * *", "limit": 100,
            "include_tokens": True}


DEMO_CONNECTION = None
