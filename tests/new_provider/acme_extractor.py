"""Acme custody: a sixth provider, written the way docs/ADDING_A_PROVIDER.md says.

Not a real API: ``tests/test_adding_a_provider.py`` drops this file into a
fresh copy of the repository as ``extractors/acme.py`` (with its sandbox,
its test and its documentation beside it) and checks that nothing else has
to change for the pipeline to take it. ``GET /v1/holdings`` answers every
holding at once, as of the server's ``as_of``; amounts are decimal strings.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Iterator

from extractors.errors import MalformedResponseError
from extractors.http import HttpClient
from extractors.paginators import SinglePage
from extractors.provider import BaseExtractor, Provider, Throttle
from extractors.records import BalanceRow, Page, RecordError, decimal_amount, require
from extractors.settings import ProviderSettings, Url

HOLDINGS_PATH = "/v1/holdings"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


class Settings(ProviderSettings):
    """The ``[sources.<name>]`` keys an Acme source accepts."""

    base_url: Url


class AcmeExtractor(BaseExtractor):
    """Reads every holding: one request, one page."""

    def pages(self, at: datetime, account_range=None) -> Iterator[Page]:
        data = next(self.client.paginate(HOLDINGS_PATH, None, SinglePage(max_pages=self.max_pages)))
        as_of_raw = data.get("as_of") if isinstance(data, dict) else None
        if not isinstance(as_of_raw, str) or not _TIME.fullmatch(as_of_raw):
            raise MalformedResponseError("response has no as_of time", raw=data)
        holdings = data.get("holdings")
        if not isinstance(holdings, list):
            raise MalformedResponseError("response has no holdings list", raw=data)
        page = Page(as_of=datetime.fromisoformat(as_of_raw), as_of_raw=as_of_raw)
        for _, row in page.parse_each(holdings, self._parse):
            page.rows.append(row)
        yield page

    def probe(self) -> str:
        page = next(self.pages(datetime.now()))
        return f"{len(page.rows)} holdings at {page.as_of_raw}"

    @staticmethod
    def _parse(record: Any) -> BalanceRow:
        if not isinstance(record, dict):
            raise RecordError("a holding is not an object")
        return BalanceRow(require(record, "account"), require(record, "asset"),
                          decimal_amount(require(record, "amount"), "amount"))


def build(settings: Settings, credentials, policy, *, max_pages: int,
          throttle: Throttle | None = None) -> AcmeExtractor:
    return AcmeExtractor(settings, HttpClient(settings.base_url, policy=policy, throttle=throttle),
                         max_pages=max_pages)


PROVIDER = Provider(
    name="acme",
    settings=Settings,
    build=build,
    extractor=AcmeExtractor,
    has_history=False,  # the API reports the present only
    rate_limit=(5.0, 5),
)
