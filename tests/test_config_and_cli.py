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
from pipeline.config import (PRESET_INTERVALS, ConfigError, cron_of, load_config, parse_config, parse_source,
                             schedule_interval, schedule_times, source_from_record)
from tests.conftest import REPO, fetch, with_login
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
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
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
    assert result.stderr == ("balances: sources.down: connection refused by base_url http://127.0.0.1:9 "
                             "(nothing listens on port 9)\n")

    config.write_text('[sources.bad]\nprovider = "hedera"\n')
    result = run_cli("--config", str(config), "snapshot", "bad", env={"BALANCES_DB_URL": database_url})
    assert result.returncode == 2 and "sources.bad.base_url: missing" in result.stderr

    result = run_cli("--config", str(Path(tmp_path) / "missing.toml"), "snapshot", "x")
    assert result.returncode == 2 and "does not exist" in result.stderr

    wrong = with_login(database_url, "nobody", "wrong")
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
    ("wrong credentials", 1, 'password authentication failed for user "postgres"'),
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
    elif case == "wrong credentials":  # the test cluster checks passwords (SCRAM), as production does
        url = with_login(database_url, "postgres", "s3cret-pw")
    elif case == "migrations missing":
        url = _empty_database(database_url)
    result = run_cli("--config", str(config), "snapshot", "s", env={"BALANCES_DB_URL": url})
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("balances: ")
    assert says in result.stderr
    assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr


@pytest.mark.parametrize("preset", sorted(PRESET_INTERVALS))
def test_a_presets_interval_is_the_one_its_cron_fires_at(preset):
    for start in (datetime(2024, 1, 1, tzinfo=timezone.utc), datetime(1999, 3, 15, 7, 30, tzinfo=timezone.utc),
                  datetime(2100, 11, 30, 23, 59, tzinfo=timezone.utc)):
        times = schedule_times(cron_of(preset), start)
        assert min(b - a for a, b in zip(times, times[1:])) == PRESET_INTERVALS[preset]
        assert schedule_interval(preset, start, "s.schedule") == PRESET_INTERVALS[preset]


def test_a_file_of_presets_is_read_without_cron_arithmetic(tmp_path):
    config = tmp_path / "sources.toml"
    config.write_text('[sources.a]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n'  # the default, @hourly
                      '[sources.b]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\nschedule = "@daily"\n')
    probe = ("import sys; from pipeline.config import load_config; c = load_config(sys.argv[1]);"
             " print(c.source('a').task_timeout, c.source('b').task_timeout, 'croniter' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3600.0", "21600.0", "False"]  # task timeouts: an hour, six (the cap)


# -- the CLI a user reaches for (check, sources, latest, runs, options anywhere) --

def hedera_file(tmp_path, url: str, extra: str = "") -> Path:
    config = tmp_path / "sources.toml"
    config.write_text(f'[sources.cli_hedera]\nprovider = "hedera"\nbase_url = "{url}"\n'
                      f'schedule = "*/15 * * * *"\nstart_date = 2023-01-01\n{extra}')
    return config


def test_global_options_work_before_and_after_the_subcommand(database_url, db, serve, tmp_path):
    server = serve(mirror())
    config = hedera_file(tmp_path, server.url)
    after = run_cli("snapshot", "cli_hedera", "--at", "2023-11-14T23:00:00Z", "--config", str(config),
                    "--db-url", database_url, "--quiet")
    assert after.returncode == 0, after.stderr
    assert after.stderr == ""  # --quiet: no progress lines
    before = run_cli("--config", str(config), "--db-url", database_url, "runs", "cli_hedera")
    mixed = run_cli("--db-url", database_url, "runs", "--config", str(config), "cli_hedera")
    assert before.returncode == mixed.returncode == 0, before.stderr + mixed.stderr
    assert before.stdout == mixed.stdout and "published" in before.stdout


