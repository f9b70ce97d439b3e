"""Aggregated balances reported by a provider (Formance ``/aggregate/balances``).

Kept beside the per-account rows of the same run so reconciliation can
compare the provider's own total with the sum of what was loaded.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE aggregate_balances (
            source        text NOT NULL,
            provider      text NOT NULL,
            asset         text NOT NULL,
            balance       numeric NOT NULL,
            decimals      smallint,
            as_of         timestamptz NOT NULL,
            as_of_raw     text NOT NULL,
            scheduled_for timestamptz NOT NULL,
            run_id        bigint NOT NULL REFERENCES snapshot_runs (run_id),
            loaded_at     timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT aggregate_balances_key PRIMARY KEY (source, asset, as_of)
        )
        """
    )
    op.execute("CREATE INDEX aggregate_balances_run ON aggregate_balances (run_id)")


def downgrade() -> None:
    op.execute("DROP TABLE aggregate_balances")
