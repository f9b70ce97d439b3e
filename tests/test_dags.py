"""The generated DAGs, parsed and run by real Airflow (``dag.test()``)."""
from __future__ import annotations

import importlib.util
import os
import sys
import tomllib
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from airflow.listeners import hookimpl

import extractors
from extractors import registry
from extractors.provider import Provider
from pipeline.config import load_config, parse_source
from devtools.demo import write_sources
from sandbox.apps import available, sandbox
from tests.conftest import REPO, dag_bag, fetch, load_dag, write_config
from tests.sandboxes import PROVIDERS, demo_app, install_connection, source_keys
from sandbox.hedera import Account
from tests.hedera_data import NETWORK_NUMS, T2, T3, mirror, moving_mirror, network

pytestmark = pytest.mark.airflow


def hedera_config(url: str, name: str = "hedera_dagtest", extra: str = "") -> str:
    return f"""
[sources.{name}]
provider = "hedera"
base_url = "{url}"
schedule = "*/15 * * * *"
limit = 10
task_retries = 0
start_date = 2023-01-01
backoff_base = 0.01
{extra}
"""


EXAMPLE = REPO / "config" / "balances.example.toml"


def test_providers_are_the_modules_that_declare_one():
    """The registry finds declarations by reading sources; importing every module says the same."""
    import importlib
    import pkgutil

    import extractors

    declared = set()
    for info in pkgutil.iter_modules(extractors.__path__):
        if isinstance(getattr(importlib.import_module(f"extractors.{info.name}"), "PROVIDER", None), Provider):
            declared.add(info.name)
    assert set(PROVIDERS) == declared and {"bitfront", "coreledger", "evm", "formance", "hedera"} <= declared
    for name in PROVIDERS:
        declared = registry.provider(name)
        assert isinstance(declared, Provider) and declared.name == name
    # The shared machinery declares no provider.
    assert not {"http", "paginators", "records", "provider", "registry"} & set(PROVIDERS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_has_a_sandbox_a_demo_source_an_example_and_a_readme_section(provider):
    assert provider in available()
    module = sandbox(provider)
    keys = module.demo_source("http://127.0.0.1:9")
    assert keys["provider"] == provider
    parse_source(f"{provider}_demo", dict(keys))  # the demo source is a valid source
    assert module.DEMO_CONNECTION is None or len(module.DEMO_CONNECTION) == 2
    example = tomllib.loads(EXAMPLE.read_text())["sources"]
    assert provider in {table["provider"] for table in example.values()}
    assert provider in EXAMPLE.read_text().split("provider ", 1)[1].split("(required)", 1)[0]
    # Its README section shows a source table.
    assert f'\nprovider = "{provider}"\n' in (REPO / "README.md").read_text()


def test_example_config_builds_one_dag_per_source(airflow_env):
    write_config(EXAMPLE.read_text())
    bag = dag_bag()
    assert bag.import_errors == {}
    snapshot_dags = {d: dag for d, dag in bag.dags.items() if set(dag.tags) & set(PROVIDERS)}
    expected = load_config(EXAMPLE)
    assert sorted(snapshot_dags) == sorted(s.dag_id for s in expected.sources.values())
    assert {s.provider for s in expected.sources.values()} == set(PROVIDERS)
    for dag_id, dag in snapshot_dags.items():
        provider = expected.sources[dag_id.removeprefix("balances_")].provider
        assert [t.task_id for t in dag.topological_sort()] == ["begin_run", "plan_shards", "crawl_snapshot",
                                                               "publish_snapshot", "plan_movements", "crawl_movements",
                                                               "publish_movements"]
        assert all(t.pool == f"balances_{provider}" for t in dag.tasks)
        assert dag.max_active_runs == 1
        assert dag.doc_md and "snapshot" in dag.doc_md
    publish = bag.get_dag("balances_hedera_mainnet").get_task("publish_snapshot")
    assert [o.uri for o in publish.outlets] == ["balances://snapshots/hedera_mainnet"]
    moved = bag.get_dag("balances_hedera_mainnet").get_task("publish_movements")
    assert [o.uri for o in moved.outlets] == ["balances://movements/hedera_mainnet"]


def test_broken_config_is_an_import_error_naming_the_field(airflow_env):
    write_config('[sources.bad]\nprovider = "hedera"\nbase_url = "http://x"\nlimit = 500\n'
                 + hedera_config("http://127.0.0.1:9", name="fine"))
    bag = dag_bag()
    errors = " ".join(bag.import_errors.values())
    assert "sources.bad.limit" in errors and "100" in errors
    # The mistake costs only its own source's DAG.
    assert "balances_fine" in bag.dags and "balances_bad" not in bag.dags


def test_a_provider_module_that_fails_to_import_costs_only_its_sources(airflow_env, tmp_path, monkeypatch):
    """A half-deployed provider module: its sources are reported and left out, the rest load."""
    (tmp_path / "bitfront.py").write_text(
        'raise RuntimeError("half-deployed")\nPROVIDER = None\n')
    # Found before the real module, as a broken copy on the DAG processor's path would be.
    monkeypatch.setattr(extractors, "__path__", [str(tmp_path), *extractors.__path__])
    monkeypatch.delitem(sys.modules, "extractors.bitfront")
    write_config(hedera_config("http://127.0.0.1:9", name="fine") + """
[sources.exchange]
provider = "bitfront"
conn_id = "bitfront_main"

[checks.fine_gaps]
kind = "continuity"
source = "fine"

[checks.exchange_gaps]
kind = "continuity"
source = "exchange"
""")
    bag = dag_bag()
    errors = {Path(f).name: e for f, e in bag.import_errors.items()}
    assert sorted(errors) == ["balance_reconciliation.py", "balance_snapshots.py"]
    assert ("sources.exchange.provider: the bitfront provider module (extractors/bitfront.py) failed to "
            "import: RuntimeError: half-deployed") in errors["balance_snapshots.py"]
    assert "checks.exchange_gaps.source: source 'exchange' has a mistake" in errors["balance_reconciliation.py"]
    ours = sorted(d for d in bag.dags if d.startswith(("balances_", "reconcile_")))
    assert ours == ["balances_fine", "reconcile_balances"]
    assert "balances://snapshots/fine" in str(bag.dags["reconcile_balances"].timetable.asset_condition)


def test_a_module_without_a_declaration_is_no_provider(tmp_path, monkeypatch):
    (tmp_path / "helpers.py").write_text("PROVIDERS = ()\nPROVIDER_URL = 'x'\n")
    (tmp_path / "newcomer.py").write_text("PROVIDER: object = object()\n")
    monkeypatch.setattr(extractors, "__path__", [str(tmp_path), *extractors.__path__])
    assert "helpers" not in registry.names() and "newcomer" in registry.names()
    # Declared but not a Provider named after its module: refused, with what to write.
    try:
        with pytest.raises(registry.ProviderUnavailable, match="PROVIDER = Provider"):
            registry.provider("newcomer")
    finally:
        sys.modules.pop("extractors.newcomer", None)
    assert importlib.util.find_spec("sandbox.newcomer") is None and "newcomer" not in available()


def test_dag_run_publishes_a_snapshot_and_updates_the_asset(airflow_env, db, serve):
    server = serve(mirror())
    write_config(hedera_config(server.url))
    dag = load_dag("balances_hedera_dagtest")
    # A scheduled run for the interval ending between T2 and T3 must load T2.
    logical = datetime.fromtimestamp(1700001000, tz=timezone.utc)
    dag_run = dag.test(logical_date=logical)
    assert dag_run.state == "success"
    runs = fetch(db, "SELECT status, as_of_raw, scheduled_for, dag_run_id, rows, rows_inserted FROM snapshot_runs")
    assert len(runs) == 1
    status, as_of_raw, scheduled_for, dag_run_id, rows, inserted = runs[0]
    assert (status, as_of_raw, dag_run_id) == ("published", T2, dag_run.run_id)
    assert scheduled_for == dag_run.data_interval_end
    assert rows == inserted == fetch(db, "SELECT count(*) FROM balance_history")[0][0] > 0

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.execute(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == "balances://snapshots/hedera_dagtest")
        ).scalars().all()
        assert len(events) == 1

    # The same interval again (a rerun) adds nothing.
    rerun = dag.test(logical_date=logical)
    assert rerun.state == "success"
    assert fetch(db, "SELECT count(*) FROM balance_history")[0][0] == rows
    assert fetch(db, "SELECT rows_inserted FROM snapshot_runs ORDER BY run_id DESC LIMIT 1") == [(0,)]


