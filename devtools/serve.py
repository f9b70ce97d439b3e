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

The test suite starts the same stack with :func:`live_stack`. Given
:class:`CeleryWorkers`, the stack runs Airflow's CeleryExecutor instead: a
private ``redis-server`` as the broker, Celery results in the metadata
database, and one ``airflow celery worker`` per name, each recording its
name as the hostname of the task instances it runs (``bench/celery_scaleout.py``
kills one of them mid-shard).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from devtools.devdb import free_port
from devtools.demo import (DEMO_DIR, REPO, database, demo_alerts, demo_checks, start_sandboxes, write_env,
                           write_pools, write_sources)
from loaders.db import describe_url
from loaders.migrate import upgrade

log = logging.getLogger(__name__)

SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
# Airflow's log servers bind every interface (0.0.0.0 and [::]), with no
# setting to change it. On one machine nobody needs them: the api-server
# reads task logs from the shared log folder. So they are not started.
SKIP_SERVE_LOGS = ("scheduler", "triggerer")
POOL_SLOTS = 4
ADMIN = "admin"
BROKER = "redis"
# A worker's name, read by worker_hostname() in the task processes it starts.
WORKER_NAME_ENV = "BALANCES_WORKER_HOSTNAME"


class ServeError(RuntimeError):
    """The live stack could not start; the message says which part and why."""


@dataclass(frozen=True)
class CeleryWorkers:
    """Airflow's CeleryExecutor on this machine: a private Redis broker and one worker per name.

    Each worker is ``airflow celery worker --celery-hostname <name>@<host>``
    serving ``queue`` with ``concurrency`` task slots, with its own log-server
    port. Task instances it runs record ``<name>`` as their hostname (all
    workers share one machine here; on separate machines the real hostnames
    differ anyway).
    """

    names: tuple[str, ...] = ("w1", "w2")
    concurrency: int = 2
    queue: str = "default"

    def process(self, name: str) -> str:
        """The key of that worker in :attr:`Stack.processes`."""
        return f"celery-{name}"


@dataclass
class Stack:
    db_url: str
    home: Path
    config: Path
    env: dict[str, str]
    api_url: str
    password: str
    sources: dict[str, dict]
    # Stops the sandbox servers (and whatever else was started with them).
    sandboxes: ExitStack = field(default_factory=ExitStack)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    celery: CeleryWorkers | None = None
    broker_url: str | None = None
    # Processes left running by a partial kill (pid: start time); stop() ends them.
    strays: dict[int, int | None] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def metadata_url(self) -> str:
        """The Airflow metadata database, as a libpq URL (for psycopg2)."""
        url = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        return url.replace("postgresql+psycopg2://", "postgresql://")

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


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the Celery workers here: the worker's name.

    Several workers on one machine would otherwise all record its FQDN.
    """
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


def prepare(db_url: str, workdir: Path, *, sandboxes: list[str] | None = None, shards: int = 3,
            schedule: str = "* * * * *", extra_config: str = "", sources: dict[str, dict] | None = None,
            celery: CeleryWorkers | None = None, airflow_config: dict[str, str] | None = None,
            alerts_smtp: str | None = None) -> Stack:
    """Sandboxes started, sources file written, Airflow's metadata migrated and pools created.

    ``sandboxes`` names the moving sandboxes to serve (default: all; an empty
    list: none). ``sources`` adds sources of the caller's own (``[sources.<name>]``
    keys, servers already running). ``celery`` runs the tasks on Celery
    workers instead of the LocalExecutor. ``airflow_config`` adds or overrides
    Airflow settings as ``AIRFLOW__SECTION__KEY`` variables. ``alerts_smtp``
    (``HOST:PORT``) adds the demo's ``[alerts]`` table, mailing through that
    server (:func:`devtools.demo.demo_alerts`).
    """
    from sandbox import live

    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "airflow"
    (home / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))]:
        del env[key]
    env.pop("BALANCES_DB_URL", None)
    started_at = live.start_of_minute()
    servers = ExitStack()
    try:
        def source(name: str, url: str) -> dict:
            keys = live.live_source(name, url, schedule=schedule, shards=shards)
            keys["start_date"] = started_at
            return keys

        served, connections = start_sandboxes(servers, live.live_app, source, sandboxes)
        env.update(connections)
        if alerts_smtp is not None:
            alerts, alerts_connection = demo_alerts(alerts_smtp)
            extra_config += alerts
            env.update(alerts_connection)
        sources = {**served, **(sources or {})}
        config = workdir / "balances.toml"
        checks = demo_checks([k.split("_")[0] for k in sources])
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
        broker_url = None
        if celery is not None:
            broker_url = f"redis://127.0.0.1:{free_port()}/0"
            env.update(celery_env(celery, broker_url, env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]))
        env.update(airflow_config or {})
        if celery is not None:
            check_celery(env)
        stack = Stack(db_url=db_url, home=home, config=config, env=env, api_url=api_url,
                      password=password, sources=sources, sandboxes=servers, celery=celery,
                      broker_url=broker_url)
        stack.airflow("db", "migrate", timeout=600)
        stack.airflow("pools", "import", str(write_pools(workdir / "pools.json", POOL_SLOTS)))
    except BaseException:
        servers.close()
        raise
    return stack


_CELERY_EXECUTOR = "airflow.providers.celery.executors.celery_executor_utils"


def check_celery(env: dict[str, str]) -> None:
    """Fail at once, saying why, when the Celery provider cannot load with this Celery release.

    (apache-airflow-providers-celery 3.26.0 imports ``celery.backends.database.retry``,
    which Celery 5.7 removed: every worker would die at start.)
    """
    probe = subprocess.run([sys.executable, "-c", f"import {_CELERY_EXECUTOR}"], env=env,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        from importlib.metadata import version

        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ServeError(f"the Celery provider does not load (celery {version('celery')}, "
                         f"apache-airflow-providers-celery {version('apache-airflow-providers-celery')}): "
                         f"{last}; celery==5.6.3 works with this provider")


def celery_env(celery: CeleryWorkers, broker_url: str, metadata: str) -> dict[str, str]:
    """The settings every Airflow component needs to run tasks on Celery."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        # Task states in the metadata database (PostgreSQL), not in the broker.
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(celery.concurrency),
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": celery.queue,
        # Airflow's default, said out loud: a killed worker's task is retried
        # by the scheduler once its heartbeats stop, not redelivered by Redis.
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
    }


