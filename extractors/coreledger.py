"""CoreLedger TEOS: current balances of configured addresses × assets.

What differs from the other providers: no pagination and no history. One
OData function call, ``Balances/GetAssetsBalances(addresses=[...],
uniqueAssetIds=[...])``, answers a grid of addresses × assets as of now, so
the grid is split into sub-grids whose URLs stay under ``max_url_length``.
The path is built and percent-encoded here. Amounts are string integers in
Sparks; each asset's ``SparkFactor`` (Sparks per unit, not always a power of
ten) is looked up once per run. Every requested pair must come back: a
missing one is rejected, never read as zero.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Iterator
from urllib.parse import quote, urlsplit

import requests
from pydantic import ValidationInfo, field_validator

from extractors.credentials import Credentials, require_credentials
from extractors.errors import MalformedResponseError, ProviderError
from extractors.http import HttpClient, error_text, http_error
from extractors.paginators import PlannedPages
from extractors.provider import BaseExtractor, Provider, Throttle
from extractors.settings import Count, Matching, OneOrMore, ProviderSettings, Text, Url
from extractors.records import (
    BalanceRow,
    Page,
    RecordError,
    integer_amount,
    require,
)
from extractors.text import safe_text

DEFAULT_BASE_URL = "https://teosapi.coreledger.net"
RATE_LIMITED = "13000"

_VERSION = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
_POWER_OF_TEN = re.compile(r"10*")
# Error details listed in a message; a body could hold a million of them.
_MAX_DETAILS = 10


def fold(value: str) -> str:
    """Hex addresses and asset ids compare without case, in ASCII only.

    ``str.casefold`` would make the Kelvin sign equal to ``k`` and ``ß``
    equal to ``ss``: a provider could answer for a pair it was not asked.
    """
    return value.lower() if value.isascii() else value


def odata_string(value: str) -> str:
    """An OData string literal, percent-encoded for a URL path.

    A ``'`` inside the value is doubled (OData's escape) and left as is;
    everything else outside the unreserved set is encoded, so ``,`` ``)``
    ``]`` ``/`` ``?`` ``#`` or ``%`` in an address cannot end the literal or
    the path early.
    """
    return "'" + quote(value.replace("'", "''"), safe="'") + "'"


def odata_array(values: list[str]) -> str:
    # Brackets are not allowed raw in a path (RFC 3986); the server decodes them.
    return "%5B" + ",".join(map(odata_string, values)) + "%5D"


def balances_path(api_version: str, addresses: list[str], asset_ids: list[str]) -> str:
    return (f"/odata/v{api_version}/Balances/GetAssetsBalances("
            f"addresses={odata_array(addresses)},uniqueAssetIds={odata_array(asset_ids)})")


def asset_path(api_version: str, asset_id: str) -> str:
    return f"/odata/v{api_version}/Assets({odata_string(asset_id)})"


class Settings(ProviderSettings):
    """The ``[sources.<name>]`` keys a CoreLedger source accepts."""

    addresses: OneOrMore[Text]
    unique_asset_ids: OneOrMore[Text]
    base_url: Url = DEFAULT_BASE_URL
    api_version: Annotated[Text, Matching(_VERSION, "a version such as '1.1'")] = "1.1"
    max_url_length: Count = 2000

    @field_validator("addresses", "unique_asset_ids")
    @classmethod
    def _each_once(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("must list at least one value")
        seen: set[str] = set()
        for value in values:
            # Hex addresses and asset ids are case-insensitive.
            if fold(value) in seen:
                raise ValueError(f"{value!r} is listed twice")
            seen.add(fold(value))
        return values

    @field_validator("base_url")
    @classmethod
    def _origin_only(cls, base_url: str) -> str:
        if "/odata" in urlsplit(base_url).path.lower():
            raise ValueError("give the origin only, e.g. https://teosapi.coreledger.net: "
                             "the /odata/v<version> part comes from api_version")
        return base_url.rstrip("/")

    @field_validator("max_url_length")
    @classmethod
    def _one_pair_fits(cls, max_url_length: int, info: ValidationInfo) -> int:
        keys = info.data
        if not {"addresses", "unique_asset_ids", "base_url", "api_version"} <= set(keys):
            return max_url_length  # a mistake there is reported on its own
        widest = len(keys["base_url"] + balances_path(
            keys["api_version"], [max(keys["addresses"], key=lambda a: len(odata_string(a)))],
            [max(keys["unique_asset_ids"], key=lambda a: len(odata_string(a)))]))
        if widest > max_url_length:
            raise ValueError(f"{max_url_length} is too short: one address and "
                             f"one asset already need a {widest}-character URL")
        return max_url_length


@dataclass(slots=True, frozen=True)
class Batch:
    """One sub-grid of the configured addresses × assets: one request."""

    addresses: list[str]
    asset_ids: list[str]


def plan_batches(settings: Settings) -> list[Batch]:
    """Cover every address × asset pair exactly once, each URL within the limit.

    Each value costs its encoded literal plus a comma; the asset list is cut
    in the way that needs the fewest requests among a few candidate widths
    (a short asset list in every request, or the assets spread out).
    """
    fixed = len(settings.base_url + balances_path(settings.api_version, [], []))
    budget = settings.max_url_length - fixed + 2  # the last value of each list has no comma
    address_costs = [len(odata_string(a)) + 1 for a in settings.addresses]
    asset_costs = [len(odata_string(a)) + 1 for a in settings.unique_asset_ids]
    widest_address = max(address_costs)
    candidates = {max(asset_costs), sum(asset_costs)} | {budget * k // 8 for k in range(1, 8)}
    best: list[tuple[list[int], list[int]]] | None = None
    for asset_budget in sorted(candidates):
        if not max(asset_costs) <= asset_budget <= budget - widest_address:
            continue
        grid = [(chunk, asset_chunk) for asset_chunk in _pack(asset_costs, asset_budget)
                for chunk in _pack(address_costs, budget - sum(asset_costs[j] for j in asset_chunk))]
        if best is None or len(grid) < len(best):
            best = grid
    assert best is not None, "Settings checked that one address and one asset fit"
    return [Batch([settings.addresses[i] for i in a], [settings.unique_asset_ids[j] for j in s])
            for a, s in best]


def _pack(costs: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices, greedily grouped so each group's cost fits ``budget``."""
    groups: list[list[int]] = []
    used = budget + 1
    for index, cost in enumerate(costs):
        if used + cost > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += cost
    return groups


