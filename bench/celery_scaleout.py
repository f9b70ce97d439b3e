"""Scale-out on Airflow's CeleryExecutor, proven: ``python -m bench celery``.

The sharded Hedera crawl as a deployment runs it: api-server, scheduler,
dag-processor and triggerer, CeleryExecutor with two workers (``w1``, ``w2``,
two task slots each), Redis (Debian's ``redis-server``) as the broker and
the Airflow metadata and Celery results in PostgreSQL. A local mirror node
serves a snapshot of ``accounts`` accounts (balances above 2**53, a token on
every tenth) and notes when each request arrived. Two DAG runs:

1. **Clean.** The ``shards`` crawl tasks must run on both workers (the
   hostname of each task instance), and the requests of all shards
   together must stay within the source's ``rate_limit`` (the budget row
   in PostgreSQL that every worker draws on).
2. **A worker killed mid-shard.** A new snapshot is published on the
   mirror and the DAG runs again; once a shard has been served a few pages
   on one worker, that worker's whole process tree is SIGKILLed. The
   scheduler finds the shard's heartbeats stopped, the task is retried on
   the surviving worker, and the published snapshot must hold exactly one
   copy of every row of the mirror's snapshot, with the exact values.

Everything runs in a temporary directory (a private PostgreSQL cluster
unless ``db_url`` or ``$BALANCES_CELERY_DB_URL`` names a database) and is
stopped on the way out. ``run`` returns the figures and ``ok``; ``python -m
bench celery`` prints them and exits non-zero when a proof fails.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import psycopg2

from devtools import devdb
from devtools.serve import CeleryWorkers, Stack, kill_worker, live_stack, worker_tasks
from loaders.migrate import upgrade
from sandbox.hedera import Account, HederaMirror, Snapshot
from sandbox.server import FakeServer, Request, Response

SOURCE = "hedera_celery"
DAG_ID = f"balances_{SOURCE}"
TOKEN, TOKEN_DECIMALS = "0.0.5001", 6
WORKERS = CeleryWorkers(names=("w1", "w2"), concurrency=2)
# Seconds without a heartbeat before the scheduler fails a task (and retries
# it): Airflow's default is 300; a killed worker is noticed this fast.
HEARTBEAT_TIMEOUT = 20
AIRFLOW_CONFIG = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    # A task the killed worker had taken but not yet started stays queued (its
    # message unacknowledged in Redis) until this timeout requeues it (default 600 s).
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
}
RUN_DEADLINE = 480  # seconds for one DAG run, kill and retry included
# Windows (seconds) over which the observed request count is held against
# the token bucket: at most burst + rate * window requests in any of them.
WINDOWS = (1, 2, 5, 10)
# One request of slack: between taking a token and the request reaching the
# mirror lie a connection and a scheduler tick on a busy 2-core machine.
SLACK = 1


@dataclass(frozen=True, slots=True)
class Settings:
    accounts: int = 6000
    shards: int = 4
    rate_limit: float = 4.0  # requests per second, every shard together
    page_delay: float = 0.05  # the mirror's answer time: unthrottled, 4 shards could send ~80/s
    limit: int = 100  # accounts per page
    kill_after_pages: int = 3  # pages of a shard served before its worker is killed
    # Kill only the worker's process group (kill -9 -<pgid>), not the task
    # processes Airflow runs in groups of their own: they live on, orphaned.
    group_only: bool = False


def say(message: str) -> None:
    print(f"[celery {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the mirror node ----------------------------------------------------------

def snapshot_at(at: int, accounts: int) -> Snapshot:
    """Accounts 1..N at ``at`` (epoch seconds); every balance differs from any snapshot of the day before."""
    seed = at % 100_000

    def account(num: int) -> Account:
        tokens = [(TOKEN, num * 1_000_003 + seed)] if num % 10 == 0 else []
        # Above 2**53: exact only if no float ever holds it.
        return Account(balance=9_000_000_000_000_000_000 + num * 100_000_007 + seed, tokens=tokens)

    return Snapshot(f"{at}.123456789", range(1, accounts + 1), account)


def expected_rows(snapshot: Snapshot) -> dict[tuple[str, str], tuple[Decimal, int]]:
    rows = {}
    for num in snapshot.nums:
        account = snapshot.account(num)
        rows[(f"0.0.{num}", "HBAR")] = (Decimal(account.balance), 8)
        for token, amount in account.tokens:
            rows[(f"0.0.{num}", token)] = (Decimal(amount), TOKEN_DECIMALS)
    return rows


@dataclass(frozen=True, slots=True)
class Served:
    at: float  # time.monotonic() when the request arrived
    limit: str | None
    first: int | None  # the first account number of a balances page
    count: int  # accounts on it


class RecordingMirror:
    """The Hedera sandbox answering after ``delay`` seconds; notes every request."""

    def __init__(self, mirror: HederaMirror, delay: float) -> None:
        self.mirror = mirror
        self.delay = delay
        self.served: list[Served] = []
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        arrived = time.monotonic()
        time.sleep(self.delay)
        response = self.mirror(request)
        first, count = None, 0
        if request.path.rstrip("/") == "/api/v1/balances" and response.status == 200:
            balances = json.loads(response.body)["balances"]
            if balances:
                first, count = int(balances[0]["account"].rsplit(".", 1)[1]), len(balances)
        limit = next((v for k, v in request.query if k == "limit"), None)
        with self._lock:
            self.served.append(Served(arrived, limit, first, count))
        return response

    def between(self, start: float, end: float) -> list[Served]:
        with self._lock:
            return [s for s in self.served if start <= s.at <= end]


# -- Airflow and the databases --------------------------------------------------

def query(url: str, sql: str, params=()) -> list[tuple]:
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def wait_for_dag(stack: Stack, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not query(stack.metadata_url, """SELECT 1 FROM dag d JOIN serialized_dag s USING (dag_id)
                                            WHERE d.dag_id = %s AND NOT d.is_paused""", (DAG_ID,)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{DAG_ID} was not parsed within {timeout:.0f}s; see {stack.logs}")
        time.sleep(1)


def dag_run(stack: Stack, run_id: str) -> tuple | None:
    rows = query(stack.metadata_url, "SELECT state, start_date, end_date FROM dag_run"
                                     " WHERE dag_id = %s AND run_id = %s", (DAG_ID, run_id))
    return rows[0] if rows else None


@dataclass(frozen=True, slots=True)
class Attempt:
    shard: int
    try_number: int
    state: str | None
    hostname: str | None
    start: datetime | None
    end: datetime | None


def attempts(stack: Stack, run_id: str) -> list[Attempt]:
    """Every try of every crawl task of the run: the current ones and those retried."""
    found: dict[tuple[int, int], Attempt] = {}
    for table in ("task_instance_history", "task_instance"):  # the current row wins
        for row in query(stack.metadata_url,
                         f"SELECT map_index, try_number, state, hostname, start_date, end_date FROM {table}"
                         " WHERE dag_id = %s AND run_id = %s AND task_id = 'crawl_snapshot'", (DAG_ID, run_id)):
            found[(row[0], row[1])] = Attempt(*row)
    return sorted(found.values(), key=lambda a: (a.shard, a.try_number))


def all_started(stack: Stack, worker: str) -> bool:
    """Whether every task the worker holds is running in Airflow (none is only received).

    A task a killed worker had received but not started stays queued, its
    message unacknowledged in Redis, until ``task_queued_timeout`` requeues
    it: a kill at such a moment measures that timeout, not the retry.
    """
    held = worker_tasks(stack, worker)
    if held is None:
        return False
    running = {row[0] for row in query(stack.metadata_url, """SELECT external_executor_id FROM task_instance
                                                               WHERE state = 'running' AND hostname = %s""",
                                       (worker,))}
    return held <= running


def shard_ranges(stack: Stack, run_id: str) -> list[tuple[int, int | None]] | None:
    """Each shard's account numbers [low, high) as plan_shards chose them (its XCom)."""
    rows = query(stack.metadata_url, "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s"
                                     " AND task_id = 'plan_shards' AND key = 'return_value'", (DAG_ID, run_id))
    if not rows or rows[0][0] is None:
        return None
    plan = rows[0][0] if not isinstance(rows[0][0], str) else json.loads(rows[0][0])
    ranges = []
    for shard in sorted(plan, key=lambda s: s["shard"]):
        low, high = shard["account_range"] or (None, None)
        ranges.append((0 if low is None else int(low.rsplit(".", 1)[1]),
                       None if high is None else int(high.rsplit(".", 1)[1])))
    return ranges


