"""History table, run bookkeeping and quarantine.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE snapshot_runs (
            run_id        bigserial PRIMARY KEY,
            source        text NOT NULL,
            provider      text NOT NULL,
            scheduled_for timestamptz NOT NULL,
            dag_run_id    text,
            shards        integer NOT NULL DEFAULT 1,
            status        text NOT NULL
                          CHECK (status IN ('running', 'published', 'failed', 'no_snapshot', 'abandoned')),
            started_at    timestamptz NOT NULL DEFAULT now(),
            finished_at   timestamptz,
            as_of         timestamptz,
            as_of_raw     text,
            pages         integer NOT NULL DEFAULT 0,
            requests      integer NOT NULL DEFAULT 0,
            retries       integer NOT NULL DEFAULT 0,
            rows          bigint NOT NULL DEFAULT 0,
            rows_inserted bigint NOT NULL DEFAULT 0,
            rejected      integer NOT NULL DEFAULT 0,
            warnings      jsonb NOT NULL DEFAULT '[]'::jsonb,
            -- {"<shard>": {"rows": n, "aggregates": m}} once a shard finished
            -- staging; publish checks the (UNLOGGED) staging tables still hold it.
            staged        jsonb NOT NULL DEFAULT '{}'::jsonb,
            error         text
        )
        """
    )
    op.execute("CREATE INDEX snapshot_runs_source_time ON snapshot_runs (source, scheduled_for DESC)")
    op.execute(
        """
        CREATE TABLE rejected_records (
            rejected_id bigserial PRIMARY KEY,
            run_id      bigint NOT NULL REFERENCES snapshot_runs (run_id) ON DELETE CASCADE,
            shard       integer NOT NULL DEFAULT 0,
            raw         text NOT NULL,
            reason      text NOT NULL,
            rejected_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX rejected_records_run ON rejected_records (run_id, shard)")
    # balance is NUMERIC without scale: exactly what the provider reported.
    # No foreign key to snapshot_runs: it would cost a lookup per row on a
    # million-row publish, and publish writes both in one transaction.
    op.execute(
        """
        CREATE TABLE balance_history (
            source            text NOT NULL,
            provider          text NOT NULL,
            account           text NOT NULL,
            asset             text NOT NULL,
            balance           numeric NOT NULL,
            decimals          smallint,
            available_balance numeric,
            spark_factor      numeric,
            as_of             timestamptz NOT NULL,
            as_of_raw         text NOT NULL,
            scheduled_for     timestamptz NOT NULL,
            run_id            bigint NOT NULL,
            loaded_at         timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT balance_history_key PRIMARY KEY (source, account, asset, as_of)
        ) PARTITION BY RANGE (as_of)
        """
    )
    # The key serves "latest per account" (backward scan per partition);
    # this one serves time ranges and "everything in one snapshot".
    op.execute("CREATE INDEX balance_history_source_as_of ON balance_history (source, as_of)")
    op.execute(
        """
        CREATE FUNCTION balance_history_ensure_partition(at timestamptz) RETURNS text
        LANGUAGE plpgsql AS $$
        DECLARE
            first_day timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
            part      text := 'balance_history_' || to_char(first_day AT TIME ZONE 'UTC', 'YYYY_MM');
        BEGIN
            IF to_regclass(part) IS NULL THEN
                -- Two publishers may race for the same new month.
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
    op.execute("CREATE SCHEMA balance_staging")


def downgrade() -> None:
    op.execute("DROP SCHEMA balance_staging CASCADE")
    op.execute("DROP TABLE balance_history")
    op.execute("DROP FUNCTION balance_history_ensure_partition(timestamptz)")
    op.execute("DROP TABLE rejected_records")
    op.execute("DROP TABLE snapshot_runs")
