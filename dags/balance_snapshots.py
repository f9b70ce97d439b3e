"""Balance snapshots: one DAG per source in the sources file ($BALANCES_CONFIG).

Each run takes the provider's snapshot for the end of its data interval:
`begin_run` opens a row in `snapshot_runs`, `plan_shards` chooses the
snapshot once for the whole run where the provider can (Hedera: none at or
before the time ends the run as `no_snapshot`, with no shard to crawl) and
splits the crawl (`shards = N` in the config; one shard otherwise), each mapped
`crawl_snapshot` streams its pages into a private staging table, and
`publish_snapshot` makes the whole snapshot visible in `balance_history` in
one transaction, only when every shard succeeded, and updates the source's
Asset. Then the movements of the windows the snapshot bounds (the span to
the previous snapshot, and for a backfill the one to the next): `plan_movements`
opens a movement run per window not loaded yet (for a provider without
movements it records the window as not available), each mapped
`crawl_movements` stages one shard of a window's movements, and
`publish_movements` stores each window whole and updates the source's
movements Asset. Reruns and backfills of the same interval add nothing
twice. Secrets come from Airflow Connections; XCom carries ids and counts.
Every task has an `execution_timeout`: the source's `task_timeout`, by
default one interval of its schedule kept within 10 minutes and 6 hours.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from pipeline import tasks
from pipeline.assets import movements_asset, snapshot_asset
from pipeline.config import SourceConfig, config_error_dag, load_config


def snapshot_dag(source: SourceConfig):
    pool = source.pool
    default_args = {
        "owner": "balances",
        "retries": source.task_retries,
        "retry_delay": timedelta(seconds=source.task_retry_delay),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
        # A hung request, lock or provider cannot hold a worker slot forever.
        "execution_timeout": source.execution_timeout,
    }

    @dag(
        dag_id=source.dag_id,
        schedule=source.schedule,
        start_date=source.start_date,
        catchup=source.catchup,
        max_active_runs=1,
        default_args=default_args,
        tags=["balances", source.provider],
        doc_md=__doc__,
    )
    def balances_snapshot():
        @task(pool=pool)
        def begin_run(**context) -> int:
            return tasks.begin_run(source.name, context)

        # "run_id" is reserved by Airflow's context; ours is the snapshot run.
        @task(pool=pool)
        def plan_shards(snapshot_run: int) -> list[dict]:
            return tasks.plan_shards(source.name, snapshot_run)

        # One mapped task per shard; each stages its own rows.
        @task(pool=pool)
        def crawl_snapshot(snapshot_run: int, shard: dict) -> dict:
            return tasks.crawl_snapshot(source.name, snapshot_run, **shard)

        @task(pool=pool, outlets=[snapshot_asset(source.name)])
        def publish_snapshot(snapshot_run: int, crawled: list[dict]) -> dict:
            return tasks.publish_snapshot(source.name, snapshot_run)

        @task(pool=pool)
        def plan_movements(snapshot_run: int, published: dict, **context) -> list[dict]:
            return tasks.plan_movements(source.name, snapshot_run, context)

        # One mapped task per window and shard.
        @task(pool=pool)
        def crawl_movements(snapshot_run: int, planned: dict) -> dict:
            return tasks.crawl_movements(source.name, snapshot_run, **planned)

        @task(pool=pool, outlets=[movements_asset(source.name)])
        def publish_movements(snapshot_run: int, crawled: list[dict]) -> dict:
            return tasks.publish_movements(source.name, snapshot_run, crawled)

        snapshot_run = begin_run()
        shards = plan_shards(snapshot_run)
        crawled = crawl_snapshot.partial(snapshot_run=snapshot_run).expand(shard=shards)
        published = publish_snapshot(snapshot_run, crawled)
        planned = plan_movements(snapshot_run, published)
        moved = crawl_movements.partial(snapshot_run=snapshot_run).expand(planned=planned)
        publish_movements(snapshot_run, moved)

    return balances_snapshot()


# A source with a mistake (a wrong table, or a provider module that fails to
# import: load_config imports each provider only for its own sources) must
# not take the others down: raising here would drop every DAG of this file.
# A placeholder DAG with a failing task would only show the mistake once it
# runs (and new DAGs start paused). So the mistakes become this file's import
# error, through a DAG the DagBag refuses, while every valid source keeps its DAG.
_config = load_config()
_errors = list(_config.errors.values())
for _source in _config.sources.values():
    try:
        globals()[_source.dag_id] = snapshot_dag(_source)
    except Exception as _exc:  # the validator should have caught it; still, only this source is lost
        _errors.append(f"sources.{_source.name}: Airflow refused its DAG: {type(_exc).__name__}: {_exc}")
if _errors:
    balances_config_errors = config_error_dag("balances_config_errors", _errors)
