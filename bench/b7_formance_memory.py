"""B7: the Formance v1 crawl's memory at 1 M and 10 M accounts.

A v1 crawl reads live data page by page and checks that it read one
instant of the ledger. Until issue 25 it kept a digest of every address it
had seen, to spot an account listed twice: about 90 MB more per million
accounts. It now keeps only the sums per asset and the addresses of the
page before, so its memory should not depend on the ledger's size.

The server is purpose-built and fast, in its own process: a v1.x ledger
(``/_info``, ``/{ledger}/stats``, ``/{ledger}/balances`` with an offset
cursor, ``/{ledger}/aggregate/balances``) whose accounts are generated from
their index as pages are asked for, so it holds nothing per account
either. Each crawl runs in a fresh (spawned) process that streams the
extractor's pages and drops them, as the run does once a page is staged,
and reports its peak RSS before the first page, after a tenth of the pages
and at the end. Target: at most 300 MB at any size, and flat (the end no
more than a few MB above the tenth).
"""
from __future__ import annotations

import base64
import multiprocessing as mp
import resource
import time
from datetime import datetime, timezone

from extractors.records import PageKind
from sandbox.server import FakeServer, Request, Response, json_response

LEDGER = "bench"
PAGE_SIZE = 1000  # the v1 API's largest page
TARGET_MB = 300.0
FLAT_MB = 16.0  # allowed growth from a tenth of the crawl to its end


class GeneratedLedger:
    """A v1.x ledger of ``accounts`` accounts, each page made from its offset.

    ``users:000000000`` ... hold 1, 2, ... cents of ``USD/2``; ``world``,
    listed last, holds minus their sum, so the accounts add up to the
    aggregate (0) as on any real ledger.
    """

    def __init__(self, accounts: int) -> None:
        self.accounts = accounts
        users = accounts - 1
        self.world = -users * (users + 1) // 2

    def __call__(self, request: Request) -> Response:
        path = request.path
        if path == "/_info":
            return json_response({"data": {"server": "numary-ledger", "version": "v1.10.16",
                                           "config": {"storage": {"driver": "postgres", "ledgers": [LEDGER]}}}})
        if path == f"/{LEDGER}/stats":
            return json_response({"data": {"transactions": self.accounts - 1, "accounts": self.accounts}})
        if path == f"/{LEDGER}/aggregate/balances":
            return json_response({"data": {"USD/2": 0}})
        if path == f"/{LEDGER}/balances":
            return self._page(request)
        return Response(status=404, body=b"404 page not found", content_type="text/plain")

    def _page(self, request: Request) -> Response:
        cursor = request.params("cursor")
        if cursor:
            offset, size = map(int, base64.urlsafe_b64decode(cursor[0] + "==").decode().split(","))
        else:
            offset, size = 0, int((request.params("pageSize") or ["15"])[0])
        end = min(offset + size, self.accounts)
        users = min(end, self.accounts - 1)
        records = [f'{{"users:{i:09d}":{{"USD/2":{i + 1}}}}}' for i in range(offset, users)]
        if end == self.accounts:
            records.append(f'{{"world":{{"USD/2":{self.world}}}}}')
        more = end < self.accounts
        head = f'{{"cursor":{{"pageSize":{size},"hasMore":{"true" if more else "false"}'
        if more:
            token = base64.urlsafe_b64encode(f"{end},{size}".encode()).decode().rstrip("=")
            head += f',"next":"{token}"'
        body = head + ',"data":[' + ",".join(records) + "]}}"
        return Response(body=body.encode())


def _serve(accounts: int, ready, stop) -> None:
    server = FakeServer(GeneratedLedger(accounts), keep_requests=10).start()
    ready.put(server.url)
    stop.wait()
    server.stop()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _crawl(url: str, accounts: int, results) -> None:
    from extractors.formance import Settings, build
    from extractors.http import RetryPolicy

    settings = Settings(base_url=url, ledger=LEDGER, api="v1-standalone", page_size=PAGE_SIZE)
    pages_total = -(-accounts // PAGE_SIZE)
    extractor = build(settings, None, RetryPolicy(), max_pages=pages_total + 10)
    before = _peak_mb()
    tenth = None
    started = time.perf_counter()
    rows = pages = 0
    for page in extractor.pages(datetime.now(timezone.utc)):
        if page.kind is PageKind.RESTART:
            raise RuntimeError(f"the ledger moved: {page.warnings}")
        if page.kind is PageKind.BALANCES:
            rows += len(page.rows)
            pages += 1
            if pages == max(1, pages_total // 10):
                tenth = _peak_mb()
    results.put({"accounts": accounts, "rows": rows, "pages": pages, "seconds": time.perf_counter() - started,
                 "rss_before_mb": before, "rss_tenth_mb": tenth, "rss_end_mb": _peak_mb()})


def measure(accounts: int) -> dict:
    fork, spawn = mp.get_context("fork"), mp.get_context("spawn")
    ready, stop = fork.Queue(), fork.Event()
    server = fork.Process(target=_serve, args=(accounts, ready, stop), daemon=True)
    server.start()
    try:
        url = ready.get(timeout=60)
        results = spawn.Queue()
        crawler = spawn.Process(target=_crawl, args=(url, accounts, results))
        crawler.start()
        result = results.get(timeout=7200)
        crawler.join(timeout=60)
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
    if result["rows"] != accounts:
        raise RuntimeError(f"read {result['rows']} rows of {accounts}")
    return {key: round(value, 1) if isinstance(value, float) else value for key, value in result.items()}


def run(sizes: tuple[int, ...] = (1_000_000, 10_000_000)) -> dict:
    crawls = [measure(n) for n in sizes]
    peak = max(c["rss_end_mb"] for c in crawls)
    growth = max(c["rss_end_mb"] - c["rss_tenth_mb"] for c in crawls)
    return {"benchmark": "B7 formance v1 crawl memory", "page_size": PAGE_SIZE, "crawls": crawls,
            "peak_rss_mb": peak, "growth_after_a_tenth_mb": round(growth, 1),
            "target": f"<= {TARGET_MB:g} MB and flat (<= {FLAT_MB:g} MB growth)",
            "met": peak <= TARGET_MB and growth <= FLAT_MB}


if __name__ == "__main__":
    print(run())
