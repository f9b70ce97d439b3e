"""Formance ledger: per-account balances and the ledger's own aggregate.

What differs from the other providers: a ``cursor`` paginator whose
follow-ups carry only the cursor; four path layouts (v1 and v2, each through
the stack gateway or on a standalone ledger); OAuth2 client credentials;
assets that carry their scale (``USD/2``); arbitrary-precision, possibly
negative amounts; and history only in v2 (``pit``), so a v1 snapshot is the
time of the fetch. Each run also reads ``/aggregate/balances`` into a
``kind="aggregate"`` page, for reconciliation against the per-account sum.

What the real server does that shapes this module (``formancehq/ledger``):

* v1 routes create an unknown ledger and answer 200 with empty data (v1.x
  ``pkg/ledger/resolver.go`` ``GetLedgerStore(ctx, name, true)``; v2.x
  ``internal/api/v1/middleware_auto_create_ledger.go``), so the ledger's
  existence is checked first with calls that create nothing: the ledger list
  of ``GET /_info`` for v1, ``GET /v2/{ledger}`` (404 when absent) for v2.
* v1 ``address`` is a regex per segment on v1.x
  (``pkg/storage/sqlstorage/balances.go`` v1.10.16) but a v2 match on the
  v2.x compatibility layer (``query.Match``, ``internal/api/v1/controllers_accounts.go``),
  so only literal and empty segments are accepted: they mean the same on both.
* v2.2.x's compatibility layer drops the filter on cursor follow-ups (fixed
  in v2.3.0, b708297d5), so every returned address is checked against it.
* v1 pages are offsets over live data: a v1 crawl is checked for movement
  (an address listed twice, the aggregate changing, the accounts not adding
  up to it) and read again, a bounded number of times.
* v2 ``volumes`` at ``pit`` are by insertion date, the aggregate by effective
  date unless ``useInsertionDate=true``
  (``internal/storage/ledger/resource_aggregated_balances.go`` v2.2.59).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator
from urllib.parse import quote

import requests

from extractors.auth import ClientCredentialsAuth
from extractors.credentials import Credentials
from extractors.errors import (
    LedgerUnavailable,
    MalformedResponseError,
    ProviderError,
    SnapshotError,
    SnapshotMoved,
)
from extractors.http import HttpClient, RetryPolicy, error_text, http_error
from extractors.paginators import CursorPaginator
from extractors.provider import Provider, Throttle
from extractors.records import (
    BalanceRow,
    Page,
    RecordError,
    integer_amount,
)

# api -> (prefix of the ledger service, path of one ledger under it).
APIS = {
    "v1": ("/api/ledger", "/{ledger}"),
    "v1-standalone": ("", "/{ledger}"),
    "v2": ("/api/ledger", "/v2/{ledger}"),
    "v2-standalone": ("", "/v2/{ledger}"),
}
V2_APIS = ("v2", "v2-standalone")
# v1 (both servers) caps at 1000; v2 clamps anything above 100 without a word.
MAX_PAGE_SIZE = {"v1": 1000, "v1-standalone": 1000, "v2": 100, "v2-standalone": 100}
DEFAULT_TOKEN_URL = "/api/auth/oauth/token"
BIGINT_AS_STRING = {"Formance-Bigint-As-String": "true"}
# Formance's own codes for failures that may pass: the ledger timed out or broke inside.
RETRIABLE_CODES = {"INTERNAL", "TIMEOUT"}
# The scale is stored as the row's decimals and turned into whole units in
# NUMERIC, whose largest scale is 16383; the server allows up to 999999.
MAX_DECIMALS = 16383
# A v1 crawl reads live data; this many crawls that each saw the ledger move fail the run.
V1_ATTEMPTS = 3
# v2 point-in-time volumes and the insertion-date aggregate both read the moves history.
V2_FEATURES = {"MOVES_HISTORY": "ON"}

_LEDGER = re.compile(r"[0-9A-Za-z_-]{1,63}")
# The server's asset pattern: ``[A-Z][A-Z0-9]{0,16}(_[A-Z]{1,16})?(\/\d{1,6})?``
# (pkg/assets/asset.go, v2.3.1 to v2.4.12; v1.x and v2.2 lack the _SUFFIX
# part). Go's \d is ASCII, hence [0-9].
_ASSET = re.compile(r"[A-Z][A-Z0-9]{0,16}(?:_[A-Z]{1,16})?(?:/([0-9]{1,6}))?")
# An address segment as v2.x defines it (pkg/accounts/accounts.go); v1.x
# allows a subset (no '-'), so a literal segment means the same on both.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def address_filter_problem(pattern: str, api: str) -> str | None:
    """Why ``pattern`` would not select the same accounts on every server, or None.

    v1.x reads each segment as an anchored regex (``.*``, ``*`` and an empty
    segment are wildcards, a trailing ``.*`` any depth, a comma a list of
    addresses); the v2.x compatibility layer and v2 match literally, an
    empty segment being a wildcard and, from v2.3, a trailing ``...`` any
    depth. Literal and empty segments are the common ground.
    """
    if "," in pattern:
        return (f"{pattern!r} has a comma: v1.x servers read it as a list of addresses, "
                "v2.x servers as one literal address; give one pattern")
    for segment in pattern.split(":"):
        if segment and not _SEGMENT.fullmatch(segment):
            return (f"segment {segment!r} of {pattern!r} is not a literal (letters, digits, _ and -): "
                    "regexes, '*', '.*' and '...' select different accounts on v1.x and v2.x "
                    "servers; use literal segments, and empty ones as wildcards (e.g. 'users:')")
    if len(pattern) < 2 and api not in V2_APIS:
        return f"{pattern!r} is one character: v1.x servers fail on it (HTTP 500)"
    return None


def address_matches(pattern: str, address: str) -> bool:
    """Whether ``address`` is one the (accepted) ``pattern`` selects."""
    wanted, parts = pattern.split(":"), address.split(":")
    return len(wanted) == len(parts) and all(w in ("", p) for w, p in zip(wanted, parts))


@dataclass(slots=True)
class Settings:
    """The ``[sources.<name>]`` keys a Formance source accepts."""

    base_url: str
    ledger: str
    api: str = "v1"
    address: str | None = None
    page_size: int = 100
    # A ledger (or filter) holding no account is usually a misspelling:
    # the run fails unless the source says an empty snapshot is expected.
    allow_empty: bool = False

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError("api", f"must be one of {', '.join(APIS)}, got {self.api!r}")
        if not _LEDGER.fullmatch(self.ledger):
            raise ValueError("ledger", f"{self.ledger!r} is not a ledger name (letters, digits, _ and -)")
        top = MAX_PAGE_SIZE[self.api]
        if not 1 <= self.page_size <= top:
            # Say so rather than let the server cut it without a word.
            raise ValueError("page_size", f"must be between 1 and {top} for the {self.api} API, "
                                          f"got {self.page_size}")
        if self.address is not None:
            problem = address_filter_problem(self.address, self.api)
            if problem:
                raise ValueError("address", problem)


def has_history(settings: Settings) -> bool:
    """Only v2 answers for a past time (``pit``); v1 reports the present."""
    return settings.api in V2_APIS


def asset_decimals(asset: str) -> int:
    """The scale an asset carries: ``USD/2`` → 2, ``COIN`` → 0, ``EUR_CENTS/0`` → 0."""
    match = _ASSET.fullmatch(asset)
    if not match:
        raise RecordError(f"asset {asset!r} is not a Formance asset such as 'USD/2' or 'COIN'")
    decimals = int(match[1] or 0)
    if decimals > MAX_DECIMALS:
        raise RecordError(f"asset {asset!r} has scale {decimals}: valid on the ledger, but above "
                          f"{MAX_DECIMALS}, the largest scale PostgreSQL NUMERIC can hold")
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
        pass  # v1 answers some 5xx, and a missing scope, with an empty body
    text = message or error_text(response)
    if response.status_code == 401:
        if "Authorization" not in response.request.headers:
            text = f"{text} (no access token sent: does the source need a conn_id?)"
        else:
            renewed = " after renewing the access token" if response.history else ""
            text = f"{text} (the ledger refused the access token{renewed})"
    elif response.status_code == 403:
        text = (f"{text} (the access token lacks a scope this route needs: "
                "set 'scope' in the Connection's extra)")
    elif isinstance(message, str) and ("missing feature" in message or "to use volumes" in message):
        # ErrMissingFeature / ErrInvalidQuery of internal/storage/ledger (v2.x).
        text = f"{text} (the ledger was created without a feature this read needs)"
    return http_error(response, f"{code}: {text}" if code else text, str(code) if code else None,
                      retriable=code in RETRIABLE_CODES)


@dataclass(slots=True)
class _Crawl:
    """What one pass over the pages saw, to judge whether it is one snapshot."""

    seen: set[bytes]
    sums: dict[str, int]
    rows: int = 0
    rejected: int = 0
    moved: str | None = None


class FormanceExtractor:
    """Reads one snapshot of a ledger's balances, page by page, then its aggregate."""

    provider = "formance"

    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int) -> None:
        self.settings = settings
        self.client = client
        self.max_pages = max_pages
        prefix, ledger_path = APIS[settings.api]
        self.prefix = prefix
        self.base_path = prefix + ledger_path.format(ledger=quote(settings.ledger, safe=""))

    @property
    def v2(self) -> bool:
        return self.settings.api in V2_APIS

    def pages(self, at: datetime, account_range: tuple[str, str | None] | None = None) -> Iterator[Page]:
        """Yield the balance pages, then one aggregate page, all with one ``as_of``.

        v2 reads the ledger at ``pit = at``; v1 can only read the present,
        so its snapshot time is when the first page arrived. A v1 crawl that
        saw the ledger move yields a ``kind="restart"`` page (what was
        yielded so far is void) and reads again.
        """
        if account_range is not None:
            raise ValueError("formance sources are not sharded")
        self._check_ledger()
        if self.v2:
            crawl = _Crawl(set(), {})
            yield from self._balance_pages(at, at, crawl)
            if crawl.moved:
                raise SnapshotError(f"{self._where()}: {crawl.moved}, in a point-in-time read")
            totals = self._totals(at)
            yield self._finish(crawl, totals, at)
            return
        for attempt in range(1, V1_ATTEMPTS + 1):
            # Each pass reads the present anew: its snapshot time is when its
            # own first page arrived (the run forgets a voided pass's time).
            as_of: datetime | None = None
            crawl = _Crawl(set(), {})
            before = self._totals(None)
            for page in self._balance_pages(None, as_of, crawl):
                as_of = page.as_of
                yield page
                if crawl.moved:
                    break
            after = self._totals(None) if not crawl.moved else before
            if not crawl.moved:
                crawl.moved = _movement(before, after, crawl)
            if crawl.moved is None:
                yield self._finish(crawl, after, as_of or datetime.now(timezone.utc))
                return
            if attempt == V1_ATTEMPTS:
                raise SnapshotMoved(
                    f"{self._where()} moved during each of {V1_ATTEMPTS} crawls (last: {crawl.moved}); "
                    "the v1 API reads live data page by page, so no consistent snapshot could be read. "
                    "Use api = \"v2\" (or \"v2-standalone\"), which reads a point in time, if the server "
                    "offers it, or schedule the source when the ledger is quiet")
            when = as_of or datetime.now(timezone.utc)
            yield Page(as_of=when, as_of_raw=format_pit(when), kind="restart", warnings=[
                f"{self._where()} moved during crawl {attempt} of at most {V1_ATTEMPTS} "
                f"({crawl.moved}); reading it again"])

    def _where(self) -> str:
        scope = f" (address {self.settings.address!r})" if self.settings.address else ""
        return f"ledger {self.settings.ledger!r}{scope}"

    # -- the ledger itself ----------------------------------------------------

    def probe(self) -> str:
        """The ledger's existence, asked in a way that creates nothing (``balances check --connect``)."""
        self._check_ledger()
        return f"{self._where()} exists"

    def _check_ledger(self) -> None:
        """Fail unless the ledger exists, asking in a way that creates nothing."""
        name = self.settings.ledger
        if self.v2:
            try:
                data = self.client.get_json(self.base_path)
            except ProviderError as exc:
                if exc.status != 404 or f"{self.base_path}:" not in str(exc):
                    raise  # another error, or the token endpoint's
                if exc.code in ("NOT_FOUND", "LEDGER_NOT_FOUND"):
                    raise LedgerUnavailable(f"ledger {name!r} does not exist: {exc}") from None
                hint = ('a stack gateway serves /api/ledger/v2/{ledger}: api = "v2"'
                        if self.settings.api == "v2-standalone" else
                        'a standalone ledger serves /v2/{ledger}: api = "v2-standalone"')
                raise LedgerUnavailable(f"no v2 API at {self.base_path}: {exc} ({hint}; "
                                        "a v1.x server has only the v1 API)") from None
            ledger = data.get("data") if isinstance(data, dict) else None
            if not isinstance(ledger, dict):
                raise MalformedResponseError("ledger has no data object", raw=data)
            features = ledger.get("features")
            if isinstance(features, dict):
                for feature, value in V2_FEATURES.items():
                    if features.get(feature) != value:
                        raise LedgerUnavailable(
                            f"ledger {name!r} has feature {feature}={features.get(feature)!r}; point-in-time "
                            f"volumes and the insertion-date aggregate need {feature}={value} (features are "
                            "set when a ledger is created)")
            return
        try:
            info = self.client.get_json(f"{self.prefix}/_info")
        except ProviderError as exc:
            if exc.status != 404 or f"{self.prefix}/_info:" not in str(exc):
                raise  # another error, or the token endpoint's
            hint = ('a stack gateway serves /api/ledger/{ledger}: api = "v1"'
                    if self.settings.api == "v1-standalone" else
                    'a standalone ledger serves /{ledger}: api = "v1-standalone"')
            raise LedgerUnavailable(f"no v1 API at {self.prefix}/_info: {exc} ({hint})") from None
        storage = _dig(info, "data", "config", "storage")
        ledgers = storage.get("ledgers") if isinstance(storage, dict) else None
        if not isinstance(ledgers, list):
            raise MalformedResponseError("_info has no data.config.storage.ledgers list",
                                         raw=info)
        if name not in ledgers:
            known = ", ".join(repr(n) for n in ledgers[:10] if isinstance(n, str)) or "none"
            more = f" and {len(ledgers) - 10} more" if len(ledgers) > 10 else ""
            raise LedgerUnavailable(
                f"ledger {name!r} does not exist (the server has {known}{more}); its v1 routes "
                "would create it and answer with an empty snapshot, so nothing was read")

    # -- balances -------------------------------------------------------------

    def _balance_pages(self, pit: datetime | None, as_of: datetime | None,
                       crawl: _Crawl) -> Iterator[Page]:
        paginator = CursorPaginator(cursor_path=("cursor", "next"),
                                    has_more_path=("cursor", "hasMore"), cursor_param="cursor",
                                    max_pages=self.max_pages)
        if self.v2:
            params = [("pageSize", self.settings.page_size), ("expand", "volumes"),
                      ("pit", format_pit(pit))]
            bodies = self.client.paginate(f"{self.base_path}/accounts", params, paginator,
                                          json_body=self._v2_filter())
        else:
            params = [("pageSize", self.settings.page_size)]
            if self.settings.address:
                params.append(("address", self.settings.address))
            bodies = self.client.paginate(f"{self.base_path}/balances", params, paginator)
        for data in bodies:
            if as_of is None:
                as_of = datetime.now(timezone.utc)
            page = Page(as_of=as_of, as_of_raw=format_pit(as_of))
            parse = self._parse_v2 if self.v2 else _parse_v1
            for _, accounts in page.parse_each(_cursor_data(data), parse):
                for address, rows in accounts:
                    self._account(address, crawl)
                    page.rows.extend(rows)
                    for row in rows:
                        crawl.sums[row.asset] = crawl.sums.get(row.asset, 0) + row.balance
            crawl.rows += len(page.rows)
            crawl.rejected += len(page.rejected)
            yield page
            if crawl.moved:
                return

    def _account(self, address: str, crawl: _Crawl) -> None:
        """Check a listed address: inside the filter, and not listed before."""
        pattern = self.settings.address
        if pattern and not address_matches(pattern, address):
            # Never stored: the server ignored the filter, and the snapshot
            # would hold accounts nobody asked for.
            if pattern.endswith(":") and address.count(":") > pattern.count(":"):
                hint = (" (v2.3.0 to v2.3.21 and v2.4.0 to v2.4.11 match a trailing ':' at any depth; "
                        "fixed in v2.3.22 and v2.4.12)")
            elif not self.v2:
                hint = (" (the v1 API of v2.2.x servers drops the filter after the first page; "
                        "v2.3.0 fixed it, or use api = \"v2\")")
            else:
                hint = ""
            raise SnapshotError(f"{self._where()}: the server listed {address!r}, outside the "
                                f"address filter{hint}; nothing stored")
        digest = hashlib.blake2b(address.encode(), digest_size=16).digest()
        if digest in crawl.seen:
            # Offsets shifted under the crawl: accounts were added meanwhile.
            crawl.moved = f"{address!r} was listed twice"
        crawl.seen.add(digest)

    def _v2_filter(self) -> dict | None:
        # v2 filters in the body; the accepted syntax means the same there.
        return {"$match": {"address": self.settings.address}} if self.settings.address else None

    # -- aggregate ------------------------------------------------------------

    def _totals(self, pit: datetime | None) -> dict:
        path = f"{self.base_path}/aggregate/balances"
        if self.v2:
            # On the volumes' time axis: insertion dates (pit counts inserts, not effective dates).
            params = [("pit", format_pit(pit)), ("useInsertionDate", "true")]
            data = self.client.get_json(path, params, json_body=self._v2_filter())
        else:
            params = [("address", self.settings.address)] if self.settings.address else []
            data = self.client.get_json(path, params)
        totals = data.get("data") if isinstance(data, dict) else None
        if not isinstance(totals, dict):
            raise MalformedResponseError("aggregate has no data object", raw=data)
        return totals

    def _finish(self, crawl: _Crawl, totals: dict, as_of: datetime) -> Page:
        """The aggregate page, once the crawl is known to hold something."""
        page = Page(as_of=as_of, as_of_raw=format_pit(as_of), kind="aggregate")
        if crawl.rows == 0 and crawl.rejected == 0:
            message = (f"{self._where()} holds no account with a balance ({len(crawl.seen)} listed); "
                       "a misspelt ledger or filter looks exactly like this")
            if not self.settings.allow_empty:
                raise SnapshotError(f"{message}. Nothing published; set allow_empty = true if this "
                                    "source may be empty")
            page.warnings.append(message)
        for asset, amount in totals.items():
            try:
                page.rows.append(BalanceRow("", asset, integer_amount(amount, f"aggregate {asset}"),
                                            asset_decimals(asset)))
            except RecordError as exc:
                page.reject({asset: amount}, exc)
        return page

    def _parse_v2(self, record: Any) -> list[tuple[str, list[BalanceRow]]]:
        if not isinstance(record, dict):
            raise RecordError(f"account is {type(record).__name__}, expected an object")
        address = _address(record.get("address"))
        volumes = record.get("volumes")
        if volumes is None:
            return [(address, [])]  # no movement at that point in time
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
        return [(address, rows)]


