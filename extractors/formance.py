"""Formance ledger: per-account balances and the ledger's own aggregate.

What differs from the other providers: a ``cursor`` paginator whose
follow-ups carry only the cursor; three path layouts (v1 through the stack
gateway, a standalone v1 ledger, v2); OAuth2 client credentials; assets
that carry their scale (``USD/2``); arbitrary-precision, possibly negative
amounts; and history only in v2 (``pit``), so a v1 snapshot is the time of
the fetch. Each run also reads ``/aggregate/balances`` into a
``kind="aggregate"`` page, for reconciliation against the per-account sum.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator
from urllib.parse import quote

import requests

from extractors.auth import ClientCredentialsAuth
from extractors.credentials import Credentials
from extractors.errors import MalformedResponseError, ProviderError
from extractors.http import HttpClient, RetryPolicy, http_error
from extractors.paginators import CursorPaginator
from extractors.records import (
    BalanceRow,
    Page,
    RecordError,
    Rejection,
    integer_amount,
    to_json_text,
)

APIS = {"v1": "/api/ledger/{ledger}", "v1-standalone": "/{ledger}", "v2": "/v2/{ledger}"}
MAX_PAGE_SIZE = {"v1": 1000, "v1-standalone": 1000, "v2": 100}  # v2 clamps larger sizes silently
DEFAULT_TOKEN_URL = "/api/auth/oauth/token"
BIGINT_AS_STRING = {"Formance-Bigint-As-String": "true"}
# Formance's own codes for failures that may pass: the ledger timed out or broke inside.
RETRIABLE_CODES = {"INTERNAL", "TIMEOUT"}
MAX_DECIMALS = 255

_LEDGER = re.compile(r"^[0-9A-Za-z_-]{1,63}$")
# The ledger's asset syntax: an uppercase code, optional _SUFFIX, optional /scale.
_ASSET = re.compile(r"^[A-Z][A-Z0-9]{0,16}(?:_[A-Z]{1,16})?(?:/(\d{1,6}))?$")


@dataclass(slots=True)
class Settings:
    """The ``[sources.<name>]`` keys a Formance source accepts."""

    base_url: str
    ledger: str
    api: str = "v1"
    address: str | None = None
    page_size: int = 100

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError("api", f"must be one of {', '.join(APIS)}, got {self.api!r}")
        if not _LEDGER.match(self.ledger):
            raise ValueError("ledger", f"{self.ledger!r} is not a ledger name (letters, digits, _ and -)")
        top = MAX_PAGE_SIZE[self.api]
        if not 1 <= self.page_size <= top:
            # Say so rather than let the server cut it without a word.
            raise ValueError("page_size", f"must be between 1 and {top} for the {self.api} API, "
                                          f"got {self.page_size}")


def has_history(settings: Settings) -> bool:
    """Only v2 answers for a past time (``pit``); v1 reports the present."""
    return settings.api == "v2"


def asset_decimals(asset: str) -> int:
    """The scale an asset carries: ``USD/2`` → 2, ``COIN`` → 0."""
    match = _ASSET.match(asset)
    if not match:
        raise RecordError(f"asset {asset!r} is not a Formance asset such as 'USD/2' or 'COIN'")
    decimals = int(match[1] or 0)
    if decimals > MAX_DECIMALS:
        raise RecordError(f"asset {asset!r} has scale {decimals}, above the {MAX_DECIMALS} "
                          "this pipeline stores")
    return decimals


def format_pit(at: datetime) -> str:
    """RFC 3339 in UTC, as ``pit`` takes it (and as the snapshot's raw time)."""
    if at.tzinfo is None:
        raise ValueError("snapshot time must be timezone-aware")
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def formance_error(response: requests.Response) -> ProviderError:
    """``errorCode``/``errorMessage`` (or the deprecated snake_case pair) as the error."""
    code = message = None
    try:
        body = response.json()
        code = body.get("errorCode") or body.get("error_code")
        message = body.get("errorMessage") or body.get("error_message")
    except (ValueError, AttributeError):
        pass  # v1 answers some 5xx with an empty body
    text = message or response.text[:300].strip() or response.reason or "no body"
    if response.status_code == 401:
        if "Authorization" not in response.request.headers:
            text = f"{text} (no access token sent: does the source need a conn_id?)"
        else:
            renewed = " after renewing the access token" if response.history else ""
            text = f"{text} (the ledger refused the access token{renewed})"
    error = http_error(response, f"{code}: {text}" if code else text, str(code) if code else None)
    if code in RETRIABLE_CODES:
        error.retriable = True
    return error


class FormanceExtractor:
    """Reads one snapshot of a ledger's balances, page by page, then its aggregate."""

    provider = "formance"

    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int) -> None:
        self.settings = settings
        self.client = client
        self.max_pages = max_pages
        self.base_path = APIS[settings.api].format(ledger=quote(settings.ledger, safe=""))

    @property
    def v2(self) -> bool:
        return self.settings.api == "v2"

    def pages(self, at: datetime, account_range: tuple[str, str | None] | None = None) -> Iterator[Page]:
        """Yield the balance pages, then one aggregate page, all with one ``as_of``.

        v2 reads the ledger at ``pit = at``; v1 can only read the present,
        so its snapshot time is when the first page arrived.
        """
        if account_range is not None:
            raise ValueError("formance sources are not sharded")
        as_of: datetime | None = at if self.v2 else None
        for data in self._balance_pages(at):
            if as_of is None:
                as_of = datetime.now(timezone.utc)
            page = Page(as_of=as_of, as_of_raw=format_pit(as_of))
            for record in _cursor_data(data):
                try:
                    page.rows.extend(self._parse_v2(record) if self.v2 else _parse_v1(record))
                except RecordError as exc:
                    page.rejected.append(Rejection(raw=to_json_text(record), reason=str(exc)))
            yield page
        yield self._aggregate(at, as_of)

    def _balance_pages(self, at: datetime) -> Iterator[Any]:
        paginator = CursorPaginator(max_pages=self.max_pages)
        if self.v2:
            params = [("pageSize", self.settings.page_size), ("expand", "volumes"),
                      ("pit", format_pit(at))]
            return self.client.paginate(f"{self.base_path}/accounts", params, paginator,
                                        json_body=self._v2_filter())
        params = [("pageSize", self.settings.page_size)]
        if self.settings.address:
            params.append(("address", self.settings.address))
        return self.client.paginate(f"{self.base_path}/balances", params, paginator)

    def _v2_filter(self) -> dict | None:
        # v2 filters in the body; its address syntax is not v1's regex.
        return {"$match": {"address": self.settings.address}} if self.settings.address else None

    def _aggregate(self, at: datetime, as_of: datetime) -> Page:
        path = f"{self.base_path}/aggregate/balances"
        if self.v2:
            data = self.client.get_json(path, [("pit", format_pit(at))], json_body=self._v2_filter())
        else:
            params = [("address", self.settings.address)] if self.settings.address else []
            data = self.client.get_json(path, params)
        totals = data.get("data") if isinstance(data, dict) else None
        if not isinstance(totals, dict):
            raise MalformedResponseError("aggregate has no data object", raw=to_json_text(data)[:2000])
        page = Page(as_of=as_of, as_of_raw=format_pit(as_of), kind="aggregate")
        for asset, amount in totals.items():
            try:
                page.rows.append(BalanceRow("", asset, integer_amount(amount, f"aggregate {asset}"),
                                            asset_decimals(asset)))
            except RecordError as exc:
                page.rejected.append(Rejection(raw=to_json_text({asset: amount}), reason=str(exc)))
        return page

    def _parse_v2(self, record: Any) -> list[BalanceRow]:
        if not isinstance(record, dict):
            raise RecordError(f"account is {type(record).__name__}, expected an object")
        address = _address(record.get("address"))
        volumes = record.get("volumes")
        if volumes is None:
            return []  # no movement at that point in time
        if not isinstance(volumes, dict):
            raise RecordError(f"volumes of {address} is {type(volumes).__name__}, expected an object")
        rows = []
        for asset, volume in volumes.items():
            if not isinstance(volume, dict):
                raise RecordError(f"volume of {asset} is {type(volume).__name__}, expected an object")
            if "balance" in volume:
                balance = integer_amount(volume["balance"], f"balance of {asset}")
            else:
                balance = (integer_amount(volume.get("input"), f"input of {asset}")
                           - integer_amount(volume.get("output"), f"output of {asset}"))
            rows.append(BalanceRow(address, asset, balance, asset_decimals(asset)))
        return rows


