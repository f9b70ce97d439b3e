"""Pipeline health for dashboards, and the views' names made consistent.

* ``pipeline_runs``: every snapshot run (source, status, times, duration,
  counts) without its ``error`` text, and ``rejection_reasons``: rejected
  records counted per source, UTC day and reason code. Both are readable by
  ``balances_reader``; neither shows text a provider wrote (errors and raw
  records can quote it), so a run-history or rejection chart can be built
  without access to ``snapshot_runs`` or ``rejected_records``.
* ``rejected_records.reason_code``: why, in the pipeline's own words
  (``extractors.records.REASON_CODES``); rows from before this migration
  are ``unclassified``.
* ``balance_latest`` and ``balance_daily_close`` are the views' names now,
  like ``balance_history_units`` and ``balance_changes``;
  ``balances_latest`` and ``balances_daily_close`` stay as views over them,
  so existing dashboards keep working.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

RENAMED = {"balances_latest": "balance_latest", "balances_daily_close": "balance_daily_close"}


def upgrade() -> None:
    op.execute("ALTER TABLE rejected_records ADD COLUMN reason_code text NOT NULL DEFAULT 'unclassified'")
    for old, new in RENAMED.items():
        # A rename keeps the definition and the grants; the old name becomes a view over the new.
        op.execute(f"ALTER VIEW {old} RENAME TO {new}")
        op.execute(f"CREATE VIEW {old} AS SELECT * FROM {new}")
        op.execute(f"GRANT SELECT ON {old} TO balances_reader")
    op.execute(
        """
        CREATE VIEW pipeline_runs AS
        SELECT run_id, source, provider, status, scheduled_for, as_of, started_at, finished_at,
               extract(epoch FROM finished_at - started_at)::numeric AS duration_seconds,
               shards, pages, requests, retries, rows, rows_inserted, rows_stored, rejected,
               jsonb_array_length(coalesce(warnings, '[]'::jsonb)) AS warnings,
               dag_run_id IS NOT NULL AS by_airflow
          FROM snapshot_runs
        """
    )
    op.execute(
        """
        CREATE VIEW rejection_reasons AS
        SELECT r.source, r.provider, x.reason_code, (x.rejected_at AT TIME ZONE 'UTC')::date AS day,
               count(*) AS rejections, count(DISTINCT x.run_id) AS runs, max(x.rejected_at) AS last_rejected_at
          FROM rejected_records x
          JOIN snapshot_runs r USING (run_id)
         GROUP BY r.source, r.provider, x.reason_code, (x.rejected_at AT TIME ZONE 'UTC')::date
        """
    )
    op.execute("GRANT SELECT ON pipeline_runs, rejection_reasons TO balances_reader")


def downgrade() -> None:
    op.execute("DROP VIEW rejection_reasons, pipeline_runs")
    for old, new in RENAMED.items():
        op.execute(f"DROP VIEW {old}")
        op.execute(f"ALTER VIEW {new} RENAME TO {old}")
    op.execute("ALTER TABLE rejected_records DROP COLUMN reason_code")