def rate_limit_reset(response: requests.Response, now: float | None = None) -> float | None:
    """Seconds until ``X-Rate-Limit-Reset`` (an ISO 8601 UTC time), if sent."""
    value = response.headers.get("X-Rate-Limit-Reset")
    if not value:
        return None
    try:
        reset = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if reset.tzinfo is None:
        reset = reset.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, reset.timestamp() - now)


def coreledger_error(response: requests.Response) -> ProviderError:
    """TEOS's ``code``, ``message``, details and ``clTraceId`` as the error text.

    ``13000`` (quota exceeded) and HTTP 429 are retried once the quota
    resets; every other code is fatal. (The HttpClient has already masked
    the request's credentials in the body, should the server echo them.)
    """
    code = None
    try:
        body = response.json()
        code = safe_text(str(body["code"]), 40) if body.get("code") is not None else None
        parts = [p for p in (code, body.get("message")) if p]
        details = body.get("details") or []
        parts += [f"[{d.get('code')}] {d.get('message')}" for d in details[:_MAX_DETAILS]
                  if isinstance(d, dict)]
        text = safe_text(" ".join(str(p) for p in parts), 300) or error_text(response)
        if body.get("clTraceId"):
            text += f" (clTraceId {safe_text(str(body['clTraceId']), 80)})"
    except (ValueError, AttributeError, KeyError, TypeError):
        text = error_text(response)
    if response.status_code == 414:
        text += " (URL too long for this server: lower max_url_length)"
    limited = code == RATE_LIMITED or response.status_code == 429
    return http_error(response, text, code=code, retriable=limited,
                      retry_after=rate_limit_reset(response) if limited else None)


