"""Formance ledger: per-account balances and the ledger's own aggregate.

What differs from the other providers: a ``cursor`` paginator whose
follow-ups carry only the cursor; four path layouts (v1 and v2, each through
the stack gateway or on a standalone ledger); OAuth2 client credentials with
scopes; assets that carry their scale (``USD/2``); arbitrary-precision,
possibly negative amounts; and history only in v2 (``pit``), so a v1
snapshot is the time of the fetch. Each run also reads
``/aggregate/balances`` into a ``PageKind.TOTALS`` page, for reconciliation
against the per-account sum.

What the real server does that shapes this module (``formancehq/ledger``):

* The layout is found with requests that create nothing, before any
  ledger-scoped route: ``GET /_info`` at the server's root, public on a
  standalone ledger (v1.10.16 ``pkg/api/routes/routes.go:Engine``; v2.x
  ``internal/api/v1/routes.go:NewRouter``) and nothing of the ledger's on a
  stack gateway (``ee/gateway/Caddyfile``), then, for a gateway,
  ``GET /api/ledger/_info``. A standalone v2.x server takes any other
  unknown first segment for a ledger and creates it before answering 404
  (``internal/api/router.go:NewRouter`` mounts ``/*``;
  ``internal/api/v1/middleware_auto_create_ledger.go:autoCreateMiddleware``):
  ``/api/ledger/...`` sent to one would create a ledger ``api``.
* v1 routes create an unknown ledger and answer 200 with empty data (v1.x
  ``pkg/ledger/resolver.go`` ``GetLedgerStore(ctx, name, true)``), so the
  ledger's existence is checked with calls that create nothing: the ledger
  list of ``/_info`` on v1.x, ``GET /v2/{ledger}`` (404 when absent,
  ``internal/api/v2/controllers_ledgers_read.go:readLedger``) on v2.x, whose
  ``features`` also say whether the reads can work: ``MOVES_HISTORY=ON`` for
  point-in-time reads, on v2.2 ``INDEX_ADDRESS_SEGMENTS=ON`` for a filter
  with an empty segment (``internal/storage/ledger/store.go:validateAddressFilter``),
  which the v1 layer otherwise answers with a bare 500
  (``internal/api/common/errors.go:HandleCommonErrors``).
* v1 ``address`` is a regex per segment on v1.x
  (``pkg/storage/sqlstorage/balances.go`` v1.10.16) but a v2 match on the
  v2.x compatibility layer (``query.Match``, ``internal/api/v1/controllers_accounts.go``),
  so only literal and empty segments are accepted: they mean the same on both.
* v2.2.x's compatibility layer drops the filter on cursor follow-ups (fixed
  in v2.3.0, b708297d5), so every returned address is checked against it.
* v1 pages are offsets over live data. Every balance-moving write adds a
  transaction (a revert adds one too), and the ledger's statistics count
  them (v1.10.16 ``pkg/ledger/stats.go:Stats``, v2.x
  ``internal/api/v1/controllers_stats.go:getStats``): the count read before
  and after a crawl is its consistency token. Unlike the newest transaction
  id it does not depend on commit order (v2.x takes ids from a sequence,
  ``internal/storage/ledger/transactions.go``, and serialises only its log
  inserts, ``logs.go:InsertLog``). A crawl whose count moved is read again,
  a bounded number of times; the count is recorded in the snapshot's raw
  time (``... transactions=N``): which ledger state the snapshot is.
* v2 reads balances from ``volumes`` with ``endTime=pit`` and
  ``insertionDate=true`` (``internal/storage/ledger/resource_volumes.go``):
  every move inserted by ``pit``, whatever its account's first use. The
  ``accounts`` listing filters on ``first_usage``, a transaction's
  timestamp (``resource_accounts.go``), so an account opened by a
  future-dated transaction would be missing while its amount is counted
  elsewhere. The aggregate is read at the same ``pit`` with
  ``useInsertionDate=true`` (``resource_aggregated_balances.go``) and the
  rows must add up to it.
* A ``pit`` is read only once the server's own clock (its ``Date`` header)
  is ``pit_margin`` past it: a later one would see moves inserted during the
  crawl. A ``pit`` after the server's clock is refused.
* Movements (the roll-forward of a window between two snapshots). v2:
  ``volumes`` with ``startTime`` and ``endTime`` sums the moves of each
  account and asset whose insertion date lies in ``[startTime, endTime]``,
  both ends inclusive (``v2.4.12:internal/storage/ledger/resource_volumes.go:BuildDataset``,
  ``insertion_date >= OOT``, ``<= PIT``, the same in v2.2.59 and v2.3.0;
  ``v2.4.12:internal/api/v2/controllers_volumes.go:readVolumes``): the window
  ``(start, end]`` asks from one microsecond after ``start`` (dates are
  PostgreSQL timestamps, microseconds), so a move is counted in exactly one
  window, and its ``input`` and ``output`` are the window's inflow and
  outflow. v1: a v1 snapshot is the ledger after its first N transactions
  (the count in its raw time), so a window is the transactions with ids
  from N1 to N2 - 1, listed newest first from ``after=N2``
  (``v1.10.16:pkg/storage/sqlstorage/transactions.go:GetTransactions``,
  ``id <= after`` and the first dropped when it equals ``after``; v2.x
  ``v2.4.12:internal/api/v1/controllers_transactions.go:buildGetTransactionsQuery``,
  ``id < after``; both ``ORDER BY id DESC``), each posting a leg out of its
  source and one into its destination. v1.x numbers transactions one after
  the other; a v2.x server takes ids from a sequence
  (``v2.4.12:internal/storage/ledger/transactions.go:InsertTransaction``,
  ``nextval``), which can skip one: ids that are not contiguous fail the
  window rather than guess which transactions a snapshot held. Not
  ``start_time``/``end_time``: a transaction's timestamp is its client's to
  set (``v1.10.16:pkg/ledger/execute_txsdata.go:ExecuteTxsData``: a later one is always
  accepted), the count is the ledger's own order.
* Scopes: a v2.x ledger and the stack gateway accept a read with
  ``ledger:read`` (or ``ledger:write``) and answer 401 without it (go-libs
  ``auth/auth.go:jwtAuth.Authenticate``); v1.x checks a scope per route
  (``accounts:read`` for balances, ``stats`` for statistics) and answers 403,
  as it does for a token it does not accept (v1.10.16
  ``libs/auth/middleware.go``). The token endpoint grants only the scopes
  asked for (``formancehq/auth`` ``pkg/oidc/storage.go:ClientCredentialsTokenRequest``),
  so the request names them: ``scopes``, by default ``["ledger:read"]``.
"""
from __future__ import annotations

