"""Locks and leases no reader can take or block; skipped and abandoned runs.

Any login may call ``pg_advisory_lock`` on any key, the read-only
``balances_reader`` logins included, and run ids are predictable: the
advisory locks that marked runs alive, serialised publishes and guarded
partition creation let a dashboard login stall a snapshot forever. What
replaces them lives in tables ``balances_reader`` has no privilege on:

* ``run_leases``: which database session works on a run (or a shard of
  it); the lease lasts while that session is connected (loaders/leases.py).
* ``source_locks``: one row per source; publishes of a source take turns
  on it (``SELECT ... FOR UPDATE``).

``balance_history_ensure_partition`` now creates the month as a plain table
and attaches it. ``CREATE TABLE ... PARTITION OF`` takes ACCESS EXCLUSIVE
on ``balance_history``: it queues behind any reader's open transaction on
the views, and every later reader queues behind it. ``ATTACH PARTITION``
takes SHARE UPDATE EXCLUSIVE, which readers (ACCESS SHARE) and publishes
(ROW EXCLUSIVE) do not conflict with; it conflicts with itself, so it also
serialises two publishers racing for one new month. Only the pipeline may
execute the function.

Statuses: ``skipped`` for a rerun of an interval already published by a
present-only provider (nothing fetched, nothing stored), ``abandoned`` for
a reconciliation whose process died.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SNAPSHOT_STATUSES = "'running', 'published', 'failed', 'no_snapshot', 'abandoned'"
RECONCILIATION_STATUSES = "'running', 'succeeded', 'failed'"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE run_leases (
            run_kind      text NOT NULL CHECK (run_kind IN ('snapshot', 'reconciliation')),
            run_id        bigint NOT NULL,
            shard         integer NOT NULL,  -- -1: the whole run
            pid           integer NOT NULL,
            backend_start timestamptz NOT NULL,
            holder_role   oid NOT NULL,
            claimed_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_kind, run_id, shard)
        )
        """
    )
    op.execute('CREATE TABLE source_locks (source text COLLATE "C" PRIMARY KEY)')
    op.execute(
        f"""
        ALTER TABLE snapshot_runs DROP CONSTRAINT snapshot_runs_status_check,
            ADD CONSTRAINT snapshot_runs_status_check CHECK (status IN ({SNAPSHOT_STATUSES}, 'skipped'))
        """
    )
    op.execute(
        f"""
        ALTER TABLE reconciliation_runs DROP CONSTRAINT reconciliation_runs_status_check,
            ADD CONSTRAINT reconciliation_runs_status_check
                CHECK (status IN ({RECONCILIATION_STATUSES}, 'abandoned'))
        """
    )
    op.execute(
        """
        CREATE OR REPLACE FUNCTION balance_history_ensure_partition(at timestamptz) RETURNS text
        LANGUAGE plpgsql AS $$
        DECLARE
            first_day timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
            part      text := 'balance_history_' || to_char(first_day AT TIME ZONE 'UTC', 'YYYY_MM');
        BEGIN
            IF to_regclass(part) IS NULL THEN
                LOCK TABLE balance_history IN SHARE UPDATE EXCLUSIVE MODE;
                IF to_regclass(part) IS NULL THEN
                    EXECUTE format('CREATE TABLE %I (LIKE balance_history INCLUDING DEFAULTS)', part);
                    EXECUTE format(
                        'ALTER TABLE balance_history ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                        part, first_day, first_day + interval '1 month');
                END IF;
            END IF;
            -- A table of that name that is not our partition (created by
            -- hand, or by someone allowed to create tables in public) would
            -- otherwise make every publish into that month fail obscurely.
            IF NOT EXISTS (SELECT FROM pg_inherits
                            WHERE inhrelid = to_regclass(part) AND inhparent = 'balance_history'::regclass) THEN
                RAISE EXCEPTION 'table % exists but is not a partition of balance_history', part;
            END IF;
            RETURN part;
        END
        $$
        """
    )
    op.execute("REVOKE EXECUTE ON FUNCTION balance_history_ensure_partition(timestamptz) FROM PUBLIC")


def downgrade() -> None:
    op.execute("GRANT EXECUTE ON FUNCTION balance_history_ensure_partition(timestamptz) TO PUBLIC")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION balance_history_ensure_partition(at timestamptz) RETURNS text
        LANGUAGE plpgsql AS $$
        DECLARE
            first_day timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
            part      text := 'balance_history_' || to_char(first_day AT TIME ZONE 'UTC', 'YYYY_MM');
        BEGIN
            IF to_regclass(part) IS NULL THEN
                PERFORM pg_advisory_xact_lock(hashtext(part));
                IF to_regclass(part) IS NULL THEN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF balance_history FOR VALUES FROM (%L) TO (%L)',
                        part, first_day, first_day + interval '1 month');
                END IF;
            END IF;
            RETURN part;
        END
        $$
        """
    )
    # The older statuses cannot say these: a skipped run stored nothing and
    # is dropped; an abandoned reconciliation failed.
    op.execute("DELETE FROM snapshot_runs WHERE status = 'skipped'")
    op.execute("UPDATE reconciliation_runs SET status = 'failed' WHERE status = 'abandoned'")
    op.execute(
        f"""
        ALTER TABLE snapshot_runs DROP CONSTRAINT snapshot_runs_status_check,
            ADD CONSTRAINT snapshot_runs_status_check CHECK (status IN ({SNAPSHOT_STATUSES}))
        """
    )
    op.execute(
        f"""
        ALTER TABLE reconciliation_runs DROP CONSTRAINT reconciliation_runs_status_check,
            ADD CONSTRAINT reconciliation_runs_status_check CHECK (status IN ({RECONCILIATION_STATUSES}))
        """
    )
    op.execute("DROP TABLE source_locks")
    op.execute("DROP TABLE run_leases")