def test_did_you_mean_for_keys_and_sources_with_every_known_key(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_config({"sources": {"s": {"provider": "hedera", "base_url": "http://x", "schedul": "@daily"}}})
    message = str(caught.value)
    assert "sources.s.schedul: unknown key (did you mean 'schedule'?)" in message
    known = message.split("(known: ")[1]
    for key in ("schedule", "base_url", "max_attempts", "request_deadline", "account_ids", "shards"):
        assert key in known  # shared keys and the provider's own
    config = hedera_file(tmp_path, "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"no source named 'cli_hedra' .*\(did you mean 'cli_hedera'\?\)"):
        load_config(config).source("cli_hedra")
    with pytest.raises(ConfigError, match=r"unknown provider 'hedra' \(did you mean 'hedera'\?\)"):
        parse_config({"sources": {"s": {"provider": "hedra"}}})


def test_runs_shows_as_of_and_duration_and_refuses_unknown_sources(database_url, db, serve, tmp_path):
    server = serve(mirror())
    config = hedera_file(tmp_path, server.url)
    assert run_cli("--config", str(config), "--db-url", database_url, "snapshot", "cli_hedera",
                   "--at", "2023-11-14T23:00:00Z").returncode == 0
    listed = run_cli("--config", str(config), "--db-url", database_url, "runs")
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["run", "source", "status", "scheduled_for", "as_of", "took", "rows",
                              "rows_inserted", "rejected", "error"]
    as_of = fetch(db, "SELECT as_of FROM snapshot_runs")[0][0]
    assert as_of.isoformat() in row and (" ms " in row or " s " in row)
    unknown = run_cli("--config", str(config), "--db-url", database_url, "runs", "cli_hedra")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "balances: config error: no source named 'cli_hedra' (did you mean 'cli_hedera'?)" in unknown.stderr
    # A source no longer configured but with runs in the database is still listed.
    gone = tmp_path / "empty.toml"
    gone.write_text("")
    kept = run_cli("--config", str(gone), "--db-url", database_url, "runs", "cli_hedera")
    assert kept.returncode == 0 and "cli_hedera" in kept.stdout


def test_latest_prints_the_exact_balances_and_csv(database_url, db, serve, tmp_path):
    import csv
    import io
    from decimal import Decimal

    server = serve(mirror())
    config = hedera_file(tmp_path, server.url)
    env = {"BALANCES_DB_URL": database_url}
    assert run_cli("--config", str(config), "snapshot", "cli_hedera", "--at", "2023-11-14T23:00:00Z",
                   env=env).returncode == 0
    stored = fetch(db, "SELECT account, asset, balance FROM balances_latest WHERE source = 'cli_hedera'"
                       " ORDER BY balance DESC LIMIT 1")[0]
    table = run_cli("--config", str(config), "latest", "cli_hedera", "--account", stored[0], env=env)
    assert table.returncode == 0, table.stderr
    assert str(stored[2]) in table.stdout  # exact, however large
    exported = run_cli("--config", str(config), "latest", "cli_hedera", "--csv", env=env)
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    by_key = {(r["account"], r["asset"]): Decimal(r["balance"]) for r in rows}
    assert by_key == {(a, x): b for a, x, b in fetch(
        db, "SELECT account, asset, balance FROM balances_latest WHERE source = 'cli_hedera'")}
    missing = run_cli("--config", str(config), "latest", "cli_hedera", "--account", "0.0.999999999", env=env)
    assert missing.returncode == 1 and "no published snapshot holds account '0.0.999999999'" in missing.stderr


def test_csv_guards_text_cells_a_spreadsheet_would_run_but_keeps_amounts():
    import csv
    import io

    from cli.terminal import write_csv

    out = io.StringIO()
    write_csv(("account", "asset", "balance"), [("=HYPERLINK(\"x\")", "@SUM", -5), ("users:1", "USD/2", 7)],
              text_columns=("account", "asset"), out=out)
    assert list(csv.reader(io.StringIO(out.getvalue()))) == [
        ["account", "asset", "balance"], ["'=HYPERLINK(\"x\")", "'@SUM", "-5"], ["users:1", "USD/2", "7"]]


def test_check_validates_every_table_and_connect_reaches_each_source_creating_nothing(
        database_url, db, serve, tmp_path):
    server = serve(mirror())
    config = hedera_file(tmp_path, server.url)
    env = {"BALANCES_DB_URL": database_url}
    plain = run_cli("--config", str(config), "check", env=env)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "ok     source cli_hedera (hedera, schedule */15 * * * *)" in plain.stdout
    assert len(server.requests) == 0  # without --connect nothing is reached
    reached = run_cli("--config", str(config), "check", "--connect", env=env)
    assert reached.returncode == 0, reached.stdout + reached.stderr
    assert "ok     source cli_hedera (hedera): latest snapshot " in reached.stdout
    assert "ok     database postgresql://postgres@" in reached.stdout and "(up to date)" in reached.stdout
    assert len(server.requests) == 1  # one request per source
    assert fetch(db, "SELECT count(*) FROM snapshot_runs") == [(0,)]  # and nothing created

    config.write_text(config.read_text() + '\n[sources.lost]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n'
                      'max_attempts = 1\n')
    down = run_cli("--config", str(config), "check", "--connect", env=env)
    assert down.returncode == 1
    assert "FAILED source lost (hedera): TransportError: connection refused by base_url http://127.0.0.1:9" in down.stdout
    config.write_text(config.read_text() + '\n[sources.typo]\nprovider = "hedera"\nbase_url = "http://x"\nlimt = 5\n')
    wrong = run_cli("--config", str(config), "check", env=env)
    assert wrong.returncode == 2 and "error  sources.typo.limt: unknown key (did you mean 'limit'?)" in wrong.stdout


def test_sources_lists_each_source_with_its_schedule_and_next_run(tmp_path):
    config = hedera_file(tmp_path, "http://127.0.0.1:9")
    listed = run_cli("--config", str(config), "sources")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["source", "provider", "schedule", "next_run", "shards", "history", "conn_id", "dag_id"]
    assert row.startswith("cli_hedera") and "*/15 * * * *" in row and "balances_cli_hedera" in row
    next_run = datetime.fromisoformat(row.split()[7])  # after the five fields of the schedule
    assert next_run.minute % 15 == 0 and next_run > datetime.now(timezone.utc)


@pytest.mark.parametrize("seconds, text", [
    (0.04, "40 ms"), (1.5, "1.5 s"), (59.9, "59 s"), (125, "2 min 5 s"), (10_799.9, "2 h 59 min"),
    (86_400, "1 d"), (1125 * 86_400 + 10_799.876544, "1125 d 2 h"),
])
def test_durations_are_written_as_people_write_them(seconds, text):
    from extractors.text import human_duration

    assert human_duration(seconds) == text


def test_network_errors_name_the_cause_and_the_key_and_dns_is_not_retried(serve):

    from extractors.errors import TransportError
    from extractors.http import HttpClient, RetryPolicy
    from sandbox.server import Fault

    policy = RetryPolicy(max_attempts=3, backoff_base=0.001, read_timeout=0.3)

    def failure(url: str, key: str = "base_url") -> tuple[TransportError, int]:
        client = HttpClient(url, policy=policy, url_key=key)
        with pytest.raises(TransportError) as caught:
            client.get_json("/api/v1/balances")
        return caught.value, client.stats.requests

    error, requests = failure("http://nosuch-host.invalid", "rpc_url")
    assert str(error) == "cannot resolve host 'nosuch-host.invalid' (DNS): check rpc_url http://nosuch-host.invalid"
    assert not error.retriable and requests == 1
    error, requests = failure("http://127.0.0.1:9")
    assert "connection refused by base_url http://127.0.0.1:9" in str(error) and requests == 3
    plain = serve(mirror())  # https to a plain-HTTP port: the handshake fails
    error, requests = failure(plain.url.replace("http://", "https://"))
    assert str(error).startswith(f"TLS error talking to base_url https://127.0.0.1:{plain.port}")
    assert not error.retriable and requests == 1
    plain.inject(Fault("delay", times=3, path="/api/v1/balances", seconds=2))
    error, requests = failure(plain.url)
    assert "timed out waiting for base_url" in str(error) and "(read_timeout)" in str(error) and requests == 3


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
    from cli.main import main

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
    from cli.main import aware_time

    assert aware_time("1969-12-31T23:00:00-01:00") == datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert aware_time("9999-12-31T23:59:59Z").year == 9999


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