class CoreLedgerExtractor(BaseExtractor):
    """Reads the configured grid, one page per batch, all as of one time."""


    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int) -> None:
        super().__init__(settings, client, max_pages=max_pages)
        self._spark_factors: dict[str, int] = {}

    def pages(self, at: datetime, account_range: tuple[str, str | None] | None = None) -> Iterator[Page]:
        """Yield one page per batch; ``at`` is ignored: the API only knows now."""
        batches = plan_batches(self.settings)
        version = self.settings.api_version
        # Planned here in full: a grid over the page cap is refused before any request.
        paginator = PlannedPages([balances_path(version, b.addresses, b.asset_ids) for b in batches],
                                 what="the grid", max_pages=self.max_pages)
        # One time for the whole grid: the run is one snapshot, not one per batch.
        as_of = datetime.now(timezone.utc)
        as_of_raw = as_of.isoformat()
        bodies = self.client.paginate(paginator.targets[0], None, paginator)
        for data, batch in zip(bodies, batches, strict=True):
            page = Page(as_of=as_of, as_of_raw=as_of_raw)
            self._parse(data, batch, page)
            yield page

    def probe(self) -> str:
        """One request: the first configured asset (``balances check --connect``)."""
        asset_id = self.settings.unique_asset_ids[0]
        return f"asset {asset_id}: SparkFactor {self.spark_factor(asset_id)}"

    def _parse(self, data: Any, batch: Batch, page: Page) -> None:
        items = data.get("value") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise MalformedResponseError("balances response is neither a JSON array nor {\"value\": [...]}",
                                         raw=data)
        wanted = {(fold(a), fold(s)): (a, s) for a in batch.addresses for s in batch.asset_ids}
        for _, row in page.parse_each(items, lambda record: self._row(record, wanted)):
            page.rows.append(row)
        for address, asset_id in wanted.values():
            page.reject({"Address": address, "UniqueAssetId": asset_id},
                        f"missing: no balance returned for address {address} and asset {asset_id} "
                        "(a missing pair is not read as zero)", code="missing")

    def _row(self, record: Any, wanted: dict[tuple[str, str], tuple[str, str]]) -> BalanceRow:
        # The pair is taken off `wanted` first: a returned pair with a bad
        # amount is rejected for its amount, not reported missing as well.
        address, asset_id = self._pair(record, wanted)
        amount = integer_amount(require(record, "Amount"), "Amount", minimum=0)
        factor = self.spark_factor(asset_id)
        return BalanceRow(address, asset_id, amount, decimals_of(factor), spark_factor=factor)

    @staticmethod
    def _pair(record: Any, wanted: dict[tuple[str, str], tuple[str, str]]) -> tuple[str, str]:
        """The configured spelling of the record's pair, taken off ``wanted``."""
        address, asset_id = require(record, "Address"), require(record, "UniqueAssetId")
        if not isinstance(address, str) or not isinstance(asset_id, str):
            raise RecordError("Address and UniqueAssetId must be strings")
        key = (fold(address), fold(asset_id))
        if key not in wanted:
            raise RecordError(f"pair {safe_text(address, 200)} / {safe_text(asset_id, 200)} was not "
                              "requested in this batch or was returned twice")
        # The configured spelling keeps an account's history under one key
        # whatever case the API answers in.
        return wanted.pop(key)

    def spark_factor(self, asset_id: str) -> int:
        """The asset's ``SparkFactor`` (a string integer), fetched once per run."""
        if asset_id not in self._spark_factors:
            info = self.client.get_json(asset_path(self.settings.api_version, asset_id))
            try:
                factor = integer_amount(require(info, "SparkFactor"), f"SparkFactor of asset {asset_id}",
                                        minimum=1)
            except RecordError as exc:
                raise MalformedResponseError(f"asset {asset_id}: {exc}", raw=info) from None
            self._spark_factors[asset_id] = factor
        return self._spark_factors[asset_id]


def decimals_of(spark_factor: int) -> int | None:
    """log10 of the factor when it is a power of ten; else None (use spark_factor)."""
    text = str(spark_factor)
    return len(text) - 1 if _POWER_OF_TEN.fullmatch(text) else None


def build(settings: Settings, credentials: Credentials | None, policy, *, max_pages: int,
          throttle: Throttle | None = None) -> CoreLedgerExtractor:
    """A CoreLedger extractor; the Connection's password is the bearer API key."""
    credentials = require_credentials(credentials, "a CoreLedger source", password="the API key")
    client = HttpClient(settings.base_url, headers={"Authorization": f"Bearer {credentials.password}"},
                        policy=policy, error_for=coreledger_error, throttle=throttle)
    return CoreLedgerExtractor(settings, client, max_pages=max_pages)


PROVIDER = Provider(
    name="coreledger",
    settings=Settings,
    build=build,
    extractor=CoreLedgerExtractor,
    has_history=False,  # the API reports balances as of the call, nothing earlier
    rate_limit=(5.0, 5),  # documented: 300 calls per minute (and 30,000 per 24 h)
)
