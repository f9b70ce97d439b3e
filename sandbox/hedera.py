"""A fake Hedera mirror node: ``/api/v1/balances``, ``/api/v1/transactions`` and ``/api/v1/tokens/{id}``.

Answers as the Hiero mirror node's own REST module does, read from
``github:mpcq-network/mpcq-mirror-node`` at commit 60af5fda6
(``rest/balances.js``, ``rest/utils.js``, ``rest/entityId.js``,
``rest/middleware/requestHandler.js``, ``rest/config/application.yml``) and
checked against its request/response pairs in
``rest/__tests__/specs/balances/*.json``:

* Snapshot choice (``getAccountBalanceTimestampRange``): ``timestamp``
  bounds pick the latest snapshot inside them; ``eq`` means ``lte``;
  ``ne`` excludes one time. No snapshot in the bounds answers
  ``{"timestamp": null, "balances": [], "links": {"next": null}}``.
* ``timestamp`` of an answer is the snapshot's when rows are listed and
  **null whenever no row is** (``formatBalancesResult``): an empty page
  after an exactly full last page, and a filter or account range that
  matches nothing in an existing snapshot, alike.
* ``account.id`` (``parseAccountIdQueryParam`` / ``parseParams``): repeated
  values are deduplicated; exact ids (no operator or ``eq``) form one
  ``IN (...)`` list; every other value is one more condition, all of them
  **ANDed** (``0.0.98`` with ``gte:0.0.1000`` matches nothing). Ids are
  ``shard.realm.num``, ``realm.num`` or an encoded integer, compared as
  encoded ids (``entityId.js``). More than 100 values of one parameter
  get 400 (``maxRepeatedQueryParameters``).
* ``links.next`` (``getPaginationLink`` / ``getNextParamQueries`` /
  ``updateReqQuery`` / ``isEmptyRange``): null unless the page is full;
  otherwise the query as parsed (keys in first-seen order, values
  decoded and written back unencoded) with ``account.id`` values matching
  ``lt[e]?:`` (desc) or ``gt[e]?:`` (asc) removed and the anchor
  ``lt:<last>`` / ``gt:<last>`` added — added only when the *original*
  ``account.id`` value, as JavaScript writes an array (joined with
  commas), starts with ``gt``/``lt``, or when no ``account.id`` is left. So
  a query of exact ids only gets a link that **repeats the request**, and
  a link whose range is empty (``gte:0.0.20`` then ``lt:0.0.20``) is null.
* ``limit`` defaults to 25, larger values are cut to 100, 0 is refused;
  ``order`` defaults to ``desc``; unknown parameters get 400 with the
  ``_status`` body; token ``decimals`` is a string.

``/api/v1/transactions`` (``rest/transactions.js``, same commit, and
``rest/__tests__/specs/transactions/*.json``), the movements behind the
balances:

* Parameters (``acceptedTransactionParameters``): ``account.id``,
  ``limit``, ``order`` (default ``desc``), ``timestamp``, ``result``,
  ``type`` (credit/debit), ``transactiontype``; anything else 400.
  ``timestamp`` (``utils.parseTimestampFilters`` with strict checks, no
  range limit for this route): at most one lower and one upper bound, ``eq``
  alone. ``account.id`` (``extractSqlFromTransactionsRequest``): exact ids
  one ``IN`` list, every other condition ANDed; a transaction matches when
  an account that matches paid it or is in its HBAR or token transfers
  (``getTransactionTimestampsQuery``), and then **every** leg of it is
  listed, the other accounts' too (``getTransactionsDetails``).
* Pages by consensus timestamp, ``limit`` at most 100; ``links.next``
  (``doGetTransactions``, ``getPaginationLink``) only on a full page, the
  query with its ``timestamp`` bound on the side of the order replaced by
  ``lt:``/``gt:`` the last timestamp listed.
* ``transfers`` are the net HBAR change of each account (fees to the node
  and to 0.0.98 included, also on a failed transaction), ordered by
  account then amount (``cryptoTransferJsonAgg``); a staking reward is one
  of them, paid out of 0.0.800, and listed again in
  ``staking_reward_transfers`` (``createStakingRewardTransferList``).
  ``token_transfers`` by token then account; ``nft_transfers`` one serial
  each, without a sender when minted, without a receiver when burnt.
* A balance snapshot is the state after every transaction up to its
  consensus timestamp: the importer's own reconciliation adds the transfers
  with ``previous < consensus_timestamp <= current`` to one snapshot and
  must find the next
  (``60af5fda6:importer/src/main/java/org/hiero/mirror/importer/reconciliation/BalanceReconciliationService.java:reconcileCryptoTransfers``,
  ``reconcileTokenTransfers``). :func:`roll` books snapshots that way.

Not reproduced: the importer's month-partition bound (a snapshot more than
a month older than the requested time is not found by the real node),
aliases and EVM addresses as ``account.id``, ``account.balance`` and
``account.publickey`` filtering (accepted, ignored), live balances when no
``timestamp`` is given (the latest snapshot is served instead).
"""
from __future__ import annotations