def _cursor_data(data: Any) -> list:
    cursor = data.get("cursor") if isinstance(data, dict) else None
    records = cursor.get("data") if isinstance(cursor, dict) else None
    if not isinstance(records, list):
        raise MalformedResponseError("page has no cursor.data list", raw=to_json_text(data)[:2000])
    return records


def _address(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RecordError(f"account address {value!r} is not a non-empty string")
    return value


def _parse_v1(record: Any) -> list[BalanceRow]:
    """``{"users:001": {"USD/2": 500}}``; ``{"users:002": {}}`` has no holdings."""
    if not isinstance(record, dict):
        raise RecordError(f"record is {type(record).__name__}, expected an object")
    rows = []
    for address, assets in record.items():
        _address(address)
        if not isinstance(assets, dict):
            raise RecordError(f"balances of {address} is {type(assets).__name__}, expected an object")
        for asset, amount in assets.items():
            rows.append(BalanceRow(address, asset, integer_amount(amount, f"balance of {asset}"),
                                   asset_decimals(asset)))
    return rows


def build(settings: Settings, credentials: Credentials | None, policy: RetryPolicy, *,
          max_pages: int) -> FormanceExtractor:
    """A Formance extractor; a Connection makes it an OAuth2 client, none means no auth."""
    auth = None
    if credentials is not None:
        auth = ClientCredentialsAuth.from_credentials(
            settings.base_url, credentials, default_token_url=DEFAULT_TOKEN_URL,
            timeout=(policy.connect_timeout, policy.read_timeout))
    headers = BIGINT_AS_STRING if settings.api == "v2" else {}
    client = HttpClient(settings.base_url, auth=auth, headers=headers, policy=policy,
                        error_for=formance_error)
    if auth is not None:
        auth.stats = client.stats
    return FormanceExtractor(settings, client, max_pages=max_pages)
