"""Movements and the roll-forward: every balance change explained by the movements behind it.

* ``movement_runs``: one row per attempt to load the movements of a
  **window**, the span ``(period_start, period_end]`` between two
  consecutive published snapshots of a source. A window is held by at most
  one run that ``published`` it (or recorded it ``not_available``: the
  provider offers no movements). A run whose window is split by a
  backfilled snapshot in between becomes ``superseded``, its movements
  removed, when the first of the two smaller windows is published.
  ``unexplainable`` names the assets whose movements the provider cannot
  read in that window (an EVM node without traces cannot explain native
  balances), with the reason.
* ``balance_movements``: one row per leg of a movement, exactly as the
  provider reported it, in the balance rows' units; unique per source and
  ``movement_id``. Loaded only by the publish of a whole window, in one
  transaction.
* ``rejected_movements``: movement records that could not be read, kept
  with their text and reason, as ``rejected_records`` keeps balances'.
* Views ``balance_rollforward`` (the roll-forward statement: opening +
  inflow - outflow = closing, and what is left unexplained) and
  ``balance_movements_detail``, readable by ``balances_reader``.
* ``reconciliation_breaks.check_kind`` and ``break_incidents.check_kind`` accept ``rollforward``;
  ``run_leases.run_kind`` accepts ``movements``.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""
from alembic import op

revision = "0015"
# Chained after 0014 (incidents) when both land; "0013" until then.
down_revision = "0014"
branch_labels = None
depends_on = None

MOVEMENT_KINDS = ("transfer", "fee", "reward", "mint", "burn", "withdrawal")
MOVEMENT_STATUSES = ("running", "published", "failed", "abandoned", "not_available", "superseded", "skipped")
VIEWS = ("balance_rollforward", "balance_movements_detail")


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


# Per window, per holding: the opening and closing balances (the two
# snapshots' states) and the movements' inflow and outflow. A holding one
# snapshot lacks is 0 there (an account created, a token dissociated); one
# neither snapshot lists but movements name is a movement without a holding.
# The windows are the published or not_available runs whose two snapshots
# are still held.
ROLLFORWARD_VIEW = """
CREATE VIEW balance_rollforward AS
SELECT w.source, x.account, x.asset, w.period_start, w.period_end,
       x.opening, x.inflow, x.outflow, x.closing, x.unexplained,
       x.status, x.note, x.movements, x.decimals, x.spark_factor,
       balance_whole_units(x.opening, x.decimals, x.spark_factor) AS opening_units,
       balance_whole_units(x.inflow, x.decimals, x.spark_factor) AS inflow_units,
       balance_whole_units(x.outflow, x.decimals, x.spark_factor) AS outflow_units,
       balance_whole_units(x.closing, x.decimals, x.spark_factor) AS closing_units,
       balance_whole_units(x.unexplained, x.decimals, x.spark_factor) AS unexplained_units,
       x.opening::text AS opening_text, x.inflow::text AS inflow_text, x.outflow::text AS outflow_text,
       x.closing::text AS closing_text, x.unexplained::text AS unexplained_text,
       w.run_id AS movement_run_id
  FROM movement_runs w
  JOIN balance_snapshots s0 ON s0.source = w.source AND s0.as_of = w.period_start
  JOIN balance_snapshots s1 ON s1.source = w.source AND s1.as_of = w.period_end
 CROSS JOIN LATERAL (
        SELECT z.account, z.asset, z.opening, z.inflow, z.outflow, z.closing, z.note, z.movements,
               z.decimals, z.spark_factor,
               CASE WHEN z.opening IS NULL AND z.closing IS NULL THEN NULL
                    ELSE coalesce(z.closing, 0) - coalesce(z.opening, 0) - z.inflow + z.outflow END AS unexplained,
               CASE WHEN w.status = 'not_available' THEN 'not_available'
                    WHEN z.inflow IS NULL THEN 'unexplainable'
                    WHEN z.opening IS NULL AND z.closing IS NULL THEN 'movement_without_holding'
                    WHEN coalesce(z.closing, 0) - coalesce(z.opening, 0) = z.inflow - z.outflow THEN 'explained'
                    ELSE 'unexplained' END AS status
          FROM (SELECT k.account, k.asset, k.opening, k.closing, k.decimals, k.spark_factor, k.note, k.movements,
                       CASE WHEN w.status = 'published' AND k.note IS NULL THEN k.inflow END AS inflow,
                       CASE WHEN w.status = 'published' AND k.note IS NULL THEN k.outflow END AS outflow
                  FROM (SELECT coalesce(b.account, m.account) AS account, coalesce(b.asset, m.asset) AS asset,
                               b.opening, b.closing, coalesce(b.decimals, m.decimals) AS decimals, b.spark_factor,
                               coalesce(m.inflow, 0) AS inflow, coalesce(m.outflow, 0) AS outflow,
                               coalesce(m.movements, 0) AS movements,
                               coalesce(w.unexplainable ->> coalesce(b.asset, m.asset), w.unexplainable ->> '*')
                                   AS note
                          FROM (SELECT coalesce(o.account, c.account) AS account,
                                       coalesce(o.asset, c.asset) AS asset,
                                       o.balance AS opening, c.balance AS closing,
                                       coalesce(c.decimals, o.decimals) AS decimals,
                                       coalesce(c.spark_factor, o.spark_factor) AS spark_factor
                                  FROM (SELECT h.account, h.asset, h.balance, h.decimals, h.spark_factor
                                          FROM balance_history h
                                         WHERE h.source = w.source AND h.as_of = w.period_start) o
                                  FULL JOIN (SELECT h.account, h.asset, h.balance, h.decimals, h.spark_factor
                                               FROM balance_history h
                                              WHERE h.source = w.source AND h.as_of = w.period_end) c
                                    ON c.account = o.account AND c.asset = o.asset) b
                          FULL JOIN (SELECT v.account, v.asset,
                                            sum(v.amount) FILTER (WHERE v.amount > 0) AS inflow,
                                            -sum(v.amount) FILTER (WHERE v.amount < 0) AS outflow,
                                            count(*) AS movements, max(v.decimals) AS decimals
                                       FROM balance_movements v
                                      WHERE v.run_id = w.run_id
                                      GROUP BY v.account, v.asset) m
                            ON m.account = b.account AND m.asset = b.asset) k) z) x
 WHERE w.status IN ('published', 'not_available')
