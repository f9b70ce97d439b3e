"""Reconciliation results: one row per reconciliation run, one per break.

A break is keyed by its check, its kind, its subject (the holding, asset or
source it is about, as JSON) and its check time, so rerunning a window
updates the same rows (``last_seen``) instead of adding new ones.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE reconciliation_runs (
            run_id          bigserial PRIMARY KEY,
            window_from     timestamptz NOT NULL,
            window_to       timestamptz NOT NULL,
            started_at      timestamptz NOT NULL DEFAULT now(),
            finished_at     timestamptz,
            status          text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
            checks          text[] NOT NULL DEFAULT '{}',
            checks_run      integer NOT NULL DEFAULT 0,
            breaks_open     integer NOT NULL DEFAULT 0,
            breaks_new      integer NOT NULL DEFAULT 0,
            breaks_resolved integer NOT NULL DEFAULT 0,
            dag_run_id      text,
            error           text,
            CHECK (window_from <= window_to)
        )
        """
    )
    # Values are in whole units (for stale breaks: seconds), exact NUMERIC.
    op.execute(
        """
        CREATE TABLE reconciliation_breaks (
            break_id      bigserial PRIMARY KEY,
            check_name    text NOT NULL,
            check_kind    text NOT NULL CHECK (check_kind IN ('pair', 'aggregate', 'continuity')),
            kind          text NOT NULL,
            subject       jsonb NOT NULL,
            check_time    timestamptz NOT NULL,
            sources       text[] NOT NULL,
            left_value    numeric,
            right_value   numeric,
            difference    numeric,
            tolerance     numeric,
            status        text NOT NULL CHECK (status IN ('open', 'resolved')),
            first_seen    timestamptz NOT NULL,
            last_seen     timestamptz NOT NULL,
            resolved_at   timestamptz,
            first_run_id  bigint NOT NULL REFERENCES reconciliation_runs (run_id),
            last_run_id   bigint NOT NULL REFERENCES reconciliation_runs (run_id),
            detail        text NOT NULL DEFAULT '',
            CONSTRAINT reconciliation_breaks_key UNIQUE (check_name, kind, subject, check_time)
        )
        """
    )
    # Serves "breaks of this check in this window" (resolution) and the report.
    op.execute("CREATE INDEX reconciliation_breaks_check_time ON reconciliation_breaks (check_name, check_time)")
    op.execute("CREATE INDEX reconciliation_breaks_open ON reconciliation_breaks (check_time) WHERE status = 'open'")


def downgrade() -> None:
    op.execute("DROP TABLE reconciliation_breaks")
    op.execute("DROP TABLE reconciliation_runs")
