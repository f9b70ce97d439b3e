"""No credential, token or signature appears in logs, errors or tables.

Every provider runs with its sandbox credentials through the real DAG (and
the CLI), once cleanly and once against a provider that echoes the request's
headers back in its error message, as some gateways do. Everything a person
could later read is then searched for every secret the fake was sent.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from devtools.demo import write_sources
from sandbox.apps import sandbox
from sandbox.server import Response
from tests.conftest import REPO, fetch, load_dag
from tests.sandboxes import PROVIDERS, SECRET_HEADERS, demo_app, start

pytestmark = pytest.mark.airflow

# The providers whose sandbox takes credentials (a mirror node needs no key: nothing to leak).
KEYED = [p for p in PROVIDERS if sandbox(p).DEMO_CONNECTION is not None]


class Echoing:
    """The sandbox, but the balances request fails with the request's headers in the message."""

    def __init__(self, app):
        self.app = app

    def __call__(self, request):
        if "token" in request.path or "Assets(" in request.path:
            return self.app(request)  # let authentication and lookups succeed
        echoed = json.dumps(request.headers)
        body = {"message": f"rejected request with headers {echoed}", "errorMessage": echoed,
                "code": "400", "errorCode": "VALIDATION", "msg": echoed}
        return Response(400, body=json.dumps(body).encode())


def everything_readable(db, capfd, caplog) -> str:
    """Logs (ours, Airflow's task logs, stdout/stderr) and every table's contents."""
    out, err = capfd.readouterr()
    parts = [out, err, caplog.text]
    for path in Path(os.environ["AIRFLOW_HOME"]).rglob("*"):
        if path.is_file() and path.suffix in (".log", ".json", ".txt", "") and path.stat().st_size < 5e6:
            parts.append(path.read_text(errors="replace"))
    tables = fetch(db, "SELECT format('%%I.%%I', schemaname, tablename) FROM pg_tables"
                       " WHERE schemaname IN ('public', 'balance_staging')")
    for (table,) in tables:
        parts += [row[0] for row in fetch(db, f"SELECT t::text FROM {table} t")]
    return "\n".join(parts)


def assert_nothing_leaked(text: str, secrets: set[str]) -> None:
    assert secrets, "the fake received no credential: the test would prove nothing"
    leaked = sorted(s for s in secrets if s in text)
    assert not leaked, f"{len(leaked)} secret(s) found, e.g. one starting {leaked[0][:3]!r}"


def _dag_run(provider, serve, app=None):
    live = start(provider, serve, app=app, name=f"{provider}_secrets", max_attempts=1,
                 schedule="*/15 * * * *", start_date=date(2023, 1, 1))
    write_sources(Path(os.environ["BALANCES_CONFIG"]), {live.source.name: live.keys})
    dag = load_dag(f"balances_{live.source.name}")
    dag_run = dag.test(logical_date=datetime.now(timezone.utc) - timedelta(minutes=16))
    return live, dag_run


@pytest.mark.parametrize("provider", KEYED)
def test_a_clean_dag_run_leaks_no_secret(airflow_env, db, serve, capfd, caplog, provider):
    caplog.set_level(logging.DEBUG)
    live, dag_run = _dag_run(provider, serve)
    assert dag_run.state == "success"
    assert {name for r in live.server.requests for name in SECRET_HEADERS if r.header(name)}
    assert_nothing_leaked(everything_readable(db, capfd, caplog), live.secrets())


@pytest.mark.parametrize("provider", KEYED)
def test_a_provider_echoing_our_headers_in_its_error_leaks_no_secret(airflow_env, db, serve, capfd, caplog,
                                                                     provider):
    caplog.set_level(logging.DEBUG)
    live, dag_run = _dag_run(provider, serve, app=Echoing(demo_app(provider)))
    assert dag_run.state == "failed"
    [(status, error)] = fetch(db, "SELECT status, error FROM snapshot_runs")
    assert status == "failed" and "***" in error  # the echo was there, and was masked
    assert_nothing_leaked(everything_readable(db, capfd, caplog), live.secrets())


@pytest.mark.parametrize("provider", KEYED)
def test_the_cli_leaks_no_secret_on_failure(database_url, db, serve, provider, tmp_path):
    live = start(provider, serve, app=Echoing(demo_app(provider)), max_attempts=1)
    config = tmp_path / "balances.toml"
    write_sources(config, {live.source.name: live.keys})
    env = {k: v for k, v in os.environ.items() if k.startswith(("AIRFLOW_CONN_", "PATH", "HOME"))}
    env.update(BALANCES_DB_URL=database_url, BALANCES_CONFIG=str(config),
               AIRFLOW_HOME=os.environ["AIRFLOW_HOME"])
    result = subprocess.run([sys.executable, "-m", "cli.main", "-v", "snapshot", live.source.name],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 1
    text = result.stdout + result.stderr + "\n".join(
        row[0] for row in fetch(db, "SELECT t::text FROM snapshot_runs t"))
    assert_nothing_leaked(text, live.secrets())
