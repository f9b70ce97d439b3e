"""History stored by changes: a monthly keyframe, then only what changed.

Until now every published snapshot wrote every holding again. From here
``balance_history_store`` (monthly partitions ``balance_history_YYYY_MM``)
holds, per source:

* the **keyframe**: the first snapshot of the source in each UTC month, in
  full, so a month is self-contained and "balance at T" reads T's month only;
* for every later snapshot of the month, only the holdings that are new or
  changed (balance, available balance, decimals, spark factor, or the
  provider; a scale change such as ``12.5`` -> ``12.50`` counts) since the
  previous snapshot, and a **tombstone** (``gone``) for each holding that
  was there and is missing now. A holding that comes back is new again.

``balance_snapshots`` lists the snapshots held (one row per source and
``as_of``, with the run that first published it). The state of a source at
snapshot S is, per holding, the newest stored row from the first of S's
month up to S, unless it is a tombstone.

``balance_history`` is now a view with the same columns as the table had:
every holding at every snapshot. The reader views (0004) are recreated on
it and mean what they meant. Writing through ``balance_history``
(INSERT/UPDATE/DELETE) still works for maintenance and tests: triggers
turn each change into a rewrite of that snapshot (and of the next one in
its month), which is exact but costs a snapshot per row.

Row metadata (``as_of_raw``, ``scheduled_for``, ``run_id``, ``loaded_at``)
is stored only where it differs from the snapshot's (a holding added by a
rerun); elsewhere it is NULL and the snapshot's is shown.

Existing full snapshots are converted in place; the downgrade expands the
history back into a full table.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""
from datetime import datetime, timezone

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

READER_VIEWS = ("balance_history_units", "balances_latest", "balances_daily_close", "balance_changes")
MONTH_START = "(date_trunc('month', {0} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"
MONTH_END = "((date_trunc('month', {0} AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC')"
# A stored row's values, compared exactly: numeric equality ignores the
# scale, which the text of a balance keeps (12.5 is not 12.50).
VALUES_DIFFER = " OR ".join(
    [f"{{a}}.{c} IS DISTINCT FROM {{b}}.{c}" for c in ("provider", "decimals")]
    + [f"{{a}}.{c} IS DISTINCT FROM {{b}}.{c} OR scale({{a}}.{c}) IS DISTINCT FROM scale({{b}}.{c})"
       for c in ("balance", "available_balance", "spark_factor")]
)
META = ("as_of_raw", "scheduled_for", "run_id", "loaded_at")


def state_at(source: str, as_of: str) -> str:
    """The holdings of ``source`` at snapshot ``as_of`` (SQL expressions): values and own metadata.

    Metadata is non-null only for a row stored at that snapshot with its own.
    """
    meta = ", ".join(f"CASE WHEN r.as_of = {as_of} THEN r.{m} END AS {m}" for m in META)
    return f"""
        SELECT r.provider, r.account, r.asset, r.balance, r.decimals, r.available_balance, r.spark_factor,
               {meta}
          FROM (SELECT DISTINCT ON (h.account, h.asset) h.*
                  FROM balance_history_store h
                 WHERE h.source = {source} AND h.as_of >= {MONTH_START.format(as_of)} AND h.as_of <= {as_of}
                 ORDER BY h.account, h.asset, h.as_of DESC) r
         WHERE NOT r.gone"""


# balance_history_put(source, as_of, snapshot metadata): make the pg_temp
# relation balance_put (a table or a view: the complete holdings of that
# snapshot, with per-row metadata or NULL) the snapshot's contents. Stores
# the difference from the previous snapshot of the month (everything if
# none: the keyframe), and rewrites the next snapshot of the month against
# it, so a backfill in any order leaves what loading in time order leaves.
# Returns (holdings, rows stored).
PUT = f"""
CREATE FUNCTION balance_history_put(p_source text, p_as_of timestamptz, p_provider text, p_as_of_raw text,
                                    p_scheduled_for timestamptz, p_run_id bigint, p_loaded_at timestamptz,
                                    OUT holdings bigint, OUT stored bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_month_start timestamptz := {MONTH_START.format('p_as_of')};
    v_month_end   timestamptz := {MONTH_END.format('p_as_of')};
    v_prev timestamptz;
    nxt  balance_snapshots;
    next_stored bigint;
BEGIN
    PERFORM balance_history_ensure_partition(p_as_of);
    SELECT max(s.as_of) INTO v_prev FROM balance_snapshots s
     WHERE s.source = p_source AND s.as_of >= v_month_start AND s.as_of < p_as_of;
    SELECT * INTO nxt FROM balance_snapshots s
     WHERE s.source = p_source AND s.as_of > p_as_of AND s.as_of < v_month_end ORDER BY s.as_of LIMIT 1;
    DROP TABLE IF EXISTS pg_temp.balance_put_next;
    IF nxt.as_of IS NOT NULL THEN
        -- What the next snapshot holds, read before anything under it moves.
        EXECUTE format($s$CREATE TEMP TABLE balance_put_next AS {state_at('%1$L', '%2$L::timestamptz')}$s$,
                       p_source, nxt.as_of);
    END IF;
    DELETE FROM balance_history_store WHERE source = p_source AND as_of = p_as_of;
    EXECUTE format($q$
        WITH f AS MATERIALIZED (
            SELECT b.provider, b.account, b.asset, b.balance, b.decimals, b.available_balance, b.spark_factor,
                   b.run_id IS NOT NULL AND b.run_id <> %3$s AS own,
                   b.as_of_raw, b.scheduled_for, b.run_id, b.loaded_at
              FROM pg_temp.balance_put b),
        p AS ({state_at('%1$L', '%4$L::timestamptz')} AND %4$L IS NOT NULL),
        stored AS (
            INSERT INTO balance_history_store
                (source, provider, account, asset, balance, decimals, available_balance, spark_factor,
                 as_of, as_of_raw, scheduled_for, run_id, loaded_at, gone)
            SELECT %1$L, f.provider, f.account, f.asset, f.balance, f.decimals, f.available_balance,
                   f.spark_factor, %2$L::timestamptz,
                   CASE WHEN f.own THEN f.as_of_raw END, CASE WHEN f.own THEN f.scheduled_for END,
                   CASE WHEN f.own THEN f.run_id END, CASE WHEN f.own THEN f.loaded_at END, false
              FROM f LEFT JOIN p ON p.account = f.account AND p.asset = f.asset
             WHERE p.account IS NULL OR f.own OR {VALUES_DIFFER.format(a='f', b='p')}
            UNION ALL
            SELECT %1$L, p.provider, p.account, p.asset, NULL, NULL, NULL, NULL, %2$L::timestamptz, NULL, NULL, NULL, NULL, true
              FROM p WHERE NOT EXISTS (SELECT FROM f WHERE f.account = p.account AND f.asset = p.asset)
            RETURNING 1)
        SELECT (SELECT count(*) FROM f), (SELECT count(*) FROM stored)
        $q$, p_source, p_as_of, p_run_id, v_prev) INTO holdings, stored;
    INSERT INTO balance_snapshots AS s (source, as_of, month_start, provider, as_of_raw, scheduled_for, run_id,
                                        loaded_at, holdings, stored, keyframe)
    VALUES (p_source, p_as_of, v_month_start, p_provider, p_as_of_raw, p_scheduled_for, p_run_id,
            coalesce(p_loaded_at, now()), holdings, stored, v_prev IS NULL)
    ON CONFLICT (source, as_of) DO UPDATE
       SET holdings = EXCLUDED.holdings, stored = EXCLUDED.stored, keyframe = EXCLUDED.keyframe;
    IF nxt.as_of IS NOT NULL THEN
        DELETE FROM balance_history_store WHERE source = p_source AND as_of = nxt.as_of;
        EXECUTE format($q$
            WITH n AS (SELECT * FROM pg_temp.balance_put_next),
            p AS ({state_at('%1$L', '%3$L::timestamptz')}),
            stored AS (
                INSERT INTO balance_history_store
                    (source, provider, account, asset, balance, decimals, available_balance, spark_factor,
                     as_of, as_of_raw, scheduled_for, run_id, loaded_at, gone)
                SELECT %1$L, n.provider, n.account, n.asset, n.balance, n.decimals, n.available_balance,
                       n.spark_factor, %2$L::timestamptz, n.as_of_raw, n.scheduled_for, n.run_id, n.loaded_at, false
                  FROM n LEFT JOIN p ON p.account = n.account AND p.asset = n.asset
                 WHERE p.account IS NULL OR n.run_id IS NOT NULL OR {VALUES_DIFFER.format(a='n', b='p')}
                UNION ALL
                SELECT %1$L, p.provider, p.account, p.asset, NULL, NULL, NULL, NULL, %2$L::timestamptz, NULL, NULL, NULL,
                       NULL, true
                  FROM p WHERE NOT EXISTS (SELECT FROM n WHERE n.account = p.account AND n.asset = p.asset)
                RETURNING 1)
            SELECT count(*) FROM stored
            $q$, p_source, nxt.as_of, p_as_of) INTO next_stored;
        UPDATE balance_snapshots SET stored = next_stored, keyframe = false
         WHERE source = p_source AND as_of = nxt.as_of;
        DROP TABLE pg_temp.balance_put_next;
    END IF;
END
$fn$
"""

ENSURE_PARTITION = """
CREATE OR REPLACE FUNCTION balance_history_ensure_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    part      text := 'balance_history_' || to_char(first_day AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(part) IS NULL THEN
        LOCK TABLE balance_history_store IN SHARE UPDATE EXCLUSIVE MODE;
        IF to_regclass(part) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE balance_history_store INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           part);
            EXECUTE format(
                'ALTER TABLE balance_history_store ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                part, first_day, first_day + interval '1 month');
        END IF;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_inherits
                    WHERE inhrelid = to_regclass(part) AND inhparent = 'balance_history_store'::regclass) THEN
        RAISE EXCEPTION 'table % exists but is not a partition of balance_history_store', part;
    END IF;
    RETURN part;
END
$$
"""

# The snapshot's metadata for a row carried from an earlier snapshot, its
# own where it was stored at this one with its own (a rerun's addition).
_SHOWN_META = ",\n".join(
    f"               CASE WHEN r.as_of = s.as_of AND r.run_id IS NOT NULL THEN r.{m} ELSE s.{m} END AS {m}"
    for m in META)
HISTORY_VIEW = f"""
CREATE VIEW balance_history AS
SELECT s.source, r.provider, r.account, r.asset, r.balance, r.decimals, r.available_balance, r.spark_factor,
       s.as_of,
{_SHOWN_META}
  FROM balance_snapshots s
 CROSS JOIN LATERAL (
        SELECT DISTINCT ON (h.account, h.asset) h.provider, h.account, h.asset, h.balance, h.decimals,
               h.available_balance, h.spark_factor, h.as_of, h.as_of_raw, h.scheduled_for, h.run_id,
               h.loaded_at, h.gone
          FROM balance_history_store h
         WHERE h.source = s.source AND h.as_of >= s.month_start AND h.as_of <= s.as_of
         ORDER BY h.account, h.asset, h.as_of DESC) r
 WHERE NOT r.gone
"""

# Writing through the view: each row changes one snapshot's holdings, which
# balance_history_put stores (and re-bases the next snapshot on). Exact,
# but it rewrites a snapshot per row: for maintenance and tests, not loads.
TRIGGERS = f"""
CREATE FUNCTION balance_history_write() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    snap balance_snapshots;
    target record;
    done bigint;
    stored bigint;
BEGIN
    target := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    IF TG_OP = 'UPDATE' AND (NEW.source, NEW.as_of) IS DISTINCT FROM (OLD.source, OLD.as_of) THEN
        RAISE EXCEPTION 'balance_history: moving a row to another source or snapshot is not supported'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    SELECT * INTO snap FROM balance_snapshots WHERE source = target.source AND as_of = target.as_of;
    DROP TABLE IF EXISTS pg_temp.balance_put;
    CREATE TEMP TABLE balance_put (provider text, account text COLLATE "C", asset text COLLATE "C",
        balance numeric, decimals smallint, available_balance numeric, spark_factor numeric,
        as_of_raw text, scheduled_for timestamptz, run_id bigint, loaded_at timestamptz);
    IF snap.as_of IS NOT NULL THEN
        EXECUTE format($s$INSERT INTO balance_put {state_at('%1$L', '%2$L::timestamptz')}$s$,
                       target.source, target.as_of);
    ELSE
        snap.source := NEW.source; snap.as_of := NEW.as_of; snap.provider := NEW.provider;
        snap.as_of_raw := NEW.as_of_raw; snap.scheduled_for := NEW.scheduled_for;
        snap.run_id := NEW.run_id; snap.loaded_at := coalesce(NEW.loaded_at, now());
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM balance_put WHERE account = OLD.account AND asset = OLD.asset;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF EXISTS (SELECT FROM balance_put WHERE account = NEW.account AND asset = NEW.asset) THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "balance_history_key"'
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('Key (source, account, asset, as_of)=(%s, %s, %s, %s) already exists.',
                                      NEW.source, NEW.account, NEW.asset, NEW.as_of);
        END IF;
        IF NEW.balance IS NULL OR NEW.provider IS NULL OR NEW.account IS NULL OR NEW.asset IS NULL
           OR NEW.as_of_raw IS NULL OR NEW.scheduled_for IS NULL OR NEW.run_id IS NULL THEN
            RAISE EXCEPTION 'balance_history: a row needs provider, account, asset, balance, as_of_raw,'
                            ' scheduled_for and run_id' USING ERRCODE = 'not_null_violation';
        END IF;
        INSERT INTO balance_put VALUES (NEW.provider, NEW.account, NEW.asset, NEW.balance, NEW.decimals,
            NEW.available_balance, NEW.spark_factor,
            NEW.as_of_raw, NEW.scheduled_for, NEW.run_id, coalesce(NEW.loaded_at, snap.loaded_at));
        -- Metadata equal to the snapshot's is the snapshot's.
        UPDATE balance_put SET as_of_raw = NULL, scheduled_for = NULL, run_id = NULL, loaded_at = NULL
         WHERE account = NEW.account AND asset = NEW.asset AND run_id = snap.run_id
           AND as_of_raw = snap.as_of_raw AND scheduled_for = snap.scheduled_for AND loaded_at = snap.loaded_at;
    END IF;
    SELECT * INTO done, stored FROM balance_history_put(snap.source, snap.as_of, snap.provider, snap.as_of_raw,
                                                          snap.scheduled_for, snap.run_id, snap.loaded_at);
    DROP TABLE pg_temp.balance_put;
    RETURN target;
END
$fn$;
CREATE TRIGGER balance_history_write INSTEAD OF INSERT OR UPDATE OR DELETE ON balance_history
    FOR EACH ROW EXECUTE FUNCTION balance_history_write();
"""

UNITS_VIEW = """
CREATE VIEW balance_history_units AS
SELECT h.source, h.provider, h.account, h.asset, h.balance, h.decimals, h.available_balance,
       h.spark_factor, h.as_of, h.as_of_raw, h.scheduled_for, h.run_id, h.loaded_at,
       balance_whole_units(h.balance, h.decimals, h.spark_factor) AS balance_units,
       h.balance::text AS balance_text,
       balance_whole_units(h.available_balance, h.decimals, h.spark_factor) AS available_units,
       h.available_balance::text AS available_text
  FROM balance_history h
"""
LATEST_VIEW = """
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
DAILY_CLOSE_VIEW = """
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
# The previous snapshot holding it: the holding's newest stored row before
# this snapshot says where to look. Not a tombstone: the holding was there
# at every snapshot after that row up to this one, or, if that row is from
# an earlier month, up to the last snapshot of that month (the keyframes
# since did not hold it). A tombstone: it was there up to the snapshot
# before the tombstone, with the stored row before it.
CHANGES_VIEW = f"""
CREATE VIEW balance_changes AS
SELECT h.source, h.provider, h.account, h.asset, h.as_of, ps.as_of AS previous_as_of,
       h.balance, p.balance AS previous_balance, h.balance - p.balance AS delta,
       balance_whole_units(h.balance, h.decimals, h.spark_factor)
         - balance_whole_units(p.balance, p.decimals, p.spark_factor) AS delta_units,
       (h.balance - p.balance)::text AS delta_text
  FROM balance_history h
  LEFT JOIN LATERAL (
        SELECT q.as_of, q.gone, q.balance, q.decimals, q.spark_factor
          FROM balance_history_store q
         WHERE q.source = h.source AND q.account = h.account AND q.asset = h.asset AND q.as_of < h.as_of
         ORDER BY q.as_of DESC
         LIMIT 1) r ON true
  LEFT JOIN LATERAL (
        SELECT q.balance, q.decimals, q.spark_factor
          FROM balance_history_store q
         WHERE r.gone AND q.source = h.source AND q.account = h.account AND q.asset = h.asset
           AND q.as_of < r.as_of
         ORDER BY q.as_of DESC
         LIMIT 1) r2 ON true
  LEFT JOIN LATERAL (
        SELECT CASE WHEN r.gone THEN r2.balance ELSE r.balance END AS balance,
               CASE WHEN r.gone THEN r2.decimals ELSE r.decimals END AS decimals,
               CASE WHEN r.gone THEN r2.spark_factor ELSE r.spark_factor END AS spark_factor) p ON true
  LEFT JOIN LATERAL (
        SELECT x.as_of
          FROM balance_snapshots x
         WHERE r.as_of IS NOT NULL AND x.source = h.source
           AND x.as_of < CASE WHEN r.gone THEN r.as_of ELSE least(h.as_of, {MONTH_END.format('r.as_of')}) END
         ORDER BY x.as_of DESC
         LIMIT 1) ps ON true
"""


def upgrade() -> None:
    bind = op.get_bind()
    op.execute(f"DROP VIEW {', '.join(reversed(READER_VIEWS))}")
    op.execute("ALTER TABLE balance_history RENAME TO balance_history_full")
    old_parts = [r[0] for r in bind.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'balance_history_full'::regclass ORDER BY 1").fetchall()]
    for name in old_parts:
        op.execute(f'ALTER TABLE "{name}" RENAME TO "{name.replace("balance_history_", "balance_history_full_", 1)}"')
    op.execute(
        """
        CREATE TABLE balance_history_store (
            source            text COLLATE "C" NOT NULL,
            provider          text NOT NULL,
            account           text COLLATE "C" NOT NULL,
            asset             text COLLATE "C" NOT NULL,
            balance           numeric,
            decimals          smallint,
            available_balance numeric,
            spark_factor      numeric,
            as_of             timestamptz NOT NULL,
            -- NULL: the snapshot's (balance_snapshots); set only where a row differs
            as_of_raw         text,
            scheduled_for     timestamptz,
            run_id            bigint,
            loaded_at         timestamptz,
            gone              boolean NOT NULL DEFAULT false,
            CONSTRAINT balance_history_store_tombstone CHECK (gone = (balance IS NULL))
        ) PARTITION BY RANGE (as_of)
        """
    )
    # Newest first within a holding: "latest row at or before S" is the
    # first entry, and a snapshot's state is one forward scan.
    op.execute("CREATE UNIQUE INDEX balance_history_store_key"
               " ON balance_history_store (source, account, asset, as_of DESC)")
    op.execute(
        """
        CREATE TABLE balance_snapshots (
            source        text COLLATE "C" NOT NULL,
            as_of         timestamptz NOT NULL,
            month_start   timestamptz NOT NULL,
            provider      text NOT NULL,
            as_of_raw     text NOT NULL,
            scheduled_for timestamptz NOT NULL,
            run_id        bigint NOT NULL,
            loaded_at     timestamptz NOT NULL DEFAULT now(),
            holdings      bigint NOT NULL,
            stored        bigint NOT NULL,
            keyframe      boolean NOT NULL,
            PRIMARY KEY (source, as_of)
        )
        """
    )
    op.execute("ALTER TABLE snapshot_runs ADD COLUMN rows_stored bigint")
    op.execute(ENSURE_PARTITION)
    op.execute("REVOKE EXECUTE ON FUNCTION balance_history_ensure_partition(timestamptz) FROM PUBLIC")
    op.execute(PUT)
    op.execute("REVOKE EXECUTE ON FUNCTION balance_history_put(text, timestamptz, text, text, timestamptz,"
               " bigint, timestamptz) FROM PUBLIC")
    _convert(bind, old_parts)
    op.execute("DROP TABLE balance_history_full")
    op.execute(HISTORY_VIEW)
    op.execute(TRIGGERS)
    op.execute("REVOKE EXECUTE ON FUNCTION balance_history_write() FROM PUBLIC")
    for view in (UNITS_VIEW, LATEST_VIEW, DAILY_CLOSE_VIEW, CHANGES_VIEW):
        op.execute(view)
    op.execute(f"GRANT SELECT ON {', '.join(READER_VIEWS)} TO balances_reader")


def _first_day(partition: str) -> datetime:
    year, month = partition[-7:].split("_")
    return datetime(int(year), int(month), 1, tzinfo=timezone.utc)


def _convert(bind, old_parts: list[str]) -> None:
    """Full snapshots -> keyframe + changes, month by month, in one pass over each month."""
    op.execute(
        """
        INSERT INTO balance_snapshots (source, as_of, month_start, provider, as_of_raw, scheduled_for, run_id,
                                       loaded_at, holdings, stored, keyframe)
        SELECT source, as_of, date_trunc('month', as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
               (array_agg(provider ORDER BY run_id, loaded_at))[1],
               (array_agg(as_of_raw ORDER BY run_id, loaded_at))[1],
               (array_agg(scheduled_for ORDER BY run_id, loaded_at))[1],
               min(run_id), (array_agg(loaded_at ORDER BY run_id, loaded_at))[1], count(*), 0, false
          FROM balance_history_full GROUP BY source, as_of
        """
    )
    op.execute(
        """
        CREATE TEMP TABLE snapshot_order ON COMMIT DROP AS
        SELECT s.*, lag(s.as_of) OVER (PARTITION BY s.source, s.month_start ORDER BY s.as_of) AS prev
          FROM balance_snapshots s
        """
    )
    op.execute("CREATE INDEX ON snapshot_order (source, as_of)")
    op.execute("ANALYZE snapshot_order")
    for name in old_parts:
        part = name.replace("balance_history_", "balance_history_full_", 1)
        bind.exec_driver_sql("SELECT balance_history_ensure_partition(%s)", (_first_day(name),))
        meta = ", ".join(f"CASE WHEN (o.as_of_raw, o.scheduled_for, o.run_id, o.loaded_at)"
                         f" = (s.as_of_raw, s.scheduled_for, s.run_id, s.loaded_at) THEN NULL ELSE o.{m} END"
                         for m in META)
        differ = VALUES_DIFFER.format(a="o", b="p")
        op.execute(
            f"""
            INSERT INTO balance_history_store
                (source, provider, account, asset, balance, decimals, available_balance, spark_factor,
                 as_of, as_of_raw, scheduled_for, run_id, loaded_at, gone)
            SELECT o.source, o.provider, o.account, o.asset, o.balance, o.decimals, o.available_balance,
                   o.spark_factor, o.as_of, {meta}, false
              FROM "{part}" o
              JOIN snapshot_order s ON s.source = o.source AND s.as_of = o.as_of
              LEFT JOIN "{part}" p ON p.source = o.source AND p.account = o.account AND p.asset = o.asset
                                  AND p.as_of = s.prev
             WHERE s.prev IS NULL OR p.source IS NULL
                OR (o.as_of_raw, o.scheduled_for, o.run_id, o.loaded_at)
                   IS DISTINCT FROM (s.as_of_raw, s.scheduled_for, s.run_id, s.loaded_at)
                OR {differ}
            UNION ALL
            SELECT p.source, p.provider, p.account, p.asset, NULL, NULL, NULL, NULL, s.as_of,
                   NULL, NULL, NULL, NULL, true
              FROM snapshot_order s
              JOIN "{part}" p ON p.source = s.source AND p.as_of = s.prev
             WHERE NOT EXISTS (SELECT FROM "{part}" o WHERE o.source = p.source AND o.account = p.account
                                                      AND o.asset = p.asset AND o.as_of = s.as_of)
            """
        )
    op.execute(
        """
        UPDATE balance_snapshots b
           SET keyframe = o.prev IS NULL,
               stored = (SELECT count(*) FROM balance_history_store h WHERE h.source = b.source AND h.as_of = b.as_of)
          FROM snapshot_order o
         WHERE o.source = b.source AND o.as_of = b.as_of
        """
    )


# --- downgrade: the full table again ------------------------------------------------------

OLD_UNITS_VIEW = UNITS_VIEW
OLD_CHANGES_VIEW = """
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
OLD_ENSURE_PARTITION = ENSURE_PARTITION.replace("balance_history_store", "balance_history").replace(
    " INCLUDING CONSTRAINTS", "")


def downgrade() -> None:
    bind = op.get_bind()
    op.execute(f"DROP VIEW {', '.join(reversed(READER_VIEWS))}")
    parts = [r[0] for r in bind.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'balance_history_store'::regclass ORDER BY 1").fetchall()]
    for name in parts:
        op.execute(f'ALTER TABLE "{name}" RENAME TO "{name.replace("balance_history_", "balance_history_store_", 1)}"')
    op.execute(
        """
        CREATE TABLE balance_history_full (
            source            text COLLATE "C" NOT NULL,
            provider          text NOT NULL,
            account           text COLLATE "C" NOT NULL,
            asset             text COLLATE "C" NOT NULL,
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
    op.execute("CREATE INDEX balance_history_source_as_of ON balance_history_full (source, as_of)")
    for name in parts:
        first_day = _first_day(name)
        op.execute(f'CREATE TABLE "{name}" PARTITION OF balance_history_full'
                   f" FOR VALUES FROM ('{first_day.isoformat()}') TO ('{first_day.isoformat()}'::timestamptz"
                   " + interval '1 month')")
    op.execute("INSERT INTO balance_history_full SELECT * FROM balance_history")
    op.execute("DROP VIEW balance_history")
    op.execute("DROP FUNCTION balance_history_write()")
    op.execute("DROP FUNCTION balance_history_put(text, timestamptz, text, text, timestamptz, bigint, timestamptz)")
    op.execute("DROP TABLE balance_history_store, balance_snapshots")
    op.execute("ALTER TABLE balance_history_full RENAME TO balance_history")
    op.execute(OLD_ENSURE_PARTITION)
    op.execute("ALTER TABLE snapshot_runs DROP COLUMN rows_stored")
    for view in (OLD_UNITS_VIEW, LATEST_VIEW, DAILY_CLOSE_VIEW, OLD_CHANGES_VIEW):
        op.execute(view)
    op.execute(f"GRANT SELECT ON {', '.join(READER_VIEWS)} TO balances_reader")
