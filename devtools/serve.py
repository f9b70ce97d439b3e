"""``balances demo --serve``: the real Airflow services over moving sandboxes.

The demo's set-up (database, migrations), then the sandbox providers in
their moving variants (``sandbox/live.py``), a sources file scheduling each
of them every minute (Hedera sharded), and Airflow 3 as a deployment runs
it: ``api-server``, ``scheduler``, ``dag-processor`` and ``triggerer``,
LocalExecutor, the metadata in a database of the same PostgreSQL cluster
(``<balances database>_airflow``, never SQLite), one pool per provider.
With ``scripts/superset`` installed, Superset serves the dashboard too.
Prints the URLs and logins and runs until Ctrl-C; then stops every process
it started, each by its own process group.

The test suite starts the same stack with :func:`live_stack`.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from loaders.db import describe
from loaders.migrate import upgrade
from devtools import devdb
from devtools.demo import DEMO_CHECKS, DEMO_DIR, REPO, write_sources
from sandbox import apps
from sandbox.server import FakeServer

log = logging.getLogger(__name__)

SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
POOL_SLOTS = 4
ADMIN = "admin"


class ServeError(RuntimeError):
    """The live stack could not start; the message says which part and why."""


@dataclass
class Stack:
    db_url: str
    home: Path
    config: Path
    env: dict[str, str]
    api_url: str
    password: str
    sources: dict[str, dict]
    servers: list[FakeServer] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def airflow(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        """Run ``airflow ARGS`` against this stack's metadata; its output."""
        result = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServeError(f"airflow {' '.join(args[:2])} failed: {tail[0]}")
        return result.stdout

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metadata_url(db_url: str) -> str:
    """The Airflow metadata database next to the balances one: ``<name>_airflow``, created if missing."""
    import psycopg2
    from psycopg2 import sql

    parts = urlsplit(db_url)
    name = parts.path.lstrip("/") + "_airflow"
    conn = psycopg2.connect(db_url, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg2.Error as exc:
        raise ServeError(f"cannot create the Airflow metadata database {name!r}: "
                         f"{' '.join(str(exc).split())}") from None
    finally:
        conn.close()
    scheme = "postgresql+psycopg2"
    return urlunsplit((scheme, parts.netloc, "/" + name, parts.query, ""))


def prepare(db_url: str, workdir: Path, *, sandboxes: list[str] | None = None, shards: int = 3,
            schedule: str = "* * * * *", extra_config: str = "") -> Stack:
    """Sandboxes started, sources file written, Airflow's metadata migrated and pools created."""
    from sandbox import live

    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "airflow"
    (home / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))]:
        del env[key]
    env.pop("BALANCES_DB_URL", None)
    sources: dict[str, dict] = {}
    servers: list[FakeServer] = []
    started_at = live.start_of_minute()
    try:
        for name in sandboxes or apps.available():
            server = FakeServer(live.live_app(name)).start()
            servers.append(server)
            keys = live.live_source(name, server.url, schedule=schedule, shards=shards)
            keys["start_date"] = started_at
            sources[f"{name}_sandbox"] = keys
            connection = apps.sandbox(name).DEMO_CONNECTION
            if connection:
                env[f"AIRFLOW_CONN_{connection[0].upper()}"] = connection[1]
        config = workdir / "balances.toml"
        checks = DEMO_CHECKS if {"formance", "hedera", "bitfront"} <= {k.split("_")[0] for k in sources} else ""
        write_sources(config, sources, checks + extra_config)

        port = free_port()
        api_url = f"http://127.0.0.1:{port}"
        password = secrets.token_urlsafe(12)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN: password}))
        passwords.chmod(0o600)
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "16",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url(db_url),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # Log servers on free ports: two stacks on one machine do not collide.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "BALANCES_CONFIG": str(config),
            "AIRFLOW_CONN_BALANCES_DB": db_url,
        })
        stack = Stack(db_url=db_url, home=home, config=config, env=env, api_url=api_url,
                      password=password, sources=sources, servers=servers)
        stack.airflow("db", "migrate", timeout=600)
        for provider in sorted({keys["provider"] for keys in sources.values()}):
            stack.airflow("pools", "set", f"balances_{provider}", str(POOL_SLOTS),
                          f"{provider} request budget")
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return stack


