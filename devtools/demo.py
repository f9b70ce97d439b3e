"""The README's demo: every sandbox provider through the real Airflow DAGs.

Starts the private PostgreSQL cluster (unless a database URL is given),
applies the migrations, starts the sandbox providers on 127.0.0.1, writes a
sources file pointing at them, runs each source's DAG once with
``airflow dags test``, backfills two earlier Hedera snapshots and an earlier
EVM block, takes a second Formance snapshot after the ledger moved, loads
the movements of every window between two snapshots, reconciles (the
roll-forward checks find the one change the Hedera sandbox plants without a
transaction), writes the report and prints what landed and a roll-forward
statement per source. Then it hands over: the database
URL, the sources file, ``.demo/env`` (everything the ``balances`` command
needs, in one file to source) and commands to try next.

What the demo starts, it stops: the sandboxes when it ends (``--keep``
keeps them serving until Ctrl-C, so ``balances snapshot`` works against
them), and on any failure also the cluster, if this run started it. After
a good run the cluster keeps running for the commands to try;
``scripts/demo --stop`` stops it.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

from devtools import devdb
from extractors.text import human_duration
from loaders.db import connect, describe_url
from loaders.migrate import upgrade
from sandbox import apps
from sandbox.apps import sources_text
from sandbox.server import FakeServer

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / ".demo"
ENV_FILE = DEMO_DIR / "env"


def write_sources(path: Path, sources: dict[str, dict], checks: str = "") -> None:
    path.write_text("# Written by scripts/demo: sandbox providers on 127.0.0.1.\n\n" + sources_text(sources)
                    + checks)


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


# The roll-forward of each source with movements, and of one without (reported not available).
# Not in the live stack's checks (devtools/serve.py): its books move by the minute.
ROLLFORWARD_CHECKS = """
[checks.hedera_rollforward]
kind = "rollforward"
source = "hedera_sandbox"

[checks.formance_rollforward]
kind = "rollforward"
source = "formance_sandbox"

[checks.evm_rollforward]
kind = "rollforward"
source = "evm_sandbox"

[checks.bitfront_rollforward]
kind = "rollforward"
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


DEMO_ALERTS_CONN_ID = "demo_alerts"


def demo_alerts(smtp: str) -> tuple[str, dict[str, str]]:
    """``scripts/demo --serve --alerts-smtp HOST:PORT``: the ``[alerts]`` table and its Connection.

    The server at HOST:PORT takes mail without TLS or a login: a local
    capture such as ``python -m aiosmtpd -n -l 127.0.0.1:8025``.
    """
    host, _, port = smtp.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/@?# "):
        raise ValueError(f"--alerts-smtp: expected HOST:PORT of an SMTP server, got {smtp!r}")
    table = f"""
[alerts]
smtp_conn_id = "{DEMO_ALERTS_CONN_ID}"
to = ["treasury-ops@example.com"]
from_email = "balances-demo@example.com"
subject_prefix = "[balances demo]"
# The ledger books the treasury's move every third minute and is crawled
# before the mirror node: the pair check mismatches for the seconds between.
# Within 5 minutes, each time is the same incident coming back.
flap_window = "5m"
"""
    uri = f"smtp://{host}:{port}?disable_ssl=true&disable_tls=true&timeout=10&retry_limit=1"
    return table, {f"AIRFLOW_CONN_{DEMO_ALERTS_CONN_ID.upper()}": uri}


def demo_checks(available: list[str], *, rollforward: bool = False) -> str:
    checks = DEMO_CHECKS if {"formance", "hedera", "bitfront"} <= set(available) else ""
    if {"formance", "evm"} <= set(available):
        checks += evm_checks()
    if rollforward and {"formance", "hedera", "bitfront", "evm"} <= set(available):
        checks += ROLLFORWARD_CHECKS
    return checks


