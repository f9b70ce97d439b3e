"""The README's demo: every sandbox provider through the real Airflow DAGs.

Starts the private PostgreSQL cluster (unless a database URL is given),
applies the migrations, starts the sandbox providers on 127.0.0.1, writes a
sources file pointing at them, runs each source's DAG once with
``airflow dags test`` and prints what landed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from loaders.db import connect, describe
from loaders.migrate import upgrade
from devtools import devdb
from pipeline.config import toml_table
from sandbox import apps
from sandbox.server import FakeServer

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / ".demo"


def write_sources(path: Path, sources: dict[str, dict], checks: str = "") -> None:
    lines = ["# Written by 'balances demo': sandbox providers on 127.0.0.1.", ""]
    for name, keys in sources.items():
        lines += [*toml_table("sources", name, keys), ""]
    path.write_text("\n".join(lines) + checks)


# The Formance sandbox books the Hedera treasury (0.0.1234) as treasury:hedera.
DEMO_CHECKS = """
[checks.treasury_hbar]
kind = "pair"
left = { source = "formance_sandbox", account = "treasury:hedera", asset = "HBAR/8" }
right = { source = "hedera_sandbox", account = "0.0.1234", asset = "HBAR" }
abs_tolerance = "0.000001"
rel_tolerance = "0"
max_skew = "1h"

[checks.formance_totals]
kind = "aggregate"
source = "formance_sandbox"

[checks.formance_continuity]
kind = "continuity"
source = "formance_sandbox"
allow_negative = ["world"]

[checks.bitfront_continuity]
kind = "continuity"
source = "bitfront_sandbox"
"""


def evm_checks() -> str:
    """The Formance sandbox's book of the EVM treasury wallet against the chain itself."""
    from sandbox.evm import TREASURY

    return f"""
[checks.treasury_eth]
kind = "pair"
left = {{ source = "formance_sandbox", account = "treasury:evm", asset = "ETH/18" }}
right = {{ source = "evm_sandbox", account = "{TREASURY}", asset = "ETH" }}
abs_tolerance = "0"
rel_tolerance = "0"
max_skew = "1h"
"""


def demo_checks(available: list[str]) -> str:
    checks = DEMO_CHECKS if {"formance", "hedera", "bitfront"} <= set(available) else ""
    if {"formance", "evm"} <= set(available):
        checks += evm_checks()
    return checks


def _airflow(args: list[str], env: dict, log: Path) -> int:
    with open(log, "ab") as out:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode


def run_demo(db_url: str | None = None) -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    logs = DEMO_DIR / "logs"
    logs.mkdir(exist_ok=True)
    url = db_url or os.environ.get("BALANCES_DB_URL") or devdb.start()
    print(f"database: {describe(url)}")
    print(f"migrations: at revision {upgrade(url)}")

    servers: list[FakeServer] = []
    started_at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    sources: dict[str, dict] = {}
    env = dict(os.environ)
    for name in apps.available():
        module = apps.sandbox(name)
        server = FakeServer(module.demo_app()).start()
        servers.append(server)
        keys = module.demo_source(server.url)
        keys.setdefault("task_retries", 0)
        # Scheduled from now: the continuity checks then expect no earlier runs.
        keys.setdefault("start_date", started_at)
        sources[f"{name}_sandbox"] = keys
        if module.DEMO_CONNECTION:
            conn_id, uri = module.DEMO_CONNECTION
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = uri
        print(f"sandbox {name}: {server.url}")
    config = DEMO_DIR / "balances.toml"
    write_sources(config, sources, demo_checks(apps.available()))

    env.update({
        "AIRFLOW_HOME": str(DEMO_DIR / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "BALANCES_CONFIG": str(config),
        "AIRFLOW_CONN_BALANCES_DB": url,
    })
    env.pop("BALANCES_DB_URL", None)
    airflow_log = logs / "airflow.log"
    print(f"airflow: metadata DB in {DEMO_DIR / 'airflow'} (log: {airflow_log})")
    if _airflow(["db", "migrate"], env, airflow_log) != 0:
        print("airflow db migrate failed; see the log", file=sys.stderr)
        return 1
    for provider in {keys["provider"] for keys in sources.values()}:
        _airflow(["pools", "set", f"balances_{provider}", "4", f"{provider} request budget"], env, airflow_log)

    failed = []
    try:
        for name in sources:
            started = time.monotonic()
            log = logs / f"{name}.log"
            code = _airflow(["dags", "test", f"balances_{name}"], env, log)
            state = "ok" if code == 0 else f"FAILED (exit {code}, see {log})"
            print(f"dag balances_{name}: {state} in {time.monotonic() - started:.1f}s")
            if code != 0:
                failed.append(name)
        if "hedera_sandbox" in sources and "hedera_sandbox" not in failed:
            backfill_hedera(url, sources["hedera_sandbox"])
        if not failed and "[checks." in config.read_text():
            started = time.monotonic()
            log = logs / "reconcile_balances.log"
            code = _airflow(["dags", "test", "reconcile_balances"], env, log)
            state = "ok" if code == 0 else f"FAILED (exit {code}, see {log})"
            print(f"dag reconcile_balances: {state} in {time.monotonic() - started:.1f}s")
            if code != 0:
                failed.append("reconcile_balances")
    finally:
        for server in servers:
            server.stop()
    show_landed(url, list(sources))
    if "[checks." in config.read_text():
        show_report(url, started_at)
    return 1 if failed else 0


def backfill_hedera(url: str, keys: dict) -> None:
    """Load the mirror node's two earlier snapshots, so the report has a history to draw.

    Hedera answers for past times, so this is a real backfill (the CLI's
    ``balances snapshot --at``), not a fake.
    """
    from pipeline.config import parse_source
    from pipeline.snapshot import take_snapshot

    source = parse_source("hedera_sandbox", dict(keys))
    conn = connect(url)
    try:
        for minutes in (30, 15):
            at = datetime.now(timezone.utc) - timedelta(minutes=minutes)
            summary = take_snapshot(conn, source, at)
            print(f"backfill hedera_sandbox at {at:%H:%M}: {summary['status']}, "
                  f"snapshot {summary['as_of_raw']}, {summary['rows_inserted']} new rows")
    finally:
        conn.close()


def show_report(url: str, since: datetime) -> None:
    from reconciliation.report import write_report
    from reconciliation.reconcile import open_breaks

    conn = connect(url)
    try:
        breaks = open_breaks(conn, window=(since - timedelta(days=3), datetime.now(timezone.utc)), limit=10)
    finally:
        conn.close()
    print(f"\nreconciliation: {len(breaks)} open break(s)")
    for b in breaks:
        print(f"  {b['check_time']:%Y-%m-%d %H:%M} {b['check_name']} {b['kind']} ({b['subject_label']}):"
              f" {b['detail']}")
    paths = write_report(url, DEMO_DIR / "report", since - timedelta(days=3), datetime.now(timezone.utc))
    print("report: " + ", ".join(str(p) for p in paths))


def show_landed(url: str, sources: list[str]) -> None:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT DISTINCT ON (source) run_id, source, status, as_of_raw, pages, requests,
                       rows, rows_inserted, rejected
                  FROM snapshot_runs WHERE source = ANY(%s) ORDER BY source, run_id DESC
                """,
                (sources,),
            )
            runs = cur.fetchall()
            print("\nlatest run per source (snapshot_runs):")
            print(f"  {'run':>4} {'source':<20} {'status':<11} {'as_of_raw':<32} {'pages':>5} {'reqs':>5} {'rows':>6} {'new':>6} {'rej':>4}")
            for r in runs:
                print(f"  {r[0]:>4} {r[1]:<20} {r[2]:<11} {str(r[3]):<32} {r[4]:>5} {r[5]:>5} {r[6]:>6} {r[7]:>6} {r[8]:>4}")
            query = """SELECT source, account, asset, balance, decimals, as_of
  FROM balance_history
 WHERE source = %s
 ORDER BY as_of DESC, balance DESC
 LIMIT 3"""
            for source in sources:
                cur.execute(query, (source,))
                rows = cur.fetchall()
                if not rows:
                    continue
                print(f"\nsample: {query.replace('%s', repr(source))}")
                for row in rows:
                    print("  " + " | ".join(str(v) for v in row))
            cur.execute("SELECT count(*), count(DISTINCT source) FROM balance_history")
            total, n_sources = cur.fetchone()
            print(f"\nbalance_history: {total} rows from {n_sources} source(s)")
    finally:
        conn.close()