def start_services(stack: Stack) -> None:
    for name in SERVICES:
        args = [sys.executable, "-m", "airflow", name]
        if name == "api-server":
            args += ["--host", "127.0.0.1", "--port", str(urlsplit(stack.api_url).port), "--workers", "1"]
        log = open(stack.logs / f"{name}.log", "ab")
        try:
            # Own process group: stopping it takes the workers each service forked.
            stack.processes[name] = subprocess.Popen(args, env=stack.env, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()


def wait_ready(stack: Stack, timeout: float = 180) -> None:
    """Until the API server answers its health check; a service that died is an error."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if stack.dead():
            raise ServeError(f"airflow {', '.join(stack.dead())} exited at start; see {stack.logs}")
        try:
            if requests.get(f"{stack.api_url}/api/v2/monitor/health", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"the Airflow API server did not answer within {timeout:.0f}s; see {stack.logs}")
        time.sleep(1)


def stop(stack: Stack, grace: float = 30) -> None:
    """Stop every process this stack started (their whole process groups) and the sandboxes."""
    for process in stack.processes.values():
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in stack.processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the group (task processes, gunicorn workers).
        _signal_group(process, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(process, timeout=15)
    for server in stack.servers:
        server.stop()
    stack.servers.clear()


def _wait_group_gone(process: subprocess.Popen, timeout: float) -> None:
    """Wait until no member of the process group is left.

    Members other than the leader are reparented when it dies and reaped
    by init a moment later: until then the group still exists, and a port
    or a file they held may still be in use.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    log.warning("process group %d of %s still exists %.0fs after SIGKILL", process.pid, process.args, timeout)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def live_stack(db_url: str, workdir: Path, **options) -> Iterator[Stack]:
    """The whole live stack, stopped on the way out whatever happened."""
    stack = prepare(db_url, workdir, **options)
    try:
        start_services(stack)
        wait_ready(stack)
        yield stack
    finally:
        stop(stack)


def run_serve(db_url: str | None = None, *, until: float | None = None) -> int:
    """The README's ``scripts/demo --serve``: runs until Ctrl-C (or ``until`` seconds)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # the URLs show at once, also in a log file
    # Ctrl-C, and also a SIGTERM (a service manager, `kill`) or a SIGINT that a
    # shell's background job would otherwise ignore: all stop what was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    url = db_url or os.environ.get("BALANCES_DB_URL") or devdb.start()
    print(f"database: {describe(url)}")
    print(f"migrations: at revision {upgrade(url)}")
    workdir = DEMO_DIR / "live"
    print("starting the sandboxes and Airflow (metadata migration: about a minute the first time)...")
    superset = None
    with live_stack(url, workdir) as stack:
        for name, keys in stack.sources.items():
            print(f"sandbox {name}: {keys['base_url']} (schedule {keys['schedule']!r}"
                  f"{', ' + str(keys['shards']) + ' shards' if keys.get('shards') else ''})")
        print(f"pools: {', '.join(sorted('balances_' + k['provider'] for k in stack.sources.values()))}"
              f" ({POOL_SLOTS} slots each)")
        print(f"\nAirflow:  {stack.api_url}  (login {ADMIN} / {stack.password})")
        try:
            superset = _start_superset(url, workdir)
        except RuntimeError as exc:  # Airflow keeps running without the dashboard
            print(f"Superset: not started: {exc}", file=sys.stderr)
            superset = None
        if superset is not None:
            print(f"Superset: {superset.url}  (login {superset.login} / {superset.password};"
                  f" dashboard {superset.url}{superset.dashboard_path})")
        else:
            print("Superset: not running (scripts/superset installs it; then rerun with --serve)")
        print(f"sources file: {stack.config}\nlogs: {stack.logs}\n"
              f"balances database: {describe(url)} (views for BI: see README, 'Live')")
        print("\nrunning; press Ctrl-C to stop everything started here")
        try:
            deadline = None if until is None else time.monotonic() + until
            while deadline is None or time.monotonic() < deadline:
                time.sleep(2)
                if stack.dead():
                    print(f"airflow {', '.join(stack.dead())} stopped; see {stack.logs}", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            print("\nstopping...")
        finally:
            if superset is not None:
                superset.stop()
    print(f"stopped at {datetime.now(timezone.utc):%H:%M:%S} UTC")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _start_superset(db_url: str, workdir: Path):
    from devtools.superset import SupersetServer, venv

    if not (venv() / "bin" / "superset").exists():
        return None
    return SupersetServer.start(venv(), workdir / "superset", db_url)