import bisect
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from sandbox.live import HISTORY_MINUTES, MINUTE, MovingBook, minute_now, treasury_move
from sandbox.server import Request, Response, json_response

ALLOWED = ("account.balance", "account.id", "account.publickey", "limit", "order", "timestamp")
TRANSACTION_PARAMS = ("account.id", "limit", "order", "result", "timestamp", "transactiontype", "type")
OPERATORS = ("eq", "ne", "lt", "lte", "gt", "gte")
MAX_REPEATED = 100  # config.query.maxRepeatedQueryParameters
DEFAULT_LIMIT, MAX_LIMIT = 25, 100  # config.response.limit
# entityId.js: entityIdRegex and encodedEntityIdRegex (JavaScript's \d is ASCII).
_ENTITY_ID = re.compile(r"(?:([0-9]{1,4})\.)?([0-9]{1,5})\.([0-9]{1,12})")
_ENCODED_ID = re.compile(r"-?[0-9]{1,19}")
_TS = re.compile(r"([0-9]{1,10})(?:\.([0-9]{1,9}))?")  # utils.isValidTimestampParam
_POSITIVE = re.compile(r"[0-9]{1,19}")
_GT_LT = re.compile(r"[gl]te?:")  # utils.gtLtPattern, anchored at the start
_SHARD_BITS, _REALM_BITS, _NUM_BITS = 10, 16, 38


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
    match = _TS.fullmatch(text)
    if not match:
        raise ValueError(text)
    return int(match[1]) * 10**9 + int((match[2] or "0").ljust(9, "0"))


def encode_id(shard: int, realm: int, num: int) -> int:
    return (shard << (_REALM_BITS + _NUM_BITS)) | (realm << _NUM_BITS) | num


def parse_entity_id(text: str, shard: int = 0, realm: int = 0) -> int | None:
    """The encoded id of ``shard.realm.num``, ``realm.num`` or an encoded integer; None if invalid."""
    match = _ENTITY_ID.fullmatch(text)
    if match:
        return encode_id(int(match[1]) if match[1] is not None else shard, int(match[2]), int(match[3]))
    if _ENCODED_ID.fullmatch(text):
        value = int(text)
        return value if 0 <= value < 2**63 else None
    return None


def split_operator(value: str) -> tuple[str, str] | None:
    """``op:value`` as utils.parseOperatorAndValueFromQueryParam splits it."""
    parts = value.split(":")
    if len(parts) == 1:
        return "eq", parts[0]
    if len(parts) == 2 and parts[0] in OPERATORS:
        return parts[0], parts[1]
    return None


