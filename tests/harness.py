"""A provider's extractor run against its sandbox, with no database: pages, rows and rejections.

``crawl(live)`` reads one snapshot as the run does (the snapshot chosen
first where the provider chooses it, every page's bad ids rejected, a
restarted crawl's pages dropped), with the run's client, retries and
limits, and keeps the pages in memory: what a test of parsing, pagination,
faults or hostile input asserts on. The sandbox is the provider's own fake
(``tests.sandboxes.start``), or any app in front of it that rewrites or
replays pages (``tests/test_pagination.py``). What the database does with
the pages (staging, the atomic publish, run records) is tested apart, with
PostgreSQL.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from extractors.provider import stats
from extractors.records import Page, PageKind, Rejection
from pipeline.snapshot import build_extractor, close_extractor
from tests.sandboxes import Live, now


@dataclass
class Crawl:
    """What one crawl yielded, and the requests it took."""

    pages: list[Page] = field(default_factory=list)
    requests: int = 0
    retries: int = 0

    @property
    def rows(self) -> list[tuple]:
        """Every balance row as a tuple of its columns, sorted: compared whole, whatever the provider."""
        return sorted(dataclasses.astuple(r) for p in self.pages if p.kind is PageKind.BALANCES for r in p.rows)

    @property
    def rejected(self) -> list[Rejection]:
        return [r for p in self.pages for r in p.rejected]


def crawl(live: Live, at: datetime | None = None) -> Crawl:
    """Read one snapshot of ``live``'s source; an error the crawl raises is raised here.

    As the run does: the snapshot is chosen by one extractor (``plan_shards``)
    and read by another (``crawl``).
    """
    source = live.source
    at = at or now()
    result = Crawl()
    kwargs = {}
    if source.contract.chooses_snapshot:
        with _extractor(live, result) as extractor:
            kwargs["snapshot"] = extractor.choose_snapshot(at)
    with _extractor(live, result) as extractor:
        for page in extractor.pages(at, **kwargs):
            if page.kind is PageKind.RESTART:  # what was read is void: the extractor reads again
                result.pages.clear()
                continue
            if page.kind is PageKind.BALANCES:
                page.reject_bad_ids()
            result.pages.append(page)
    return result


@contextmanager
def _extractor(live: Live, result: Crawl) -> Iterator:
    extractor = build_extractor(live.source, live.credentials)
    try:
        yield extractor
    finally:
        made = stats(extractor)
        result.requests += made.requests
        result.retries += made.retries
        close_extractor(extractor)