def test_dag_run_with_a_fatal_error_fails_without_publishing(airflow_env, db, serve):
    server = serve(mirror())
    write_config(hedera_config(server.url))
    server.app.snapshots[-1].account = lambda num: Account(balance="1e3x")  # not an integer
    dag = load_dag("balances_hedera_dagtest")
    dag_run = dag.test(logical_date=datetime.fromtimestamp(1700002000, tz=timezone.utc))
    assert dag_run.state == "failed"
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) > 0 FROM rejected_records") == [(True,)]


def test_dag_run_before_the_first_snapshot_ends_as_no_snapshot(airflow_env, db, serve):
    server = serve(mirror())
    write_config(hedera_config(server.url))
    dag = load_dag("balances_hedera_dagtest")
    dag_run = dag.test(logical_date=datetime(2023, 6, 1, tzinfo=timezone.utc))
    # Planning found no snapshot: no shard to crawl, nothing to publish, no failure.
    assert dag_run.state == "success"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["crawl_snapshot"] == "skipped" and states["publish_snapshot"] == "skipped"
    assert fetch(db, "SELECT status, as_of_raw FROM snapshot_runs") == [("no_snapshot", None)]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


def test_sharded_dag_loads_the_readme_account_ids(airflow_env, db, serve):
    server = serve(network())
    write_config(hedera_config(server.url, extra='shards = 3\naccount_ids = ["0.0.98", "gte:0.0.1000"]'))
    dag = load_dag("balances_hedera_dagtest")
    dag_run = dag.test(logical_date=datetime.fromtimestamp(1700001000, tz=timezone.utc))
    assert dag_run.state == "success"
    nums = [n for n in NETWORK_NUMS if n == 98 or n >= 1000]
    expected = len(nums) + sum(1 for n in nums if n % 50 == 0)  # HBAR rows + token rows
    assert fetch(db, "SELECT status, as_of_raw, rows, rejected FROM snapshot_runs") == [
        ("published", T2, expected, 0)]
    assert fetch(db, "SELECT count(DISTINCT account), min(account) FROM balance_history") == [
        (len(nums), "0.0.1001")]
    assert fetch(db, "SELECT count(*) FROM balance_history WHERE account IN ('0.0.2', '0.0.98')") == [(1,)]