def shard_of(ranges: list[tuple[int, int | None]], num: int) -> int | None:
    for i, (low, high) in enumerate(ranges):
        if low <= num and (high is None or num < high):
            return i
    return None


def pages_by_shard(served: list[Served], ranges, limit: int) -> dict[int, list[Served]]:
    """The crawl pages among ``served`` (planning asks for one account), by shard."""
    pages: dict[int, list[Served]] = {i: [] for i in range(len(ranges))}
    for s in served:
        if s.first is not None and s.limit == str(limit):
            shard = shard_of(ranges, s.first)
            if shard is not None:
                pages[shard].append(s)
    return pages


def accounts_in(ranges, accounts: int) -> dict[int, int]:
    counts = {i: 0 for i in range(len(ranges))}
    for num in range(1, accounts + 1):
        counts[shard_of(ranges, num)] += 1
    return counts


# -- the proofs -------------------------------------------------------------------

def budget_figures(served: list[Served], rate: float) -> dict:
    """Observed requests per window against the token bucket (burst = rate, as request_budget sets it)."""
    burst = max(1.0, rate)
    times = sorted(s.at for s in served)
    figures = {"requests": len(times), "rate_limit": rate, "burst": burst}
    held = True
    for window in WINDOWS:
        most, j = 0, 0
        for i, t in enumerate(times):
            while times[j] < t - window:
                j += 1
            most = max(most, i - j + 1)
        allowed = burst + rate * window
        figures[f"max_in_{window}s"] = most
        figures[f"allowed_in_{window}s"] = allowed
        held &= most <= allowed + SLACK
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    figures["span_s"] = round(span, 2)
    figures["mean_rps"] = round((len(times) - 1) / span, 2) if span else None
    figures["max_sustained_rps_10s"] = round(figures["max_in_10s"] / 10, 2)
    figures["held"] = held
    return figures


