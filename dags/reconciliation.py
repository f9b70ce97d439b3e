"""Reconciliation: the `[checks.<name>]` of the sources file, run after snapshots.

Scheduled on the Assets of the sources the checks read: a published
snapshot of any of them (any-of) triggers a run, which checks the window of
the last 3 days ending at the triggering time and records the breaks in
`reconciliation_breaks` (see `pipeline/reconcile.py` for what each check
finds). Reruns update the same breaks; breaks that no longer hold are
resolved. The task succeeds when the checks ran, whatever they found.
Only defined when the sources file has checks.
"""
from __future__ import annotations

from airflow.sdk import AssetAny, dag, task

from pipeline.assets import snapshot_asset
from pipeline.checks import Check, load_checks
from pipeline.config import load_config

DAG_ID = "reconcile_balances"


def reconciliation_dag(checks: dict[str, Check]):
    sources = sorted({s for check in checks.values() for s in check.sources})

    @dag(
        dag_id=DAG_ID,
        schedule=AssetAny(*(snapshot_asset(s) for s in sources)),
        catchup=False,
        max_active_runs=1,
        default_args={"owner": "balances", "retries": 1},
        tags=["balances", "reconciliation"],
        doc_md=__doc__,
    )
    def reconcile_balances():
        @task
        def reconcile_window(**context) -> dict:
            from pipeline import reconcile, tasks

            window_from, window_to = reconcile.default_window(reconcile.triggering_time(context))
            with tasks.database() as conn:
                result = reconcile.reconcile(conn, load_checks(load_config()), window_from, window_to,
                                             dag_run_id=context["dag_run"].run_id)
            return {"run_id": result.run_id, "open": result.breaks_open, "new": result.breaks_new,
                    "resolved": result.breaks_resolved}

        reconcile_window()

    return reconcile_balances()


_checks = load_checks(load_config())
if _checks:
    globals()[DAG_ID] = reconciliation_dag(_checks)