"""

DETAIL_VIEW = """
CREATE VIEW balance_movements_detail AS
SELECT m.source, r.provider, m.account, m.asset, m.movement_time, m.movement_time_raw, m.movement_id,
       m.amount, balance_whole_units(m.amount, m.decimals, NULL) AS amount_units, m.amount::text AS amount_text,
       m.decimals, m.counterparty, m.kind, r.period_start, r.period_end, m.run_id, m.loaded_at
  FROM balance_movements m
  JOIN movement_runs r ON r.run_id = m.run_id
"""


# The tables that name a check's kind (breaks since 0005, their incidents since 0014).
CHECK_KIND_TABLES = ("reconciliation_breaks", "break_incidents")


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE movement_runs (
            run_id          bigserial PRIMARY KEY,
            source          text COLLATE "C" NOT NULL,
            provider        text NOT NULL,
            period_start    timestamptz NOT NULL,
            period_end      timestamptz NOT NULL,
            start_raw       text NOT NULL,
            end_raw         text NOT NULL,
            snapshot_run_id bigint,
            dag_run_id      text,
            shards          integer NOT NULL DEFAULT 1,
            status          text NOT NULL CHECK (status IN ({_quoted(MOVEMENT_STATUSES)})),
            started_at      timestamptz NOT NULL DEFAULT now(),
            finished_at     timestamptz,
            pages           integer NOT NULL DEFAULT 0,
            requests        integer NOT NULL DEFAULT 0,
            retries         integer NOT NULL DEFAULT 0,
            movements       bigint NOT NULL DEFAULT 0,
            rejected        integer NOT NULL DEFAULT 0,
            warnings        jsonb NOT NULL DEFAULT '[]'::jsonb,
            staged          jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            unexplainable   jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            error           text,
            config          jsonb,
            CHECK (period_start < period_end)
        )
        """
    )
    # A window is held by one run at most: the one that published it (or found it not available).
    op.execute("CREATE UNIQUE INDEX movement_runs_window ON movement_runs (source, period_start, period_end)"
               " WHERE status IN ('published', 'not_available')")
    op.execute("CREATE INDEX movement_runs_source_end ON movement_runs (source, period_end DESC)")
    op.execute(
        f"""
        CREATE TABLE balance_movements (
            source            text COLLATE "C" NOT NULL,
            account           text COLLATE "C" NOT NULL,
            asset             text COLLATE "C" NOT NULL,
            movement_time     timestamptz NOT NULL,
            movement_time_raw text NOT NULL,
            movement_id       text COLLATE "C" NOT NULL,
            amount            numeric NOT NULL,
            kind              text NOT NULL CHECK (kind IN ({_quoted(MOVEMENT_KINDS)})),
            decimals          smallint,
            counterparty      text,
            run_id            bigint NOT NULL REFERENCES movement_runs (run_id),
            loaded_at         timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (source, movement_id)
        )
        """
    )
    # A window's movements (the statement, superseding); a holding's over time.
    op.execute("CREATE INDEX balance_movements_run ON balance_movements (run_id)")
    op.execute("CREATE INDEX balance_movements_time ON balance_movements (source, movement_time)")
    op.execute(
        """
        CREATE TABLE rejected_movements (
            rejected_id bigserial PRIMARY KEY,
            run_id      bigint NOT NULL REFERENCES movement_runs (run_id) ON DELETE CASCADE,
            shard       integer NOT NULL DEFAULT 0,
            raw         text NOT NULL,
            reason      text NOT NULL,
            reason_code text NOT NULL DEFAULT 'malformed_record',
            rejected_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX rejected_movements_run ON rejected_movements (run_id, shard)")
    for table in CHECK_KIND_TABLES:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_check_kind_check")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_check_kind_check"
                   " CHECK (check_kind IN ('pair', 'aggregate', 'continuity', 'rollforward'))")
    op.execute("ALTER TABLE run_leases DROP CONSTRAINT run_leases_run_kind_check")
    op.execute("ALTER TABLE run_leases ADD CONSTRAINT run_leases_run_kind_check"
               " CHECK (run_kind IN ('snapshot', 'reconciliation', 'movements'))")
    op.execute(ROLLFORWARD_VIEW)
    op.execute(DETAIL_VIEW)
    op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO balances_reader")


def downgrade() -> None:
    op.execute(f"DROP VIEW {', '.join(reversed(VIEWS))}")
    op.execute("DELETE FROM run_leases WHERE run_kind = 'movements'")
    op.execute("ALTER TABLE run_leases DROP CONSTRAINT run_leases_run_kind_check")
    op.execute("ALTER TABLE run_leases ADD CONSTRAINT run_leases_run_kind_check"
               " CHECK (run_kind IN ('snapshot', 'reconciliation'))")
    op.execute("DELETE FROM reconciliation_breaks WHERE check_kind = 'rollforward'")
    op.execute("DELETE FROM break_incidents WHERE check_kind = 'rollforward'")
    for table in CHECK_KIND_TABLES:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_check_kind_check")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_check_kind_check"
                   " CHECK (check_kind IN ('pair', 'aggregate', 'continuity'))")
    op.execute("DROP TABLE rejected_movements")
    op.execute("DROP TABLE balance_movements")
    op.execute("DROP TABLE movement_runs")