def _spawn(stack: Stack, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
    log = open(stack.logs / f"{name}.log", "ab")
    try:
        # Own process group: stopping it takes the workers each service forked.
        stack.processes[name] = subprocess.Popen(args, env=env or stack.env, stdout=log,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 start_new_session=True)
    finally:
        log.close()


def start_services(stack: Stack) -> None:
    if stack.celery is not None:
        start_broker(stack)
    for name in SERVICES:
        args = [sys.executable, "-m", "airflow", name]
        if name == "api-server":
            args += ["--host", "127.0.0.1", "--port", str(urlsplit(stack.api_url).port), "--workers", "1"]
        elif name in SKIP_SERVE_LOGS:
            args.append("--skip-serve-logs")
        _spawn(stack, name, args)
    if stack.celery is not None:
        for worker in stack.celery.names:
            start_worker(stack, worker)


def start_broker(stack: Stack, timeout: float = 30) -> None:
    """A private ``redis-server`` on the broker URL's port, in memory only; until it answers."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise ServeError("redis-server not found: apt-get install -y redis-server")
    port = urlsplit(stack.broker_url).port
    _spawn(stack, BROKER, [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--daemonize", "no", "--dir", str(stack.home)])
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if stack.processes[BROKER].poll() is not None or time.monotonic() > deadline:
            raise ServeError(f"redis-server did not start on port {port}; see {stack.logs / (BROKER + '.log')}")
        time.sleep(0.2)


def start_worker(stack: Stack, name: str) -> None:
    """``airflow celery worker`` named ``name`` (also to start a killed one again)."""
    celery = stack.celery
    env = dict(stack.env)
    env.update({
        WORKER_NAME_ENV: name,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
        # Every worker serves its task logs; on one machine each needs its own port.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
    })
    _spawn(stack, celery.process(name),
           [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname",
            f"{name}@{socket.gethostname()}", "--queues", celery.queue, "--concurrency",
            str(celery.concurrency), "--skip-serve-logs"], env)


def wait_ready(stack: Stack, timeout: float = 180) -> None:
    """Until the API server answers its health check (and every Celery worker a ping).

    A service that died is an error.
    """
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if stack.dead():
            raise ServeError(f"airflow {', '.join(stack.dead())} exited at start; see {stack.logs}")
        try:
            if requests.get(f"{stack.api_url}/api/v2/monitor/health", timeout=5).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"the Airflow API server did not answer within {timeout:.0f}s; see {stack.logs}")
        time.sleep(1)
    if stack.celery is not None:
        wait_workers(stack, stack.celery.names, timeout=max(10.0, deadline - time.monotonic()))


def wait_workers(stack: Stack, names, timeout: float = 120) -> None:
    """Until the Celery workers ``names`` answer a ping through the broker."""
    from celery import Celery

    app = Celery(broker=stack.broker_url)
    wanted = {f"{name}@{socket.gethostname()}" for name in names}
    deadline = time.monotonic() + timeout
    try:
        while True:
            answered = {host for reply in app.control.ping(timeout=2) for host in reply}
            if wanted <= answered:
                return
            if stack.dead():
                raise ServeError(f"airflow {', '.join(stack.dead())} exited; see {stack.logs}")
            if time.monotonic() > deadline:
                raise ServeError(f"Celery workers {sorted(wanted - answered)} did not answer within "
                                 f"{timeout:.0f}s; see {stack.logs}")
            time.sleep(1)
    finally:
        app.close()


def worker_tasks(stack: Stack, name: str, timeout: float = 2) -> set[str] | None:
    """The Celery task ids the worker ``name`` holds (running or received); None if it did not answer.

    Airflow's Celery task id is a task instance's ``external_executor_id``.
    """
    from celery import Celery

    app = Celery(broker=stack.broker_url)
    try:
        inspect = app.control.inspect(destination=[f"{name}@{socket.gethostname()}"], timeout=timeout)
        active, reserved = inspect.active(), inspect.reserved()
    finally:
        app.close()
    if active is None or reserved is None:
        return None
    return {task["id"] for tasks in (*active.values(), *reserved.values()) for task in tasks}


def kill_worker(stack: Stack, name: str, *, group_only: bool = False, timeout: float = 15) -> list[int]:
    """SIGKILL the Celery worker ``name`` and everything it started, as a lost machine would stop.

    Its process group is not enough: Airflow's task supervisor puts each task
    process in a group of its own, which would go on running orphaned. So
    the whole tree is frozen first (SIGSTOP: nothing forks while it is
    collected), then killed. With ``group_only``, only the worker's process
    group is killed (``kill -9 -<pgid>``) and the task processes live on
    (:attr:`Stack.strays` until :func:`stop`). Returns the pids killed.
    """
    process = stack.processes[stack.celery.process(name)]
    if group_only:
        below = _descendants(process.pid)
        members = {process.pid} | {pid for pid in below if _group(pid) == process.pid}
        stack.strays.update({pid: started for pid, started in below.items() if pid not in members})
        _signal_group(process, signal.SIGKILL)
        process.wait(timeout=timeout)
        return sorted(members)
    tree = _freeze_tree(process.pid)
    for pid in tree:
        _kill(pid, signal.SIGKILL)
    _signal_group(process, signal.SIGKILL)
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(tree)


def stop(stack: Stack, grace: float = 30) -> None:
    """Stop every process this stack started (their whole process trees), then the sandboxes.

    The broker goes last: workers and the scheduler talk to it while they stop.
    """
    services = {name: p for name, p in stack.processes.items() if name != BROKER}
    _stop_processes(services, grace)
    for pid, started in stack.strays.items():
        if _start_time(pid) == started:
            _kill(pid, signal.SIGKILL)
    stack.strays.clear()
    if BROKER in stack.processes:
        _stop_processes({BROKER: stack.processes[BROKER]}, grace)
    stack.sandboxes.close()


def _stop_processes(processes: dict[str, subprocess.Popen], grace: float) -> None:
    # Task processes run in process groups of their own: found now, killed
    # below if they outlive their service.
    trees = {name: _descendants(p.pid) for name, p in processes.items()}
    for process in processes.values():
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the group (task processes, gunicorn workers).
        _signal_group(process, signal.SIGKILL)
        for pid, started in trees[name].items():
            if _start_time(pid) == started:  # still that process, not a reused pid
                _kill(pid, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(process, timeout=15)


def _children() -> dict[int, list[int]]:
    """Every process's children, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow its last ")".
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> dict[int, int | None]:
    """The processes below ``pid``, each with its start time (to tell a reused pid)."""
    children = _children()
    found: dict[int, int | None] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found:
            found[child] = _start_time(child)
            todo.extend(children.get(child, []))
    return found


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _freeze_tree(pid: int) -> set[int]:
    """SIGSTOP ``pid`` and all below it until no new process appears; the pids."""
    frozen: set[int] = set()
    while True:
        tree = {pid} | set(_descendants(pid))
        new = tree - frozen
        if not new:
            return frozen
        for member in new:
            _kill(member, signal.SIGSTOP)
        frozen |= new


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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


def run_serve(db_url: str | None = None, *, until: float | None = None, alerts_smtp: str | None = None) -> int:
    """The README's ``scripts/demo --serve``: runs until Ctrl-C (or ``until`` seconds).

    ``alerts_smtp`` (``HOST:PORT``, ``--alerts-smtp``) sends the incidents'
    alerts through that SMTP server.

    Whatever it started (the cluster, if it started it; the sandboxes, the
    Airflow services, Superset) is stopped when it ends, however it ends:
    Ctrl-C, SIGTERM, a service that dies, or a part that fails to start.
    """
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # the URLs show at once, also in a log file
    # Ctrl-C, and also a SIGTERM (a service manager, `kill`) or a SIGINT that a
    # shell's background job would otherwise ignore: all stop what was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started = ExitStack()
    try:
        return _serve(started, db_url, until, alerts_smtp)
    except KeyboardInterrupt:
        print("\nCtrl-C")
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping everything started here...", flush=True)
        started.close()
        print(f"stopped at {datetime.now(timezone.utc):%H:%M:%S} UTC")


def _serve(started: ExitStack, db_url: str | None, until: float | None, alerts_smtp: str | None) -> int:
    if alerts_smtp is not None:
        demo_alerts(alerts_smtp)  # a mistake is one line before anything starts
    url = database(started, db_url)
    print(f"database: {describe_url(url)}")
    print(f"migrations: at revision {upgrade(url)}")
    workdir = DEMO_DIR / "live"
    print("starting the sandboxes and Airflow (metadata migration: about a minute the first time)...")
    stack = started.enter_context(live_stack(url, workdir, alerts_smtp=alerts_smtp))
    for name, keys in stack.sources.items():
        shards = f", {keys['shards']} shards" if keys.get("shards") else ""
        print(f"source {name}: {keys['provider']} sandbox (schedule {keys['schedule']!r}{shards})")
    print(f"pools: {', '.join(sorted({'balances_' + k['provider'] for k in stack.sources.values()}))}"
          f" ({POOL_SLOTS} slots each)")
    if alerts_smtp is not None:
        print(f"alerts: mailed through the SMTP server at {alerts_smtp} ([alerts] in {stack.config})")
    print(f"\nAirflow:  {stack.api_url}  (login {ADMIN} / {stack.password})")
    superset = _start_superset(url, workdir)
    if superset is not None:
        started.callback(superset.stop)
        print(f"Superset: {superset.url}  (login {superset.login} / {superset.password};"
              f" dashboard {superset.url}{superset.dashboard_path})")
    else:
        print("Superset: not installed (scripts/superset installs it; then run --serve again)")
    env_file = write_env(url, stack.config, {k: v for k, v in stack.env.items() if k.startswith("AIRFLOW_CONN_")
                                             and k != "AIRFLOW_CONN_BALANCES_DB"})
    print(f"sources file: {stack.config}\nenvironment: {env_file} ('. {env_file}', then the balances "
          f"command reads the live stack)\nlogs: {stack.logs}")
    print("\nrunning; press Ctrl-C to stop everything started here")
    deadline = None if until is None else time.monotonic() + until
    while deadline is None or time.monotonic() < deadline:
        time.sleep(2)
        dead = stack.dead() + (["superset"] if superset is not None and superset.process.poll() is not None else [])
        if dead:
            print(f"{', '.join(dead)} stopped; see {stack.logs}", file=sys.stderr)
            return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _start_superset(db_url: str, workdir: Path):
    """Superset serving the dashboard, if ``scripts/superset`` installed it; None if not.

    Installed but failing to start is a failure of the whole stack.
    """
    from devtools.superset import SupersetServer, venv

    if not (venv() / "bin" / "superset").exists():
        return None
    return SupersetServer.start(venv(), workdir / "superset", db_url)
