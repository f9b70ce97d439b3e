"""B2: pages per second of the Hedera extractor vs a bare requests loop.

Both fetch the same pre-rendered 100-row pages from a local server in
another process; the bare loop does nothing with them, the extractor parses
every record into exact rows. Target: extractor >= 0.8x the bare loop.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

import requests

from bench.servers import SNAPSHOT_TS, MirrorProcess
from extractors.hedera import Settings, build
from extractors.http import RetryPolicy

ACCOUNTS = 200_000
AT = datetime.fromtimestamp(int(SNAPSHOT_TS.split(".")[0]) + 60, tz=timezone.utc)


def bare_loop(url: str) -> tuple[int, float]:
    session = requests.Session()
    started = time.perf_counter()
    pages = 0
    next_url = f"{url}/api/v1/balances?limit=100&timestamp=lte:{SNAPSHOT_TS}"
    while next_url:
        body = session.get(next_url, timeout=30).json()
        pages += 1
        link = body["links"]["next"]
        next_url = url + link if link else None
    return pages, time.perf_counter() - started


def extractor_loop(url: str) -> tuple[int, float, int]:
    extractor = build(Settings(base_url=url, limit=100, include_tokens=False), None, RetryPolicy(),
                      max_pages=1_000_000)
    started = time.perf_counter()
    pages = rows = 0
    for page in extractor.pages(AT):
        pages += 1
        rows += len(page.rows)
    return pages, time.perf_counter() - started, rows


def run(accounts: int = ACCOUNTS) -> dict:
    # The extractor asks for the snapshot it chose (lte:<snapshot>) on every
    # page after its one lookup: pre-render that query so both loops read
    # the same cached pages.
    query = f"limit=100&timestamp=lte:{SNAPSHOT_TS}"
    with MirrorProcess(accounts, prerender_query=query) as url:
        bare_loop(url)  # warm both paths once
        bare_pages, bare_s = bare_loop(url)
        ours_pages, ours_s, rows = extractor_loop(url)
    assert bare_pages == ours_pages and rows == accounts
    bare_rate, ours_rate = bare_pages / bare_s, ours_pages / ours_s
    return {"benchmark": "B2 extract", "pages": ours_pages, "bare_pages_per_s": round(bare_rate, 1),
            "extractor_pages_per_s": round(ours_rate, 1), "ratio": round(ours_rate / bare_rate, 3),
            "target": ">= 0.8"}


if __name__ == "__main__":
    print(run())
