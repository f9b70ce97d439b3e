"""Hedera mirror node: ``GET /api/v1/balances`` snapshots.

What differs from the other providers: a ``links.next`` paginator, the
snapshot chosen once per run with an unfiltered ``timestamp=lte:<time>``
(so history is available and backfills work), the returned ``timestamp``
as ``as_of``, HBAR in tinybars, and token decimals looked up per token.

``account_ids`` is a union: the node ANDs repeated ``account.id``
parameters, so each range is paged through on its own (overlapping ranges
merged first, so no account is read twice) and exact ids are asked for in
groups that fit one page. An exact id the snapshot lacks is a rejected
record (``missing``), never a zero balance; a range holding no account is a
warning. A page with no balances ends a range whatever its ``timestamp``
(the node sends null there) and its link.

Movements (``movements(window)``): ``GET /api/v1/transactions`` with
``timestamp=gt:<start>&timestamp=lte:<end>``, the consensus timestamps of
the window's two snapshots, to the nanosecond: a balance snapshot is the
state after every transaction up to its timestamp (the importer's own
reconciliation, ``60af5fda6:importer/src/main/java/org/hiero/mirror/importer/reconciliation/BalanceReconciliationService.java:reconcileCryptoTransfers``,
adds the transfers ``> previous`` and ``<= current``). The same account
ranges and exact ids as the balances (the same shards), each paged through
on its own, ascending (``60af5fda6:rest/transactions.js:getTransactions``). A
transaction lists every leg, the other accounts' too
(``rest/transactions.js:getTransactionsDetails``): only the legs of the accounts the query was
for are kept, so a transaction two queries return is counted once. HBAR
``transfers`` are each account's net change (the fee included); the legs
of the node and 0.0.98 receiving the fee, and a payer whose only leg is the
fee, are ``fee``; a staking reward (listed in ``transfers`` out of 0.0.800,
and again in ``staking_reward_transfers``) is ``reward`` and counted once;
``token_transfers`` and ``nft_transfers`` (one serial: a count of 1) are
the tokens'. The node may end a page early and still link on (it binds an
open time range, ``60af5fda6:rest/timestampRange.js:bindTimestampRange``): only a
null link ends a query.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Iterator

from pydantic import field_validator

from extractors.errors import (
    MalformedResponseError,
    NoSnapshotAvailable,
    ProviderError,
    SnapshotError,
)
from extractors.credentials import Credentials
from extractors.http import HttpClient, error_text, http_error
from extractors.paginators import NextLinkPaginator, check_page_cap
from extractors.provider import BaseExtractor, Provider, Throttle
from extractors.settings import Between, Count, OneOrMore, ProviderSettings, Text, Url
from extractors.records import (
    BalanceRow,
    MovementPage,
    MovementRow,
    Page,
    RecordError,
    Window,
    integer_amount,
    require,
)

HBAR = "HBAR"
HBAR_DECIMALS = 8
MAX_LIMIT = 100
# Accounts that take a transaction's fee: the node (named per transaction), the network's fee
# collector, and the two staking reward accounts (HIP-406: part of every fee funds rewards).
FEE_ACCOUNTS = frozenset({"0.0.98", "0.0.800", "0.0.801"})
STAKING_REWARD_ACCOUNT = "0.0.800"
TOKENS_LISTED_AT_MOST = 50  # HIP-367: the balances endpoint cuts the rest silently
INT64_MAX = 2**63 - 1

# What the mirror node answers with: shard.realm.num (rest/entityId.js toString).
_ENTITY_ID = re.compile(r"[0-9]{1,10}\.[0-9]{1,10}\.[0-9]{1,10}")
# What a user may write in account_ids: the forms rest/entityId.js accepts
# (shard.realm.num, realm.num, a bare number), each with an optional operator.
_ACCOUNT_EXPRESSION = re.compile(r"(?:(eq|lt|lte|gt|gte):)?(?:(?:([0-9]{1,4})\.)?([0-9]{1,5})\.)?([0-9]{1,12})")
_TIMESTAMP = re.compile(r"([0-9]{1,12})\.([0-9]{9})")
# rest/entityId.js: |10-bit shard|16-bit realm|38-bit num|; the node orders
# and compares account ids as this integer.
_SHARD_BITS, _REALM_BITS, _NUM_BITS = 10, 16, 38
MAX_ENCODED_ID = 2 ** (_SHARD_BITS + _REALM_BITS + _NUM_BITS) - 1


def encode_id(shard: int, realm: int, num: int) -> int:
    return (shard << (_REALM_BITS + _NUM_BITS)) | (realm << _NUM_BITS) | num


def id_text(encoded: int) -> str:
    """``shard.realm.num`` of an encoded id."""
    num = encoded & (2**_NUM_BITS - 1)
    realm = (encoded >> _NUM_BITS) & (2**_REALM_BITS - 1)
    return f"{encoded >> (_REALM_BITS + _NUM_BITS)}.{realm}.{num}"


def parse_account_id(text: Any) -> int | None:
    """The encoded id of a ``shard.realm.num`` the node sent, or None."""
    if text.__class__ is str and text.startswith("0.0."):
        # Shard 0, realm 0, as every id of the public networks: its num is the encoded id.
        num = text[4:]
        if 0 < len(num) <= 10 and num.isascii() and num.isdigit():
            num = int(num)
            return num if num < 2**_NUM_BITS else None
    if not isinstance(text, str) or not _ENTITY_ID.fullmatch(text):
        return None
    shard, realm, num = map(int, text.split("."))
    if shard >= 2**_SHARD_BITS or realm >= 2**_REALM_BITS or num >= 2**_NUM_BITS:
        return None
    return encode_id(shard, realm, num)


@dataclass(slots=True, frozen=True)
class AccountExpression:
    """One ``account_ids`` entry: an exact id or a one-sided range, as an inclusive interval."""

    text: str
    low: int
    high: int

    @property
    def exact(self) -> bool:
        return self.low == self.high


def parse_account_expression(text: str) -> AccountExpression:
    """``0.0.98``, ``eq:0.0.98``, ``gte:0.0.1000``, ... as the ids they cover; ValueError otherwise.

    Short forms mean shard 0, realm 0, as on every public network (the node
    fills in its own shard and realm; an encoded number equals the num there).
    """
    match = _ACCOUNT_EXPRESSION.fullmatch(text)
    if not match:
        if text.startswith("ne:"):
            raise ValueError(
                f"{text!r}: the mirror node cannot page through 'ne:' (its next link repeats the "
                "request); list the ranges on either side instead, e.g. 'lt:0.0.98', 'gt:0.0.98'",
            )
        raise ValueError(
            f"{text!r} is not an account.id expression such as '0.0.98' or 'gte:0.0.1000'",
        )
    op, shard, realm, num = match[1] or "eq", int(match[2] or 0), int(match[3] or 0), int(match[4])
    if shard >= 2**_SHARD_BITS or realm >= 2**_REALM_BITS or num >= 2**_NUM_BITS:
        raise ValueError(f"{text!r}: shard, realm or num out of range for an entity id")
    encoded = encode_id(shard, realm, num)
    low, high = {
        "eq": (encoded, encoded),
        "lt": (0, encoded - 1),
        "lte": (0, encoded),
        "gt": (encoded + 1, MAX_ENCODED_ID),
        "gte": (encoded, MAX_ENCODED_ID),
    }[op]
    if low > high:
        raise ValueError(f"{text!r} matches no possible account id")
    return AccountExpression(text, low, high)


class Settings(ProviderSettings):
    """The ``[sources.<name>]`` keys a Hedera source accepts."""

    base_url: Url
    account_ids: OneOrMore[Text] = []
    # The mirror node silently cuts larger limits to 100; say so instead.
    limit: Annotated[Count, Between(1, MAX_LIMIT)] = 100
    include_tokens: bool = True
    api_key_header: Text = "x-api-key"

    def __init__(self, base_url: str | None = None, /, **keys: Any) -> None:
        # Settings("https://node", ...) reads as well as Settings(base_url=...).
        super().__init__(**keys if base_url is None else {"base_url": base_url, **keys})

    @field_validator("account_ids")
    @classmethod
    def _expressions(cls, account_ids: list[str]) -> list[str]:
        for expr in account_ids:
            parse_account_expression(expr)
        return account_ids

    def expressions(self) -> list[AccountExpression]:
        return [parse_account_expression(expr) for expr in self.account_ids]


def format_timestamp(at: datetime) -> str:
    """``seconds.nanoseconds`` as the mirror node writes timestamps."""
    if at.tzinfo is None:
        raise ValueError("snapshot time must be timezone-aware")
    at = at.astimezone(timezone.utc)
    seconds = int(at.replace(microsecond=0).timestamp())
    return f"{seconds}.{at.microsecond * 1000:09d}"


def parse_timestamp(text: Any) -> datetime:
    """The mirror node's ``seconds.nanoseconds`` as an aware datetime (µs)."""
    match = _TIMESTAMP.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise MalformedResponseError(f"timestamp {text!r} is not seconds.nanoseconds")
    seconds, nanos = int(match[1]), int(match[2])
    return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=nanos // 1000)


