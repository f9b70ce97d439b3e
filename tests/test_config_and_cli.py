"""Config validation and the ``balances`` command, as a user meets them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from extractors.http import parse_retry_after
from extractors.redaction import redact_url, same_origin
from pipeline.config import ConfigError, load_config, parse_config, parse_source, source_from_record
from tests.conftest import REPO, fetch
from tests.sandboxes import PROVIDERS
from tests.hedera_data import T3, mirror


def test_example_config_is_valid():
    config = load_config(REPO / "config" / "balances.example.toml")
    mainnet = config.source("hedera_mainnet")
    assert mainnet.settings.account_ids == ["0.0.98", "0.0.800"]
    assert mainnet.schedule == "*/15 * * * *"
    assert mainnet.dag_id == "balances_hedera_mainnet"


@pytest.mark.parametrize("table, message", [
    ({"provider": "nope"}, "sources.s.provider: unknown provider 'nope'"),
    ({"base_url": "http://x"}, "sources.s.provider: missing"),
    ({"provider": "hedera"}, "sources.s.base_url: missing"),
    ({"provider": "hedera", "base_url": "http://x", "limit": 101}, "sources.s.limit: must be between 1 and 100"),
    ({"provider": "hedera", "base_url": "http://x", "limit": "10"}, "sources.s.limit: expected an integer"),
    ({"provider": "hedera", "base_url": "http://x", "account_ids": ["0.0.x"]}, "sources.s.account_ids"),
    ({"provider": "hedera", "base_url": "http://x", "schedule": "every day"}, "sources.s.schedule"),
    ({"provider": "hedera", "base_url": "http://x", "colour": "red"}, "sources.s.colour: unknown key"),
    ({"provider": "hedera", "base_url": "http://x", "max_rejected": -1}, "sources.s.max_rejected"),
])
def test_config_errors_name_the_source_and_field(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"sources": {"s": table}})
    assert message in str(caught.value)


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_redaction_masks_secrets_but_keeps_the_link_text():
    url = "https://user:pw@h.example/api/v1/balances?account.id=lt:0.0.7&api_key=abc&token=t"
    assert redact_url(url) == "https://***@h.example/api/v1/balances?account.id=lt:0.0.7&api_key=***&token=***"
    assert same_origin("http://a:80/x", "http://a/y") and not same_origin("http://a/x", "https://a/x")


def run_cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)


def test_cli_snapshot_prints_the_summary_and_exits_zero(database_url, db, serve, tmp_path):
    server = serve(mirror())
    config = tmp_path / "sources.toml"
    config.write_text(f'[sources.cli_hedera]\nprovider = "hedera"\nbase_url = "{server.url}"\n')
    result = run_cli("--config", str(config), "snapshot", "cli_hedera", "--at", "2023-11-14T23:00:00Z",
                     env={"BALANCES_DB_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert "status: published" in result.stdout and T3 in result.stdout
    assert fetch(db, "SELECT count(DISTINCT as_of_raw) FROM balance_history") == [(1,)]


def test_cli_failures_are_one_line_with_a_nonzero_exit(database_url, tmp_path):
    config = tmp_path / "sources.toml"
    config.write_text('[sources.down]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\nmax_attempts = 1\n')
    result = run_cli("--config", str(config), "snapshot", "down", env={"BALANCES_DB_URL": database_url})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "ConnectionError" in result.stderr

    config.write_text('[sources.bad]\nprovider = "hedera"\n')
    result = run_cli("--config", str(config), "snapshot", "bad", env={"BALANCES_DB_URL": database_url})
    assert result.returncode == 2 and "sources.bad.base_url: missing" in result.stderr

    result = run_cli("--config", str(Path(tmp_path) / "missing.toml"), "snapshot", "x")
    assert result.returncode == 2 and "does not exist" in result.stderr

    wrong = database_url.replace("postgres@", "nobody:wrong@")
    result = run_cli("migrate", env={"BALANCES_DB_URL": wrong})
    assert result.returncode == 1 and "wrong" not in result.stderr.replace("nobody", "")
    assert result.stderr.startswith("balances: ")


def test_migrate_is_safe_to_repeat(database_url):
    first = run_cli("migrate", env={"BALANCES_DB_URL": database_url})
    second = run_cli("migrate", env={"BALANCES_DB_URL": database_url})
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout and "revision" in first.stdout


def test_migrations_upgrade_an_existing_database_in_place(database_url, tmp_path):
    from loaders.db import connect
    from loaders.migrate import head_revision, upgrade
    import psycopg2

    admin = psycopg2.connect(database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS balances_upgrade")
        cur.execute("CREATE DATABASE balances_upgrade")
    admin.close()
    url = database_url.rsplit("/", 1)[0] + "/balances_upgrade"
    assert upgrade(url, "0001") == "0001"
    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO snapshot_runs (source, provider, scheduled_for, status)"
                    " VALUES ('old', 'hedera', now(), 'published')")
    conn.commit()
    assert upgrade(url) == head_revision()
    assert fetch(conn, "SELECT source FROM snapshot_runs") == [("old",)]
    conn.close()


def _empty_database(database_url: str) -> str:
    """A database on the test server with no tables at all."""
    import psycopg2

    admin = psycopg2.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS balances_unmigrated")
        cur.execute("CREATE DATABASE balances_unmigrated")
    admin.close()
    return database_url.rsplit("/", 1)[0] + "/balances_unmigrated"


@pytest.mark.parametrize("case, exit_code, says", [
    ("malformed config", 2, "config error"),
    ("unknown provider", 2, "sources.s.provider: unknown provider 'nope'"),
    ("database unreachable", 1, "cannot connect to the balances database"),
    # The test cluster trusts local users, so a wrong login stands in for a wrong password.
    ("wrong credentials", 1, 'role "nobody" does not exist'),
    ("migrations missing", 1, "run 'balances migrate' first"),
])
def test_config_and_database_errors_are_one_clear_line(database_url, tmp_path, case, exit_code, says):
    config = tmp_path / "sources.toml"
    config.write_text('[sources.s]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n')
    url = database_url
    if case == "malformed config":
        config.write_text('[sources.s]\nprovider = "hedera\n')
    elif case == "unknown provider":
        config.write_text('[sources.s]\nprovider = "nope"\n')
    elif case == "database unreachable":
        url = "postgresql://postgres@127.0.0.1:9/balances"
    elif case == "wrong credentials":
        url = database_url.replace("postgres@", "nobody:s3cret-pw@")
    elif case == "migrations missing":
        url = _empty_database(database_url)
    result = run_cli("--config", str(config), "snapshot", "s", env={"BALANCES_DB_URL": url})
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("balances: ")
    assert says in result.stderr
    assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr


# --- a run keeps the configuration it was begun with ----------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_sources_kept_record_reads_back_as_the_same_source_and_names_no_secret(provider):
    from sandbox.apps import sandbox

    keys = dict(sandbox(provider).demo_source("https://node.example/api"))
    source = parse_config({"sources": {"kept": keys}}).source("kept")
    record = json.loads(json.dumps(source.record()))  # as snapshot_runs.config holds it
    assert source_from_record("kept", record) == source
    # Every key resolved, the defaults too; a Connection is named, never opened.
    assert record["task_timeout"] == source.task_timeout and record["max_attempts"] == source.retry.max_attempts
    assert record.get("conn_id") == keys.get("conn_id")
    demo = sandbox(provider).DEMO_CONNECTION
    if demo is not None:
        secrets = {value for value in (urlsplit(demo[1]).username, urlsplit(demo[1]).password) if value}
        assert secrets and not any(secret in json.dumps(record) for secret in secrets)


def test_a_url_carrying_a_password_is_refused_as_it_would_be_kept_with_every_run():
    with pytest.raises(ConfigError, match=r"sources.s.base_url: 'https://\*\*\*@h.example' carries a user or"
                                          r" password: put credentials in the source's Connection"):
        parse_config({"sources": {"s": {"provider": "hedera", "base_url": "https://me:s3cret@h.example"}}})


def test_runs_lists_a_sources_runs_and_shows_the_configuration_a_run_used(db, database_url, serve, tmp_path,
                                                                          monkeypatch, capsys):
    from pipeline.cli import main

    server = serve(mirror())
    config = tmp_path / "sources.toml"
    config.write_text(f'[sources.cli_kept]\nprovider = "hedera"\nbase_url = "{server.url}"\nlimit = 25\n'
                      f'[sources.cli_other]\nprovider = "hedera"\nbase_url = "{server.url}"\n')
    monkeypatch.setenv("BALANCES_DB_URL", database_url)
    for source in ("cli_kept", "cli_other"):
        assert main(["--config", str(config), "snapshot", source, "--at", "2023-11-14T23:00:00Z"]) == 0
    capsys.readouterr()
    # The file changes after the run: the run still shows what it ran with.
    config.write_text(config.read_text().replace("limit = 25", "limit = 50"))
    for args in (["runs", "cli_kept"], ["runs", "--source", "cli_kept"]):
        assert main(args) == 0
        listed = capsys.readouterr().out
        assert " cli_kept " in listed and "cli_other" not in listed
    assert main(["runs", "cli_kept", "--show", "1"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# run 1 of cli_kept: published, scheduled for 2023-11-14T23:00:00+00:00\n")
    table = tomllib.loads(shown)["sources"]["cli_kept"]
    assert parse_source("cli_kept", table) == parse_config(
        {"sources": {"cli_kept": {"provider": "hedera", "base_url": server.url, "limit": 25}}}).source("cli_kept")
    assert table["limit"] == 25 and table["start_date"] == datetime(2024, 1, 1, tzinfo=timezone.utc)
    # A run of another source, two sources at once: refused with one line.
    assert main(["runs", "cli_kept", "--show", "2"]) == 1
    assert capsys.readouterr().err == "balances: run 2 is a run of cli_other, not of cli_kept\n"
    assert main(["runs", "cli_kept", "--source", "cli_other"]) == 2
    assert "two sources given" in capsys.readouterr().err


# --- times outside 1970..9999 UTC --------------------------------------------------------------


@pytest.mark.parametrize("at", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00",
                                "1969-12-31T23:59:59Z", "1970-01-01T00:30:00+01:00"])
def test_a_time_outside_1970_to_9999_utc_is_refused_before_any_work(db, database_url, tmp_path, at):
    config = tmp_path / "sources.toml"
    config.write_text('[sources.s]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\nmax_attempts = 1\n')
    result = run_cli("--config", str(config), "snapshot", "s", "--at", at, env={"BALANCES_DB_URL": database_url})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].endswith(f"argument --at: {at.replace('Z', '+00:00')} is outside "
                                                   "1970-01-01 to 9999-12-31 in UTC")
    assert fetch(db, "SELECT count(*) FROM snapshot_runs") == [(0,)]
    result = run_cli("reconcile", "--from", at, env={"BALANCES_DB_URL": database_url})
    assert result.returncode == 2 and "argument --from" in result.stderr
    # Its edges, once in UTC, are times.
    from pipeline.cli import _aware_time

    assert _aware_time("1969-12-31T23:00:00-01:00") == datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert _aware_time("9999-12-31T23:59:59Z").year == 9999


@pytest.mark.parametrize("start_date", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "0001-01-01",
                                        "1969-12-31T23:59:59Z"])
def test_a_time_in_the_config_outside_1970_to_9999_utc_is_a_config_error(tmp_path, start_date):
    config = tmp_path / "sources.toml"
    config.write_text(f'[sources.s]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\nstart_date = {start_date}\n')
    result = run_cli("--config", str(config), "snapshot", "s")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("balances: config error: sources.s.start_date: ")
    assert result.stderr.rstrip().endswith("is outside 1970-01-01 to 9999-12-31 in UTC")
    assert result.stderr.count("\n") == 1
