"""The Airflow Assets each source's DAG updates: when it publishes a snapshot, and a window's movements."""
from __future__ import annotations


def snapshot_asset(source: str):
    from airflow.sdk import Asset

    return Asset(name=f"balances_snapshot_{source}", uri=f"balances://snapshots/{source}",
                 group="balances")


def movements_asset(source: str):
    from airflow.sdk import Asset

    return Asset(name=f"balances_movements_{source}", uri=f"balances://movements/{source}", group="balances")
