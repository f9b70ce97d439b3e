"""Each source's newest snapshot kept as it was staged, so the next publish compares against it.

Publishing a snapshot by changes (0010) compares it with the previous one.
Rebuilding the previous one from the history (the month's keyframe plus
its changes, newest row per holding) costs as much as the comparison
itself. Instead, the staging tables a source's newest snapshot was
published from are kept (renamed ``balance_staging.latest_<run>_shard_<n>``)
and recorded here; the next publish reads them straight.

They are a cache, never the record: the history answers every question
without them. A publish uses them only while they provably hold the
previous snapshot: the entry is ``valid``, names that snapshot, its tables
exist and hold exactly ``holdings`` rows (staging is UNLOGGED, so crash
recovery empties them). Anything that changes a stored snapshot other
than appending the newest one (a backfill before it, a rerun adding
holdings, a write through the ``balance_history`` view, a TRUNCATE)
updates or deletes its ``balance_snapshots`` row or truncates the
history; the triggers below then mark the entry invalid, and the next
publish reads the history instead and keeps its own staging in its place.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE balance_latest_cache (
            source   text COLLATE "C" PRIMARY KEY,
            as_of    timestamptz NOT NULL,
            run_id   bigint NOT NULL,       -- its tables: balance_staging.latest_<run_id>_shard_<n>
            shards   integer NOT NULL CHECK (shards > 0),
            provider text NOT NULL,
            holdings bigint NOT NULL,       -- rows in those tables, one per holding
            valid    boolean NOT NULL DEFAULT true
        )
        """
    )
    op.execute(
        """
        CREATE FUNCTION balance_latest_cache_invalidate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_LEVEL = 'ROW' THEN
                UPDATE balance_latest_cache SET valid = false
                 WHERE source = OLD.source AND as_of = OLD.as_of AND valid;
            ELSE
                UPDATE balance_latest_cache SET valid = false WHERE valid;
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute("REVOKE EXECUTE ON FUNCTION balance_latest_cache_invalidate() FROM PUBLIC")
    op.execute("CREATE TRIGGER balance_latest_cache_snapshot_changed AFTER UPDATE OR DELETE ON balance_snapshots"
               " FOR EACH ROW EXECUTE FUNCTION balance_latest_cache_invalidate()")
    for table in ("balance_snapshots", "balance_history_store"):
        op.execute(f"CREATE TRIGGER balance_latest_cache_truncated AFTER TRUNCATE ON {table}"
                   " FOR EACH STATEMENT EXECUTE FUNCTION balance_latest_cache_invalidate()")


def downgrade() -> None:
    bind = op.get_bind()
    for (name,) in bind.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'balance_staging'"
            " AND tablename ~ '^latest_[0-9]+_shard_[0-9]+$'").fetchall():
        op.execute(f'DROP TABLE balance_staging."{name}"')
    for table in ("balance_snapshots", "balance_history_store"):
        op.execute(f"DROP TRIGGER balance_latest_cache_truncated ON {table}")
    op.execute("DROP TRIGGER balance_latest_cache_snapshot_changed ON balance_snapshots")
    op.execute("DROP FUNCTION balance_latest_cache_invalidate()")
    op.execute("DROP TABLE balance_latest_cache")
