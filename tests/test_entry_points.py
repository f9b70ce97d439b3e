"""Every documented command works as typed: a fresh clone, a shell, a user's environment.

The README's and docs/DEPLOYMENT.md's ``sh`` blocks each carry a mark
(``<!-- tested: NAME -->``) and a test here runs that block, as written,
in ``bash -e`` from a fresh copy of the working tree (no ``.venv``, no
cluster: ``scripts/demo`` installs them, and its time is the time a new
user waits). Placeholders a user fills in (``USER:PASSWORD@HOST``,
``SOURCE``, ``DATE``) are filled in with test values; nothing else is
changed. Every process a command starts carries a marker in its
environment, so a test sees whatever it left behind, the PostgreSQL
cluster included.

One clone and one demo are shared: the quickstart test runs ``scripts/demo``
first (and with it ``scripts/bootstrap``: the clone's ``.venv`` is the
editable install the later tests use). Tests run in file order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import REPO, fetch
from tests.entry_points import (MARK, documented_blocks, env_file_value, fresh_clone, kill_marked,
                                listening_sockets, marked_pids, new_mark, run_block, unmarked_sh_blocks,
                                user_env, wait_gone)

pytestmark = pytest.mark.entry_points

README = REPO / "README.md"
DEPLOYMENT = REPO / "docs" / "DEPLOYMENT.md"
# Which test runs each marked block.
TESTED = {
    (README, "quickstart"): "test_quickstart_as_typed",
    (README, "first-source"): "test_first_real_source_as_typed",
    (README, "airflow-install"): "tests/test_install.py::test_the_package_installs_onto_a_plain_airflow",
    (README, "serve"): "test_serve_as_typed_then_ctrl_c_stops_everything",
    (README, "superset-import"): "tests/test_dashboard.py::test_import_into_an_existing_superset_as_typed",
    (README, "alerts"): "tests/test_alerts.py::test_the_readme_alerts_block_as_typed",
    (DEPLOYMENT, "deploy"): "test_deploy_block_with_the_editable_install and "
                            "test_deploy_block_with_a_plain_pinned_install",
}
SERVE_DEADLINE = float(os.environ.get("BALANCES_LIVE_DEADLINE", "420"))


def tail(done: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((done.stdout + "\n" + done.stderr).splitlines()[-lines:])


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    path = fresh_clone(tmp_path_factory.mktemp("clone"))
    yield path
    data = path / ".pgdata"
    if data.is_symlink():  # the cluster's files live where postgres can reach them (devtools/devdb.py)
        target = data.resolve()
        shutil.rmtree(target, ignore_errors=True)
        target.with_name(target.name + ".password").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def mark():
    value = new_mark()
    yield value
    kill_marked(value)  # whatever a failed test left, so the next starts clean


def test_every_documented_block_is_run_by_a_test():
    for path in (README, DEPLOYMENT):
        assert unmarked_sh_blocks(path) == 0, f"{path.name}: an sh block without <!-- tested: NAME -->"
    documented = {(path, name) for path in (README, DEPLOYMENT) for name in documented_blocks(path)}
    assert documented == set(TESTED)
    here = "".join((REPO / "tests" / name).read_text()
                   for name in ("test_entry_points.py", "test_install.py", "test_dashboard.py", "test_alerts.py"))
    for runner in TESTED.values():
        for name in (part.rsplit("::", 1)[-1] for part in runner.split(" and ")):
            assert f"def {name}(" in here, runner
    # CI runs the README's test command.
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_quickstart_as_typed(clone, home, mark):
    block = documented_blocks(README)["quickstart"]
    started = time.monotonic()
    done = run_block(block, clone, user_env(home, **{MARK: mark}), timeout=1500)
    took = time.monotonic() - started
    assert done.returncode == 0, tail(done)
    # The demo's hand-over names what the block types next, line for line.
    printed = done.stdout.split("try next:\n", 1)[1].splitlines()
    shown = [line.strip() for line in printed[:4]]
    assert shown == block.splitlines()[1:5], printed[:6]
    assert "balance_history: 882 rows from 5 source(s)" in done.stdout
    # A roll-forward statement for each source with movements, and the one change planted without any.
    for source in ("hedera_sandbox", "formance_sandbox", "evm_sandbox"):
        assert re.search(rf"roll-forward {source} \([0-9]+ explained", done.stdout), source
    assert "roll-forward hedera_sandbox (551 explained, 1 unexplained)" in done.stdout
    assert re.search(r"hedera_rollforward unexplained_change \(hedera_sandbox 0\.0\.777 HBAR\): the balance changed "
                     r"by 0\.00000007 over", done.stdout)
    assert re.search(r"database: +postgresql://postgres@127\.0\.0\.1:[0-9]+/balances", done.stdout)
    # balances latest printed the treasury, exactly.
    assert re.search(r"0\.0\.1234 +HBAR +12345678900000000 +123456789\.00000000", done.stdout)
    assert "stopped the PostgreSQL cluster in .pgdata" in done.stdout
    assert not (clone / ".pgdata" / "postmaster.pid").exists()
    assert wait_gone(mark) == []
    print(f"\nquickstart from a fresh clone (installs included): {took:.0f}s")


def test_a_failing_part_stops_everything_the_demo_started(clone, home, mark):
    env = user_env(home, BALANCES_ANVIL="/bin/false", **{MARK: mark})
    done = subprocess.run(["scripts/demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, tail(done)
    assert "anvil did not start" in done.stderr
    # A second run: the quickstart's sandboxes were other ledgers, so their history is not continued.
    assert "the sandboxes are new ledgers each run, so the demo's database starts afresh" in done.stdout
    assert "stopped the PostgreSQL cluster in .pgdata it had started" in done.stderr
    assert not (clone / ".pgdata" / "postmaster.pid").exists()
    assert wait_gone(mark) == []


def test_first_real_source_as_typed(clone, home, database_url, serve):
    from sandbox.hedera import demo_app

    mirror = serve(demo_app())
    lines = documented_blocks(README)["first-source"].splitlines()
    assert lines[0] == "cp config/balances.example.toml my-balances.toml"
    env = user_env(home)
    assert run_block(lines[0], clone, env).returncode == 0
    # What the README asks the user to do by hand: keep one source, point it at their accounts.
    example = (clone / "my-balances.toml").read_text()
    kept = example[example.index("[sources.hedera_mainnet]"):example.index("[sources.hedera_testnet]")]
    kept = kept.replace("https://mainnet-public.mirrornode.hedera.com", mirror.url)
    kept = kept.replace('account_ids = ["0.0.98", "0.0.800"]', 'account_ids = ["0.0.98", "0.0.100"]')
    (clone / "my-balances.toml").write_text(kept)
    done = run_block("\n".join(lines[1:]), clone, env,
                     substitutions={"postgresql://USER:PASSWORD@HOST:5432/balances": database_url})
    assert done.returncode == 0, tail(done)
    assert "ok     source hedera_mainnet (hedera): latest snapshot" in done.stdout
    assert "status: published" in done.stdout
    assert re.search(r"\n0\.0\.98 +HBAR +[0-9]+ +[0-9.]+ +20", done.stdout)


def test_balances_help_and_every_subcommand_help(clone, home):
    balances = str(clone / ".venv" / "bin" / "balances")
    top = subprocess.run([balances, "--help"], env=user_env(home), capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "usage: balances" in top.stdout
    from cli.main import build_parser

    names = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)
    assert len(names) >= 10
    for name in names:
        assert f"    {name} " in top.stdout  # listed with its summary
        done = subprocess.run([balances, name, "--help"], env=user_env(home), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: balances {name}"), done.stderr


def test_balances_migrate_twice(clone, home, database_url):
    balances = str(clone / ".venv" / "bin" / "balances")
    env = user_env(home, BALANCES_DB_URL=database_url)
    first = subprocess.run([balances, "migrate"], env=env, capture_output=True, text=True, timeout=300)
    second = subprocess.run([balances, "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and re.fullmatch(
        r"database postgresql://postgres@127\.0\.0\.1:[0-9]+/balances_test at revision [0-9]{4}\n", first.stdout)


# -- the deployment block, with each kind of install ----------------------------------------

def deploy_env(tmp_path: Path, home: Path, database_url: str, mirror_url: str, bin_dir: Path) -> dict[str, str]:
    """An existing Airflow: its home with a DAGs folder and a migrated metadata database."""
    airflow_home = tmp_path / "airflow"
    (airflow_home / "dags").mkdir(parents=True)
    config = tmp_path / "balances.toml"
    config.write_text(f'[sources.hedera_sandbox]\nprovider = "hedera"\nbase_url = "{mirror_url}"\n'
                      'schedule = "*/15 * * * *"\n\n[checks.hedera_gaps]\nkind = "continuity"\n'
                      'source = "hedera_sandbox"\n')
    env = user_env(home, AIRFLOW_HOME=str(airflow_home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                   BALANCES_CONFIG=str(config), AIRFLOW_CONN_BALANCES_DB=database_url)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def check_deployed(done: subprocess.CompletedProcess, db, env: dict[str, str]) -> None:
    assert done.returncode == 0, tail(done, 60)
    assert "No data found" in done.stdout  # list-import-errors: none
    listed = set(re.findall(r"^(balances_[a-z0-9_]+|reconcile_balances) ", done.stdout, re.M))
    assert listed == {"balances_hedera_sandbox", "reconcile_balances"}, done.stdout[-3000:]
    assert fetch(db, "SELECT status FROM snapshot_runs WHERE source = 'hedera_sandbox'"
                     " AND dag_run_id LIKE 'manual\\_\\_%%'") == [("published",)]
    pools = subprocess.run(["airflow", "pools", "list", "-o", "json"], env=env, capture_output=True, text=True,
                           timeout=120)
    names = {p["pool"] for p in json.loads(pools.stdout[pools.stdout.index("["):])}
    from pipeline.config import pools_document

    assert set(pools_document()) <= names


def deploy_substitutions() -> dict[str, str]:
    return {"SOURCE": "hedera_sandbox", "DATE": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def test_deploy_block_with_the_editable_install(clone, home, db, database_url, serve, tmp_path):
    from sandbox.hedera import demo_app

    lines = documented_blocks(DEPLOYMENT)["deploy"].splitlines()
    assert lines[0] == "pip install -c constraints.txt ."  # scripts/bootstrap made the editable one instead
    env = deploy_env(tmp_path, home, database_url, serve(demo_app()).url, clone / ".venv" / "bin")
    assert subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True, timeout=600).returncode == 0
    done = run_block("\n".join(lines[1:]), clone, env, substitutions=deploy_substitutions(), timeout=900)
    check_deployed(done, db, env)


def test_deploy_block_with_a_plain_pinned_install(clone, home, db, database_url, serve, tmp_path):
    from sandbox.hedera import demo_app

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = deploy_env(tmp_path, home, database_url, serve(demo_app()).url, venv / "bin")
    install = run_block(documented_blocks(DEPLOYMENT)["deploy"].splitlines()[0], clone, env, timeout=900)
    assert install.returncode == 0, tail(install)
    assert subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True, timeout=600).returncode == 0
    done = run_block(documented_blocks(DEPLOYMENT)["deploy"], clone, env, substitutions=deploy_substitutions(),
                     timeout=900)
    check_deployed(done, db, env)
    # Not the checkout: the installed package, and nothing of development in it.
    probe = subprocess.run(["python", "-c", "import loaders, importlib.util as u; print(loaders.__file__);"
                            "print(u.find_spec('devtools'), u.find_spec('sandbox'))"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert str(venv) in probe.stdout and "None None" in probe.stdout, probe.stdout + probe.stderr


# -- scripts/demo --serve ---------------------------------------------------------------------

def published_scheduled(url: str, sources: list[str]) -> dict[str, int]:
    with psycopg2.connect(url, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute("SELECT source, count(*) FROM snapshot_runs WHERE status = 'published'"
                    " AND dag_run_id LIKE 'scheduled\\_\\_%%' GROUP BY source")
        counts = dict(cur.fetchall())
    conn.close()
    return {s: counts.get(s, 0) for s in sources}


def metadata(url: str, query: str) -> list[tuple]:
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


def failures(metadata_url: str, logs: Path) -> str:
    """What failed, for an assertion message: the failed tasks and the last error their logs hold."""
    tasks = metadata(metadata_url, "SELECT dag_id, task_id, map_index, run_id FROM task_instance"
                                   " WHERE state IN ('failed', 'upstream_failed') ORDER BY 1, 2")
    errors = []
    for log in sorted(logs.glob("dag_id=*/**/attempt=*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        if lines:
            errors.append(f"{log.relative_to(logs)}: {lines[-1][:800]}")
    return f"failed tasks: {tasks}\nerrors: " + "\n".join(errors[-6:])


def wait_until(predicate, process: subprocess.Popen, deadline: float, what: str):
    while True:
        value = predicate()
        if value:
            return value
        assert process.poll() is None, f"scripts/demo --serve exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {SERVE_DEADLINE:.0f}s"
        time.sleep(3)


def test_serve_as_typed_then_ctrl_c_stops_everything(clone, home, mark):
    from sandbox import apps

    block = documented_blocks(README)["serve"].splitlines()
    assert block == ["scripts/superset", "scripts/demo --serve"]
    env = user_env(home, **{MARK: mark})
    superset = run_block(block[0], clone, env, timeout=1800)
    assert superset.returncode == 0, tail(superset)
    log = open(clone.parent / "serve.log", "w+")
    started, began = time.monotonic(), time.time()  # .demo/env must be this run's, not the quickstart's
    serving = subprocess.Popen(["bash", "-c", block[1]], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = started + SERVE_DEADLINE
        env_file = clone / ".demo" / "env"
        wait_until(lambda: env_file.exists() and env_file.stat().st_mtime > began, serving, deadline,
                   "the hand-over (.demo/env)")
        url = env_file_value(env_file, "BALANCES_DB_URL")
        metadata_url = url.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1] + "_airflow"
        sources = [f"{name}_sandbox" for name in apps.available()]
        wait_until(lambda: min(published_scheduled(url, sources).values()) >= 1, serving, deadline,
                   "scheduled snapshot of every sandbox source")
        wait_until(lambda: metadata(metadata_url, "SELECT 1 FROM dag_run WHERE dag_id = 'reconcile_balances'"
                                                  " AND run_type = 'asset_triggered' AND state = 'success'"),
                   serving, deadline, "reconciliation run on the sources' Asset events")
        failed = metadata(metadata_url, "SELECT dag_id, run_id FROM dag_run WHERE state = 'failed'")
        assert failed == [], failures(metadata_url, clone / ".demo" / "live" / "airflow" / "logs")
        # Every process it started listens on loopback only.
        sockets = listening_sockets(marked_pids(mark))
        assert sockets and all(a.startswith(("127.0.0.1:", "::1:")) for _, a in sockets), sockets
        # The Hedera shards of one run crawled side by side, in the pool the registry names.
        shards = metadata(metadata_url, """SELECT run_id, start_date, end_date, pool FROM task_instance
                                            WHERE dag_id = 'balances_hedera_sandbox' AND task_id = 'crawl_snapshot'
                                              AND state = 'success'""")
        by_run: dict[str, list] = {}
        for run_id, start, end, pool in shards:
            assert pool == "balances_hedera"
            by_run.setdefault(run_id, []).append((start, end))
        assert any(len(s) == 3 and max(a for a, _ in s) < min(b for _, b in s) for s in by_run.values()), by_run
        ready = time.monotonic() - started
    finally:
        os.killpg(serving.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        try:
            code = serving.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            raise
        log.seek(0)
        output = log.read()
        log.close()
    assert code == 0, output[-3000:]
    assert "stopped the PostgreSQL cluster in .pgdata it had started" in output
    assert wait_gone(mark) == [], output[-2000:]
    assert not (clone / ".pgdata" / "postmaster.pid").exists()
    print(f"\nserve: every source published and reconciled {ready:.0f}s after start")


def test_serve_stops_everything_when_a_part_fails(clone, home, mark, tmp_path):
    """Superset installed but broken: the stack stops itself, all of it, and says why."""
    broken = tmp_path / "superset-venv"
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "superset").write_text("#!/bin/sh\necho 'superset: broken on purpose' >&2\nexit 3\n")
    (broken / "bin" / "superset").chmod(0o755)
    env = user_env(home, SUPERSET_VENV=str(broken), **{MARK: mark})
    done = subprocess.run(["scripts/demo", "--serve"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900, start_new_session=True)
    assert done.returncode == 1, tail(done)
    assert "superset db failed (exit 3)" in done.stderr
    assert "stopped the PostgreSQL cluster in .pgdata it had started" in done.stdout + done.stderr
    assert wait_gone(mark) == [], tail(done)
    assert not (clone / ".pgdata" / "postmaster.pid").exists()
