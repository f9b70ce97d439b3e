"""The sharded crawl on Airflow's CeleryExecutor with two workers (opt-in: ``BALANCES_CELERY=1``).

Runs ``bench/celery_scaleout.py`` against the suite's database: Redis
(Debian's ``redis-server``) as the broker, the Airflow metadata and Celery
results in PostgreSQL, workers ``w1`` and ``w2``. It holds that the shards
ran on both workers, that all of them together kept to the source's request
budget, and that a worker SIGKILLed mid-shard led to that shard being
retried on the other worker and to a published snapshot holding exactly one
copy of every row, with exact values. About four minutes on 2 cores.
"""
from __future__ import annotations

import json
import os

import pytest

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(os.environ.get("BALANCES_CELERY") != "1",
                       reason="starts redis-server, the Airflow services and two Celery workers (about "
                              "4 minutes): set BALANCES_CELERY=1 to run it"),
]


def test_shards_scale_out_over_two_celery_workers_and_survive_one_killed(database_url, tmp_path):
    from bench import celery_scaleout

    result = celery_scaleout.run(db_url=database_url, workdir=tmp_path / "celery")
    figures = json.dumps(result, default=str, indent=1)
    proofs = result["proofs"]
    clean, killed = result["clean"], result["killed"]

    # (a) The shards of one run ran on both workers.
    assert set(clean["shards_per_worker"]) == {"w1", "w2"}, figures
    assert sum(clean["shards_per_worker"].values()) == result["shards"], figures
    assert proofs["shards_on_both_workers"], figures

    # (b) Together they kept to the one budget: no window held more requests than the bucket allows.
    for run in (clean, killed):
        budget = run["budget"]
        for window in celery_scaleout.WINDOWS:
            allowed = budget[f"allowed_in_{window}s"] + celery_scaleout.SLACK
            assert budget[f"max_in_{window}s"] <= allowed, figures
    assert proofs["budget_held_across_workers"], figures

    # (c) The killed worker's shard was retried elsewhere; every row is there once, exact.
    kill = killed["kill"]
    assert kill is not None, figures
    assert 0 < kill["pages_served_before_kill"] < kill["pages_in_shard"], figures  # mid-shard
    assert kill["recrawled"], figures
    for shard in kill["retried"]:
        assert shard["first"] == ["failed", kill["worker"]], figures
        try_number, state, host = shard["last"]
        assert try_number > 1 and state == "success" and host != kill["worker"], figures
    for run in (clean, killed):
        rows = run["rows"]
        assert rows["status"] == "published", figures
        assert rows["published"] == rows["expected"] and rows["duplicates"] == rows["missing"] == 0, figures
        assert rows["wrong_values"] == 0 and rows["staging_left"] == 0, figures
    assert proofs["killed_shard_retried_rows_exactly_once"], figures
    assert result["ok"] and result["failures"] == [], figures
    print(f"\ncelery: shards per worker {clean['shards_per_worker']}, run {clean['wall_s']}s; budget "
          f"{clean['budget']['max_in_10s']}/{clean['budget']['allowed_in_10s']:.0f} requests in the busiest"
          f" 10 s; "
          f"killed {kill['worker']} in shard {kill['shard']}, retried after "
          f"{kill['retried'][0]['retry_started_after_kill_s']}s; {killed['rows']['published']} rows exact")
