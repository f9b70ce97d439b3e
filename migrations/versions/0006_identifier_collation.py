"""Source names, account ids and asset ids compare byte by byte (COLLATE "C").

They are identifiers (``0.0.1234``, ``users:001``, ``0x7bc5...``), not
words. A linguistic collation (``en_US.UTF-8``, the default of most
production clusters) gives them no better order, makes the primary key
that every publish maintains costlier (a keyed load of 1 M rows took 1.61x
as long under ICU en-US: docs/BENCHMARKS.md), and ties the index to the
collation library's version: after an OS upgrade that changes it, a unique
index can silently stop being unique.
"C" never changes. On a database whose default is already C nothing
changes but the catalog.

The views read these columns, and PostgreSQL cannot change a column's type
under a view: they are set aside (definitions kept from the catalog) and
recreated unchanged, with the reader role's grant. On a big table, the
indexes over these columns are rebuilt: plan a maintenance window.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Views of 0004, in creation order (a later one may read an earlier one).
VIEWS = ("balance_history_units", "balances_latest", "balances_daily_close", "balance_changes",
         "source_freshness")
IDENTIFIERS = {
    "balance_history": ("source", "account", "asset"),
    "aggregate_balances": ("source", "asset"),
    "snapshot_runs": ("source",),
}


def upgrade() -> None:
    _set_collation('"C"')


def downgrade() -> None:
    _set_collation('"default"')


def _set_collation(collation: str) -> None:
    bind = op.get_bind()
    definitions = [
        (name, bind.exec_driver_sql(f"SELECT pg_get_viewdef('{name}'::regclass)").scalar())
        for name in VIEWS
    ]
    op.execute(f"DROP VIEW {', '.join(reversed(VIEWS))}")
    for table, columns in IDENTIFIERS.items():
        changes = ", ".join(f"ALTER COLUMN {c} TYPE text COLLATE {collation}" for c in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
    for name, definition in definitions:
        op.execute(f"CREATE VIEW {name} AS {definition}")
    op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO balances_reader")