import email.utils
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Iterator
from urllib.parse import quote, urlsplit

import requests
from pydantic import ValidationInfo, field_validator

from extractors.auth import ClientCredentialsAuth
from extractors.credentials import Credentials
from extractors.errors import (
    LedgerUnavailable,
    MalformedResponseError,
    ProviderError,
    SnapshotError,
    SnapshotInFuture,
    SnapshotMoved,
)
from extractors.http import HttpClient, RetryPolicy, error_text, http_error
from extractors.transport import send
from extractors.paginators import CursorPaginator
from extractors.provider import BaseExtractor, Provider, Throttle
from extractors.settings import Between, Count, Matching, Number, OneOf, OneOrMore, ProviderSettings, Text, Url
from extractors.text import safe_text
from extractors.records import (
    BalanceRow,
    MovementPage,
    MovementRow,
    Page,
    PageKind,
    RecordError,
    Window,
    integer_amount,
    require,
)

log = logging.getLogger(__name__)

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
# What a v2.x ledger and the stack gateway check for a read (service "ledger").
DEFAULT_SCOPES = ["ledger:read"]
READ_SCOPES = ("ledger:read", "ledger:write")
# v1.x checks one scope per route (pkg/api/routes/routes.go).
V1X_ROUTE_SCOPES = {"balances": "accounts:read", "aggregate/balances": "accounts:read", "stats": "stats",
                    "transactions": "transactions:read"}
BIGINT_AS_STRING = {"Formance-Bigint-As-String": "true"}
# Formance's own codes for failures that may pass: the ledger timed out or broke inside.
RETRIABLE_CODES = {"INTERNAL", "TIMEOUT"}
# The scale is stored as the row's decimals and turned into whole units in
# NUMERIC, whose largest scale is 16383; the server allows up to 999999.
MAX_DECIMALS = 16383
# A v1 crawl reads live data; by default this many crawls that each saw the ledger move fail the run.
V1_ATTEMPTS = 3
MAX_CRAWLS = 100
# v2 point-in-time volumes and the insertion-date aggregate both read the moves history.
V2_FEATURES = {"MOVES_HISTORY": "ON"}
# v2.2 only (v2.3.0 dropped it): a filter with an empty segment reads this index.
SEGMENTS_INDEX = "INDEX_ADDRESS_SEGMENTS"
# A Date header has whole seconds: the server's clock may be this far past it.
DATE_RESOLUTION = timedelta(seconds=1)
MAX_PIT_MARGIN = 3600.0

_LEDGER = re.compile(r"[0-9A-Za-z_-]{1,63}")
# The server's asset pattern: ``[A-Z][A-Z0-9]{0,16}(_[A-Z]{1,16})?(\/\d{1,6})?``
# (pkg/assets/asset.go, v2.3.1 to v2.4.12; v1.x and v2.2 lack the _SUFFIX
# part). Go's \d is ASCII, hence [0-9].
_ASSET = re.compile(r"[A-Z][A-Z0-9]{0,16}(?:_[A-Z]{1,16})?(?:/([0-9]{1,6}))?")
# An address segment as v2.x defines it (pkg/accounts/accounts.go); v1.x
# allows a subset (no '-'), so a literal segment means the same on both.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
# A scope as RFC 6749 §3.3 allows it (printable ASCII but space, " and \).
_SCOPE = re.compile(r"[!#-\[\]-~]+")


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


