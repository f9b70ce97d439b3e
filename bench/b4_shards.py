"""B4: a sharded Hedera crawl against a server adding 20 ms per request.

One shard against four, each shard in its own process as separate Airflow
workers would run them (``plan_shards`` -> mapped ``crawl_snapshot`` ->
``publish_snapshot``). Target: 4 shards >= 3x faster than 1.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from datetime import datetime, timezone

from bench.db import bench_database, reset
from bench.servers import SNAPSHOT_TS, MirrorProcess
from loaders.db import connect
from pipeline.config import parse_source
from pipeline.snapshot import begin, crawl, plan_shards, publish

ACCOUNTS = 40_000
LATENCY = 0.020
AT = datetime.fromtimestamp(int(SNAPSHOT_TS.split(".")[0]) + 60, tz=timezone.utc)


def _crawl_shard(url: str, source, run_id: int, shard: dict) -> int:
    conn = connect(url)
    try:
        return crawl(conn, source, run_id, **shard).rows
    finally:
        conn.close()


def timed_snapshot(db_url: str, server_url: str, shards: int) -> tuple[float, int]:
    source = parse_source(f"bench_shards_{shards}", {"provider": "hedera", "base_url": server_url,
                                                     "limit": 100, "shards": shards})
    conn = connect(db_url)
    started = time.perf_counter()
    run_id = begin(conn, source, AT)
    plan = plan_shards(conn, source, run_id)
    ctx = mp.get_context("fork")
    with ctx.Pool(len(plan)) as pool:
        rows = sum(pool.starmap(_crawl_shard, [(db_url, source, run_id, s) for s in plan]))
    published = publish(conn, source, run_id).rows_published
    elapsed = time.perf_counter() - started
    conn.close()
    assert published == rows
    return elapsed, rows


def run(accounts: int = ACCOUNTS) -> dict:
    db_url = bench_database()
    reset(db_url)
    with MirrorProcess(accounts, latency=LATENCY) as server_url:
        one_s, one_rows = timed_snapshot(db_url, server_url, 1)
        four_s, four_rows = timed_snapshot(db_url, server_url, 4)
    assert one_rows == four_rows == accounts
    return {"benchmark": "B4 shards", "accounts": accounts, "latency_ms": LATENCY * 1000,
            "one_shard_s": round(one_s, 2), "four_shards_s": round(four_s, 2),
            "speedup": round(one_s / four_s, 2), "target": ">= 3"}


if __name__ == "__main__":
    print(run())
