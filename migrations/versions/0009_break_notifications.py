"""Which breaks the alerts already reported, so none is reported twice.

One row per reported break (``[alerts]`` in the sources file): a break is
claimed here in the same transaction that sends its alert, so a failed
send claims nothing and the next reconciliation sends it again, while a
break that resolves and reopens is never reported a second time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE break_notifications (
            break_id bigint PRIMARY KEY REFERENCES reconciliation_breaks (break_id) ON DELETE CASCADE,
            notified_at timestamptz NOT NULL DEFAULT now(),
            channels text[] NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE break_notifications")
