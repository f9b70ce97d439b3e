"""B2: pages per second of the Hedera extractor vs a bare requests loop.

Both fetch the same pre-rendered 100-row pages from a local server in
another process; the bare loop does nothing with them, the extractor parses
every record into exact rows. Target: extractor >= 1.0x the bare loop (issue 28; 0.8x before).
"""
from __future__ import annotations

import statistics
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


def run(accounts: int = ACCOUNTS, rounds: int = 7) -> dict:
    """``rounds`` of the bare loop then the extractor, side by side; the median of the rounds' ratios."""
    # The extractor asks for the snapshot it chose (lte:<snapshot>) on every
    # page after its one lookup: pre-render that query so both loops read
    # the same cached pages.
    query = f"limit=100&timestamp=lte:{SNAPSHOT_TS}"
    ratios, bare_rates, ours_rates = [], [], []
    with MirrorProcess(accounts, prerender_query=query) as url:
        bare_loop(url)  # warm both paths once
        for _ in range(rounds):
            bare_pages, bare_s = bare_loop(url)
            ours_pages, ours_s, rows = extractor_loop(url)
            assert bare_pages == ours_pages and rows == accounts
            bare_rates.append(bare_pages / bare_s)
            ours_rates.append(ours_pages / ours_s)
            ratios.append(ours_rates[-1] / bare_rates[-1])
    return {"benchmark": "B2 extract", "pages": ours_pages, "rounds": rounds,
            "bare_pages_per_s": round(statistics.median(bare_rates), 1),
            "extractor_pages_per_s": round(statistics.median(ours_rates), 1),
            "ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            "target": ">= 1.0"}


if __name__ == "__main__":
    print(run())