def test_sharded_dag_maps_one_crawl_per_shard_and_publishes_once(airflow_env, db, serve):
    server = serve(mirror(accounts=57))
    write_config(hedera_config(server.url, extra="shards = 3"))
    dag = load_dag("balances_hedera_dagtest")
    dag_run = dag.test(logical_date=datetime.fromtimestamp(1700002000, tz=timezone.utc))
    assert dag_run.state == "success"
    crawls = [ti for ti in dag_run.get_task_instances() if ti.task_id == "crawl_snapshot"]
    assert sorted(ti.map_index for ti in crawls) == [0, 1, 2]
    assert fetch(db, "SELECT status, shards, rows FROM snapshot_runs") == [("published", 3, 58 + 11)]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(58 + 11,)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_providers_dag_lands_its_sandbox_snapshot(airflow_env, db, serve, provider):
    server = serve(demo_app(provider))
    name = f"{provider}_dagtest"
    keys = source_keys(provider, server.url, schedule="*/15 * * * *", start_date=date(2023, 1, 1))
    install_connection(provider)
    write_sources(Path(os.environ["BALANCES_CONFIG"]), {name: keys})
    dag = load_dag(f"balances_{name}")
    # The interval that just ended: providers without history accept only the present.
    dag_run = dag.test(logical_date=datetime.now(timezone.utc) - timedelta(minutes=16))
    assert dag_run.state == "success"
    [(status, rows, inserted)] = fetch(db, "SELECT status, rows, rows_inserted FROM snapshot_runs")
    assert status == "published" and rows == inserted > 0
    assert fetch(db, "SELECT count(*) FROM balance_history WHERE source = %s", (name,)) == [(rows,)]


