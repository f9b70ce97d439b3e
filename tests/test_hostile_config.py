"""Hostile configuration: what a careless operator can put in the sources file or pass to the CLI.

Each row of issue 17 that is about configuration is a test here, run
through the real CLI (``cli.main.main``) and a real Airflow DagBag: a
mistake is one line, exit 2, before any work; the DAG files build every
valid source and report the broken ones as an import error; reports never
write through a symlink.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciliation.checks import MAX_FIRE_TIMES, fire_times, load_checks, parse_duration
from cli.main import main
from pipeline.config import MAX_SHARDS, ConfigError, build_settings, load_config
from tests.conftest import dag_bag, fetch, write_config

GOOD = '''
[sources.good]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "*/15 * * * *"
'''

# (key = value written in the file, the start of the one-line error)
HOSTILE = [
    ("task_retry_delay = inf", "task_retry_delay: expected a finite number, got inf"),
    ("task_retry_delay = nan", "task_retry_delay: expected a finite number, got nan"),
    ("read_timeout = -1", "read_timeout: must be more than 0 and at most 3600 (seconds), got -1"),
    ('base_url = "file:///etc/passwd"', "base_url: 'file:///etc/passwd' is not an http:// or https:// URL"),
    ('base_url = "http:///no-host"', "base_url: 'http:///no-host' is not an http:// or https:// URL"),
    ("shards = 3000000000", f"shards: must be at least 1 and at most {MAX_SHARDS}, got 3000000000"),
    ("backoff_base = nan", "backoff_base: expected a finite number, got nan"),
    ('schedule = "* * * * * *"', "schedule: '* * * * * *' is neither a preset such as @hourly nor a five-field cron"),
    ('schedule = "0 0 31 2 *"', "schedule: '0 0 31 2 *' never fires, or fires less often than once a year"),
    ('schedule = "１ * * * *"', "schedule: '１ * * * *' is not a cron expression"),
    ("start_date = 0001-01-01", "start_date: 0001-01-01T00:00:00+00:00 is outside 1970-01-01 to 9999-12-31 in UTC"),
    ("task_timeout = 1e12", "task_timeout: must be at least 10 and at most 604800 (seconds)"),
    ("max_pages = -5", "max_pages: must be at least 1"),
    ("limit = 9999999999", "limit: must be at least 0 and at most 2147483647"),
]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    # main() points logging at the stderr of this call; drop that handler
    # afterwards, or a later test would log into a closed capture.
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        code = main(list(args))
    finally:
        root.handlers[:] = handlers
    out, err = capsys.readouterr()
    return code, out, err


def one_config_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("balances: config error: "), err
    assert "unexpected" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("line, error", HOSTILE, ids=[line.split(" =")[0] + ":" + line.split("= ")[1]
                                                       for line, _ in HOSTILE])
def test_cli_refuses_each_hostile_value_in_one_line_exit_2(capsys, tmp_path, line, error):
    config = tmp_path / "sources.toml"
    config.write_text(GOOD + f'\n[sources.bad]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n{line}\n'
                      .replace('base_url = "http://127.0.0.1:9"\nbase_url', "base_url"))
    # No database is configured: exit 2 shows the error came before any work.
    code, _, err = cli(capsys, "--config", str(config), "snapshot", "bad")
    assert f"sources.bad.{error}" in one_config_error(code, err)


def hostile_file() -> str:
    """The good source and check beside one broken source per hostile value, and broken checks."""
    text = GOOD
    for i, (line, _) in enumerate(HOSTILE):
        text += f'\n[sources.bad{i}]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n{line}\n'
    text = text.replace('base_url = "http://127.0.0.1:9"\nbase_url', "base_url")
    text += '\n[sources."bad\\n"]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n'
    text += '\n[checks.good_gaps]\nkind = "continuity"\nsource = "good"\n'
    text += '\n[checks.bad_gaps]\nkind = "continuity"\nsource = "bad0"\n'
    text += '\n[checks.bad_skew]\nkind = "pair"\nmax_skew = "99999999999999d"\n' \
            'left = { source = "good", account = "a", asset = "X" }\n' \
            'right = { source = "good", account = "b", asset = "X" }\n'
    text += '\n[alerts]\nsmtp_conn_id = "smtp"\nto = ["ops@example.com"]\ncolour = "red"\n'
    return text


# No capsys here: Airflow binds its log handler to the stderr of the test
# that first imports it, and capsys closes its stream after the test.
def test_dag_file_builds_every_valid_source_and_reports_each_broken_one():
    """What the CLI refuses the DAG file refuses, source by source; the rest keep their DAGs."""
    path = write_config(hostile_file())
    bag = dag_bag()
    ours = sorted(d for d in bag.dags if d.startswith(("balances_", "reconcile_")))
    assert ours == ["balances_good", "reconcile_balances"]
    errors = {Path(f).name: e for f, e in bag.import_errors.items()}
    assert sorted(errors) == ["balance_reconciliation.py", "balance_snapshots.py"]
    for i, (_, error) in enumerate(HOSTILE):
        assert f"sources.bad{i}.{error}" in errors["balance_snapshots.py"]
    assert "sources.'bad\\n': names in [sources] are 1 to 63 lowercase ASCII letters" in errors["balance_snapshots.py"]
    assert "checks.bad_gaps.source: source 'bad0' has a mistake" in errors["balance_reconciliation.py"]
    assert "checks.bad_skew.max_skew: '99999999999999d' is not a duration" in errors["balance_reconciliation.py"]
    assert "alerts.colour: unknown key" in errors["balance_reconciliation.py"]
    assert "alerts" not in errors["balance_snapshots.py"]
    # The good check still runs, on the good source's Asset.
    assert "balances://snapshots/good" in str(bag.dags["reconcile_balances"].timetable.asset_condition)

    # The CLI reads the file the same way: the same sources, the same errors.
    config = load_config(path)
    assert sorted(config.sources) == ["good"]
    for name, error in config.errors.items():
        assert error in errors["balance_snapshots.py"]
    assert len(config.errors) == len(HOSTILE) + 1


def test_cli_names_a_broken_source_name_or_check_in_one_line(capsys, tmp_path):
    path = tmp_path / "sources.toml"
    path.write_text(hostile_file())
    code, _, err = cli(capsys, "--config", str(path), "snapshot", "bad\n")
    assert "sources.'bad\\n': names in [sources]" in one_config_error(code, err)
    code, _, err = cli(capsys, "--config", str(path), "reconcile", "--check", "bad_gaps")
    assert "checks.bad_gaps.source: source 'bad0' has a mistake" in one_config_error(code, err)


def test_cli_check_lists_a_check_and_alerts_mistake_one_line_each_and_exits_2(capsys, tmp_path):
    path = tmp_path / "sources.toml"
    path.write_text(GOOD + '\n[checks.totals]\nkind = "aggregate"\nsource = "good"\ncolour = "red"\n'
                           '\n[alerts]\nslack_conn_id = "slack_alerts"\nflap_window = "5 minutes"\n')
    code, out, _ = cli(capsys, "--config", str(path), "check")
    assert code == 2
    assert "  error  checks.totals.colour: unknown key for a aggregate check (known: abs_tolerance, assets, kind," \
           " source)\n" in out
    assert "  error  alerts.flap_window: '5 minutes' is not a duration such as 90s, 15m, 1h or 2d\n" in out
    code, _, err = cli(capsys, "--config", str(path), "reconcile")
    assert err == "balances: config error: checks.totals.colour: unknown key for a aggregate check (known:" \
                  " abs_tolerance, assets, kind, source)\n"
    assert code == 2


def test_every_task_has_an_execution_timeout_derived_from_the_schedule(tmp_path):
    write_config(GOOD + '''
[sources.minutely]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "* * * * *"

[sources.daily]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "@daily"

[sources.manual]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "none"

[sources.tuned]
provider = "hedera"
base_url = "http://127.0.0.1:9"
schedule = "*/15 * * * *"
task_timeout = 120

[checks.gaps]
kind = "continuity"
source = "good"
''')
    bag = dag_bag()
    assert bag.import_errors == {}
    expected = {"good": timedelta(minutes=15), "minutely": timedelta(minutes=10), "daily": timedelta(hours=6),
                "manual": timedelta(hours=6), "tuned": timedelta(minutes=2)}
    for name, timeout in expected.items():
        dag = bag.dags[f"balances_{name}"]
        assert {t.task_id: t.execution_timeout for t in dag.tasks} == {
            t: timeout for t in ("begin_run", "plan_shards", "crawl_snapshot", "publish_snapshot", "plan_movements",
                                 "crawl_movements", "publish_movements")}
    reconcile = bag.dags["reconcile_balances"]
    assert [t.execution_timeout for t in reconcile.tasks] == [timedelta(hours=1)]


def test_config_path_that_is_a_directory_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BALANCES_CONFIG", str(tmp_path))
    code, _, err = cli(capsys, "snapshot", "x")
    assert f"config file {tmp_path} is a directory" in one_config_error(code, err)
    code, _, err = cli(capsys, "--config", "/dev/null/x", "snapshot", "x")
    assert "cannot be read" in one_config_error(code, err) or "does not exist" in err


@pytest.mark.parametrize("duration", ["99999999999999d", "367d", "1e3d", "１h", "1h\n30m"])
def test_oversized_or_foreign_duration_is_one_line_exit_2(capsys, tmp_path, duration):
    config = tmp_path / "sources.toml"
    config.write_text(GOOD + f'\n[checks.gaps]\nkind = "continuity"\nsource = "good"\n'
                             f"max_staleness = {json.dumps(duration)}\n")
    code, _, err = cli(capsys, "--config", str(config), "reconcile")
    assert "checks.gaps.max_staleness:" in one_config_error(code, err)


@pytest.mark.parametrize("value", ['"NaN"', '"Infinity"', '"1e999999999"', '"1e40"', '"１"', "0.5"])
def test_tolerances_are_finite_bounded_ascii_decimals(capsys, tmp_path, value):
    config = tmp_path / "sources.toml"
    config.write_text(GOOD + '\n[checks.pair]\nkind = "pair"\nmax_skew = "1h"\n'
                             'left = { source = "good", account = "a", asset = "X" }\n'
                             'right = { source = "good", account = "b", asset = "X" }\n'
                             f'abs_tolerance = {value}\n')
    code, _, err = cli(capsys, "--config", str(config), "reconcile")
    assert "checks.pair.abs_tolerance:" in one_config_error(code, err)


def test_durations_are_bounded_and_ascii():
    assert parse_duration("366d") == timedelta(days=366)
    for text in ("367d", "99999999999999d", "１h", "1h\n1m", "1h1h1h1h1h"):
        with pytest.raises(ValueError):
            parse_duration(text)


def test_a_tight_schedule_cannot_flood_the_gap_breaks(db, capsys, tmp_path, monkeypatch, database_url):
    """The every-second schedule wrote 259,201 gap breaks in 3 days; every minute is the tightest now."""
    start = datetime(2024, 3, 1, tzinfo=timezone.utc)
    assert len(fire_times("* * * * *", start, start + timedelta(days=3))) == 3 * 24 * 60 + 1

    config = tmp_path / "sources.toml"
    config.write_text('[sources.minutely]\nprovider = "hedera"\nbase_url = "http://127.0.0.1:9"\n'
                      'schedule = "* * * * *"\nstart_date = 2024-01-01\n'
                      '[checks.gaps]\nkind = "continuity"\nsource = "minutely"\n')
    monkeypatch.setenv("BALANCES_DB_URL", database_url)
    window = ("--from", start.isoformat(), "--to", (start + timedelta(days=3)).isoformat())
    code, out, err = cli(capsys, "--config", str(config), "reconcile", *window)
    assert code == 0, err
    # Every scheduled run but the newest (still on its way until the next is due).
    assert fetch(db, "SELECT count(*) FROM reconciliation_breaks WHERE kind = 'gap'") == [(3 * 24 * 60,)]
    # A window the schedule would fill with more runs than a check looks at: one line, nothing stored.
    code, _, err = cli(capsys, "--config", str(config), "reconcile", "--from", start.isoformat(),
                       "--to", (start + timedelta(minutes=MAX_FIRE_TIMES)).isoformat())
    assert code == 1 and err.count("\n") == 1 and f"more than {MAX_FIRE_TIMES} runs" in err
    assert "unexpected" not in err
    assert fetch(db, "SELECT count(*) FROM reconciliation_breaks") == [(3 * 24 * 60,)]
    assert load_checks(load_config(config))["gaps"].max_staleness == timedelta(minutes=2)


def test_report_out_at_a_file_is_one_line_and_leaves_the_file(capsys, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code, _, err = cli(capsys, "report", "--out", str(existing))
    assert code == 1 and err.count("\n") == 1 and "exists and is not a directory" in err
    assert "unexpected" not in err and existing.read_text() == "keep me"
    code, _, err = cli(capsys, "report", "--out", str(existing / "sub"))
    assert code == 1 and err.count("\n") == 1 and "unexpected" not in err
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, _, err = cli(capsys, "report", "--out", str(dangling))
    assert code == 1 and "broken symlink" in err and not (tmp_path / "nowhere").exists()


def test_report_replaces_a_symlink_instead_of_writing_through_it(db, capsys, tmp_path, monkeypatch, database_url):
    monkeypatch.setenv("BALANCES_DB_URL", database_url)
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("not a report")
    (out / "report.md").symlink_to(target)
    (out / "report.html").symlink_to(tmp_path / "missing.html")  # dangling: must not be created
    code, stdout, err = cli(capsys, "report", "--out", str(out))
    assert code == 0, err
    assert target.read_text() == "not a report" and not (tmp_path / "missing.html").exists()
    for name in ("report.md", "report.html"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert "open break(s)." in (out / "report.md").read_text()
    # Written through a temporary file and renamed: none is left behind.
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert stdout.split() == [str(out / "report.html"), str(out / "report.md")]


def test_report_into_a_directory_named_report_md_is_one_line(db, capsys, tmp_path, monkeypatch, database_url):
    monkeypatch.setenv("BALANCES_DB_URL", database_url)
    (tmp_path / "report.md").mkdir()
    code, _, err = cli(capsys, "report", "--out", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and "is a directory" in err and "unexpected" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_counts_are_bounded(capsys):
    for args in (["partitions", "--months", "100000000"], ["runs", "--limit", "-1"], ["runs", "--limit", "１"]):
        with pytest.raises(SystemExit) as caught:
            main(args)
        assert caught.value.code == 2
        assert "is not a whole number" in capsys.readouterr().err


def test_config_file_bounds(capsys, tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    code, _, err = cli(capsys, "--config", str(big), "snapshot", "x")
    assert "is larger than 1048576 bytes" in one_config_error(code, err)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    code, _, err = cli(capsys, "--config", str(deep), "snapshot", "x")
    one_config_error(code, err)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[sources.a]\nprovider = \"\xff\"\n")
    code, _, err = cli(capsys, "--config", str(binary), "snapshot", "a")
    assert "is not UTF-8 text" in one_config_error(code, err)
    if os.path.exists("/dev/zero"):
        code, _, err = cli(capsys, "--config", "/dev/zero", "snapshot", "x")
        assert "is not a regular file" in one_config_error(code, err)


@dataclass(slots=True)
class _UrlSettings:
    """A provider's settings as a future provider may declare them: URLs by name."""

    rpc_url: str = "https://rpc.example"
    mirror_urls: list[str] = field(default_factory=list)
    page_size: int = 10