def _movement(before: dict, after: dict, crawl: _Crawl) -> str | None:
    """Why a v1 crawl is not one snapshot, or None.

    With nothing moving, the aggregate read before the pages equals the one
    read after, and the accounts listed add up to it.
    """
    if _nonzero(before) != _nonzero(after):
        return "its aggregate balances changed between the start and the end of the crawl"
    if crawl.rejected == 0:
        try:
            totals = {a: integer_amount(v, f"aggregate {a}") for a, v in _nonzero(after).items()}
        except RecordError:
            return None  # the aggregate page will reject it
        if _nonzero(crawl.sums) != totals:
            return "the accounts listed do not add up to its aggregate balances"
    return None


def _nonzero(totals: dict) -> dict:
    return {asset: amount for asset, amount in totals.items() if amount not in (0, "0")}


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _cursor_data(data: Any) -> list:
    cursor = data.get("cursor") if isinstance(data, dict) else None
    records = cursor.get("data") if isinstance(cursor, dict) else None
    if not isinstance(records, list):
        raise MalformedResponseError("page has no cursor.data list", raw=data)
    return records


def _address(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RecordError(f"account address {value!r} is not a non-empty string")
    return value


def _parse_v1(record: Any) -> list[tuple[str, list[BalanceRow]]]:
    """``{"users:001": {"USD/2": 500}}``; ``{"users:002": {}}`` has no holdings."""
    if not isinstance(record, dict):
        raise RecordError(f"record is {type(record).__name__}, expected an object")
    accounts = []
    for address, assets in record.items():
        _address(address)
        if not isinstance(assets, dict):
            raise RecordError(f"balances of {address} is {type(assets).__name__}, expected an object")
        accounts.append((address, [
            BalanceRow(address, asset, integer_amount(amount, f"balance of {asset}"), asset_decimals(asset))
            for asset, amount in assets.items()]))
    return accounts


def build(settings: Settings, credentials: Credentials | None, policy: RetryPolicy, *,
          max_pages: int, throttle: Throttle | None = None) -> FormanceExtractor:
    """A Formance extractor; a Connection makes it an OAuth2 client, none means no auth."""
    auth = None
    if credentials is not None:
        auth = ClientCredentialsAuth.from_credentials(
            settings.base_url, credentials, default_token_url=DEFAULT_TOKEN_URL,
            timeout=(policy.connect_timeout, policy.read_timeout))
    headers = BIGINT_AS_STRING if settings.api in V2_APIS else {}
    client = HttpClient(settings.base_url, auth=auth, headers=headers, policy=policy,
                        error_for=formance_error, throttle=throttle)
    if auth is not None:
        auth.stats = client.stats
    return FormanceExtractor(settings, client, max_pages=max_pages)


PROVIDER = Provider(
    name="formance",
    settings=Settings,
    build=build,
    has_history=has_history,  # v2 answers for a past time (pit), v1 only for the present
)
