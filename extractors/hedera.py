"""Hedera mirror node: ``GET /api/v1/balances`` snapshots.

What differs from the other providers: a ``links.next`` paginator, the
snapshot chosen with ``timestamp=lte:<time>`` (so history is available and
backfills work), the returned ``timestamp`` as ``as_of``, HBAR in tinybars,
and token decimals looked up per token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from extractors.errors import MalformedResponseError, NoSnapshotAvailable, ProviderError, SnapshotError
from extractors.credentials import Credentials
from extractors.http import HttpClient, http_error
from extractors.paginators import NextLinkPaginator
from extractors.records import (
    BalanceRow,
    Page,
    RecordError,
    Rejection,
    integer_amount,
    require,
    to_json_text,
)

HBAR = "HBAR"
HBAR_DECIMALS = 8
MAX_LIMIT = 100
HAS_HISTORY = True  # timestamp=lte:<time> selects any past snapshot
SHARDABLE = True  # the account-id space splits into account.id=gte:..&lt:.. ranges
TOKENS_LISTED_AT_MOST = 50  # HIP-367: the balances endpoint cuts the rest silently
INT64_MAX = 2**63 - 1

_ENTITY_ID = re.compile(r"^\d{1,10}\.\d{1,10}\.\d{1,10}$")
_ACCOUNT_FILTER = re.compile(r"^((eq|ne|lt|lte|gt|gte):)?(\d{1,10}\.){0,2}\d{1,10}$")
_TIMESTAMP = re.compile(r"^(\d{1,12})\.(\d{9})$")


@dataclass(slots=True)
class Settings:
    """The ``[sources.<name>]`` keys a Hedera source accepts."""

    base_url: str
    account_ids: list[str] = field(default_factory=list)
    limit: int = 100
    include_tokens: bool = True
    api_key_header: str = "x-api-key"

    def __post_init__(self) -> None:
        for expr in self.account_ids:
            if not _ACCOUNT_FILTER.match(expr):
                raise ValueError(
                    "account_ids",
                    f"{expr!r} is not an account.id expression such as '0.0.98' or 'gte:0.0.1000'",
                )
        if not 1 <= self.limit <= MAX_LIMIT:
            # The mirror node silently cuts larger limits to 100; say so instead.
            raise ValueError("limit", f"must be between 1 and {MAX_LIMIT}, got {self.limit}")


def format_timestamp(at: datetime) -> str:
    """``seconds.nanoseconds`` as the mirror node writes timestamps."""
    if at.tzinfo is None:
        raise ValueError("snapshot time must be timezone-aware")
    at = at.astimezone(timezone.utc)
    seconds = int(at.replace(microsecond=0).timestamp())
    return f"{seconds}.{at.microsecond * 1000:09d}"


def parse_timestamp(text: Any) -> datetime:
    """The mirror node's ``seconds.nanoseconds`` as an aware datetime (µs)."""
    match = _TIMESTAMP.match(text) if isinstance(text, str) else None
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
        text = response.text[:300].strip() or response.reason or "no body"
    return http_error(response, text)


