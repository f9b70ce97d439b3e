"""The package installs onto a plain Airflow 3 virtualenv, without the constraints file.

A user's existing Airflow: a fresh virtualenv with the newest Airflow and
its Postgres provider that resolve today. Then the README's "On a schedule,
in your Airflow" block, as typed: ``pip install .`` must not move any of
Airflow's own packages; the DAG files import, every source has its DAG,
and one ``airflow dags test`` (``dag.test()``) publishes a snapshot. The
wheel itself holds production code only.
"""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from datetime import datetime, timezone

import pytest

from tests.conftest import REPO, fetch
from tests.entry_points import documented_blocks, fresh_clone, run_block, user_env

pytestmark = pytest.mark.entry_points


def freeze(venv) -> dict[str, str]:
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                          capture_output=True, text=True, check=True, timeout=120)
    return dict(line.split("==", 1) for line in done.stdout.splitlines() if "==" in line)


def test_the_package_installs_onto_a_plain_airflow(db, database_url, serve, tmp_path):
    from sandbox.hedera import demo_app

    clone = fresh_clone(tmp_path / "clone")
    venv = tmp_path / "airflow-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    home = tmp_path / "home"
    home.mkdir()
    # The user's existing Airflow: newest releases, no constraints.
    existing = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "apache-airflow",
                               "apache-airflow-providers-postgres"], capture_output=True, text=True, timeout=900)
    assert existing.returncode == 0, existing.stderr[-3000:]
    before = freeze(venv)
    airflow_home = tmp_path / "airflow"
    (airflow_home / "dags").mkdir(parents=True)
    config = tmp_path / "balances.toml"
    config.write_text(f'[sources.hedera_sandbox]\nprovider = "hedera"\nbase_url = "{serve(demo_app()).url}"\n'
                      'schedule = "*/15 * * * *"\n')
    env = user_env(home, AIRFLOW_HOME=str(airflow_home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                   BALANCES_CONFIG=str(config), AIRFLOW_CONN_BALANCES_DB=database_url)
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    assert subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True, timeout=600).returncode == 0

    done = run_block(documented_blocks(REPO / "README.md")["airflow-install"], clone, env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    after = freeze(venv)
    moved = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert moved == {}, f"installing the package moved Airflow's dependencies: {moved}"
    assert "balance-snapshots" in after or "balance_snapshots" in after
    assert re.search(r"^balances_hedera_sandbox ", done.stdout, re.M), done.stdout[-2000:]

    # One dag.test() through the CLI: the DAG files import and run from the installed package.
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tested = subprocess.run(["airflow", "dags", "test", "balances_hedera_sandbox", at], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert fetch(db, "SELECT status FROM snapshot_runs WHERE source = 'hedera_sandbox'") == [("published",)]
    print(f"\nnewest Airflow that resolves: {after.get('apache-airflow')}, SQLAlchemy {after.get('SQLAlchemy')}, "
          f"pandas {after.get('pandas')}")


def test_the_wheel_holds_production_code_only(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                            str(fresh_clone(tmp_path / "clone"))], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"extractors", "loaders", "pipeline",
                                                                "reconciliation", "cli"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "loaders/migrations/env.py" in names
    assert len([n for n in names if n.startswith("loaders/migrations/versions/")]) >= 13
    # Every module of the production packages, subpackages included (extractors/evm/ once went missing).
    shipped = {n for n in names if n.endswith(".py")}
    source = {str(f.relative_to(REPO)) for top in ("extractors", "loaders", "pipeline", "reconciliation", "cli")
              for f in (REPO / top).rglob("*.py")}
    assert source <= shipped, sorted(source - shipped)