class Settings(ProviderSettings):
    """The ``[sources.<name>]`` keys a Formance source accepts."""

    base_url: Url
    # First: the checks of page_size and address read it, and a wrong api is the mistake to name.
    api: Annotated[Text, OneOf(*APIS)] = "v1"
    ledger: Annotated[Text, Matching(_LEDGER, "a ledger name (letters, digits, _ and -)")]
    address: Text | None = None
    # Say so rather than let the server cut a larger page without a word
    # (the top depends on the API: _page_size_fits_the_api).
    page_size: Count = 100
    # A ledger (or filter) holding no account is usually a misspelling:
    # the run fails unless the source says an empty snapshot is expected.
    allow_empty: bool = False
    # The OAuth2 scopes asked for; None: the Connection's extra ``scope``, else DEFAULT_SCOPES.
    scopes: OneOrMore[Text] | None = None
    # A v2 read waits until the server's clock is this many seconds past pit.
    pit_margin: Annotated[Number, Between(0, MAX_PIT_MARGIN, unit=" seconds")] = 60.0
    # v1: crawls that may each see the ledger's log move before the run fails.
    max_crawls: Annotated[Count, Between(1, MAX_CRAWLS)] = V1_ATTEMPTS

    # The checks below read api: a wrong api is reported on its own.
    @field_validator("address")
    @classmethod
    def _filter_every_server_reads_alike(cls, address: str | None, info: ValidationInfo) -> str | None:
        api = info.data.get("api")
        problem = address_filter_problem(address, api) if address is not None and api is not None else None
        if problem:
            raise ValueError(problem)
        return address

    @field_validator("page_size")
    @classmethod
    def _page_size_fits_the_api(cls, page_size: int, info: ValidationInfo) -> int:
        api = info.data.get("api")
        if api is not None and not 1 <= page_size <= MAX_PAGE_SIZE[api]:
            raise ValueError(f"must be between 1 and {MAX_PAGE_SIZE[api]} for the {api} API, got {page_size}")
        return page_size

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, scopes: list[str] | None) -> list[str] | None:
        for scope in scopes or []:
            if not _SCOPE.fullmatch(scope):
                raise ValueError(f"{scope!r} is not an OAuth2 scope (printable ASCII, no spaces "
                                 "or quotes; list each scope on its own)")
        return scopes


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


def v1_snapshot_raw(as_of: datetime, transactions: int) -> str:
    """A v1 snapshot's raw time: when it was read, and the ledger state it is."""
    return f"{format_pit(as_of)} transactions={transactions}"


def _route_scope(url: str) -> str | None:
    path = urlsplit(url).path
    return next((scope for route, scope in V1X_ROUTE_SCOPES.items() if path.endswith("/" + route)), None)


@dataclass(slots=True, frozen=True)
class LedgerServer:
    """What ``/_info`` says of the server: v1.x or v2.x, its version, its ledgers."""

    v1x: bool
    version: str
    ledgers: tuple[str, ...]

    @classmethod
    def from_info(cls, info: Any) -> "LedgerServer | None":
        data = info.get("data") if isinstance(info, dict) else None
        server = data.get("server") if isinstance(data, dict) else None
        ledgers = _dig(data, "config", "storage", "ledgers")
        if server not in ("ledger", "numary-ledger") or not isinstance(ledgers, list):
            return None
        version = data.get("version")
        version = version if isinstance(version, str) else ""
        v1x = server == "numary-ledger" or version.startswith("v1.")
        return cls(v1x, version, tuple(n for n in ledgers if isinstance(n, str)))

    @property
    def name(self) -> str:
        return f"ledger {self.version or ('v1.x' if self.v1x else 'v2.x')}"


@dataclass(slots=True)
class _Crawl:
    """What one pass over the pages saw, to judge whether it is one snapshot.

    Memory stays flat whatever the ledger's size: only the sums per asset
    and the addresses of the page before are kept (offsets that shift by
    less than a page list an address again there; the log's token catches
    any other movement, and publish refuses a holding listed twice with two
    balances).
    """

    sums: dict[str, int] = field(default_factory=dict)
    accounts: int = 0
    rows: int = 0
    rejected: int = 0
    moved: str | None = None
    previous_page: set = field(default_factory=set)
    this_page: set = field(default_factory=set)
    last_address: str | None = None

    def next_page(self) -> None:
        self.previous_page, self.this_page = self.this_page, set()


