"""Long work shows progress: live on a terminal, plain lines elsewhere, a line every N pages in Airflow.

The snapshot reads the Hedera sandbox with two accounts a page (121 pages),
through the real ``balances`` command in a subprocess: with its standard
error a pipe, then a pseudo-terminal, then ``--quiet``.
"""
from __future__ import annotations

import logging
import os
import pty
import re
import select
import subprocess
from datetime import datetime, timezone

import pytest

from pipeline import progress
from sandbox.hedera import demo_app
from tests.conftest import REPO, fetch, load_dag, write_config

LINE = re.compile(r"progress_hedera: (?:done, )?([0-9,]+) pages, ([0-9,]+) rows, ([0-9,]+) rows/s, [0-9]+:[0-9]{2}")


@pytest.fixture
def sandbox_config(serve, tmp_path):
    server = serve(demo_app())
    config = tmp_path / "sources.toml"
    config.write_text(f'[sources.progress_hedera]\nprovider = "hedera"\nbase_url = "{server.url}"\nlimit = 2\n')
    return config


def balances(config, database_url, *args, stderr=subprocess.PIPE, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["BALANCES_DB_URL"] = database_url
    return subprocess.Popen([str(REPO / ".venv" / "bin" / "balances"), "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO, **kwargs)


def test_plain_lines_when_not_a_terminal_and_nothing_with_quiet(database_url, db, sandbox_config):
    done = balances(sandbox_config, database_url, "snapshot", "progress_hedera")
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    lines = err.decode().splitlines()
    counted = [LINE.fullmatch(line) for line in lines]
    assert all(counted) and len(lines) == 2, lines  # one at 100 pages, one when the shard is done
    pages, rows = (int(counted[-1][1].replace(",", "")), int(counted[-1][2].replace(",", "")))
    assert lines[0].startswith("progress_hedera: 100 pages,") and lines[1].startswith("progress_hedera: done,")
    run_pages, run_rows = fetch(db, "SELECT pages, rows FROM snapshot_runs")[0]
    assert (pages, rows) == (run_pages, run_rows) and pages > 100
    assert b"status: published" in out

    quiet = balances(sandbox_config, database_url, "snapshot", "progress_hedera", "--quiet")
    out, err = quiet.communicate(timeout=120)
    assert quiet.returncode == 0 and err == b"" and b"status: published" in out


def test_live_progress_on_a_terminal(database_url, db, sandbox_config):
    leader, follower = pty.openpty()
    try:
        run = balances(sandbox_config, database_url, "snapshot", "progress_hedera", stderr=follower)
        os.close(follower)
        shown = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        out, _ = run.communicate(timeout=60)
    finally:
        os.close(leader)
    assert run.returncode == 0
    text = shown.decode(errors="replace")
    assert "\x1b[" in text  # redrawn in place, not line after line
    rows = fetch(db, "SELECT rows FROM snapshot_runs")[0][0]
    assert re.search(rf"progress_hedera.*{rows:,} rows.*rows/s", text) and "done" in text
    assert b"status: published" in out


def test_airflow_task_logs_a_line_every_n_pages(airflow_env, db, serve, monkeypatch, caplog):
    server = serve(demo_app())
    write_config(f'[sources.progress_hedera]\nprovider = "hedera"\nbase_url = "{server.url}"\nlimit = 2\n'
                 'schedule = "*/15 * * * *"\nstart_date = 2023-01-01\ntask_retries = 0\n')
    monkeypatch.setattr(progress, "EVERY_PAGES", 25)
    dag = load_dag("balances_progress_hedera")
    with caplog.at_level(logging.INFO, logger="pipeline.tasks"):
        assert dag.test(logical_date=datetime.now(timezone.utc)).state == "success"
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.tasks"]
    pages = fetch(db, "SELECT pages FROM snapshot_runs")[0][0]
    assert [int(LINE.match(line)[1]) for line in lines[:-1]] == list(range(25, pages + 1, 25))
    assert lines[-1].startswith(f"progress_hedera: done, {pages} pages")
