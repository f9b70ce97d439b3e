"""Reconciliation results for dashboards: views the read-only role may read.

``balances_reader`` reads views and nothing else (0004); these two give it
the breaks: one row per break with its subject spelled out and its values
also as exact text, and a count of breaks per day and check. Columns are
described in docs/SCHEMA.md.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

VIEWS = ("reconciliation_breaks_detail", "reconciliation_breaks_daily")


def upgrade() -> None:
    # A pair's subject is {"left": holding, "right": holding}; every other
    # subject is one holding, asset or source: {"source", ["account"], ["asset"]}.
    op.execute(
        """
        CREATE VIEW reconciliation_breaks_detail AS
        SELECT b.break_id, b.check_name, b.check_kind, b.kind, b.status, b.check_time,
               b.sources, b.subject,
               CASE WHEN b.subject ? 'left'
                    THEN concat_ws(' ', b.subject #>> '{left,source}', b.subject #>> '{left,account}',
                                   b.subject #>> '{left,asset}')
                         || ' vs '
                         || concat_ws(' ', b.subject #>> '{right,source}',
                                      b.subject #>> '{right,account}', b.subject #>> '{right,asset}')
                    ELSE concat_ws(' ', b.subject ->> 'source', b.subject ->> 'account',
                                   b.subject ->> 'asset')
               END AS subject_label,
               b.left_value, b.right_value, b.difference, b.tolerance,
               b.left_value::text AS left_text, b.right_value::text AS right_text,
               b.difference::text AS difference_text,
               b.first_seen, b.last_seen, b.resolved_at, b.detail
          FROM reconciliation_breaks b
        """
    )
    op.execute(
        """
        CREATE VIEW reconciliation_breaks_daily AS
        SELECT (date_trunc('day', b.check_time AT TIME ZONE 'UTC'))::date AS day,
               b.check_name, b.check_kind,
               count(*) FILTER (WHERE b.status = 'open') AS open,
               count(*) FILTER (WHERE b.status = 'resolved') AS resolved,
               count(*) AS total,
               max(b.last_seen) AS last_seen
          FROM reconciliation_breaks b
         GROUP BY 1, 2, 3
        """
    )
    op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO balances_reader")


def downgrade() -> None:
    op.execute(f"DROP VIEW {', '.join(reversed(VIEWS))}")