class EditAfter:
    """An Airflow listener: writes ``text`` to the sources file once task ``task_id`` has succeeded,
    as a deploy landing between two tasks of a run would."""

    def __init__(self, task_id: str, path: Path, text: str) -> None:
        self.task_id, self.path, self.text, self.done = task_id, path, text, False

    @hookimpl
    def on_task_instance_success(self, previous_state, task_instance):
        if task_instance.task_id == self.task_id and not self.done:
            self.path.write_text(self.text)
            self.done = True


def test_a_sources_file_changed_during_a_run_changes_the_next_run_only(airflow_env, db, serve):
    """A deploy between plan_shards and the crawls: every task after begin_run keeps the run's configuration."""
    from airflow.sdk.listener import get_listener_manager

    server = serve(mirror(accounts=57))
    path = write_config(hedera_config(server.url, extra="shards = 3"))
    deploy = EditAfter("plan_shards", path, hedera_config(server.url, extra="shards = 1").replace("limit = 10",
                                                                                                  "limit = 5"))
    dag = load_dag("balances_hedera_dagtest")
    get_listener_manager().add_listener(deploy)
    try:
        dag_run = dag.test(logical_date=datetime.fromtimestamp(1700002000, tz=timezone.utc))
    finally:
        get_listener_manager().pm.unregister(deploy)
    assert dag_run.state == "success"
    assert deploy.done and "shards = 1" in path.read_text()  # the file did change mid-run
    crawls = [ti for ti in dag_run.get_task_instances() if ti.task_id == "crawl_snapshot"]
    assert sorted(ti.map_index for ti in crawls) == [0, 1, 2]
    # Published whole, as planned: three shards, pages of 10 (the file now says 1 shard, pages of 5).
    assert fetch(db, "SELECT status, shards, rows, config->>'shards', config->>'limit' FROM snapshot_runs") == [
        ("published", 3, 58 + 11, "3", "10")]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(58 + 11,)]
    assert page_sizes(server) == {"10"}

    # The next run is the file's.
    server.clear()
    later = dag.test(logical_date=datetime.fromtimestamp(1700002900, tz=timezone.utc))
    assert later.state == "success"
    assert len([ti for ti in later.get_task_instances() if ti.task_id == "crawl_snapshot"]) == 1
    assert fetch(db, "SELECT status, shards, rows, config->>'limit' FROM snapshot_runs ORDER BY run_id DESC"
                     " LIMIT 1") == [("published", 1, 58 + 11, "5")]
    assert page_sizes(server) == {"5"}


def page_sizes(server) -> set[str]:
    """The page sizes the crawls asked the mirror node for."""
    return {r.params("limit")[0] for r in list(server.requests)
            if r.path.endswith("/balances") and r.params("account.id")}


def asset_events(uri: str) -> int:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.execute(select(func.count()).select_from(AssetEvent).join(
            AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.uri == uri)).scalar()


