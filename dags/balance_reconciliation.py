"""Reconciliation: the `[checks.<name>]` of the sources file, run after snapshots.

Scheduled on the Assets of the sources the checks read: a published
snapshot of any of them, or a window of movements published for a
roll-forward check's source (any-of), triggers a run, which checks the window of
the last 3 days ending at the triggering time and records the breaks in
`reconciliation_breaks` (see `reconciliation/reconcile.py` for what each check
finds). Reruns update the same breaks; breaks that no longer hold are
resolved. Consecutive breaks of one subject are one incident
(`reconciliation/incidents.py`). The task succeeds when the checks ran,
whatever they found, and is stopped after an hour (`execution_timeout`).
With `[alerts]`, `notify_incidents` then sends what is due: an incident's
opening, reminders, its resolution (`reconciliation/alerts.py`). Only defined when the
sources file has checks; a check with a mistake (or on a source with one)
is left out and reported as this file's import error.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import AssetAny, dag, task

from pipeline.assets import movements_asset, snapshot_asset
from reconciliation.checks import Check, usable_checks
from pipeline.config import config_error_dag, load_config

DAG_ID = "reconcile_balances"
# Three days of checks take seconds (fire times per window are bounded);
# an hour means something hangs.
RECONCILE_TIMEOUT = timedelta(hours=1)


def reconciliation_dag(checks: dict[str, Check]):
    sources = sorted({s for check in checks.values() for s in check.sources})
    rolled = sorted({check.source for check in checks.values() if check.kind == "rollforward"})

    @dag(
        dag_id=DAG_ID,
        schedule=AssetAny(*(snapshot_asset(s) for s in sources), *(movements_asset(s) for s in rolled)),
        catchup=False,
        max_active_runs=1,
        default_args={"owner": "balances", "retries": 1, "execution_timeout": RECONCILE_TIMEOUT},
        tags=["balances", "reconciliation"],
        doc_md=__doc__,
    )
    def reconcile_balances():
        @task
        def reconcile_window(**context) -> dict:
            import logging

            from pipeline import tasks
            from pipeline.progress import LineProgress
            from reconciliation import alerts, reconcile

            config = load_config()
            window_from, window_to = reconcile.default_window(reconcile.triggering_time(context))
            with tasks.database() as conn:
                result = reconcile.reconcile(conn, usable_checks(config)[0], window_from, window_to,
                                             dag_run_id=context["dag_run"].run_id,
                                             progress=LineProgress.to_log(logging.getLogger(DAG_ID)),
                                             flap_window=alerts.flap_window(config))
            return {"run_id": result.run_id, "open": result.breaks_open, "new": result.breaks_new,
                    "resolved": result.breaks_resolved}

        reconciled = reconcile_window()
        if load_config().alerts is not None:
            # [alerts]: each incident's alerts, once each (reconciliation/alerts.py).
            @task
            def notify_incidents(**context) -> int:
                from airflow.sdk.exceptions import AirflowFailException

                from pipeline import tasks
                from pipeline.connections import ConnectionMissing
                from reconciliation import alerts

                try:
                    with tasks.database() as conn:
                        return alerts.notify_incidents(conn, load_config(), context).total
                except ConnectionMissing as exc:  # no retry fixes a missing Connection
                    raise AirflowFailException(str(exc)) from None

            reconciled >> notify_incidents()

    return reconcile_balances()


_config = load_config()
_checks, _errors = usable_checks(_config)
if _checks:
    globals()[DAG_ID] = reconciliation_dag(_checks)
# As in balance_snapshots.py: the mistakes become this file's import error, the
# valid checks keep running.
if _errors or _config.alerts_error:
    reconcile_config_errors = config_error_dag(
        "reconcile_balances_config_errors", [*_errors.values(), *filter(None, [_config.alerts_error])])
