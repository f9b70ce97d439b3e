"""The Airflow Asset each source's DAG updates when it publishes a snapshot."""
from __future__ import annotations


def snapshot_asset(source: str):
    from airflow.sdk import Asset

    return Asset(name=f"balances_snapshot_{source}", uri=f"balances://snapshots/{source}",
                 group="balances")