@pytest.mark.parametrize("values, error", [
    ({"rpc_url": "file:///etc/passwd"}, "x.rpc_url: 'file:///etc/passwd' is not an http:// or https:// URL"),
    ({"rpc_url": "https://user:s3cret@h.example/?token=t"}, "x.rpc_url: 'https://***@h.example/?token=***' must not"),
    ({"rpc_url": "http://h.example:99999"}, "x.rpc_url: 'http://h.example:99999' has an invalid port"),
    ({"rpc_url": "https://h.exam ple"}, "x.rpc_url: 'https://h.exam ple' is not a URL"),
    ({"mirror_urls": ["https://a.example", "gopher://b.example"]}, "x.mirror_urls[1]: 'gopher://b.example'"),
    ({"page_size": 2**40}, "x.page_size: must be at least 0 and at most 2147483647"),
])
def test_every_url_and_number_of_any_provider_is_checked(values, error):
    with pytest.raises(ConfigError) as caught:
        build_settings(_UrlSettings, values, "x")
    assert error in str(caught.value) and "s3cret" not in str(caught.value)
    assert build_settings(_UrlSettings, {"mirror_urls": ["http://127.0.0.1:8080/base"]}, "x").mirror_urls == [
        "http://127.0.0.1:8080/base"]


def test_config_errors_are_always_one_line():
    assert str(ConfigError("sources.a\nb.c\u2028d: x")) == "sources.a\\nb.c\\u2028d: x"
