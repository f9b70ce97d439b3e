"""B6: movements, one window at a time, and the roll-forward check over a million holdings.

**Load.** A fake mirror node in another process serves one window holding
``legs`` movement legs (payments of four legs each: payer, payee, node, fee
account; 100 transactions a page, pre-rendered so the client is what is
measured). In the same run, first a bare crawl of the same pages (requests
and ``json()``, nothing else), then the real load of the window
(``pipeline.movements.load_windows``: the extractor, staging by COPY, the
publish into ``balance_movements`` in one transaction) in a fresh process
whose peak RSS is its own. Reported: legs per second of both, the ratio,
the load's peak RSS, at 100k and 1M legs (flat memory: the second is not
ten times the first).

**Check.** One source of ``holdings`` holdings snapshotted twice (1% of them
changed between, each change explained by a movement, one not), the
window's movements published: the wall time of a reconciliation running the
``rollforward`` check over that window, which reads the whole statement
(both snapshots' states and the movements, joined per holding), and the
one break it finds.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qsl

import requests

from bench.db import bench_database, reset
from extractors.records import BalanceRow, MovementRow
from loaders import movements as store
from loaders import runs
from loaders.db import connect
from loaders.publish import publish
from loaders.staging import StagingWriter

T1, T2 = "1700000000.000000000", "1700003600.000000000"
START_NS = 1_700_000_000 * 10**9
PER_PAGE, LEGS_PER_TX = 100, 4
WINDOW_QUERY = f"limit=100&order=asc&timestamp=gt:{T1}&timestamp=lte:{T2}"


class _Payments:
    """``count`` payments inside (T1, T2], made when asked for (a transaction log of no memory)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def between(self, low: int, high: int, *, descending: bool):
        from sandbox.hedera import payment

        step = (3_600 * 10**9) // (self.count + 1)
        first = max(0, (low - START_NS) // step - 1)
        indices = range(self.count - 1, -1, -1) if descending else range(first, self.count)
        for i in indices:
            at = START_NS + (i + 1) * step
            if at < low:
                continue
            if at > high:
                if descending:
                    continue
                return
            yield payment(f"{at // 10**9}.{at % 10**9:09d}", 1000 + i % 50_000, 1001 + (i + 7) % 50_000,
                          1_000 + i % 997)


def _serve(legs: int, ready, stop) -> None:
    from sandbox.hedera import Account, HederaMirror, Snapshot
    from sandbox.server import FakeServer, Request

    book = {n: Account(10**12) for n in range(1000, 1100)}
    app = HederaMirror([Snapshot.of(T1, book), Snapshot.of(T2, book)], transactions=_Payments(legs // LEGS_PER_TX))
    pages = {}
    query = WINDOW_QUERY
    while True:  # the window's pages, rendered once: the client is measured, not the fake
        request = Request("GET", "/api/v1/transactions", query, parse_qsl(query), {})
        response = app(request)
        pages[tuple(sorted(request.query))] = response
        link = json.loads(response.body)["links"]["next"]
        if not link:
            break
        query = link.split("?", 1)[1]

    def answer(request):
        found = pages.get(tuple(sorted(request.query))) if request.path == "/api/v1/transactions" else None
        return found or app(request)

    server = FakeServer(answer, keep_requests=10).start()
    ready.put(server.url)
    stop.wait()
    server.stop()


def _bare(url: str) -> tuple[int, int, float]:
    """Pages, legs and seconds of a bare crawl: requests, json(), the next link."""
    session = requests.Session()
    started = time.perf_counter()
    pages = legs = 0
    next_url = f"{url}/api/v1/transactions?{WINDOW_QUERY}"
    while next_url:
        body = session.get(next_url, timeout=60).json()
        pages += 1
        legs += sum(len(t["transfers"]) for t in body["transactions"])
        link = body["links"]["next"]
        next_url = url + link if link else None
    return pages, legs, time.perf_counter() - started


def _load(url: str, db_url: str, name: str, result) -> None:
    """In a fresh process: the window's snapshots, then its movements loaded; seconds, legs, peak RSS."""
    try:
        result.put(_loaded(url, db_url, name))
    except BaseException as exc:  # the parent raises it: a benchmark that failed has no figures
        result.put({"error": f"{type(exc).__name__}: {exc}"})


def _loaded(url: str, db_url: str, name: str) -> dict:
    from pipeline import movements
    from pipeline.config import parse_source
    from pipeline.snapshot import take_snapshot

    source = parse_source(name, {"provider": "hedera", "base_url": url, "max_pages": 1_000_000,
                                 "rate_limit": 10_000})
    conn = connect(db_url)
    for raw in (T1, T2):
        at = datetime.fromtimestamp(int(raw.split(".")[0]) + 1, tz=timezone.utc)
        assert take_snapshot(conn, source, at)["status"] == "published"
    windows = movements.missing_windows(conn, source)
    started = time.perf_counter()
    # load_windows, step by step: the crawl (extractor and staging) and the publish timed apart.
    [planned] = movements.plan(conn, source, windows, hold=True)
    movements.crawl(conn, source, planned["movement_run"])
    crawled = time.perf_counter()
    movements.publish(conn, source, planned["movement_run"])
    seconds = time.perf_counter() - started
    summary = store.summary(conn, planned["movement_run"])
    conn.close()
    return {"seconds": seconds, "crawl_s": crawled - started, "legs": summary["movements"], "pages": summary["pages"],
            "status": summary["status"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def load(legs: int, db_url: str) -> dict:
    reset(db_url)
    ctx = mp.get_context("spawn")
    ready, stop, result = ctx.Queue(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_serve, args=(legs, ready, stop), daemon=True)
    server.start()
    try:
        url = ready.get(timeout=1800)
        _bare(url)  # warm the connection and both paths' caches
        bare_pages, bare_legs, bare_s = _bare(url)
        loader = ctx.Process(target=_load, args=(url, db_url, f"bench_b6_{legs}", result))
        loader.start()
        ours = result.get(timeout=3600)
        loader.join()
        if "error" in ours:
            raise RuntimeError(f"B6 load of {legs} legs failed: {ours['error']}")
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
    assert ours["status"] == "published" and ours["legs"] == bare_legs == legs, (ours, bare_legs)
    bare_rate, ours_rate = bare_legs / bare_s, ours["legs"] / ours["seconds"]
    return {"legs": legs, "pages": bare_pages, "bare_legs_per_s": round(bare_rate),
            "load_legs_per_s": round(ours_rate), "ratio": round(ours_rate / bare_rate, 3),
            "crawl_legs_per_s": round(ours["legs"] / ours["crawl_s"]), "load_s": round(ours["seconds"], 1),
            "crawl_s": round(ours["crawl_s"], 1), "publish_s": round(ours["seconds"] - ours["crawl_s"], 1),
            "load_peak_rss_mb": ours["peak_rss_mb"]}


# -- the check over a million holdings ----------------------------------------------------------

SOURCE = "bench_b6_check"
S1 = datetime(2026, 11, 2, 0, 0, tzinfo=timezone.utc)
S2 = S1 + timedelta(minutes=15)


def _holding(i: int) -> tuple[str, str]:
    return f"0.0.{1000 + i}", "HBAR"


def _snapshot(conn, as_of: datetime, holdings: int, changed: set[int]) -> None:
    run_id = runs.start_run(conn, SOURCE, "hedera", as_of)
    runs.set_snapshot(conn, run_id, as_of, f"{int(as_of.timestamp())}.000000000")
    writer = StagingWriter(conn, run_id, 0)
    batch = []
    for i in range(holdings):
        account, asset = _holding(i)
        batch.append(BalanceRow(account, asset, 10**10 + i + (1_000 + i % 997 if i in changed else 0), 8))
        if len(batch) == 10_000:
            writer.add(batch)
            batch = []
    writer.add(batch)
    writer.close()
    publish(conn, run_id)


def check(holdings: int, db_url: str) -> dict:
    from reconciliation.checks import RollforwardCheck
    from reconciliation.reconcile import reconcile

    reset(db_url)
    conn = connect(db_url)
    changed = set(range(0, holdings, 100))  # 1%
    _snapshot(conn, S1, holdings, set())
    _snapshot(conn, S2, holdings, changed)
    [window] = store.windows(conn, SOURCE)
    run_id = store.begin(conn, SOURCE, "hedera", window)
    writer = store.MovementWriter(conn, run_id, 0)
    planted = min(changed)  # its movement is lost: the one break
    writer.add([MovementRow(*_holding(i), S2, f"{i}", f"tx {i}", 1_000 + i % 997, "transfer", 8)
                for i in sorted(changed) if i != planted])
    writer.close()
    store.publish(conn, run_id)
    rollforward = {"roll": RollforwardCheck("roll", SOURCE, "hedera")}
    started = time.perf_counter()
    run = reconcile(conn, rollforward, S1, S2)
    seconds = time.perf_counter() - started
    with conn.cursor() as cur:
        cur.execute("SELECT subject->>'account', difference FROM reconciliation_breaks WHERE status = 'open'")
        breaks = cur.fetchall()
    conn.commit()
    conn.close()
    assert breaks == [(_holding(planted)[0], Decimal(1_000 + planted % 997).scaleb(-8))], breaks
    return {"holdings": holdings, "movements": len(changed) - 1, "check_s": round(seconds, 1),
            "holdings_per_s": round(holdings / seconds), "breaks": run.breaks_open}


def run(sizes=(100_000, 1_000_000), holdings: int = 1_000_000) -> dict:
    db_url = bench_database()
    loads = [load(legs, db_url) for legs in sizes]
    return {"benchmark": "B6 movements", "loads": loads, "check": check(holdings, db_url),
            "targets": "load >= 0.2x the bare crawl; peak RSS flat from 100k to 1M legs; the check over 1M "
                       "holdings in under a minute"}


if __name__ == "__main__":
    print(run())
