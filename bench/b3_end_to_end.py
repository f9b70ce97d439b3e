"""B3: a whole Hedera snapshot through the real DAG into Postgres.

``airflow dags test`` runs the generated DAG (begin_run, plan_shards,
crawl_snapshot, publish_snapshot) against a fake mirror node in another
process serving N accounts (1% of them with two token balances). Measured:
wall time of the DAG run and peak RSS of the Airflow process (the tasks run
inside it), at 100k and 1M accounts. Targets on 2 cores: <= 90 s for 1M,
peak RSS <= 300 MB and flat between 100k and 1M.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.db import bench_database, reset
from bench.servers import MirrorProcess
from loaders.db import connect

REPO = Path(__file__).resolve().parent.parent
LOGICAL = "2023-11-14T22:15:00+00:00"  # after the fake's snapshot


def airflow_env(db_url: str, config: Path, home: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "BALANCES_CONFIG": str(config),
        "AIRFLOW_CONN_BALANCES_DB": db_url,
    })
    env.pop("BALANCES_DB_URL", None)
    return env


def run_dag(env: dict, dag_id: str, log: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB of the dags-test process tree, exit code."""
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", dag_id, LOGICAL],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = watched.memory_info().rss + sum(
                    c.memory_info().rss for c in watched.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
    return time.perf_counter() - started, peak / 2**20, proc.returncode


def one(accounts: int, db_url: str, home: Path) -> dict:
    reset(db_url)
    name = f"bench_e2e_{accounts}"
    config = home / f"{name}.toml"
    with MirrorProcess(accounts, tokens_every=100) as url:
        config.write_text(f'[sources.{name}]\nprovider = "hedera"\nbase_url = "{url}"\n'
                          'schedule = "*/15 * * * *"\nstart_date = 2023-01-01\ntask_retries = 0\n'
                          'max_pages = 1000000\n')
        env = airflow_env(db_url, config, home / "airflow")
        seconds, peak_mb, code = run_dag(env, f"balances_{name}", home / f"{name}.log")
    if code != 0:
        raise RuntimeError(f"dags test failed, see {home / (name + '.log')}")
    conn = connect(db_url)
    with conn.cursor() as cur:
        cur.execute("SELECT status, rows, pages FROM snapshot_runs WHERE source = %s", (name,))
        status, rows, pages = cur.fetchone()
    conn.close()
    expected = accounts + 2 * (accounts // 100)
    assert status == "published" and rows == expected, (status, rows, expected)
    return {"accounts": accounts, "rows": rows, "pages": pages, "wall_s": round(seconds, 1),
            "peak_rss_mb": round(peak_mb)}


def baseline_rss(env: dict) -> float:
    """RSS of an Airflow process that parsed the DAGs and ran nothing: the floor.

    Read as the process's resident size, not ``ru_maxrss``: Linux keeps the
    high-water mark across fork and exec, so a child of the benchmark
    process (large after B1) would report the parent's size.
    """
    proc = subprocess.run([sys.executable, "-c", "import psutil, airflow.sdk, airflow.models; "
                           "from airflow.dag_processing.dagbag import DagBag; DagBag(); "
                           "print(psutil.Process().memory_info().rss)"],
                          env=env, capture_output=True, text=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 2**20


def run(sizes=(100_000, 1_000_000)) -> dict:
    db_url = bench_database()
    home = Path(tempfile.mkdtemp(prefix="balances-b3-"))
    env = airflow_env(db_url, home / "none.toml", home / "airflow")
    (home / "none.toml").write_text("")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, check=True)
    results = [one(n, db_url, home) for n in sizes]
    return {"benchmark": "B3 end to end", "runs": results,
            "airflow_process_floor_rss_mb": round(baseline_rss(env)),
            "targets": "<= 90 s for 1M accounts; peak RSS <= 300 MB, flat from 100k to 1M"}


if __name__ == "__main__":
    print(run())
