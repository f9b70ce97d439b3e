"""Balance snapshots: one DAG per source in the sources file ($BALANCES_CONFIG).

Each run takes the provider's snapshot for the end of its data interval:
`begin_run` opens a row in `snapshot_runs`, `plan_shards` splits the crawl
(`shards = N` in the config; one shard otherwise), each mapped
`crawl_snapshot` streams its pages into a private staging table, and
`publish_snapshot` makes the whole snapshot visible in `balance_history` in
one transaction, only when every shard succeeded, and updates the source's
Asset. Reruns and backfills of the same interval add nothing
twice. Secrets come from Airflow Connections; XCom carries ids and counts.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from pipeline import tasks
from pipeline.assets import snapshot_asset
from pipeline.config import SourceConfig, load_config


def snapshot_dag(source: SourceConfig):
    pool = f"balances_{source.provider}"
    default_args = {
        "owner": "balances",
        "retries": source.task_retries,
        "retry_delay": timedelta(seconds=source.task_retry_delay),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
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

        snapshot_run = begin_run()
        shards = plan_shards(snapshot_run)
        crawled = crawl_snapshot.partial(snapshot_run=snapshot_run).expand(shard=shards)
        publish_snapshot(snapshot_run, crawled)

    return balances_snapshot()


for _source in load_config().sources.values():
    globals()[_source.dag_id] = snapshot_dag(_source)