def database(cleanup: ExitStack, db_url: str | None) -> str:
    """The database to use: given, ``$BALANCES_DB_URL``, or the private cluster in ``.pgdata``; empty.

    The sandboxes are new ledgers every run (a new chain, a new Formance
    ledger, new mirror-node data), so an earlier run's history of the
    ``*_sandbox`` sources cannot go on: a movement window from its last
    snapshot to this run's first would span two ledgers, and a continuity
    check compare them. The demo's own database (in ``.pgdata``, also when
    ``.demo/env`` names it) is therefore made afresh, its Airflow metadata
    with it; any other database is used only if it holds no sandbox history.

    A cluster this call starts is registered on ``cleanup``: stopped when
    the run fails (or, for ``--serve``, whenever it ends).
    """
    url = db_url or os.environ.get("BALANCES_DB_URL")
    if url and not devdb.owns(url):
        refuse_sandbox_history(url)
        return url
    already = devdb.running_port() is not None
    url = devdb.start()
    if not already:
        cleanup.callback(_stop_cluster)
    if sandbox_history(url):
        print("database: the sandboxes are new ledgers each run, so the demo's database starts afresh")
        url = devdb.recreate()
    return url


class DemoError(RuntimeError):
    pass


def sandbox_history(url: str) -> list[str]:
    """The sandbox sources (``<provider>_sandbox``) the database at ``url`` holds snapshots of."""
    names = [f"{name}_sandbox" for name in apps.available()]
    with closing(connect(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('balance_snapshots') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT DISTINCT source FROM balance_snapshots WHERE source = ANY(%s) ORDER BY 1", (names,))
        return [row[0] for row in cur.fetchall()]


def refuse_sandbox_history(url: str) -> None:
    held = sandbox_history(url)
    if held:
        raise DemoError(f"{describe_url(url)} holds an earlier demo's history of {', '.join(held)}: the sandboxes"
                        " are new ledgers every run, so that history cannot go on; give the demo an empty"
                        " database (or none: it then uses its own in .pgdata)")


def _stop_cluster() -> None:
    if devdb.stop():
        print("stopped the PostgreSQL cluster in .pgdata it had started", file=sys.stderr)


def start_sandboxes(cleanup: ExitStack, make_app, make_source,
                    names: list[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """A server per sandbox (``names``, default all), each stopped by ``cleanup``; their sources
    and Connections (``AIRFLOW_CONN_<ID>``: URI).

    ``make_app(name)`` is the fake to serve, ``make_source(name, url)`` the
    ``[sources.<name>]`` keys pointing at it.
    """
    sources: dict[str, dict] = {}
    connections: dict[str, str] = {}
    for name in apps.available() if names is None else names:
        server = FakeServer(make_app(name)).start()
        cleanup.callback(server.stop)
        sources[f"{name}_sandbox"] = make_source(name, server.url)
        if apps.sandbox(name).DEMO_CONNECTION:
            conn_id, uri = apps.sandbox(name).DEMO_CONNECTION
            connections[f"AIRFLOW_CONN_{conn_id.upper()}"] = uri
        print(f"sandbox {name}: {server.url}")
    return sources, connections


def write_env(url: str, config: Path, connections: dict[str, str]) -> Path:
    """``.demo/env``: what the ``balances`` command needs, to source (``. .demo/env``); mode 0600."""
    lines = ["# Written by scripts/demo: '. .demo/env', then the balances command reads the demo.",
             f"export PATH={shlex.quote(str(REPO / '.venv' / 'bin'))}:\"$PATH\"",
             f"export BALANCES_CONFIG={shlex.quote(str(config))}",
             f"export BALANCES_DB_URL={shlex.quote(url)}"]
    lines += [f"export {name}={shlex.quote(uri)}" for name, uri in sorted(connections.items())]
    fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    ENV_FILE.chmod(0o600)
    return ENV_FILE


def write_pools(path: Path, slots: int = 4) -> Path:
    """The pools file ``balances pools`` prints, for ``airflow pools import``."""
    import json

    from pipeline.config import pools_document

    path.write_text(json.dumps(pools_document(slots), indent=2))
    return path


def _airflow(args: list[str], env: dict, log: Path) -> int:
    with open(log, "ab") as out:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def run_demo(db_url: str | None = None, *, keep: bool = False) -> int:
    started = time.monotonic()
    DEMO_DIR.mkdir(exist_ok=True)
    logs = DEMO_DIR / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as on_failure:
        with ExitStack() as sandboxes:
            url = database(on_failure, db_url)
            print(f"database: {describe_url(url)}")
            print(f"migrations: at revision {upgrade(url)}")
            started_at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)

            def source(name: str, server_url: str) -> dict:
                keys = apps.sandbox(name).demo_source(server_url)
                keys.setdefault("task_retries", 0)
                # Scheduled from now: the continuity checks then expect no earlier runs.
                keys.setdefault("start_date", started_at)
                return keys

            served: dict = {}

            def app(name: str):
                served[name] = apps.sandbox(name).demo_app()
                return served[name]

            sources, connections = start_sandboxes(sandboxes, app, source)
            config = DEMO_DIR / "balances.toml"
            checks = demo_checks(apps.available(), rollforward=True)
            write_sources(config, sources, checks)
            env_file = write_env(url, config, connections)
            failed = run_dags(url, config, sources, connections, bool(checks), logs, served)
            show_landed(url, list(sources))
            show_rollforward(url, list(sources))
            if checks:
                show_report(url, started_at)
            if failed:
                print(f"\nthe demo failed ({', '.join(failed)}): see the logs in {logs}", file=sys.stderr)
                return 1
            hand_over(url, config, env_file, keep, time.monotonic() - started)
            if keep:
                wait_for_interrupt()
        on_failure.pop_all()  # a good run leaves the database running for the commands to try
    return 0


def run_dags(url: str, config: Path, sources: dict[str, dict], connections: dict[str, str],
             reconcile: bool, logs: Path, served: dict | None = None) -> list[str]:
    """Each source's DAG once (``airflow dags test``), the backfills and second snapshots that make
    windows, their movements, the reconciliation; what failed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.update(connections)
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
        return ["airflow db migrate"]
    if _airflow(["pools", "import", str(write_pools(DEMO_DIR / "pools.json"))], env, airflow_log) != 0:
        return ["airflow pools import"]
    failed = []
    for name in sources:
        if _run_dag(f"balances_{name}", env, logs) != 0:
            failed.append(name)
    if "hedera_sandbox" in sources and "hedera_sandbox" not in failed:
        backfill_hedera(url, sources["hedera_sandbox"])
    if "evm_sandbox" in sources and "evm_sandbox" not in failed:
        backfill_evm(url, sources["evm_sandbox"], connections)
    if "formance_sandbox" in sources and "formance_sandbox" not in failed and served and "formance" in served:
        move_formance(url, sources["formance_sandbox"], connections, served["formance"])
    for name in sources:
        if name not in failed:
            load_movements(url, name, sources[name], connections)
    if reconcile and not failed and _run_dag("reconcile_balances", env, logs) != 0:
        failed.append("reconcile_balances")
    return failed


def _run_dag(dag_id: str, env: dict, logs: Path) -> int:
    started = time.monotonic()
    log = logs / f"{dag_id}.log"
    code = _airflow(["dags", "test", dag_id], env, log)
    state = "ok" if code == 0 else f"FAILED (exit {code}, see {log})"
    print(f"dag {dag_id}: {state} in {time.monotonic() - started:.1f}s")
    return code


def backfill_hedera(url: str, keys: dict) -> None:
    """Load the mirror node's two earlier snapshots, so the report has a history to draw.

    Hedera answers for past times, so this is a real backfill (the CLI's
    ``balances snapshot --at``), not a fake.
    """
    from pipeline.config import parse_source
    from pipeline.snapshot import take_snapshot

    source = parse_source("hedera_sandbox", dict(keys))
    with closing(connect(url)) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT max(as_of) FROM balance_snapshots WHERE source = 'hedera_sandbox'")
            loaded = cur.fetchone()[0]
        conn.rollback()
        # Counted back from the snapshot the DAG loaded, not from the clock: a
        # quarter hour may have begun since the sandbox made its snapshots,
        # and "30 minutes ago" would then miss the earliest. A second past the
        # whole second, as a snapshot's fraction may lie after the run's.
        latest = (loaded or datetime.now(timezone.utc)).replace(microsecond=0) + timedelta(seconds=1)
        for minutes in (30, 15):
            at = latest - timedelta(minutes=minutes)
            summary = take_snapshot(conn, source, at)
            print(f"backfill hedera_sandbox at {at:%H:%M}: {summary['status']}, "
                  f"snapshot {summary['as_of_raw']}, {summary['rows_inserted']} new rows")


def backfill_evm(url: str, keys: dict, connections: dict[str, str]) -> None:
    """The chain's block of three hours ago (a day old: the seeding's second day), before the DAG's.

    The window between the two holds a DUSD payment, a payment through a
    contract (only traces show it) and the gas operations paid.
    """
    from pipeline.snapshot import take_snapshot

    source = _demo_source("evm_sandbox", keys)
    with _environment(connections), closing(connect(url)) as conn:
        from pipeline import connections as conns

        summary = take_snapshot(conn, source, datetime.now(timezone.utc) - timedelta(hours=3),
                                credentials=conns.credentials(source.conn_id))
    print(f"backfill evm_sandbox 3 hours back: {summary['status']}, block {summary['as_of_raw']}")


def move_formance(url: str, keys: dict, connections: dict[str, str], app) -> None:
    """Payments booked on the ledger after the DAG's snapshot, then a second snapshot of the present."""
    from pipeline.snapshot import take_snapshot
    from sandbox.formance import DEMO_LEDGER

    ledger = app.ledgers[DEMO_LEDGER]
    at = datetime.now(timezone.utc)
    ledger.transfer(at, "users:001", "merchants:acme", "USD/2", 1_250)
    ledger.transfer(at, "world", "users:003", "COIN", 5)
    ledger.transfer(at, "users:001", "users:004", "USD/2", 2_000)
    source = _demo_source("formance_sandbox", keys)
    with _environment(connections), closing(connect(url)) as conn:
        from pipeline import connections as conns

        summary = take_snapshot(conn, source, datetime.now(timezone.utc), force=True,
                                credentials=conns.credentials(source.conn_id))
    print(f"formance_sandbox after three payments: {summary['status']}, {summary['as_of_raw']}")


def load_movements(url: str, name: str, keys: dict, connections: dict[str, str]) -> None:
    """Every window of the source not loaded yet (``balances movements``): what the DAG's movement tasks
    do after each publish, for the snapshots taken outside Airflow."""
    from pipeline import connections as conns
    from pipeline import movements

    source = _demo_source(name, keys)
    with _environment(connections), closing(connect(url)) as conn:
        windows = movements.missing_windows(conn, source)
        try:
            loaded = movements.load_windows(conn, source, windows, credentials=conns.credentials(source.conn_id))
        except Exception as exc:  # the run recorded it; the demo goes on and shows the rest
            print(f"movements {name}: FAILED: {exc}", file=sys.stderr)
            return
    if windows:
        shown = ", ".join(f"({s['start_raw']}, {s['end_raw']}] {s['status']} {s['movements']}" for s in loaded)
        print(f"movements {name}: {shown or 'not available (recorded so)'}")


def _demo_source(name: str, keys: dict):
    from pipeline.config import parse_source

    return parse_source(name, dict(keys))


class _environment:
    """The sandboxes' Connections in this process's environment, for the steps the demo runs itself."""

    def __init__(self, connections: dict[str, str]) -> None:
        self.connections, self.saved = connections, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.connections}
        os.environ.update(self.connections)

    def __exit__(self, *exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


ROLLFORWARD_QUERY = """SELECT account, asset, period_end, opening, inflow, outflow, closing, unexplained, status
  FROM balance_rollforward
 WHERE source = %s AND (inflow <> 0 OR outflow <> 0 OR unexplained <> 0)
 ORDER BY abs(unexplained) DESC NULLS LAST, period_end DESC, account, asset
 LIMIT 6"""


def show_rollforward(url: str, sources: list[str]) -> None:
    """A roll-forward statement per source: opening + inflow - outflow = closing, and what is left."""
    with closing(connect(url)) as conn, conn.cursor() as cur:
        for source in sources:
            cur.execute(ROLLFORWARD_QUERY, (source,))
            rows = cur.fetchall()
            cur.execute("SELECT status, count(*) FROM balance_rollforward WHERE source = %s GROUP BY 1 ORDER BY 1",
                        (source,))
            counts = ", ".join(f"{n} {status}" for status, n in cur.fetchall())
            if not counts:
                continue
            print(f"\nroll-forward {source} ({counts}): {ROLLFORWARD_QUERY.replace('%s', repr(source))}")
            for row in rows:
                print("  " + " | ".join("" if v is None else str(v) for v in row))


def show_report(url: str, since: datetime) -> None:
    from reconciliation.report import write_report
    from reconciliation.reconcile import open_breaks

    with closing(connect(url)) as conn:
        breaks = open_breaks(conn, window=(since - timedelta(days=3), datetime.now(timezone.utc)), limit=10)
    print(f"\nreconciliation: {len(breaks)} open break(s)")
    for b in breaks:
        print(f"  {b['check_time']:%Y-%m-%d %H:%M} {b['check_name']} {b['kind']} ({b['subject_label']}):"
              f" {b['detail']}")
    paths = write_report(url, DEMO_DIR / "report", since - timedelta(days=3), datetime.now(timezone.utc))
    print("report: " + ", ".join(str(p) for p in paths))


def show_landed(url: str, sources: list[str]) -> None:
    """Each source's newest published snapshot, a sample of it, and the history's size."""
    with closing(connect(url)) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT ON (source) run_id, source, status, as_of_raw, pages, requests,
                   rows, rows_inserted, rejected
              FROM snapshot_runs WHERE source = ANY(%s) AND status = 'published'
             ORDER BY source, as_of DESC, run_id DESC
            """,
            (sources,),
        )
        runs = cur.fetchall()
        print("\nnewest snapshot per source (snapshot_runs):")
        print(f"  {'run':>4} {'source':<20} {'status':<11} {'as_of_raw':<32} {'pages':>5} {'requests':>8}"
              f" {'rows':>6} {'rows_inserted':>13} {'rejected':>8}")
        for r in runs:
            print(f"  {r[0]:>4} {r[1]:<20} {r[2]:<11} {str(r[3]):<32} {r[4]:>5} {r[5]:>8} {r[6]:>6} {r[7]:>13}"
                  f" {r[8]:>8}")
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


def hand_over(url: str, config: Path, env_file: Path, keep: bool, took: float) -> None:
    """What the user has now, and what to type next."""
    here = Path.cwd()

    def shown(path: Path) -> str:
        return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)

    print(f"\ndone in {human_duration(took)}.\n")
    print(f"database:     {describe_url(url)} (the full URL, password included, is in {shown(env_file)})")
    print(f"sources file: {shown(config)}")
    print(f"environment:  {shown(env_file)} (BALANCES_CONFIG, BALANCES_DB_URL, the sandboxes' Connections)")
    print("\ntry next:")
    print(f"  . {shown(env_file)}")
    print("  balances latest hedera_sandbox --account 0.0.1234")
    print("  balances runs")
    print("  balances reconcile")
    if keep:
        print("  balances snapshot hedera_sandbox      (the sandboxes keep serving until Ctrl-C)")
    else:
        print("(scripts/demo --keep keeps the sandboxes serving, so 'balances snapshot hedera_sandbox' works too)")
    print("\nstop the database: scripts/demo --stop")


def wait_for_interrupt() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    print("\nthe sandboxes keep serving; Ctrl-C stops them", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the sandboxes")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_all() -> int:
    """``scripts/demo --stop``: the demo's cluster, if it runs."""
    print("stopped the PostgreSQL cluster in .pgdata" if devdb.stop() else "the demo's cluster is not running")
    return 0