def hedera_error(response) -> ProviderError:
    """The mirror node's ``_status.messages`` as the error text."""
    try:
        messages = response.json()["_status"]["messages"]
        text = "; ".join(
            " - ".join(str(m[k]) for k in ("message", "detail") if m.get(k)) for m in messages
        )
    except (ValueError, KeyError, TypeError):
        text = error_text(response)
    return http_error(response, text)


def merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching inclusive intervals joined: each id in at most one."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(intervals):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


@dataclass(slots=True)
class _Plan:
    """What one crawl (one shard) asks for, and what it must find."""

    ranges: list[tuple[int, int]]  # disjoint, each paged through on its own
    lookups: list[list[int]]  # exact ids outside the ranges, at most one page each
    expected: set[int]  # every exact id of this shard: absent ones are missing
    watched: list[AccountExpression]  # ranges that warn when they match nothing here
    matched: set[str] = field(default_factory=set)


class HederaExtractor(BaseExtractor):
    """Reads one consistent balance snapshot, page by page.

    The snapshot is chosen once per run (:meth:`choose_snapshot`); every
    request then asks for exactly that snapshot (``timestamp=lte:<its
    time>``), so shards and account expressions cannot straddle two.
    """

    path = "/api/v1/balances"

    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int) -> None:
        super().__init__(settings, client, max_pages=max_pages)
        self._decimals: dict[str, int | None] = {}
        # Movement legs name the same accounts (the node, 0.0.98, the payers) page after page.
        self._ids: dict[str, int | None] = {}

    def choose_snapshot(self, at: datetime) -> tuple[datetime, str] | None:
        """The latest snapshot at or before ``at`` (``as_of``, ``as_of_raw``); None if there is none.

        Asked unfiltered: a filtered question answers ``timestamp: null``
        both for "no snapshot" and for "no account matches".
        """
        data = self.client.get_json(self.path, [("timestamp", f"lte:{format_timestamp(at)}"), ("limit", 1)])
        balances = self._balances(data)
        raw_ts = data["timestamp"]
        if not balances:
            return None
        if raw_ts is None:
            raise MalformedResponseError("balances listed without a snapshot timestamp",
                                         raw=data)
        as_of = parse_timestamp(raw_ts)
        if as_of > at:
            raise SnapshotError(f"asked for a snapshot at or before {at.isoformat()}, got {raw_ts}")
        return as_of, raw_ts

    def probe(self) -> str:
        """One request: the node's latest balance snapshot (``balances check --connect``)."""
        snapshot = self.choose_snapshot(datetime.now(timezone.utc))
        return "no balance snapshot yet" if snapshot is None else f"latest snapshot {snapshot[1]}"

    def shard_ranges(self, at: datetime, shards: int,
                     snapshot: tuple[datetime, str] | None = None) -> list[tuple[str | None, str | None]]:
        """Split the snapshot's account ids into ``shards`` ranges [gte, lt).

        The highest account of the snapshot bounds the space; the first range
        is open below and the last above, so no account can be missed.
        Equal widths: account numbers are dense enough on Hedera networks for
        this to balance. A range may hold no account: it loads nothing.
        """
        bound = snapshot[1] if snapshot is not None else format_timestamp(at)
        data = self.client.get_json(self.path, [("timestamp", f"lte:{bound}"), ("limit", 1), ("order", "desc")])
        balances = self._balances(data)
        if not balances:
            return [(None, None)] + [("0.0.0", "0.0.0")] * (shards - 1)
        top = require(balances[0], "account")
        if parse_account_id(top) is None:
            raise MalformedResponseError(f"account {top!r} is not a shard.realm.num id")
        prefix, top_num = top.rsplit(".", 1)[0], int(top.rsplit(".", 1)[1])
        width = -(-(top_num + 1) // shards)
        bounds = [i * width for i in range(shards)] + [None]
        return [(None if i == 0 else f"{prefix}.{lo}", None if hi is None else f"{prefix}.{hi}")
                for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def _plan(self, account_range: tuple[str | None, str | None] | None) -> _Plan:
        low, high = 0, MAX_ENCODED_ID
        if account_range is not None:
            if account_range[0] is not None:
                low = self._bound(account_range[0])
            if account_range[1] is not None:
                high = self._bound(account_range[1]) - 1
        expressions = self.settings.expressions()
        if not expressions:
            return _Plan([(low, high)] if low <= high else [], [], set(), [])
        ranges = merge([(max(e.low, low), min(e.high, high)) for e in expressions
                        if not e.exact and max(e.low, low) <= min(e.high, high)])
        exact = sorted({e.low for e in expressions if e.exact and low <= e.low <= high})
        outside = [i for i in exact if not any(lo <= i <= hi for lo, hi in ranges)]
        size = self.settings.limit
        lookups = [outside[i:i + size] for i in range(0, len(outside), size)]
        # A range spanning several shards is judged by none of them alone.
        watched = [e for e in expressions if not e.exact and low <= e.low and e.high <= high]
        return _Plan(ranges, lookups, set(exact), watched)

    @staticmethod
    def _bound(text: str) -> int:
        encoded = parse_account_id(text)
        if encoded is None:
            raise ValueError(f"shard bound {text!r} is not a shard.realm.num id")
        return encoded

    def pages(self, at: datetime, account_range: tuple[str | None, str | None] | None = None,
              snapshot: tuple[datetime, str] | None = None) -> Iterator[Page]:
        """Yield the pages of the snapshot chosen for ``at``.

        ``snapshot`` is the run's chosen (``as_of``, ``as_of_raw``); without
        it the snapshot is chosen here. ``account_range`` (``gte``, ``lt``,
        either possibly None) restricts the crawl to one shard of the
        account-id space. Exact ids the snapshot does not hold and ranges
        that match nothing come last, on a page of no rows.
        """
        if snapshot is None:
            snapshot = self.choose_snapshot(at)
            if snapshot is None:
                raise NoSnapshotAvailable(f"the mirror node has no balance snapshot at or before {at.isoformat()}")
        plan = self._plan(account_range)
        yield from self._read(plan, snapshot)
        # What only the end of the crawl can tell, on one more page of no rows.
        tail = Page(as_of=snapshot[0], as_of_raw=snapshot[1])
        for missing in sorted(plan.expected):
            tail.reject({"account": id_text(missing)},
                        f"missing: snapshot {snapshot[1]} holds no account {id_text(missing)} "
                        "(a missing account is not read as zero)", code="missing")
        for expression in plan.watched:
            if expression.text not in plan.matched:
                tail.warnings.append(f"account_ids entry {expression.text!r} matches no account "
                                     f"in snapshot {snapshot[1]}")
        if tail.rejected or tail.warnings:
            yield tail

    def _read(self, plan: _Plan, snapshot: tuple[datetime, str]) -> Iterator[Page]:
        pinned = ("timestamp", f"lte:{snapshot[1]}")
        read = 0
        for low, high in plan.ranges:
            params: list[tuple[str, Any]] = [("limit", self.settings.limit), pinned]
            if low > 0:
                params.append(("account.id", f"gte:{id_text(low)}"))
            if high < MAX_ENCODED_ID:
                params.append(("account.id", f"lte:{id_text(high)}"))
            check_page_cap(read, self.max_pages)
            # The page cap holds for the whole crawl, not for each range. The
            # real node ends a range with an empty page whose timestamp is
            # null and whose link may still be set: no balances, no next page.
            paginator = NextLinkPaginator(next_path=("links", "next"), records_path=("balances",),
                                          max_pages=self.max_pages - read)
            for data in self.client.paginate(self.path, params, paginator):
                read += 1
                page, _ = self._page(data, snapshot, plan)
                yield page
        for ids in plan.lookups:
            # At most `limit` exact ids: one page holds them all. The node's
            # next link for exact ids has no anchor (it repeats the request),
            # so it is never followed.
            check_page_cap(read, self.max_pages)
            params = [("limit", self.settings.limit), pinned] + [("account.id", id_text(i)) for i in ids]
            data = self.client.get_json(self.path, params)
            read += 1
            page, _ = self._page(data, snapshot, plan, asked=set(ids))
            yield page

    # -- movements ------------------------------------------------------------------

    def movements(self, window: Window,
                  account_range: tuple[str | None, str | None] | None = None) -> Iterator[MovementPage]:
        """Yield the window's movement legs for the source's accounts (this shard's), a page per node page."""
        start, end = timestamp_nanos(window.start_raw), timestamp_nanos(window.end_raw)
        pinned = [("timestamp", f"gt:{window.start_raw}"), ("timestamp", f"lte:{window.end_raw}")]
        plan = self._plan(account_range)
        queries: list[tuple[list[tuple[str, Any]], Callable[[int], bool]]] = []
        for low, high in plan.ranges:
            params: list[tuple[str, Any]] = []
            if low > 0:
                params.append(("account.id", f"gte:{id_text(low)}"))
            if high < MAX_ENCODED_ID:
                params.append(("account.id", f"lte:{id_text(high)}"))
            queries.append((params, lambda account, low=low, high=high: low <= account <= high))
        for ids in plan.lookups:
            queries.append(([("account.id", id_text(i)) for i in ids], set(ids).__contains__))
        read = 0
        for params, ours in queries:
            check_page_cap(read, self.max_pages)
            # No records_path: a page may hold no transaction and still link on (a bound range).
            paginator = NextLinkPaginator(next_path=("links", "next"), max_pages=self.max_pages - read)
            query = [("limit", self.settings.limit), ("order", "asc"), *pinned, *params]
            for data in self.client.paginate(TRANSACTIONS_PATH, query, paginator):
                read += 1
                page = MovementPage()
                for _, legs in page.parse_each(_transactions(data), lambda tx: self._legs(tx, start, end)):
                    page.rows.extend(leg for leg, account in legs if ours(account))
                yield page

    def _legs(self, tx: Any, start: int, end: int) -> list[tuple[MovementRow, int]]:
        """A transaction's legs, each with its encoded account."""
        stamp = require(tx, "consensus_timestamp")
        if not isinstance(stamp, str) or not _TIMESTAMP.fullmatch(stamp):
            raise RecordError(f"consensus_timestamp {stamp!r} is not seconds.nanoseconds")
        if not start < timestamp_nanos(stamp) <= end:
            # Asked for (start, end]: an answer outside is the node's mistake, never a movement to keep.
            raise MalformedResponseError(f"asked for transactions after {_text(start)} up to {_text(end)}, "
                                         f"got one at {stamp}", raw=tx)
        when = parse_timestamp(stamp)
        fee = integer_amount(require(tx, "charged_tx_fee"), "charged_tx_fee", minimum=0, maximum=INT64_MAX)
        node = tx.get("node")
        rewards = {(r.get("account"), r.get("amount")) for r in _listed(tx, "staking_reward_transfers")
                   if isinstance(r, dict)}
        legs: list[tuple[MovementRow, int]] = []
        hbar = [(require(t, "account"), integer_amount(require(t, "amount"), "transfer amount",
                                                       minimum=-INT64_MAX, maximum=INT64_MAX))
                for t in _listed(tx, "transfers")]
        for index, (account, amount) in enumerate(hbar):
            if (account, amount) in rewards or (account == STAKING_REWARD_ACCOUNT and amount < 0 and rewards):
                kind = "reward"
            elif amount > 0 and (account == node or account in FEE_ACCOUNTS):
                kind = "fee"
            elif amount < 0 and -amount == fee and account == _payer(tx):
                kind = "fee"
            else:
                kind = "transfer"
            legs.append(self._leg(account, HBAR, when, stamp, f"{stamp}#hbar{index}", amount, kind, HBAR_DECIMALS,
                                  _counterparty(hbar, index, node)))
        if self.settings.include_tokens:
            tokens = [(require(t, "token_id"), require(t, "account"),
                       integer_amount(require(t, "amount"), "token transfer amount", minimum=-INT64_MAX,
                                      maximum=INT64_MAX)) for t in _listed(tx, "token_transfers")]
            for index, (token, account, amount) in enumerate(tokens):
                _check_id(token, "token_id")
                same = [(a, n) for t, a, n in tokens if t == token]
                at = same.index((account, amount))
                legs.append(self._leg(account, token, when, stamp, f"{stamp}#token{index}", amount, "transfer",
                                      self.token_decimals(token), _counterparty(same, at, None)))
            for index, nft in enumerate(_listed(tx, "nft_transfers")):
                token = require(nft, "token_id")
                _check_id(token, "token_id")
                sender, receiver = require(nft, "sender_account_id"), require(nft, "receiver_account_id")
                kind = "mint" if sender is None else "burn" if receiver is None else "transfer"
                for side, (account, other, amount) in enumerate(((sender, receiver, -1), (receiver, sender, 1))):
                    if account is not None:
                        legs.append(self._leg(account, token, when, stamp, f"{stamp}#nft{index}.{side}", amount,
                                              kind, 0, other))
        return legs

    def _leg(self, account: Any, asset: str, when: datetime, stamp: str, movement_id: str, amount: int, kind: str,
             decimals: int | None, counterparty: str | None) -> tuple[MovementRow, int]:
        encoded = self._ids.get(account) if isinstance(account, str) else None
        if encoded is None:
            encoded = parse_account_id(account)
            if encoded is not None and len(self._ids) < ID_CACHE:
                self._ids[account] = encoded
        if encoded is None:
            raise RecordError(f"account {account!r} is not a shard.realm.num id")
        return MovementRow(account, asset, when, stamp, movement_id, amount, kind, decimals, counterparty), encoded

    def _balances(self, data: Any) -> list:
        if not isinstance(data, dict):
            raise MalformedResponseError("balances page is not a JSON object", raw=data)
        if "timestamp" not in data:
            raise MalformedResponseError("balances page has no timestamp field", raw=data)
        balances = data.get("balances")
        if not isinstance(balances, list):
            raise MalformedResponseError("page has no balances list", raw=data)
        return balances

    def _page(self, data: Any, snapshot: tuple[datetime, str], plan: _Plan,
              asked: set[int] | None = None) -> tuple[Page, int]:
        balances = self._balances(data)
        page = Page(as_of=snapshot[0], as_of_raw=snapshot[1])
        if not balances:
            return page, 0
        raw_ts = data["timestamp"]
        if raw_ts is None:
            raise MalformedResponseError("balances listed without a snapshot timestamp",
                                         raw=data)
        if raw_ts != snapshot[1]:
            # Every page must come from the one snapshot chosen for the run.
            raise SnapshotError(f"a page is from snapshot {raw_ts}, not {snapshot[1]} chosen for this run")
        for record, account in page.parse_each(balances, lambda record: self._parse_account(record, page)):
            if asked is not None and account not in asked:
                raise MalformedResponseError(f"asked for {len(asked)} account(s) by id, got {id_text(account)} "
                                             "as well", raw=record)
            plan.expected.discard(account)
            for expression in plan.watched:
                if expression.low <= account <= expression.high:
                    plan.matched.add(expression.text)
        return page, len(balances)

    def _parse_account(self, record: Any, page: Page) -> int:
        """The record's rows onto ``page``; its encoded account id.

        The common case (an object whose fields are what the node sends) is
        read with as few operations as possible: a million accounts pass
        here. Anything else takes the general readers, which say what is wrong.
        """
        if record.__class__ is dict and "account" in record and "balance" in record and "tokens" in record:
            account, tinybars, tokens = record["account"], record["balance"], record["tokens"]
        else:
            account, tinybars, tokens = require(record, "account"), None, None
        encoded = parse_account_id(account)
        if encoded is None:
            raise RecordError(f"account {account!r} is not a shard.realm.num id")
        if tinybars.__class__ is not int or not 0 <= tinybars <= INT64_MAX:
            tinybars = integer_amount(require(record, "balance"), "balance", minimum=0, maximum=INT64_MAX)
        rows = [BalanceRow(account, HBAR, tinybars, HBAR_DECIMALS)]
        # Absent is not empty: a record without its tokens list would silently drop holdings.
        if tokens is None:
            tokens = require(record, "tokens")
        if not isinstance(tokens, list):
            raise RecordError(f"tokens is {type(tokens).__name__}, expected a list")
        if self.settings.include_tokens and tokens:
            known = self._decimals
            for token in tokens:
                if token.__class__ is dict and "token_id" in token and "balance" in token:
                    token_id, amount = token["token_id"], token["balance"]
                else:
                    token_id, amount = require(token, "token_id"), None
                # A token id seen before on this run was checked then (and its decimals looked up).
                if token_id.__class__ is not str or token_id not in known:
                    if parse_account_id(token_id) is None:
                        raise RecordError(f"token_id {token_id!r} is not a shard.realm.num id")
                if amount.__class__ is not int or not 0 <= amount <= INT64_MAX:
                    amount = integer_amount(require(token, "balance"), f"balance of token {token_id}",
                                            minimum=0, maximum=INT64_MAX)
                rows.append(BalanceRow(account, token_id, amount, self.token_decimals(token_id)))
            if len(tokens) >= TOKENS_LISTED_AT_MOST:
                page.warnings.append(
                    f"account {account} lists {len(tokens)} tokens: its token balances may be "
                    "truncated (HIP-367 caps this endpoint at 50 per account)"
                )
        page.rows.extend(rows)
        return encoded

    def token_decimals(self, token_id: str) -> int | None:
        """The token's ``decimals`` (a string in the API), fetched once per run."""
        if token_id not in self._decimals:
            try:
                info = self.client.get_json(f"/api/v1/tokens/{token_id}")
            except ProviderError as exc:
                if exc.status != 404:
                    raise
                self._decimals[token_id] = None
            else:
                try:
                    self._decimals[token_id] = integer_amount(
                        require(info, "decimals"), f"decimals of token {token_id}", minimum=0, maximum=255
                    )
                except RecordError as exc:
                    raise MalformedResponseError(f"token {token_id}: {exc}", raw=info) from None
        return self._decimals[token_id]


TRANSACTIONS_PATH = "/api/v1/transactions"
ID_CACHE = 100_000  # account ids remembered by a crawl of movements: a few MB at most


def timestamp_nanos(text: str) -> int:
    """A ``seconds.nanoseconds`` timestamp (a snapshot's raw time) as nanoseconds."""
    match = _TIMESTAMP.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"timestamp {text!r} is not seconds.nanoseconds")
    return int(match[1]) * 10**9 + int(match[2])


def _text(nanos: int) -> str:
    return f"{nanos // 10**9}.{nanos % 10**9:09d}"


def _transactions(data: Any) -> list:
    if not isinstance(data, dict) or not isinstance(data.get("transactions"), list):
        raise MalformedResponseError("page has no transactions list", raw=data)
    return data["transactions"]


def _listed(tx: Any, key: str) -> list:
    """A list a transaction must carry (absent is not empty: legs would go missing)."""
    value = require(tx, key)
    if not isinstance(value, list):
        raise RecordError(f"{key} is {type(value).__name__}, expected a list")
    return value


def _payer(tx: dict) -> str | None:
    """The payer, from the transaction id (``0.0.8-1565779666-711927000``)."""
    text = tx.get("transaction_id")
    return text.split("-", 1)[0] if isinstance(text, str) else None


def _check_id(value: Any, what: str) -> None:
    if parse_account_id(value) is None:
        raise RecordError(f"{what} {value!r} is not a shard.realm.num id")


def _counterparty(legs: list[tuple[str, int]], index: int, node: Any) -> str | None:
    """The one account on the other side of leg ``index``, fee takers aside; None when several are."""
    account, amount = legs[index]
    others = [a for i, (a, n) in enumerate(legs)
              if i != index and (n > 0) != (amount > 0) and n != 0 and a != node and a not in FEE_ACCOUNTS]
    return others[0] if len(others) == 1 else None


def build(settings: Settings, credentials: Credentials | None, policy, *, max_pages: int,
          throttle: Throttle | None = None) -> HederaExtractor:
    """A Hedera extractor; a Connection's password, if any, is the API key."""
    headers = {}
    if credentials is not None and credentials.password:
        headers[settings.api_key_header] = credentials.password
    client = HttpClient(settings.base_url, headers=headers, policy=policy, error_for=hedera_error,
                        throttle=throttle)
    return HederaExtractor(settings, client, max_pages=max_pages)


PROVIDER = Provider(
    name="hedera",
    settings=Settings,
    build=build,
    extractor=HederaExtractor,
    has_history=True,  # timestamp=lte:<time> selects any past snapshot
    shardable=True,  # the account-id space splits into account.id=gte:..&lte:.. ranges
    chooses_snapshot=True,  # choose_snapshot(at) once per run; every shard reads that snapshot
    has_movements=True,  # movements(window): /api/v1/transactions between the two consensus timestamps
)
