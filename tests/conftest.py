"""Shared fixtures: a real PostgreSQL database, fake providers, Airflow.

PostgreSQL: ``$BALANCES_TEST_DB_URL`` if set, else a private cluster that
the session starts in a temporary directory, the first time a test asks for
it (``database_url``), and stops at the end.
Airflow: a throwaway ``AIRFLOW_HOME`` with a SQLite metadata DB, and the
repository's ``dags/`` folder, configured before Airflow is imported.

Every test that needs a database server (PostgreSQL, or Airflow's metadata
database), or runs the project as a user would (demo, install, live
services), is marked ``database`` here at collection, from the fixtures it
asks for and its markers: ``scripts/test --unit`` runs the others (``-m
"not database"``), with ``BALANCES_TEST_UNIT`` set, under which asking for
a database fails the test instead of starting a cluster. Nothing here
starts or imports a database client until a test asks for one.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("BALANCES_TEST_SCRATCH_PID") == str(os.getpid()):
    # Imported a second time (as tests.conftest): keep the first set-up.
    _SCRATCH = Path(os.environ["BALANCES_TEST_SCRATCH"])
else:
    # Each process its own: pytest-xdist's workers (scripts/test runs four)
    # each start their own cluster and Airflow home.
    _SCRATCH = Path(tempfile.mkdtemp(prefix="balances-tests-"))
    _SCRATCH.chmod(0o755)  # as root, the cluster runs as 'postgres' and must reach its data dir
    atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
    os.environ["BALANCES_TEST_SCRATCH"] = str(_SCRATCH)
    os.environ["BALANCES_TEST_SCRATCH_PID"] = str(os.getpid())
PG_DATA = _SCRATCH / "pgdata"
os.environ["AIRFLOW_HOME"] = str(_SCRATCH / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["BALANCES_CONFIG"] = str(_SCRATCH / "balances.toml")
os.environ.pop("BALANCES_DB_URL", None)

import pytest  # noqa: E402

from pipeline.config import SourceConfig, parse_source  # noqa: E402
from sandbox.server import FakeServer  # noqa: E402

# balance_history is a view over the first two since migration 0010.
TABLES = ("balance_history_store", "balance_snapshots", "balance_latest_cache", "aggregate_balances",
          "rejected_records", "snapshot_runs", "reconciliation_breaks", "reconciliation_runs",
          "balance_movements", "rejected_movements", "movement_runs")


UNIT_ONLY = "BALANCES_TEST_UNIT"
# Fixtures that reach a database server, and markers of tests that run the
# project's services or commands as a user would (they start their own).
DATABASE_FIXTURES = {"database_url", "airflow_env"}
DATABASE_MARKERS = {"airflow", "entry_points", "services"}


def needs_database(item) -> bool:
    return bool(DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(item.get_closest_marker(m) for m in DATABASE_MARKERS))


# The slowest files first: scripts/test's workers take files in this
# order, so the long ones (a fresh clone and the demo, installs, Superset)
# start at once rather than leave one worker running them alone at the end.
SLOWEST_FIRST = ("test_entry_points.py", "test_install.py", "test_dashboard.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_database(item):
            item.add_marker(pytest.mark.database)
    # Stable: each file keeps its own order (the entry-point tests share one clone, in file order).
    items.sort(key=lambda item: SLOWEST_FIRST.index(item.path.name) if item.path.name in SLOWEST_FIRST
               else len(SLOWEST_FIRST))


@pytest.fixture(scope="session")
def database_url():
    if os.environ.get(UNIT_ONLY):
        pytest.fail("this test needs PostgreSQL, and the unit run starts none: it should be marked database")
    from devtools import devdb
    from loaders.migrate import upgrade

    url = os.environ.get("BALANCES_TEST_DB_URL")
    data_dir = None
    if not url:
        data_dir = PG_DATA
        url = devdb.start(data_dir, database="balances_test")
    upgrade(url)
    yield url
    if data_dir is not None:
        devdb.stop(data_dir)


def reset_database(conn) -> None:
    """Empty every table and drop leftover staging tables."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(t) IS NOT NULL FROM unnest(%s::text[]) t", (list(TABLES),))
        present = [t for t, ok in zip(TABLES, [r[0] for r in cur.fetchall()]) if ok]
        cur.execute(f"TRUNCATE {', '.join(present)} RESTART IDENTITY CASCADE")
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'balance_staging'")
        for (name,) in cur.fetchall():
            cur.execute(f'DROP TABLE balance_staging."{name}"')
    conn.commit()


@pytest.fixture
def db(database_url):
    """A connection to a database with every table empty."""
    from loaders.db import connect

    conn = connect(database_url)
    reset_database(conn)
    yield conn
    conn.close()


@pytest.fixture
def reader(db):
    """A login in ``balances_reader`` made as an operator makes one for Grafana (``balances reader create``)."""
    import psycopg2

    from loaders.readers import create_reader, drop_reader

    name = f"views_test_grafana_{os.getpid()}"
    password = create_reader(db, name, replace=True)
    info = db.info
    conn = psycopg2.connect(host=info.host, port=info.port, dbname=info.dbname, user=name,
                            password=password, connect_timeout=10)
    try:
        yield conn
    finally:
        conn.close()
        db.rollback()
        drop_reader(db, name)


@pytest.fixture
def serve():
    """Start fake provider apps as local HTTP servers: ``serve(app) -> FakeServer``."""
    servers: list[FakeServer] = []

    def start(app) -> FakeServer:
        server = FakeServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def with_login(url: str, user: str, password: str) -> str:
    """``url`` with another login (the test cluster checks passwords)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def make_source(name: str, **keys) -> SourceConfig:
    """A SourceConfig through the same validation as the config file."""
    keys.setdefault("backoff_base", 0.01)
    return parse_source(name, keys)


def fetch(conn, query: str, params=()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        rows = cur.fetchall()
    conn.commit()
    return rows


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def staging_tables(db) -> int:
    """Staging tables left behind: all in ``balance_staging`` but each source's newest snapshot,
    kept for its next publish (``balance_latest_cache``, migration 0011)."""
    return fetch(db, """
        SELECT count(*) FROM pg_tables t
         WHERE t.schemaname = 'balance_staging'
           AND NOT EXISTS (SELECT FROM balance_latest_cache c, generate_series(0, c.shards - 1) n
                            WHERE t.tablename = 'latest_' || c.run_id || '_shard_' || n)""")[0][0]


@pytest.fixture(scope="session")
def airflow_env(database_url):
    """Airflow's metadata DB, migrated once, and ``balances_db`` pointing at the test DB."""
    os.environ["AIRFLOW_CONN_BALANCES_DB"] = database_url
    from airflow.utils import db as airflow_db

    airflow_db.resetdb()
    yield


def write_config(text: str) -> Path:
    path = Path(os.environ["BALANCES_CONFIG"])
    path.write_text(text)
    return path


def dag_bag():
    """Parse ``dags/`` as Airflow's DAG processor does."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def load_dag(dag_id: str):
    bag = dag_bag()
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)