class FormanceExtractor(BaseExtractor):
    """Reads one snapshot of a ledger's balances, page by page, then its aggregate."""


    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int,
                 auth: ClientCredentialsAuth | None = None) -> None:
        super().__init__(settings, client, max_pages=max_pages)
        self.auth = auth
        prefix, ledger_path = APIS[settings.api]
        self.prefix = prefix
        self.base_path = prefix + ledger_path.format(ledger=quote(settings.ledger, safe=""))
        self.server: LedgerServer | None = None
        self._server_date: tuple[datetime, float] | None = None  # (Date header, monotonic when read)
        client.error_for = self._error
        client.session.hooks["response"].append(self._remember_date)

    @property
    def v2(self) -> bool:
        return self.settings.api in V2_APIS

    def pages(self, at: datetime, account_range: tuple[str, str | None] | None = None) -> Iterator[Page]:
        """Yield the balance pages, then one aggregate page, all with one ``as_of``.

        v2 reads the ledger at ``pit = at``; v1 can only read the present,
        so its snapshot time is when the first page arrived. A v1 crawl that
        saw the ledger move yields a ``PageKind.RESTART`` page (what was
        yielded so far is void) and reads again.
        """
        if account_range is not None:
            raise ValueError("formance sources are not sharded")
        self.server = self._find_server()
        self._check_ledger(self.server)
        if self.v2:
            self._wait_for_server_clock(at)
            yield from self._v2_snapshot(at)
            return
        yield from self._v1_snapshot()

    # -- movements: the roll-forward of a window ------------------------------------

    def movements(self, window: Window, account_range: tuple[str, str | None] | None = None) -> Iterator[MovementPage]:
        """Yield the window's movement legs: v2 the volumes inserted in it, v1 its transactions' postings."""
        if account_range is not None:
            raise ValueError("formance sources are not sharded")
        self.server = self._find_server()
        self._check_ledger(self.server)
        if self.v2:
            if any(_v1_count(raw) is not None for raw in (window.start_raw, window.end_raw)):
                yield _unexplainable(f"window {window} has a v1 snapshot at one end (the ledger as it was when "
                                     "read, not at a point in time): v2 volumes cannot explain it")
                return
            self._wait_for_server_clock(window.end)
            yield from self._v2_movements(window)
            return
        first, last = _v1_count(window.start_raw), _v1_count(window.end_raw)
        if first is None or last is None:
            yield _unexplainable(f"window {window} has a snapshot without the ledger's transaction count at one "
                                 "end (a v2 point in time): the v1 transactions cannot be placed in it")
            return
        yield from self._v1_movements(window, first, last)

    def _v2_movements(self, window: Window) -> Iterator[MovementPage]:
        since = format_pit(window.start + ONE_MICROSECOND)  # the start is the previous window's
        params = [("pageSize", self.settings.page_size), ("startTime", since), ("endTime", format_pit(window.end)),
                  ("insertionDate", "true")]
        bodies = self.client.paginate(f"{self.base_path}/volumes", params, self._paginator(),
                                      json_body=self._v2_filter())
        pattern = self.settings.address
        for data in bodies:
            page = MovementPage()
            for _, legs in page.parse_each(_cursor_data(data), lambda r: _volume_legs(r, window)):
                for leg in legs:
                    if pattern and not address_matches(pattern, leg.account):
                        raise SnapshotError(f"{self._where()}: the server listed {leg.account!r}, outside the "
                                            "address filter, in a window's volumes; nothing stored")
                    page.rows.append(leg)
            yield page

    def _v1_movements(self, window: Window, first: int, last: int) -> Iterator[MovementPage]:
        """Transactions ``first`` to ``last - 1``: newest first from ``after=last``, every id once."""
        if last < first:
            raise SnapshotError(f"{self._where()}: window {window} ends with fewer transactions ({last}) than it "
                                f"starts with ({first}): not one ledger")
        if last == first:
            return
        expected = last - 1  # the next id the listing must give
        params = [("pageSize", self.settings.page_size), ("after", last)]
        bodies = self.client.paginate(f"{self.base_path}/transactions", params, self._paginator())
        pattern = self.settings.address
        for data in bodies:
            page = MovementPage()
            done = False
            for record in _cursor_data(data):
                txid = _txid(record)
                if txid == last:
                    continue  # v1.x: after is inclusive, and the equal one is dropped only on a full page
                if txid < first:
                    done = True
                    break
                if txid != expected:
                    raise SnapshotError(
                        f"{self._where()}: window {window} holds transactions {first} to {last - 1}, but after "
                        f"{expected + 1} the ledger listed {txid}, not {expected}: its ids are not contiguous (a "
                        "v2.x server takes them from a sequence, which can skip one), so which transactions each "
                        'snapshot held is unknown. Nothing stored; api = "v2" rolls forward by point in time')
                expected -= 1
                for _, legs in page.parse_each([record], _posting_legs):
                    page.rows.extend(leg for leg in legs if not pattern or address_matches(pattern, leg.account))
            yield page
            if done or expected < first:
                break
        if expected >= first:
            raise SnapshotError(f"{self._where()}: window {window} holds transactions {first} to {last - 1}, but the "
                                f"listing ended before transaction {expected}; nothing stored")

    def _where(self) -> str:
        scope = f" (address {self.settings.address!r})" if self.settings.address else ""
        return f"ledger {self.settings.ledger!r}{scope}"

    # -- the server and the ledger ----------------------------------------------

    @property
    def address_pattern(self) -> re.Pattern:
        """The addresses the server found behind ``base_url`` can hold."""
        return V1_ADDRESS if self.server is not None and self.server.v1x else V2_ADDRESS

    def probe(self) -> str:
        """The server and the ledger, found with requests that create nothing (``balances check --connect``)."""
        server = self._find_server()
        self._check_ledger(server)
        return f"{self._where()} exists on {server.name}"

    def _find_server(self) -> LedgerServer:
        """The server behind ``base_url``, found with requests that create nothing."""
        root = self._root_info()
        api, base = self.settings.api, self.client.base_url
        if self.prefix:
            if root is not None:
                raise LedgerUnavailable(
                    f"{base} is a standalone ledger ({root.name} answers /_info), not a stack gateway: "
                    f'api = "{api}-standalone". Nothing was sent under {self.prefix}, which a v2.x '
                    f"server takes for a ledger named {self.prefix.split('/')[1]!r} and creates")
            try:
                found = LedgerServer.from_info(self.client.get_json(f"{self.prefix}/_info"))
            except ProviderError as exc:
                if exc.status != 404 or f"{self.prefix}/_info:" not in str(exc):
                    raise  # another error, or the token endpoint's
                found = None
            if found is None:
                raise LedgerUnavailable(f"no Formance ledger at {base}{self.prefix}/_info: is {base} a stack "
                                        f'gateway? A standalone ledger serves /_info at its root (api = "{api}'
                                        '-standalone")')
            root = found
        elif root is None:
            gateway = api.removesuffix("-standalone")
            raise LedgerUnavailable(f"no Formance ledger at {base}/_info: a stack gateway serves the ledger "
                                    f'under /api/ledger: api = "{gateway}"')
        if self.v2 and root.v1x:
            raise LedgerUnavailable(f"{root.name} has only the v1 API (a v1.x server): "
                                    f'api = "{api.replace("v2", "v1")}"')
        return root

    def _root_info(self) -> LedgerServer | None:
        """``GET /_info`` at the server's root: a standalone ledger's, or None.

        Public on every ledger, so sent without a token (a gateway's root is
        its console); no retry, since anything but a ledger's answer means
        "not a standalone ledger".
        """
        client = self.client
        if client.throttle is not None:
            client.throttle()
        client.stats.requests += 1
        policy = client.policy
        response = send(client.session, "GET", client.url_for("/_info"), deadline=policy.request_deadline,
                        max_bytes=policy.max_response_bytes, allow_redirects=False,
                        timeout=(policy.connect_timeout, policy.read_timeout))
        if response.status_code != 200:
            return None
        try:
            return LedgerServer.from_info(response.json())
        except ValueError:
            return None

    def _check_ledger(self, server: LedgerServer) -> None:
        """Fail unless the ledger exists and has what the reads need, asking in ways that create nothing."""
        name = self.settings.ledger
        known = ", ".join(repr(n) for n in server.ledgers[:10]) or "none"
        more = f" and {len(server.ledgers) - 10} more" if len(server.ledgers) > 10 else ""
        absent = (f"ledger {name!r} does not exist (the server has {known}{more}); its v1 routes "
                  "would create it and answer with an empty snapshot, so nothing was read")
        if server.v1x:
            if name not in server.ledgers:
                raise LedgerUnavailable(absent)
            return
        # v2.x: the v2 route says whether it exists (and with which features), creating nothing.
        path = self.prefix + APIS["v2"][1].format(ledger=quote(name, safe=""))
        try:
            data = self.client.get_json(path)
        except ProviderError as exc:
            if exc.status == 404 and f"{path}:" in str(exc):
                raise LedgerUnavailable(f"{absent}: {exc}") from None
            raise
        ledger = data.get("data") if isinstance(data, dict) else None
        if not isinstance(ledger, dict):
            raise MalformedResponseError("ledger has no data object", raw=data)
        features = ledger.get("features")
        if not isinstance(features, dict):
            return
        needed = dict(V2_FEATURES) if self.v2 else {}
        if self.settings.address and "" in self.settings.address.split(":") and SEGMENTS_INDEX in features:
            needed[SEGMENTS_INDEX] = "ON"
        for feature, value in needed.items():
            if features.get(feature) != value:
                reads = ("point-in-time volumes and the insertion-date aggregate" if feature in V2_FEATURES
                         else f"an address filter with an empty segment ({self.settings.address!r})")
                raise LedgerUnavailable(
                    f"ledger {name!r} has feature {feature}={features.get(feature)!r}; {reads} need "
                    f"{feature}={value} (features are set when a ledger is created; the server would "
                    f"answer {'400' if self.v2 else '500 Internal error'})")

    # -- the server's clock -------------------------------------------------------

    def _remember_date(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            when = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        self._server_date = (when, time.monotonic())

    def server_now(self) -> datetime | None:
        """The server's clock as its last ``Date`` header told it, or None if it sent none."""
        if self._server_date is None:
            return None
        when, seen = self._server_date
        return when + timedelta(seconds=time.monotonic() - seen)

    def _wait_for_server_clock(self, pit: datetime) -> None:
        """Refuse a ``pit`` after the server's clock; wait until it is ``pit_margin`` past one before it."""
        now, whose = self.server_now(), "the server's clock (its Date header)"
        if now is None:
            now, whose = datetime.now(timezone.utc), "this machine's clock (the server sent no Date header)"
        if pit > now + DATE_RESOLUTION:
            raise SnapshotInFuture(
                f"{self._where()}: pit {format_pit(pit)} is {pit - now} after {whose}, "
                f"{format_pit(now)}; a read of the future would see moves inserted while it runs. "
                "Nothing was read")
        wait = (pit + timedelta(seconds=self.settings.pit_margin) - now).total_seconds()
        if wait > 0:
            log.info("%s: waiting %.1fs for the server's clock to pass pit %s by pit_margin",
                     self._where(), wait, format_pit(pit))
            time.sleep(wait)

    # -- v2: one point in time ------------------------------------------------------

    def _v2_snapshot(self, at: datetime) -> Iterator[Page]:
        crawl = _Crawl()
        paginator = self._paginator()
        params = [("pageSize", self.settings.page_size), ("endTime", format_pit(at)),
                  ("insertionDate", "true")]
        bodies = self.client.paginate(f"{self.base_path}/volumes", params, paginator,
                                      json_body=self._v2_filter())
        for data in bodies:
            page = Page(as_of=at, as_of_raw=format_pit(at))
            for _, (address, row) in page.parse_each(_cursor_data(data), self._parse_volume):
                self._account(address, crawl, row.asset)
                page.rows.append(row)
                crawl.sums[row.asset] = crawl.sums.get(row.asset, 0) + row.balance
            self._count(page, crawl)
            yield page
            if crawl.moved:
                raise SnapshotError(f"{self._where()}: {crawl.moved}, in a point-in-time read")
        totals = self._totals(at)
        unbalanced = _unbalanced(totals, crawl)
        if unbalanced:
            raise SnapshotError(f"{self._where()}: {unbalanced} at pit {format_pit(at)}, both by insertion "
                                "date: the volumes listed are not the whole ledger. Nothing stored")
        yield self._finish(crawl, totals, at, format_pit(at))

    def _parse_volume(self, record: Any) -> tuple[str, BalanceRow]:
        """``{"account", "asset", "input", "output", "balance"}``: one holding."""
        address, asset = _volume_of(record, self.address_pattern)
        if "balance" in record:
            balance = integer_amount(record["balance"], f"balance of {asset}")
        else:
            balance = (integer_amount(record.get("input"), f"input of {asset}")
                       - integer_amount(record.get("output"), f"output of {asset}"))
        return address, BalanceRow(address, asset, balance, asset_decimals(asset))

    # -- v1: the present, checked against the ledger's log --------------------------

    def _v1_snapshot(self) -> Iterator[Page]:
        crawls = self.settings.max_crawls
        for attempt in range(1, crawls + 1):
            # Each pass reads the present anew: its snapshot time is when its
            # own first page arrived (the run forgets a voided pass's time).
            before = self._log_token()
            as_of: datetime | None = None
            crawl = _Crawl()
            for page in self._v1_pages(crawl, before):
                as_of = page.as_of
                yield page
                if crawl.moved:
                    break
            if not crawl.moved:
                totals = self._totals(None)
                after = self._log_token()
                if after != before:
                    crawl.moved = f"its log went from {before} to {after} transactions during the crawl"
                else:
                    crawl.moved = _unbalanced(totals, crawl)
            when = as_of or datetime.now(timezone.utc)
            if crawl.moved is None:
                yield self._finish(crawl, totals, when, v1_snapshot_raw(when, before))
                return
            if attempt == crawls:
                raise SnapshotMoved(
                    f"{self._where()} moved during each of {crawls} crawls (last: {crawl.moved}); "
                    "the v1 API reads live data page by page, so no consistent snapshot could be read. "
                    "Use api = \"v2\" (or \"v2-standalone\"), which reads a point in time, if the server "
                    "offers it, or schedule the source when the ledger is quiet")
            yield Page(as_of=when, as_of_raw=format_pit(when), kind=PageKind.RESTART, warnings=[
                f"{self._where()} moved during crawl {attempt} of at most {crawls} "
                f"({crawl.moved}); reading it again"])

    def _log_token(self) -> int:
        """The number of transactions in the ledger: every balance-moving write adds one."""
        data = self.client.get_json(f"{self.base_path}/stats")
        count = _dig(data, "data", "transactions")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise MalformedResponseError("stats has no data.transactions count", raw=data)
        return count

    def _v1_pages(self, crawl: _Crawl, token: int) -> Iterator[Page]:
        params = [("pageSize", self.settings.page_size)]
        if self.settings.address:
            params.append(("address", self.settings.address))
        bodies = self.client.paginate(f"{self.base_path}/balances", params, self._paginator())
        as_of: datetime | None = None
        for data in bodies:
            if as_of is None:
                as_of = datetime.now(timezone.utc)
            page = Page(as_of=as_of, as_of_raw=v1_snapshot_raw(as_of, token))
            pattern = self.address_pattern
            for _, accounts in page.parse_each(_cursor_data(data), lambda record: _parse_v1(record, pattern)):
                for address, rows in accounts:
                    self._account(address, crawl)
                    page.rows.extend(rows)
                    for row in rows:
                        crawl.sums[row.asset] = crawl.sums.get(row.asset, 0) + row.balance
            self._count(page, crawl)
            yield page
            if crawl.moved:
                return

    # -- shared ---------------------------------------------------------------------

    def _paginator(self) -> CursorPaginator:
        return CursorPaginator(cursor_path=("cursor", "next"), has_more_path=("cursor", "hasMore"),
                               cursor_param="cursor", max_pages=self.max_pages)

    @staticmethod
    def _count(page: Page, crawl: _Crawl) -> None:
        crawl.rows += len(page.rows)
        crawl.rejected += len(page.rejected)
        crawl.next_page()

    def _account(self, address: str, crawl: _Crawl, asset: str | None = None) -> None:
        """Check a listed address: inside the filter, and not on the page before or this one."""
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
        # v2 lists a holding a row (an account once per asset, one after the other): an account
        # whose assets straddle two pages is not listed twice, a holding is.
        key = address if asset is None else (address, asset)
        if key in crawl.previous_page:
            # Offsets shifted under the crawl: accounts were added meanwhile.
            crawl.moved = f"{address!r} was listed twice" + (f" for {asset}" if asset else "")
        if address != crawl.last_address:
            crawl.accounts += 1
        crawl.last_address = address
        crawl.this_page.add(key)

    def _v2_filter(self) -> dict | None:
        # v2 filters in the body; the accepted syntax means the same there.
        return {"$match": {"address": self.settings.address}} if self.settings.address else None

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

    def _finish(self, crawl: _Crawl, totals: dict, as_of: datetime, as_of_raw: str) -> Page:
        """The aggregate page, once the crawl is known to hold something."""
        page = Page(as_of=as_of, as_of_raw=as_of_raw, kind=PageKind.TOTALS)
        if crawl.rows == 0 and crawl.rejected == 0:
            message = (f"{self._where()} holds no account with a balance ({crawl.accounts} listed); "
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

    # -- errors -----------------------------------------------------------------------

    def _error(self, response: requests.Response) -> ProviderError:
        """``errorCode``/``errorMessage`` (or the deprecated snake_case pair), explained."""
        code = message = None
        try:
            body = response.json()
            code = body.get("errorCode") or body.get("error_code")
            message = body.get("errorMessage") or body.get("error_message")
        except (ValueError, AttributeError):
            pass  # auth refusals, and some v1 5xx, have an empty body
        text = message or error_text(response)
        if response.status_code in (401, 403) and "Authorization" not in response.request.headers:
            text = f"{text} (no access token sent: does the source need a conn_id?)"
        elif response.status_code == 401:
            renewed = " after renewing it" if response.history else ""
            text = (f"{text} (the server refused the access token{renewed}. A v2.x ledger and the stack "
                    f"gateway answer 401 also for a token without scope {READ_SCOPES[0]!r} "
                    f"(or {READ_SCOPES[1]!r}); {self._scopes_said()})")
        elif response.status_code == 403:
            route = _route_scope(response.url)
            needs = f"scope {route!r} for this route" if route else "the route's scope"
            text = (f"{text} (a v1.x ledger answers 403 for a token it does not accept, or one without "
                    f"{needs}: accounts:read for balances, stats for its statistics; "
                    f"{self._scopes_said()})")
        elif isinstance(message, str) and ("missing feature" in message or "to use volumes" in message
                                           or "must be 'ON'" in message):
            # ErrMissingFeature / ErrInvalidQuery of internal/storage/ledger (v2.x).
            text = f"{text} (the ledger was created without a feature this read needs)"
        elif response.status_code == 500 and code == "INTERNAL" and not self.v2:
            # internal/api/common/errors.go:HandleCommonErrors (v1.x answers its 500s without a body).
            text = (f"{text} (the v1 layer of a v2.x server answers 500 for any error it does not "
                    "classify, a missing ledger feature among them: the server's log says which; "
                    'api = "v2" reports them as they are)')
        return http_error(response, f"{code}: {text}" if code else text, str(code) if code else None,
                          retriable=code in RETRIABLE_CODES)

    def _scopes_said(self) -> str:
        if self.auth is None:
            return "no scope was asked for"
        asked = " ".join(self.auth.scopes) or "none"
        granted = ("not said" if self.auth.granted is None else " ".join(self.auth.granted) or "none")
        return (f"asked for: {asked}; granted: {granted}. The token endpoint grants only the scopes asked "
                "for that the client has: give the client the scope, or set scopes on the source")


def _unbalanced(totals: dict, crawl: _Crawl) -> str | None:
    """Why the rows read do not add up to the aggregate read with them, or None."""
    if crawl.rejected:
        return None  # a rejected record is missing from the sums, and fails the run anyway
    try:
        expected = {a: integer_amount(v, f"aggregate {a}") for a, v in _nonzero(totals).items()}
    except RecordError:
        return None  # the aggregate page will reject it
    if _nonzero(crawl.sums) != expected:
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


# The addresses a server accepts in a posting, so the only ones it can hold
# and report: v1.x pkg/core/posting.go ValidateAddress `^\w+(:\w+)*$` (Go's
# \w is ASCII), v2.x pkg/accounts/accounts.go Pattern
# `^[a-zA-Z0-9_-]+(:[a-zA-Z0-9_-]+)*$` (v2.2.59, v2.3.22, v2.4.12 alike).
V1_ADDRESS = re.compile(r"[A-Za-z0-9_]+(?::[A-Za-z0-9_]+)*")
V2_ADDRESS = re.compile(r"[A-Za-z0-9_-]+(?::[A-Za-z0-9_-]+)*")


def _address(value: Any, pattern: re.Pattern = V2_ADDRESS) -> str:
    """An account address as the server writes them; anything else is a rejected record (``invalid_id``).

    An address no posting could have made (markup, a NUL, 3,000 characters)
    did not come from the ledger's own rules: it is not stored.
    """
    if not isinstance(value, str) or not value:
        raise RecordError(f"account address {value!r} is not a non-empty string", "invalid_id")
    if not pattern.fullmatch(value):
        raise RecordError(f"account address {safe_text(ascii(value), 200)} does not match the server's address "
                          f"pattern {pattern.pattern}", "invalid_id")
    return value


def _parse_v1(record: Any, pattern: re.Pattern = V2_ADDRESS) -> list[tuple[str, list[BalanceRow]]]:
    """``{"users:001": {"USD/2": 500}}``; ``{"users:002": {}}`` has no holdings."""
    if not isinstance(record, dict):
        raise RecordError(f"record is {type(record).__name__}, expected an object")
    accounts = []
    for address, assets in record.items():
        _address(address, pattern)
        if not isinstance(assets, dict):
            raise RecordError(f"balances of {address} is {type(assets).__name__}, expected an object")
        accounts.append((address, [
            BalanceRow(address, asset, integer_amount(amount, f"balance of {asset}"), asset_decimals(asset))
            for asset, amount in assets.items()]))
    return accounts


ONE_MICROSECOND = timedelta(microseconds=1)
_V1_COUNT = re.compile(r".* transactions=([0-9]{1,19})")


def _v1_count(raw: str) -> int | None:
    """The transaction count of a v1 snapshot's raw time (:func:`v1_snapshot_raw`), or None."""
    match = _V1_COUNT.fullmatch(raw or "")
    return int(match[1]) if match else None


def _unexplainable(reason: str) -> MovementPage:
    return MovementPage(unexplainable={"*": reason})


def _movement_kind(source: str, destination: str) -> str:
    """Money from ``world`` is created, to ``world`` destroyed (the ledger's own convention)."""
    return "mint" if source == "world" else "burn" if destination == "world" else "transfer"


def _volume_of(record: Any, pattern: re.Pattern = V2_ADDRESS) -> tuple[str, str]:
    """The account and asset of a ``volumes`` record (its address checked against ``pattern``)."""
    if not isinstance(record, dict):
        raise RecordError(f"volume is {type(record).__name__}, expected an object")
    address = _address(record.get("account"), pattern)
    asset = record.get("asset")
    if not isinstance(asset, str):
        raise RecordError(f"asset of {address} is {asset!r}, expected a string")
    return address, asset


def _volume_legs(record: Any, window: Window) -> list[MovementRow]:
    """``{"account", "asset", "input", "output"}`` over the window: its inflow leg and its outflow leg."""
    address, asset = _volume_of(record)
    decimals = asset_decimals(asset)
    when = f"({window.start_raw}, {window.end_raw}]"
    legs = []
    for side, sign in (("input", 1), ("output", -1)):
        amount = integer_amount(require(record, side), f"{side} of {asset}", minimum=0)
        if amount:
            legs.append(MovementRow(address, asset, window.end, f"volumes {when}",
                                    f"volumes {when} {address} {asset} {side}", sign * amount, "transfer", decimals))
    return legs


def _txid(record: Any) -> int:
    txid = record.get("txid") if isinstance(record, dict) else None
    if isinstance(txid, bool) or not isinstance(txid, int) or txid < 0:
        raise MalformedResponseError(f"a transaction has txid {txid!r}, not a transaction number", raw=record)
    return txid


def _posting_legs(record: dict) -> list[MovementRow]:
    """A v1 transaction's postings: each a leg out of its source (even index) and one into its destination."""
    txid = record["txid"]
    stamp = require(record, "timestamp")
    if not isinstance(stamp, str):
        raise RecordError(f"timestamp of transaction {txid} is {stamp!r}, expected RFC 3339 text")
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(f"timestamp of transaction {txid} is {stamp!r}, expected RFC 3339 text") from None
    if when.tzinfo is None:
        raise RecordError(f"timestamp of transaction {txid} is {stamp!r}, without a time zone")
    postings = require(record, "postings")
    if not isinstance(postings, list):
        raise RecordError(f"postings of transaction {txid} is {type(postings).__name__}, expected a list")
    legs = []
    for index, posting in enumerate(postings):
        source, destination = _address(require(posting, "source")), _address(require(posting, "destination"))
        asset = require(posting, "asset")
        if not isinstance(asset, str):
            raise RecordError(f"asset of posting {index} of transaction {txid} is {asset!r}, expected a string")
        amount = integer_amount(require(posting, "amount"), f"amount of posting {index}", minimum=0)
        decimals, kind = asset_decimals(asset), _movement_kind(source, destination)
        legs.append(MovementRow(source, asset, when, stamp, f"tx {txid} leg {2 * index}", -amount, kind, decimals,
                                destination))
        legs.append(MovementRow(destination, asset, when, stamp, f"tx {txid} leg {2 * index + 1}", amount, kind,
                                decimals, source))
    return legs


def build(settings: Settings, credentials: Credentials | None, policy: RetryPolicy, *,
          max_pages: int, throttle: Throttle | None = None) -> FormanceExtractor:
    """A Formance extractor; a Connection makes it an OAuth2 client, none means no auth."""
    auth = None
    if credentials is not None:
        auth = ClientCredentialsAuth.from_credentials(
            settings.base_url, credentials, default_token_url=DEFAULT_TOKEN_URL, scopes=settings.scopes,
            default_scopes=DEFAULT_SCOPES, timeout=(policy.connect_timeout, policy.read_timeout),
            # v1.x refuses a token it does not accept with 403 (libs/auth/middleware.go).
            renew_on=(401, 403))
    headers = BIGINT_AS_STRING if settings.api in V2_APIS else {}
    client = HttpClient(settings.base_url, auth=auth, headers=headers, policy=policy, throttle=throttle)
    if auth is not None:
        auth.stats = client.stats
    return FormanceExtractor(settings, client, max_pages=max_pages, auth=auth)


PROVIDER = Provider(
    name="formance",
    settings=Settings,
    build=build,
    extractor=FormanceExtractor,
    has_history=has_history,  # v2 answers for a past time (pit), v1 only for the present
    has_movements=True,  # movements(window): v2 the window's volumes, v1 its transactions' postings
)