def parse_query(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """requestQueryParser: keys lowercased in first-seen order, repeats merged into a list."""
    query: dict[str, str | list[str]] = {}
    for key, value in pairs:
        key = key.lower()
        if key in query:
            current = query[key]
            query[key] = (current if isinstance(current, list) else [current]) + [value]
        else:
            query[key] = value
    return query


def values_of(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def js_string(value: str | list[str]) -> str:
    """How JavaScript turns the value into a string for ``RegExp.test``."""
    return ",".join(value) if isinstance(value, list) else value


def error(status: int, *messages: str) -> Response:
    return json_response({"_status": {"messages": [{"message": m} for m in messages]}}, status=status)


class HederaMirror:
    """The fake's application; ``snapshots`` may be changed between requests."""

    def __init__(self, snapshots: list[Snapshot], tokens: dict[str, int] | None = None,
                 shard: int = 0, realm: int = 0, transactions: "TransactionLog | None" = None) -> None:
        self.snapshots = sorted(snapshots, key=lambda s: s.nanos)
        self.tokens = dict(tokens or {})
        self.shard, self.realm = shard, realm
        self.transactions = transactions if transactions is not None else Transactions([])

    def __call__(self, request: Request) -> Response:
        if request.method != "GET":
            return error(405, "Method not allowed")
        if request.path.rstrip("/") == "/api/v1/balances":
            return self.balances(request)
        if request.path.rstrip("/") == "/api/v1/transactions":
            return self.transactions_page(request)
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

    # -- the request ---------------------------------------------------------

    def _invalid(self, query: dict[str, str | list[str]], allowed: tuple[str, ...] = ALLOWED) -> list[str]:
        """utils.validateReq: every bad parameter, in the order given."""
        bad = []
        for key, value in query.items():
            if key not in allowed:
                bad.append(f"Unknown query parameter: {key}")
                continue
            values = values_of(value)
            if len(values) > MAX_REPEATED:
                bad.append(f"Parameter values count exceeds maximum number allowed: {key} "
                           f"count: {len(values)} max: {MAX_REPEATED}")
                continue
            for v in values:
                if not self._valid(key, v):
                    bad.append(f"Invalid parameter: {key}")
        return bad

    def _valid(self, key: str, value: str) -> bool:
        split = value.split(":")
        if len(split) > 2:
            return False
        op, val = ("eq", split[0]) if len(split) == 1 else (split[0], split[1])
        if op not in OPERATORS:
            return False
        if key == "account.id":
            return parse_entity_id(val, self.shard, self.realm) is not None
        if key == "limit":
            return bool(_POSITIVE.fullmatch(val)) and int(val) > 0
        if key == "order":
            return val.lower() in ("asc", "desc")
        if key == "timestamp":
            return bool(_TS.fullmatch(val))
        if key == "type":
            return val.lower() in ("credit", "debit")
        if key == "result":
            return val.lower() in ("success", "fail")
        return True

    def balances(self, request: Request) -> Response:
        query = parse_query(request.query)
        bad = self._invalid(query)
        if bad:
            return error(400, *bad)
        limits = values_of(query.get("limit"))
        limit = min(int(limits[-1]), MAX_LIMIT) if limits else DEFAULT_LIMIT
        order = "asc" if js_string(query.get("order", "desc")).lower() == "asc" else "desc"
        snapshot = self._choose(values_of(query.get("timestamp")))
        if snapshot is None:
            return json_response({"timestamp": None, "balances": [], "links": {"next": None}})
        picked = self._pick(snapshot, values_of(query.get("account.id")), order, limit)
        balances = []
        for num in picked:
            account = snapshot.account(num)
            balances.append({
                "account": self._id(num),
                "balance": account.balance,
                "tokens": [{"token_id": t, "balance": b} for t, b in account.tokens],
            })
        next_link = None
        if len(balances) == limit:
            next_link = self._next_link(request.path, query, order, balances[-1]["account"])
        # formatBalancesResult: the timestamp comes from the rows; no row, no timestamp.
        return json_response({"timestamp": snapshot.timestamp if balances else None,
                              "balances": balances, "links": {"next": next_link}})

    def transactions_page(self, request: Request) -> Response:
        """``GET /api/v1/transactions`` (see the module docstring)."""
        query = parse_query(request.query)
        bad = self._invalid(query, TRANSACTION_PARAMS)
        if bad:
            return error(400, *bad)
        bounds = self._timestamp_bounds(values_of(query.get("timestamp")))
        if isinstance(bounds, Response):
            return bounds
        limits = values_of(query.get("limit"))
        limit = min(int(limits[-1]), MAX_LIMIT) if limits else DEFAULT_LIMIT
        order = "asc" if js_string(query.get("order", "desc")).lower() == "asc" else "desc"
        matches = self._account_matcher(values_of(query.get("account.id")))
        low, high, excluded = bounds
        listed = []
        if low <= high:
            for tx in self.transactions.between(low, high, descending=order == "desc"):
                if tx.nanos in excluded or not matches(tx):
                    continue
                listed.append(self._transaction(tx))
                if len(listed) == limit:
                    break
        next_link = None
        if len(listed) == limit:
            next_link = self._next_link(request.path, query, order, listed[-1]["consensus_timestamp"], "timestamp")
        return json_response({"transactions": listed, "links": {"next": next_link}})

    @staticmethod
    def _timestamp_bounds(params: list[str]) -> "tuple[int, int, set[int]] | Response":
        """utils.parseTimestampFilters for this route: strict, open ranges allowed, no range limit."""
        low, high, excluded, equal = 0, 2**63 - 1, set(), set()
        lowers = uppers = 0
        for param in params:
            op, value = split_operator(param)
            nanos = timestamp_nanos(value)
            if op == "eq":
                equal.add(nanos)
            elif op == "ne":
                excluded.add(nanos)
            elif op in ("gt", "gte"):
                lowers += 1
                low = max(low, nanos + (op == "gt"))
            else:
                uppers += 1
                high = min(high, nanos - (op == "lt"))
        if lowers > 1:
            return error(400, "Multiple gt or gte operators not permitted for timestamp param")
        if uppers > 1:
            return error(400, "Multiple lt or lte operators not permitted for timestamp param")
        if equal and (lowers or uppers or excluded):
            return error(400, "Cannot combine eq with ne, gt, gte, lt, or lte for timestamp param")
        if len(equal) > 1:
            return 1, 0, set()  # getTransactionTimestamps: more than one eq value lists nothing
        if equal:
            (low,) = equal
            high = low
        return low, high, excluded

    def _account_matcher(self, params: list[str]) -> Callable[["Tx"], bool]:
        """extractSqlFromTransactionsRequest: exact ids are one IN list, every other condition ANDed."""
        exact: set[int] = set()
        conditions: list[Callable[[int], bool]] = []
        for param in dict.fromkeys(params):
            op, value = split_operator(param)
            encoded = parse_entity_id(value, self.shard, self.realm)
            if op == "eq":
                exact.add(encoded)
            else:
                conditions.append({"ne": lambda a, e=encoded: a != e, "lt": lambda a, e=encoded: a < e,
                                   "lte": lambda a, e=encoded: a <= e, "gt": lambda a, e=encoded: a > e,
                                   "gte": lambda a, e=encoded: a >= e}[op])
        if exact:
            conditions.append(exact.__contains__)
        if not conditions:
            return lambda tx: True
        base = encode_id(self.shard, self.realm, 0)

        def matches(tx: "Tx") -> bool:
            accounts = {tx.payer} | {a for a, _ in tx.transfers} | {a for _, a, _ in tx.token_transfers}
            return any(all(c(base + a) for c in conditions) for a in accounts)
        return matches

    def _transaction(self, tx: "Tx") -> dict:
        """One transaction as ``formatTransactionRows`` writes it."""
        seconds = tx.timestamp.split(".")[0]
        return {
            "batch_key": None, "bytes": None, "charged_tx_fee": tx.charged_tx_fee,
            "consensus_timestamp": tx.timestamp, "entity_id": None, "max_custom_fees": [], "max_fee": "100000000",
            "memo_base64": None, "name": tx.name,
            "nft_transfers": [{"is_approval": False, "receiver_account_id": None if r is None else self._id(r),
                               "sender_account_id": None if s is None else self._id(s), "serial_number": n,
                               "token_id": t} for t, s, r, n in tx.nft_transfers],
            "node": self._id(tx.node), "nonce": 0, "parent_consensus_timestamp": None, "result": tx.result,
            "scheduled": False,
            "staking_reward_transfers": [{"account": self._id(a), "amount": n} for a, n in tx.staking_rewards],
            "token_transfers": [{"token_id": t, "account": self._id(a), "amount": n, "is_approval": False}
                                for t, a, n in sorted(tx.token_transfers)],
            "transaction_hash": "AQID", "transaction_id": f"{self._id(tx.payer)}-{seconds}-000000000",
            "transfers": [{"account": self._id(a), "amount": n, "is_approval": False}
                          for a, n in sorted(tx.transfers)],
            "valid_duration_seconds": "120", "valid_start_timestamp": f"{seconds}.000000000",
        }

    def _id(self, num: int) -> str:
        return f"{self.shard}.{self.realm}.{num}"

    def _choose(self, params: list[str]) -> Snapshot | None:
        """getOptimizedTimestampRange + getAccountBalanceTimestampRange."""
        if not params:
            return self.snapshots[-1] if self.snapshots else None
        lower, upper, excluded = 0, 2**63 - 1, set()
        for param in dict.fromkeys(params):  # parseParams dedupes
            op, value = split_operator(param)
            nanos = timestamp_nanos(value)
            if op in ("eq", "lte"):  # eq is turned into lte for balances
                upper = min(upper, nanos)
            elif op == "lt":
                upper = min(upper, nanos - 1)
            elif op == "gte":
                lower = max(lower, nanos)
            elif op == "gt":
                lower = max(lower, nanos + 1)
            else:
                excluded.add(nanos)
        candidates = [s for s in self.snapshots if lower <= s.nanos <= upper and s.nanos not in excluded]
        return candidates[-1] if candidates else None

    def _pick(self, snapshot: Snapshot, params: list[str], order: str, limit: int) -> list[int]:
        """The page's account numbers: every ``account.id`` condition ANDed."""
        base = encode_id(self.shard, self.realm, 0)
        low, high = base, base + 2**_NUM_BITS - 1  # this fake's accounts share one shard.realm
        exact: set[int] | None = None
        excluded: set[int] = set()
        for param in dict.fromkeys(params):
            op, value = split_operator(param)
            encoded = parse_entity_id(value, self.shard, self.realm)
            if op == "eq":
                exact = (exact or set()) | {encoded}
            elif op == "ne":
                excluded.add(encoded)
            elif op == "lt":
                high = min(high, encoded - 1)
            elif op == "lte":
                high = min(high, encoded)
            elif op == "gt":
                low = max(low, encoded + 1)
            else:
                low = max(low, encoded)
        if exact is not None:
            wanted = sorted(e - base for e in exact if low <= e <= high and e not in excluded)
            present = [n for n in wanted if _holds(snapshot.nums, n)]
            return (present if order == "asc" else present[::-1])[:limit]
        nums = snapshot.nums
        start, stop = bisect.bisect_left(nums, low - base), bisect.bisect_right(nums, high - base)
        indices = range(start, stop) if order == "asc" else range(stop - 1, start - 1, -1)
        picked = []
        for i in indices:
            if nums[i] + base in excluded:
                continue
            picked.append(nums[i])
            if len(picked) == limit:
                break
        return picked

    def _next_link(self, path: str, query: dict[str, str | list[str]], order: str, last: str,
                   field: str = "account.id") -> str | None:
        """getNextParamQueries with lastValueMap {field: last}, as the real node builds it."""
        query = dict(query)
        cursor = re.compile(r"gte?:" if order == "asc" else r"lte?:")  # operatorPatterns, unanchored
        anchor = f"{'gt' if order == 'asc' else 'lt'}:{last}"
        original = query.get(field)
        if isinstance(original, list):
            query[field] = [v for v in original if not cursor.search(v)]
        elif original is not None and cursor.search(original):
            del query[field]
        if field in query:
            if _GT_LT.match(js_string(original)):
                query[field] = values_of(query[field]) + [anchor]
        else:
            query[field] = anchor
        if self._empty_range(values_of(query[field]), field):
            return None
        pairs = [(k, v) for k, value in query.items() for v in values_of(value)]
        return path.rstrip("/") + "?" + "&".join(f"{k}={v}" for k, v in pairs)

    def _empty_range(self, values: list[str], field: str = "account.id") -> bool:
        """utils.isEmptyRange on the ``gt``/``lt`` values of the next link."""
        lower = upper = None
        for value in values:
            if not _GT_LT.match(value):
                continue
            op, text = split_operator(value)
            encoded = (timestamp_nanos(text) if field == "timestamp"
                       else parse_entity_id(text, self.shard, self.realm))
            if op in ("gt", "gte"):
                encoded += op == "gt"
                lower = encoded if lower is None else max(lower, encoded)
            else:
                encoded -= op == "lt"
                upper = encoded if upper is None else min(upper, encoded)
        return lower is not None and upper is not None and upper < lower


def _holds(nums: Sequence[int], num: int) -> bool:
    i = bisect.bisect_left(nums, num)
    return i < len(nums) and nums[i] == num


@dataclass(slots=True, frozen=True)
class Tx:
    """One transaction as the mirror node stores it: net HBAR change per account (fees included),
    token changes ``(token_id, num, amount)``, NFTs moved ``(token_id, sender, receiver, serial)``
    (None for a mint or a burn), the staking rewards paid ``(num, amount)`` (already in
    ``transfers``, out of 0.0.800)."""

    timestamp: str
    payer: int
    transfers: tuple[tuple[int, int], ...] = ()
    token_transfers: tuple[tuple[str, int, int], ...] = ()
    nft_transfers: tuple[tuple[str, int | None, int | None, int], ...] = ()
    staking_rewards: tuple[tuple[int, int], ...] = ()
    charged_tx_fee: int = 0
    node: int = 3
    result: str = "SUCCESS"
    name: str = "CRYPTOTRANSFER"

    @property
    def nanos(self) -> int:
        return timestamp_nanos(self.timestamp)


NODE, FEE_COLLECTOR, STAKING_REWARD_ACCOUNT = 3, 98, 800


def payment(timestamp: str, payer: int, to: int, amount: int, *, fee: int = 1_000, node: int = NODE) -> Tx:
    """``payer`` sends ``amount`` tinybars to ``to`` and pays ``fee``: 80% to the node, the rest to 0.0.98."""
    legs: dict[int, int] = {}
    for account, change in ((payer, -amount - fee), (to, amount), (node, fee * 4 // 5),
                            (FEE_COLLECTOR, fee - fee * 4 // 5)):
        legs[account] = legs.get(account, 0) + change
    return Tx(timestamp, payer, tuple((a, n) for a, n in sorted(legs.items()) if n), charged_tx_fee=fee, node=node)


class TransactionLog(Protocol):
    """The node's transactions, in consensus order, between two times (nanoseconds, inclusive)."""

    def between(self, low: int, high: int, *, descending: bool) -> Iterator[Tx]: ...


class Transactions:
    """A list of transactions (kept sorted)."""

    def __init__(self, transactions: Sequence[Tx]) -> None:
        self.items = sorted(transactions, key=lambda t: t.nanos)
        self._keys = [t.nanos for t in self.items]

    def between(self, low: int, high: int, *, descending: bool) -> Iterator[Tx]:
        start, stop = bisect.bisect_left(self._keys, low), bisect.bisect_right(self._keys, high)
        indices = range(stop - 1, start - 1, -1) if descending else range(start, stop)
        return (self.items[i] for i in indices)


def roll(book: dict[int, Account], transactions: Sequence[Tx]) -> dict[int, Account]:
    """The balances after ``transactions`` on ``book``: HBAR, token balances, NFT counts.

    A token an account reaches zero in stays listed (an association is
    removed by a transaction of its own, which moves nothing).
    """
    hbar = {num: account.balance for num, account in book.items()}
    tokens = {num: dict(account.tokens) for num, account in book.items()}
    for tx in transactions:
        for num, amount in tx.transfers:
            hbar[num] = hbar.get(num, 0) + amount
            tokens.setdefault(num, {})
        for token, num, amount in tx.token_transfers:
            held = tokens.setdefault(num, {})
            held[token] = held.get(token, 0) + amount
        for token, sender, receiver, _ in tx.nft_transfers:
            for num, change in ((sender, -1), (receiver, 1)):
                if num is not None:
                    held = tokens.setdefault(num, {})
                    held[token] = held.get(token, 0) + change
    return {num: Account(hbar.get(num, 0), sorted(tokens.get(num, {}).items())) for num in sorted(hbar)}


def rolled_snapshots(book: dict[int, Account], transactions: Sequence[Tx], times: Sequence[str]) -> list[Snapshot]:
    """Snapshots at ``times`` of ``book`` moved by the transactions up to each: what the importer's
    reconciliation holds every pair of snapshots to."""
    snapshots, done = [], []
    ordered = sorted(transactions, key=lambda t: t.nanos)
    for when in sorted(times, key=timestamp_nanos):
        done = [t for t in ordered if t.nanos <= timestamp_nanos(when)]
        snapshots.append(Snapshot.of(when, roll(book, done)))
    return snapshots


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


# The demo's book moves by transactions every 15 minutes (a "tick"), from the epoch on, so any
# snapshot's balances follow from its time alone and agree with every transaction before it:
# a demo run next hour serves the same book for 10:15 as this one did.
TICK = 900
DEMO_TOKEN, DEMO_TOKEN_DECIMALS = "0.0.5001", 6
PAYERS = range(10, 210)  # tick j: 0.0.(10 + j % 200) pays 0.0.(11 + j % 200)
PAYMENT, FEE = 250_000, 1_000
HOLDERS = 24  # tick j: 0.0.(10 * (1 + j % 24)) sends 3 units of DEMO_TOKEN to the next holder
REWARDED, REWARD = 100, 500  # every fourth tick 0.0.100 is paid a staking reward
# The planted break: every other tick 0.0.777 gains 7 tinybars that no transaction explains, so
# each demo run's two windows hold exactly one unexplained change.
PLANTED, PLANTED_TINYBARS = 777, 7


def _times(m: int, r: int, tick: int) -> int:
    """How many ticks ``j`` in ``[0, tick]`` have ``j % m == r``."""
    return 0 if tick < r else (tick - r) // m + 1


def demo_transactions(j: int) -> list[Tx]:
    """The transactions of tick ``j``, all inside ``(j - 1, j]``'s snapshots."""
    at = j * TICK
    holder, receiver = 10 * (1 + j % HOLDERS), 10 * (1 + (j + 1) % HOLDERS)
    txs = [payment(f"{at - 600}.000000001", PAYERS[0] + j % len(PAYERS), PAYERS[0] + 1 + j % len(PAYERS), PAYMENT),
           Tx(f"{at - 400}.000000002", holder, transfers=((NODE, FEE * 4 // 5), (FEE_COLLECTOR, FEE // 5),
                                                         (holder, -FEE)),
              token_transfers=((DEMO_TOKEN, holder, -3), (DEMO_TOKEN, receiver, 3)), charged_tx_fee=FEE)]
    if j % 4 == 0:
        txs.append(Tx(f"{at - 200}.000000003", REWARDED,
                      transfers=((NODE, FEE * 4 // 5), (FEE_COLLECTOR, FEE // 5), (REWARDED, REWARD - FEE),
                                 (STAKING_REWARD_ACCOUNT, -REWARD)),
                      staking_rewards=((REWARDED, REWARD),), charged_tx_fee=FEE))
    return txs


def demo_hbar(num: int, tick: int) -> int:
    """0.0.num's tinybars after every transaction up to tick ``tick`` (and the planted change)."""
    balance = {2: 5_000_000_000_000_000_000, 1234: TREASURY_TINYBARS, STAKING_REWARD_ACCOUNT: 10**15}.get(
        num, num * 100_000_000_000)
    if num in PAYERS:
        balance -= (PAYMENT + FEE) * _times(len(PAYERS), num - PAYERS[0], tick)
    if num - 1 in PAYERS:
        balance += PAYMENT * _times(len(PAYERS), num - 1 - PAYERS[0], tick)
    if num % 10 == 0 and 1 <= num // 10 <= HOLDERS:
        balance -= FEE * _times(HOLDERS, num // 10 - 1, tick)
    rewards = _times(4, 0, tick)
    fees = 2 * (tick + 1) + rewards  # every tick's two transactions, every fourth tick's reward transaction
    balance += {NODE: FEE * 4 // 5 * fees, FEE_COLLECTOR: FEE // 5 * fees, REWARDED: (REWARD - FEE) * rewards,
                STAKING_REWARD_ACCOUNT: -REWARD * rewards,
                PLANTED: PLANTED_TINYBARS * _times(2, 0, tick)}.get(num, 0)
    return balance


def demo_token(num: int, tick: int) -> int:
    held = num // 10
    return num * 1_000_000 - 3 * _times(HOLDERS, held - 1, tick) + 3 * _times(HOLDERS, (held - 2) % HOLDERS, tick)


class DemoTransactions:
    """The demo's transactions up to tick ``last``, made on the fly for the range asked."""

    def __init__(self, last: int) -> None:
        self.last = last

    def between(self, low: int, high: int, *, descending: bool) -> Iterator[Tx]:
        first, final = max(0, low // (TICK * 10**9)), min(self.last, high // (TICK * 10**9) + 1)
        ticks = range(final, first - 1, -1) if descending else range(first, final + 1)
        for j in ticks:
            txs = demo_transactions(j)
            for tx in (reversed(txs) if descending else txs):
                if low <= tx.nanos <= high:
                    yield tx


def demo_mirror(now_seconds: int, accounts: int = 240) -> HederaMirror:
    """Three snapshots 15 minutes apart, the latest at or before ``now_seconds``, and the transactions
    between them: the book of :func:`demo_hbar` and :func:`demo_token`, the planted break included."""
    # A second back: the snapshot's sub-second part must not lie after the
    # moment the app is made, or "now" would pick the snapshot before it.
    latest = (now_seconds - 1) - (now_seconds - 1) % TICK
    tokens = {DEMO_TOKEN: DEMO_TOKEN_DECIMALS, "0.0.5002": 2}
    snapshots = []
    for at in (latest - 2 * TICK, latest - TICK, latest):
        tick = at // TICK
        book = {}
        for num in [*range(2, accounts + 2), PLANTED, STAKING_REWARD_ACCOUNT, 1234]:
            holdings = []
            if num % 10 == 0 and 1 <= num // 10 <= HOLDERS:
                holdings.append((DEMO_TOKEN, demo_token(num, tick)))
            if num % 25 == 0 and num <= accounts + 1:
                holdings.append(("0.0.5002", num * 100))
            book[num] = Account(balance=demo_hbar(num, tick), tokens=holdings)
        snapshots.append(Snapshot.of(f"{at}.{123456789 + tick % 10:09d}", book))
    return HederaMirror(snapshots, tokens, transactions=DemoTransactions(latest // TICK))


def demo_app() -> HederaMirror:
    return demo_mirror(int(time.time()))


def demo_source(url: str) -> dict:
    return {"provider": "hedera", "base_url": url, "schedule": "*/15 * * * *", "limit": 100,
            "include_tokens": True}


DEMO_CONNECTION = None


# --- live: the demo data moving by the minute, for ``scripts/demo --serve`` ---------------------


class LiveHedera(MovingBook):
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
        if num == 1234:
            return TREASURY_TINYBARS + treasury_move(minute)
        # Each account drifts on its own rhythm, up and down.
        return num * 100_000_000 + ((minute * (num % 13 + 1)) % 50) * 1_000_000

    @staticmethod
    def token(num: int, minute: int) -> int | None:
        return num * 1_000_000 + (minute * num) % 997 if num % 10 == 0 else None

    def snapshot(self, minute: int):
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


# The live mirror answers 50 accounts a page, so each shard takes several pages.
LIVE_KEYS = {"limit": 50}


def live_app() -> LiveHedera:
    """The moving mirror node that ``scripts/demo --serve`` and the live tests serve."""
    return LiveHedera()