class HederaExtractor:
    """Reads one consistent balance snapshot, page by page."""

    provider = "hedera"

    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int) -> None:
        self.settings = settings
        self.client = client
        self.max_pages = max_pages
        self._decimals: dict[str, int | None] = {}

    def _query(self, at: datetime) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = [
            ("limit", self.settings.limit),
            ("timestamp", f"lte:{format_timestamp(at)}"),
        ]
        return params + [("account.id", expr) for expr in self.settings.account_ids]

    def shard_ranges(self, at: datetime, shards: int) -> list[tuple[str, str | None]]:
        """Split the snapshot's account ids into ``shards`` ranges [gte, lt).

        The highest account of the snapshot bounds the space; the last range
        is open so nothing above it can be missed. Equal widths: account
        numbers are dense enough on Hedera networks for this to balance.
        """
        query = [(k, v) for k, v in self._query(at) if k != "limit"] + [("limit", 1), ("order", "desc")]
        data = self.client.get_json("/api/v1/balances", query)
        balances = data.get("balances") if isinstance(data, dict) else None
        if not balances:
            return [("0.0.0", None)] + [("0.0.0", "0.0.0")] * (shards - 1)
        top = require(balances[0], "account")
        if not isinstance(top, str) or not _ENTITY_ID.match(top):
            raise MalformedResponseError(f"account {top!r} is not a shard.realm.num id")
        prefix, top_num = top.rsplit(".", 1)[0], int(top.rsplit(".", 1)[1])
        width = -(-(top_num + 1) // shards)
        bounds = [i * width for i in range(shards)] + [None]
        return [(f"{prefix}.{lo}", None if hi is None else f"{prefix}.{hi}")
                for lo, hi in zip(bounds[:-1], bounds[1:])]

    def pages(self, at: datetime, account_range: tuple[str, str | None] | None = None) -> Iterator[Page]:
        """Yield the pages of the latest snapshot at or before ``at``.

        ``account_range`` (``gte``, ``lt`` bounds, ``lt`` possibly None)
        restricts the crawl to one shard of the account-id space.
        """
        params = self._query(at)
        if account_range is not None:
            low, high = account_range
            params.append(("account.id", f"gte:{low}"))
            if high is not None:
                params.append(("account.id", f"lt:{high}"))
        paginator = NextLinkPaginator(max_pages=self.max_pages)
        snapshot: str | None = None
        for data in self.client.paginate("/api/v1/balances", params, paginator):
            if not isinstance(data, dict):
                raise MalformedResponseError("balances page is not a JSON object", raw=to_json_text(data)[:2000])
            if "timestamp" not in data:
                raise MalformedResponseError("balances page has no timestamp field", raw=to_json_text(data)[:2000])
            raw_ts = data["timestamp"]
            if raw_ts is None:
                if data.get("balances") != []:
                    raise MalformedResponseError("balances listed without a snapshot timestamp",
                                                 raw=to_json_text(data)[:2000])
                if snapshot is None:
                    raise NoSnapshotAvailable(f"the mirror node has no balance snapshot at or before {at.isoformat()}")
                raise SnapshotError(f"page {paginator.pages + 1} has no timestamp, earlier pages had {snapshot}")
            if snapshot is None:
                snapshot = raw_ts
                as_of = parse_timestamp(raw_ts)
                if as_of > at:
                    raise SnapshotError(f"asked for a snapshot at or before {at.isoformat()}, got {raw_ts}")
            elif raw_ts != snapshot:
                # Every page must come from the one snapshot the first page chose.
                raise SnapshotError(f"page {paginator.pages + 1} is from snapshot {raw_ts}, not {snapshot}")
            balances = data.get("balances")
            if not isinstance(balances, list):
                raise MalformedResponseError("page has no balances list", raw=to_json_text(data)[:2000])
            page = Page(as_of=as_of, as_of_raw=snapshot)
            for record in balances:
                try:
                    self._parse_account(record, page)
                except RecordError as exc:
                    page.rejected.append(Rejection(raw=to_json_text(record), reason=str(exc)))
            yield page

    def _parse_account(self, record: Any, page: Page) -> None:
        account = require(record, "account")
        if not isinstance(account, str) or not _ENTITY_ID.match(account):
            raise RecordError(f"account {account!r} is not a shard.realm.num id")
        tinybars = integer_amount(require(record, "balance"), "balance", minimum=0, maximum=INT64_MAX)
        rows = [BalanceRow(account, HBAR, tinybars, HBAR_DECIMALS)]
        # Absent is not empty: a record without its tokens list would silently drop holdings.
        tokens = require(record, "tokens")
        if not isinstance(tokens, list):
            raise RecordError(f"tokens is {type(tokens).__name__}, expected a list")
        if self.settings.include_tokens:
            for token in tokens:
                token_id = require(token, "token_id")
                if not isinstance(token_id, str) or not _ENTITY_ID.match(token_id):
                    raise RecordError(f"token_id {token_id!r} is not a shard.realm.num id")
                amount = integer_amount(require(token, "balance"), f"balance of token {token_id}",
                                        minimum=0, maximum=INT64_MAX)
                rows.append(BalanceRow(account, token_id, amount, self.token_decimals(token_id)))
            if len(tokens) >= TOKENS_LISTED_AT_MOST:
                page.warnings.append(
                    f"account {account} lists {len(tokens)} tokens: its token balances may be "
                    "truncated (HIP-367 caps this endpoint at 50 per account)"
                )
        page.rows.extend(rows)

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
                    raise MalformedResponseError(f"token {token_id}: {exc}", raw=to_json_text(info)[:2000]) from None
        return self._decimals[token_id]


def entity_num(entity_id: str) -> int:
    """The ``num`` part of ``shard.realm.num`` (what shards split on)."""
    return int(entity_id.rsplit(".", 1)[-1])



def build(settings: Settings, credentials: Credentials | None, policy, *, max_pages: int) -> HederaExtractor:
    """A Hedera extractor; a Connection's password, if any, is the API key."""
    headers = {}
    if credentials is not None and credentials.password:
        headers[settings.api_key_header] = credentials.password
    client = HttpClient(settings.base_url, headers=headers, policy=policy, error_for=hedera_error)
    return HederaExtractor(settings, client, max_pages=max_pages)