def published(db_url: str, run_id: str) -> tuple[int | None, str | None, dict, int, int]:
    """The snapshot run of a DAG run: id, status, its rows, duplicates, leftover staging tables."""
    run = query(db_url, "SELECT run_id, status FROM snapshot_runs WHERE source = %s AND dag_run_id = %s"
                        " ORDER BY run_id DESC LIMIT 1", (SOURCE, run_id))
    if not run:
        return None, None, {}, 0, 0
    snapshot_run, status = run[0]
    rows: dict[tuple[str, str], tuple[Decimal, int]] = {}
    duplicates = 0
    for account, asset, balance, decimals in query(
            db_url, """SELECT account, asset, balance, decimals FROM balance_history
                        WHERE source = %s AND as_of = (SELECT as_of FROM snapshot_runs WHERE run_id = %s)""",
            (SOURCE, snapshot_run)):
        duplicates += (account, asset) in rows
        rows[(account, asset)] = (balance, decimals)
    staging = query(db_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'balance_staging'"
                            " AND tablename LIKE %s", (f"run\\_{snapshot_run}\\_%",))[0][0]
    return snapshot_run, status, rows, duplicates, staging


def rows_figures(db_url: str, run_id: str, snapshot: Snapshot) -> dict:
    expected = expected_rows(snapshot)
    snapshot_run, status, rows, duplicates, staging = published(db_url, run_id)
    missing = expected.keys() - rows.keys()
    extra = rows.keys() - expected.keys()
    wrong = [k for k in expected.keys() & rows.keys() if rows[k] != expected[k]]
    return {"snapshot_run": snapshot_run, "status": status, "expected": len(expected), "published": len(rows),
            "duplicates": duplicates, "missing": len(missing), "extra": len(extra), "wrong_values": len(wrong),
            "staging_left": staging,
            "exact": status == "published" and not (missing or extra or wrong or duplicates or staging)}


def seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 1)


# -- the runs ---------------------------------------------------------------------

def trigger(stack: Stack, run_id: str) -> float:
    """Start a DAG run; the moment before asking (the CLI returns after the run may have begun)."""
    asked = time.monotonic()
    stack.airflow("dags", "trigger", DAG_ID, "--run-id", run_id)
    return asked


def wait_run(stack: Stack, run_id: str, expected_dead: set[str], on_tick=None) -> str:
    deadline = time.monotonic() + RUN_DEADLINE
    while True:
        run = dag_run(stack, run_id)
        if run is not None and run[0] in ("success", "failed"):
            return run[0]
        dead = set(stack.dead()) - expected_dead
        if dead:
            raise RuntimeError(f"airflow {sorted(dead)} stopped; see {stack.logs}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"DAG run {run_id} not finished after {RUN_DEADLINE}s (state "
                               f"{run and run[0]}); see {stack.logs}")
        if on_tick is not None:
            on_tick()
        time.sleep(0.5)


def clean_run(stack: Stack, mirror: RecordingMirror, db_url: str, settings: Settings,
              snapshot: Snapshot) -> dict:
    run_id = "celery_clean"
    say(f"run 1 ({run_id}): {settings.shards} shards, no fault")
    started = trigger(stack, run_id)
    state = wait_run(stack, run_id, set())
    ended = time.monotonic()
    _, start, end = dag_run(stack, run_id)
    tries = attempts(stack, run_id)
    per_worker: dict[str, int] = {}
    for a in tries:
        if a.state == "success":
            per_worker[a.hostname] = per_worker.get(a.hostname, 0) + 1
    crawl_starts = [a.start for a in tries if a.start]
    crawl_ends = [a.end for a in tries if a.end]
    return {
        "dag_run": run_id, "state": state, "wall_s": seconds(start, end),
        "crawl_span_s": seconds(min(crawl_starts), max(crawl_ends)) if crawl_starts and crawl_ends else None,
        "shard_s": sorted(seconds(a.start, a.end) for a in tries if a.state == "success"),
        "shards_per_worker": dict(sorted(per_worker.items())),
        "tries": [[a.shard, a.try_number, a.state, a.hostname] for a in tries],
        "budget": budget_figures(mirror.between(started, ended), settings.rate_limit),
        "rows": rows_figures(db_url, run_id, snapshot),
    }


def killed_run(stack: Stack, mirror: RecordingMirror, db_url: str, settings: Settings,
               snapshot: Snapshot) -> dict:
    run_id = "celery_kill"
    say(f"run 2 ({run_id}): a worker is killed once one of its shards has been served "
        f"{settings.kill_after_pages} pages")
    started = trigger(stack, run_id)
    kill: dict = {}
    ranges_seen: list = []
    killed_processes: set[str] = set()  # the killed worker: not a failure of the stack

    def maybe_kill() -> None:
        if kill:
            return
        ranges = ranges_seen[0] if ranges_seen else shard_ranges(stack, run_id)
        if ranges is None:
            return
        ranges_seen[:] = [ranges]
        running = [a for a in attempts(stack, run_id)
                   if a.state == "running" and a.try_number == 1 and a.hostname in WORKERS.names]
        if not running:
            return
        pages = pages_by_shard(mirror.between(started, time.monotonic()), ranges, settings.limit)
        sizes = accounts_in(ranges, settings.accounts)
        for a in running:
            served = len(pages[a.shard])
            # Mid-shard: some pages served, at least one still to come.
            if (settings.kill_after_pages <= served and served * settings.limit < sizes[a.shard]
                    and all_started(stack, a.hostname)):
                on_victim = sorted(b.shard for b in running if b.hostname == a.hostname)
                at, utc = time.monotonic(), datetime.now().astimezone()
                killed_processes.add(WORKERS.process(a.hostname))
                pids = kill_worker(stack, a.hostname, group_only=settings.group_only)
                kill.update({"worker": a.hostname, "shard": a.shard, "shards_on_worker": on_victim,
                             "pages_served_before_kill": served,
                             "pages_in_shard": -(-sizes[a.shard] // settings.limit),
                             "processes_killed": len(pids), "group_only": settings.group_only,
                             "orphans_left": len(stack.strays), "at": at, "utc": utc})
                say(f"killed worker {a.hostname} ({len(pids)} processes) during shard {a.shard} after "
                    f"{served} of its ~{kill['pages_in_shard']} pages; shards on it: {on_victim}")
                return

    state = wait_run(stack, run_id, killed_processes, on_tick=maybe_kill)
    ended = time.monotonic()
    _, start, end = dag_run(stack, run_id)
    tries = attempts(stack, run_id)
    result = {
        "dag_run": run_id, "state": state, "wall_s": seconds(start, end),
        "tries": [[a.shard, a.try_number, a.state, a.hostname] for a in tries],
        "budget": budget_figures(mirror.between(started, ended), settings.rate_limit),
        "rows": rows_figures(db_url, run_id, snapshot),
    }
    if not kill:
        result["kill"] = None
        return result
    killed_at = kill.pop("at")
    kill_utc = kill.pop("utc")
    survivors = [n for n in WORKERS.names if n != kill["worker"]]
    retried = []
    for shard in kill["shards_on_worker"]:
        shard_tries = [a for a in tries if a.shard == shard]
        first = next((a for a in shard_tries if a.try_number == 1), None)
        last = shard_tries[-1] if shard_tries else None
        retry = last if last is not None and last.try_number > 1 else None
        retried.append({
            "shard": shard, "tries": len(shard_tries),
            "first": [first.state, first.hostname] if first else None,
            "last": [last.try_number, last.state, last.hostname] if last else None,
            "failed_after_kill_s": seconds(kill_utc, first.end) if first else None,
            "retry_started_after_kill_s": seconds(kill_utc, retry.start) if retry else None,
            "retry_s": seconds(retry.start, retry.end) if retry else None,
            "ok": bool(first and last and first.hostname == kill["worker"] and first.state == "failed"
                       and last.try_number > 1 and last.state == "success" and last.hostname in survivors),
        })
    ranges = ranges_seen[0]
    pages = pages_by_shard(mirror.between(started, ended), ranges, settings.limit)
    shard = kill["shard"]
    kill["pages_served_in_run"] = len(pages[shard])
    kill["recrawled"] = len(pages[shard]) > kill["pages_served_before_kill"] and \
        sum(p.count for p in pages[shard]) > accounts_in(ranges, settings.accounts)[shard]
    kill["retried"] = retried
    kill["seconds_after_trigger"] = round(killed_at - started, 1)
    result["kill"] = kill
    return result


def proofs(clean: dict, killed: dict) -> tuple[dict[str, bool], list[str]]:
    failures = []
    workers = set(clean["shards_per_worker"])
    both = workers == set(WORKERS.names)
    if not both:
        failures.append(f"run 1: shards ran on {sorted(workers)}, not on both workers")
    if clean["state"] != "success":
        failures.append(f"run 1: DAG run {clean['state']}")
    budget = clean["budget"]["held"] and killed["budget"]["held"]
    for name, run in (("run 1", clean), ("run 2", killed)):
        if not run["budget"]["held"]:
            failures.append(f"{name}: request budget exceeded: {run['budget']}")
        if not run["rows"]["exact"]:
            failures.append(f"{name}: published rows not exact: {run['rows']}")
    kill = killed["kill"]
    if kill is None:
        failures.append("run 2: no shard was seen mid-crawl on a worker: nothing killed")
    else:
        if not kill["recrawled"]:
            failures.append(f"run 2: the killed shard was not crawled again: {kill}")
        for shard in kill["retried"]:
            if not shard["ok"]:
                failures.append(f"run 2: shard {shard['shard']} not retried on the surviving worker: {shard}")
    if killed["state"] != "success":
        failures.append(f"run 2: DAG run {killed['state']}")
    retried = (kill is not None and kill["recrawled"] and all(s["ok"] for s in kill["retried"])
               and killed["state"] == "success" and killed["rows"]["exact"])
    return ({"shards_on_both_workers": both and clean["state"] == "success" and clean["rows"]["exact"],
             "budget_held_across_workers": budget,
             "killed_shard_retried_rows_exactly_once": retried}, failures)


def run(settings: Settings = Settings(), *, db_url: str | None = None, workdir: Path | None = None) -> dict:
    """Set up, run both DAG runs, check; every process started here is stopped on the way out."""
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="balances-celery-")) if own_dir else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # as root, the private cluster runs as 'postgres' and must reach it
    cluster = None
    if db_url is None:
        db_url = os.environ.get("BALANCES_CELERY_DB_URL")
    if db_url is None:
        cluster = workdir / "pgdata"
        say(f"private PostgreSQL cluster in {cluster}")
        db_url = devdb.start(cluster, database="balances_celery")
    ok = False
    started = time.monotonic()
    try:
        upgrade(db_url)
        now = int(time.time())
        first = snapshot_at(now - 60, settings.accounts)
        mirror = RecordingMirror(HederaMirror([first], {TOKEN: TOKEN_DECIMALS}), settings.page_delay)
        source = {"provider": "hedera", "schedule": "none", "limit": settings.limit, "include_tokens": True,
                  "shards": settings.shards, "rate_limit": float(settings.rate_limit), "task_retries": 2,
                  "task_retry_delay": 2.0, "backoff_base": 0.1}
        with FakeServer(mirror, keep_requests=10) as server:
            # The killed worker's connections reset: expected, not worth a traceback.
            server._httpd.handle_error = lambda request, client_address: None
            source["base_url"] = server.url
            say("starting redis-server, PostgreSQL metadata, Airflow services and 2 Celery workers "
                "(metadata migration: about a minute)")
            with live_stack(db_url, workdir / "stack", sandboxes=[], sources={SOURCE: source}, celery=WORKERS,
                            airflow_config=AIRFLOW_CONFIG) as stack:
                ready = time.monotonic() - started
                say(f"ready after {ready:.0f}s; logs in {stack.logs}")
                wait_for_dag(stack)
                clean = clean_run(stack, mirror, db_url, settings, first)
                say(f"run 1: {clean['state']} in {clean['wall_s']}s, shards per worker "
                    f"{clean['shards_per_worker']}, {clean['rows']['published']} rows")
                second = snapshot_at(int(time.time()) - 1, settings.accounts)
                mirror.mirror.snapshots.append(second)
                killed = killed_run(stack, mirror, db_url, settings, second)
                say(f"run 2: {killed['state']} in {killed['wall_s']}s, {killed['rows']['published']} rows")
        checks, failures = proofs(clean, killed)
        ok = all(checks.values()) and not failures
        return {"benchmark": "celery scale-out", "accounts": settings.accounts, "shards": settings.shards,
                "workers": len(WORKERS.names), "worker_concurrency": WORKERS.concurrency,
                "page_delay_ms": settings.page_delay * 1000, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT,
                "stack_ready_s": round(ready, 1), "clean": clean, "killed": killed, "proofs": checks,
                "failures": failures, "total_s": round(time.monotonic() - started, 1), "ok": ok}
    finally:
        if cluster is not None:
            devdb.stop(cluster)
        if own_dir and ok:
            shutil.rmtree(workdir, ignore_errors=True)
        elif own_dir:
            say(f"kept {workdir} (logs in {workdir / 'stack' / 'airflow' / 'logs'})")


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, default=str))
    sys.exit(0 if result["ok"] else 1)