def test_a_run_after_an_earlier_snapshot_loads_its_window_once_and_updates_the_movements_asset(airflow_env, db,
                                                                                              serve):
    server = serve(moving_mirror())
    write_config(hedera_config(server.url, extra="shards = 2"))
    dag = load_dag("balances_hedera_dagtest")
    first = dag.test(logical_date=datetime.fromtimestamp(1700001000, tz=timezone.utc))  # T2: no window before it
    states = {ti.task_id: ti.state for ti in first.get_task_instances()}
    assert first.state == "success" and states["publish_movements"] == "skipped"
    second = dag.test(logical_date=datetime.fromtimestamp(1700002000, tz=timezone.utc))  # T3: (T2, T3]
    assert second.state == "success"
    crawls = [ti for ti in second.get_task_instances() if ti.task_id == "crawl_movements"]
    assert sorted(ti.map_index for ti in crawls) == [0, 1]  # by the snapshot's two shards
    [(status, start_raw, end_raw, shards, dag_run_id)] = fetch(
        db, "SELECT status, start_raw, end_raw, shards, dag_run_id FROM movement_runs")
    assert (status, start_raw, end_raw, shards, dag_run_id) == ("published", T2, T3, 2, second.run_id)
    assert fetch(db, "SELECT DISTINCT status FROM balance_rollforward") == [("explained",)]
    assert asset_events("balances://movements/hedera_dagtest") == 1
    # The same interval again: the window is held, nothing read, nothing published.
    rerun = dag.test(logical_date=datetime.fromtimestamp(1700002000, tz=timezone.utc))
    assert rerun.state == "success"
    assert {ti.task_id: ti.state for ti in rerun.get_task_instances()}["publish_movements"] == "skipped"
    assert fetch(db, "SELECT count(*) FROM movement_runs") == [(1,)]
    assert asset_events("balances://movements/hedera_dagtest") == 1


def test_a_provider_without_movements_records_its_windows_not_available(airflow_env, db, serve):
    server = serve(demo_app("bitfront"))
    name = "bitfront_dagtest"
    keys = source_keys("bitfront", server.url, schedule="*/15 * * * *", start_date=date(2023, 1, 1))
    install_connection("bitfront")
    write_sources(Path(os.environ["BALANCES_CONFIG"]), {name: keys})
    dag = load_dag(f"balances_{name}")
    for minutes in (20, 5):  # two runs within the last half hour: present-only providers take no other
        assert dag.test(logical_date=datetime.now(timezone.utc) - timedelta(minutes=minutes)).state == "success"
    [(status, note)] = fetch(db, "SELECT status, unexplainable->>'*' FROM movement_runs")
    assert status == "not_available" and note.startswith("bitfront offers no movement API")
    assert fetch(db, "SELECT DISTINCT status FROM balance_rollforward") == [("not_available",)]


def test_the_demo_uses_a_database_only_without_an_earlier_demos_sandbox_history(db, database_url, serve):
    """The sandboxes are new ledgers every run: history of an earlier run's sandbox must not go on."""
    from contextlib import ExitStack

    from devtools import demo, devdb
    from pipeline.snapshot import take_snapshot
    from sandbox import hedera

    assert not devdb.owns(database_url)  # the suite's cluster, not the demo's .pgdata
    with ExitStack() as stack:
        assert demo.database(stack, database_url) == database_url  # empty: used as it is
    source = parse_source("hedera_sandbox", dict(hedera.demo_source(serve(hedera.demo_app()).url)))
    assert take_snapshot(db, source, datetime.now(timezone.utc))["status"] == "published"
    with ExitStack() as stack, pytest.raises(demo.DemoError, match=r"earlier demo's history of hedera_sandbox"):
        demo.database(stack, database_url)


def test_the_demo_backfills_the_sandboxs_earlier_snapshots_when_a_quarter_hour_began_since(db, database_url, serve):
    """The sandbox made its snapshots a quarter hour ago: "30 minutes ago" by the clock would miss the first."""
    import time

    from devtools import demo
    from pipeline.snapshot import take_snapshot
    from sandbox import hedera

    keys = dict(hedera.demo_source(serve(hedera.demo_mirror(int(time.time()) - 900)).url))
    take_snapshot(db, parse_source("hedera_sandbox", dict(keys)), datetime.now(timezone.utc))  # as the DAG does
    demo.backfill_hedera(database_url, keys)
    taken = fetch(db, "SELECT as_of FROM balance_snapshots WHERE source = 'hedera_sandbox' ORDER BY as_of")
    assert len(taken) == 3
    assert [(b[0] - a[0]).total_seconds() // 60 for a, b in zip(taken, taken[1:])] == [15, 15]
