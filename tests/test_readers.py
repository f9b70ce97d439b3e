"""Dashboard logins cannot starve the pipeline: ``balances reader create|drop``.

Each limit is shown doing its job against the real server: a login made by
the command (through the CLI, as an operator types it) is refused its
eleventh session while the pipeline still connects, its query is cancelled
at its statement_timeout, its temporary files stop at temp_file_limit, an
idle open transaction is ended, and the password is checked.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psycopg2
import psycopg2.errors
import pytest

from loaders.readers import ReaderError, ReaderLimits, create_reader, drop_reader
from tests.conftest import REPO, fetch, with_login

NAME = f"test_dashboard_{os.getpid()}"


def balances(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "BALANCES_"))}
    return subprocess.run([sys.executable, "-m", "cli.main", "--db-url", database_url, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def login(db, database_url):
    """Create the login through the CLI with small limits; ``(url, password)``; dropped after."""
    made = balances(database_url, "reader", "create", NAME, "--connections", "3", "--statement-timeout", "1",
                    "--temp-file-limit", "1MB", "--idle-timeout", "1", "--replace")
    assert made.returncode == 0, made.stderr
    password = re.search(r"^password: (\S+)$", made.stdout, re.M).group(1)
    url = re.search(r"^url: (\S+)$", made.stdout, re.M).group(1)
    assert url == with_login(database_url, NAME, password)
    yield url, password
    db.rollback()
    drop_reader(db, NAME)


def test_the_password_is_checked(login, database_url):
    url, password = login
    psycopg2.connect(url).close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(with_login(database_url, NAME, password + "x"))


def test_connections_stop_at_the_limit_and_the_pipeline_still_connects(login, database_url):
    url, _ = login
    held = [psycopg2.connect(url) for _ in range(3)]
    try:
        with pytest.raises(psycopg2.OperationalError, match="too many connections for role"):
            psycopg2.connect(url)
        psycopg2.connect(database_url).close()
    finally:
        for conn in held:
            conn.close()


def test_a_long_query_is_cancelled_and_temporary_files_are_capped(login):
    url, _ = login
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.QueryCanceled, match="statement timeout"):
            cur.execute("SELECT pg_sleep(3)")
        conn.rollback()
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.ConfigurationLimitExceeded,
                                                  match="temp_file_limit"):
            # A sort that spills far past 1 MB of temporary files (work_mem is 4 MB).
            cur.execute("SELECT md5(g::text) FROM generate_series(1, 400000) g ORDER BY 1 DESC LIMIT 1")
    finally:
        conn.close()


def test_an_idle_open_transaction_is_ended(login):
    url, _ = login
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM balance_latest")  # a transaction is now open
        time.sleep(2.5)
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


def test_readers_may_not_take_the_pipelines_connections(db, database_url):
    usable = fetch(db, "SELECT current_setting('max_connections')::int"
                       " - current_setting('superuser_reserved_connections')::int")[0][0]
    try:
        create_reader(db, NAME, ReaderLimits(connections=usable - 30), reserve=20)
        with pytest.raises(ReaderError, match="leaving fewer than 20 for the pipeline"):
            create_reader(db, NAME + "_b", ReaderLimits(connections=20), reserve=20)
        assert fetch(db, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (NAME + "_b",)) == [(0,)]
        refused = balances(database_url, "reader", "create", NAME + "_b", "--connections", "20")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert "leaving fewer than 20 for the pipeline" in refused.stderr
    finally:
        drop_reader(db, NAME)


def test_a_reader_without_a_limit_is_named_and_other_roles_are_never_dropped(db, database_url):
    from psycopg2 import sql

    with db.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE balances_reader").format(sql.Identifier(NAME + "_old")))
    db.commit()
    try:
        with pytest.raises(ReaderError, match=f"{NAME}_old have no connection limit"):
            create_reader(db, NAME, ReaderLimits())
    finally:
        drop_reader(db, NAME + "_old")
    refused = balances(database_url, "reader", "drop", "postgres")
    assert refused.returncode == 1 and "is not a reader login: not dropped" in refused.stderr
    assert fetch(db, "SELECT count(*) FROM pg_roles WHERE rolname = 'postgres'") == [(1,)]
    bad = balances(database_url, "reader", "create", "Robert'); DROP TABLE x;--")
    assert bad.returncode == 1 and "lowercase ASCII letters" in bad.stderr
