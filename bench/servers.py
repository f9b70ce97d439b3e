"""Benchmark servers: fake providers run in their own process.

A fake in the benchmark's own process would share its GIL and its memory
figures; in a child process it costs the benchmark nothing but a core.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from urllib.parse import parse_qsl

from sandbox.hedera import Account, HederaMirror, Snapshot, generated_snapshot
from sandbox.server import FakeServer, Request, Response

SNAPSHOT_TS = "1700000000.000000000"


class Prerendered:
    """Serves pages rendered once up front, found by their decoded query.

    Measures the client, not the fake's JSON rendering.
    """

    def __init__(self, app, latency: float = 0.0) -> None:
        self.app = app
        self.latency = latency
        self.pages: dict[tuple, Response] = {}

    def render_all(self, first_query: str) -> int:
        query = first_query
        while True:
            request = Request("GET", "/api/v1/balances", query, parse_qsl(query), {})
            response = self.app(request)
            self.pages[self._key(request.query)] = response
            import json

            link = json.loads(response.body)["links"]["next"]
            if not link:
                return len(self.pages)
            query = link.split("?", 1)[1]

    @staticmethod
    def _key(query) -> tuple:
        return tuple(sorted(query))

    def __call__(self, request: Request) -> Response:
        if self.latency:
            time.sleep(self.latency)
        page = self.pages.get(self._key(request.query))
        if page is None:
            return self.app(request)
        return page


def moved(snapshot: Snapshot, every: int) -> Snapshot:
    """``snapshot`` with one account in ``every`` holding a tinybar more: a later snapshot's churn."""
    def account(num: int) -> Account:
        held = snapshot.account(num)
        return Account(held.balance + 1, held.tokens) if num % every == 0 else held

    return Snapshot(snapshot.timestamp, snapshot.nums, account)


def _serve(accounts: int, tokens_every: int, latency: float, prerender_query: str | None,
           snapshot_ts: str, moved_every: int, ready, stop) -> None:
    snapshot = generated_snapshot(snapshot_ts, accounts, tokens_every=tokens_every,
                                  token_ids=("0.0.5000", "0.0.5001"))
    if moved_every:
        snapshot = moved(snapshot, moved_every)
    app = HederaMirror([snapshot], tokens={"0.0.5000": 6, "0.0.5001": 2})
    if prerender_query is not None:
        wrapped = Prerendered(app, latency)
        wrapped.render_all(prerender_query)
        app = wrapped
    elif latency:
        app = Prerendered(app, latency)
    server = FakeServer(app, keep_requests=10).start()
    ready.put(server.url)
    stop.wait()
    server.stop()


class MirrorProcess:
    """A fake mirror node with ``accounts`` accounts, in a child process.

    Its one snapshot is taken at ``snapshot_ts``; with ``moved_every``, one
    account in that many holds a tinybar more than the generated balances.
    """

    def __init__(self, accounts: int, *, tokens_every: int = 0, latency: float = 0.0,
                 prerender_query: str | None = None, snapshot_ts: str = SNAPSHOT_TS,
                 moved_every: int = 0) -> None:
        ctx = mp.get_context("fork")
        self._ready = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(accounts, tokens_every, latency, prerender_query,
                                                      snapshot_ts, moved_every, self._ready, self._stop),
                                 daemon=True)

    def __enter__(self) -> str:
        self._proc.start()
        return self._ready.get(timeout=600)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
