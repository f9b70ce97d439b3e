"""Views for dashboards and reconciliation, and the read-only role that sees them.

Whole units, latest balances, daily closes, changes and source freshness
are computed here once, in SQL, so every BI tool and the reconciliation
code read the same numbers. ``balances_reader`` may read these views and
nothing else. Columns are described in docs/SCHEMA.md.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

VIEWS = ("balance_history_units", "balances_latest", "balances_daily_close", "balance_changes",
         "source_freshness")


def upgrade() -> None:
    # Division would round: numeric division keeps only ~16 significant
    # digits (123456789012345678901234567 / 100 loses the cents), and
    # power(10::numeric, -18) is 0.0000000000000000. Multiplying by the
    # exact literal 1e-<decimals> keeps every digit. A SparkFactor need not
    # be a power of ten, so that quotient may not terminate: 40 places.
    op.execute(
        """
        CREATE FUNCTION balance_whole_units(amount numeric, decimals smallint, spark_factor numeric)
        RETURNS numeric LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT CASE
                WHEN decimals IS NOT NULL THEN amount * ('1e' || (-decimals)::text)::numeric
                WHEN spark_factor IS NOT NULL THEN trim_scale(round(amount, 40) / spark_factor)
                ELSE amount
            END
        $$
        """
    )
    op.execute(
        """
        CREATE VIEW balance_history_units AS
        SELECT h.source, h.provider, h.account, h.asset, h.balance, h.decimals, h.available_balance,
               h.spark_factor, h.as_of, h.as_of_raw, h.scheduled_for, h.run_id, h.loaded_at,
               balance_whole_units(h.balance, h.decimals, h.spark_factor) AS balance_units,
               h.balance::text AS balance_text,
               balance_whole_units(h.available_balance, h.decimals, h.spark_factor)
                   AS available_units,
               h.available_balance::text AS available_text
          FROM balance_history h
        """
    )
    # "Latest published snapshot of a source" must not sort every run.
    op.execute(
        "CREATE INDEX snapshot_runs_published ON snapshot_runs (source, as_of DESC)"
        " WHERE status = 'published'"
    )
    # OFFSET 0 keeps the lateral subquery a parameterised scan: the planner
    # cannot know that one snapshot lives in one partition and would rather
    # hash-join every partition of the source; this way each source reads
    # one snapshot through (source, as_of) and the other partitions are
    # pruned at run time.
    op.execute(
        """
        CREATE VIEW balances_latest AS
        SELECT latest.source, u.provider, u.account, u.asset, u.balance, u.decimals,
               u.available_balance, u.spark_factor, u.as_of, u.as_of_raw, u.scheduled_for, u.run_id,
               u.loaded_at, u.balance_units, u.balance_text, u.available_units, u.available_text
          FROM (SELECT DISTINCT ON (r.source) r.source, r.as_of
                  FROM snapshot_runs r
                 WHERE r.status = 'published' AND r.as_of IS NOT NULL
                 ORDER BY r.source, r.as_of DESC) latest
         CROSS JOIN LATERAL (
                SELECT h.provider, h.account, h.asset, h.balance, h.decimals, h.available_balance,
                       h.spark_factor, h.as_of, h.as_of_raw, h.scheduled_for, h.run_id, h.loaded_at,
                       h.balance_units, h.balance_text, h.available_units, h.available_text
                  FROM balance_history_units h
                 WHERE h.source = latest.source AND h.as_of = latest.as_of
                OFFSET 0) u
        """
    )
    op.execute(
        """
        CREATE VIEW balances_daily_close AS
        SELECT u.source, u.provider, u.account, u.asset, close.day, u.as_of, u.balance,
               u.balance_text, u.balance_units, u.decimals, u.spark_factor
          FROM (SELECT DISTINCT ON (r.source, (r.as_of AT TIME ZONE 'UTC')::date)
                       r.source, (r.as_of AT TIME ZONE 'UTC')::date AS day, r.as_of
                  FROM snapshot_runs r
                 WHERE r.status = 'published' AND r.as_of IS NOT NULL
                 ORDER BY r.source, (r.as_of AT TIME ZONE 'UTC')::date, r.as_of DESC) close
          JOIN balance_history_units u ON u.source = close.source AND u.as_of = close.as_of
        """
    )
    # The previous snapshot is looked up per row (the newest older one, one
    # backward probe of the key) rather than with LAG(): a window over the
    # holding's whole history would keep a time filter from pruning
    # partitions; this way "changes in January" reads January.
    op.execute(
        """
        CREATE VIEW balance_changes AS
        SELECT h.source, h.provider, h.account, h.asset, h.as_of, p.as_of AS previous_as_of,
               h.balance, p.balance AS previous_balance, h.balance - p.balance AS delta,
               balance_whole_units(h.balance, h.decimals, h.spark_factor)
                 - balance_whole_units(p.balance, p.decimals, p.spark_factor) AS delta_units,
               (h.balance - p.balance)::text AS delta_text
          FROM balance_history h
          LEFT JOIN LATERAL (
                SELECT q.as_of, q.balance, q.decimals, q.spark_factor
                  FROM balance_history q
                 WHERE q.source = h.source AND q.account = h.account AND q.asset = h.asset
                   AND q.as_of < h.as_of
                 ORDER BY q.as_of DESC
                 LIMIT 1) p ON true
        """
    )
    op.execute(
        """
        CREATE VIEW source_freshness AS
        WITH per_source AS (
            SELECT r.source,
                   max(r.as_of) FILTER (WHERE r.status = 'published') AS last_published_as_of,
                   max(r.scheduled_for) AS last_scheduled_for,
                   count(*) FILTER (
                       WHERE r.status IN ('failed', 'abandoned')
                         AND coalesce(r.finished_at, r.started_at) >= now() - interval '24 hours'
                   ) AS failed_runs_24h
              FROM snapshot_runs r
             GROUP BY r.source)
        SELECT s.source, last_run.provider, s.last_published_as_of, s.last_scheduled_for,
               last_run.run_id AS last_run_id, last_run.status AS last_run_status,
               last_run.started_at AS last_run_started_at,
               last_run.finished_at AS last_run_finished_at, last_run.error AS last_run_error,
               now() - s.last_published_as_of AS age,
               extract(epoch FROM now() - s.last_published_as_of) AS age_seconds,
               s.failed_runs_24h
          FROM per_source s
          CROSS JOIN LATERAL (
                SELECT r.run_id, r.provider, r.status, r.started_at, r.finished_at, r.error
                  FROM snapshot_runs r
                 WHERE r.source = s.source
                 ORDER BY r.scheduled_for DESC, r.run_id DESC
                 LIMIT 1) last_run
        """
    )
    # Roles are cluster-wide: another database of the cluster may have
    # created it already, even while this migration runs.
    op.execute(
        """
        DO $$
        BEGIN
            IF to_regrole('balances_reader') IS NULL THEN
                CREATE ROLE balances_reader NOLOGIN;
            END IF;
        EXCEPTION
            WHEN duplicate_object THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'creating role balances_reader needs CREATEROLE'
                    USING HINT = 'an administrator runs CREATE ROLE balances_reader NOLOGIN once';
        END
        $$
        """
    )
    op.execute("GRANT USAGE ON SCHEMA public TO balances_reader")
    # Functions a view calls are checked against the reader, not the owner.
    op.execute("GRANT EXECUTE ON FUNCTION balance_whole_units(numeric, smallint, numeric)"
               " TO balances_reader")
    # SELECT only: balance_history_units is simple enough to be updatable.
    op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO balances_reader")


def downgrade() -> None:
    op.execute(f"DROP VIEW {', '.join(reversed(VIEWS))}")
    op.execute("DROP INDEX snapshot_runs_published")
    op.execute("DROP FUNCTION balance_whole_units(numeric, smallint, numeric)")
    # Members (login users an operator added) or grants in another database
    # of the cluster keep the role alive; dropping it would silently cut them.
    op.execute(
        """
        DO $$
        BEGIN
            IF to_regrole('balances_reader') IS NULL THEN
                RETURN;
            END IF;
            REVOKE USAGE ON SCHEMA public FROM balances_reader;
            IF EXISTS (SELECT FROM pg_auth_members
                        WHERE roleid = to_regrole('balances_reader')) THEN
                RAISE NOTICE 'role balances_reader kept: it has members';
                RETURN;
            END IF;
            BEGIN
                DROP ROLE balances_reader;
            EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
                RAISE NOTICE 'role balances_reader kept: %', SQLERRM;
            END;
        END
        $$
        """
    )
