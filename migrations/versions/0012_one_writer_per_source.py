"""One writer at a time per source; TRUNCATE leaves the history exact or is refused; runs keep their config.

Until now only publishes of a source took turns (``source_locks``, 0008).
A write through the ``balance_history`` view did not, and a publish
compared the new snapshot with a state it had read before such a write
committed: the write's change then showed in every later snapshot too.
A ``TRUNCATE`` committed while a publish was in flight, and the publish
re-validated the cache (0011) the truncate had just invalidated. Since
this migration:

* **A turn** is ``balance_history_take_turn(source)``: ROW EXCLUSIVE on
  ``balance_snapshots``, ``balance_history_store`` (all its months) and
  ``balance_latest_cache``, then the source's row of ``source_locks`` FOR
  UPDATE, both held until the transaction ends. Every write to a source's
  history takes it before it reads anything it compares against: publish
  and backfill (loaders/publish.py), ``balance_history_put``, a write
  through the view (its trigger, before reading the snapshot), and the
  cache invalidation of a changed ``balance_snapshots`` row. Table locks
  come first and the row second in every writer, so a TRUNCATE (ACCESS
  EXCLUSIVE, which conflicts with ROW EXCLUSIVE) waits for every writer
  in flight and every later writer waits for it: in effect it takes every
  source's turn at once, and nobody waits for a row while holding what a
  TRUNCATE waits for. Readers (ACCESS SHARE) still block nothing.
* **A write through the view** re-reads its row under the turn: a row
  another transaction changed since the statement read it fails with
  ``serialization_failure`` (what REPEATABLE READ says), one deleted
  meanwhile is skipped (as READ COMMITTED skips it on a table).
* **TRUNCATE** of ``balance_snapshots`` alone (the stored rows stay), of
  ``balance_history_store`` alone, or of one month of it
  (``balance_history_YYYY_MM``), while ``balance_snapshots`` still lists
  snapshots holding something there, is refused with one line saying what
  to truncate with it: the first showed holdings the provider no longer
  reports (the next publish became a keyframe over the old rows), the
  others showed snapshots as empty. ``TRUNCATE balance_history_store,
  balance_snapshots`` empties the history, which is exact.
* **A keyframe** is refused if its month already holds stored rows of the
  source before it (rows no snapshot in ``balance_snapshots`` lists: a
  catalog edited by hand): they would show through it.
* ``snapshot_runs.config``: the source's configuration as the run was
  begun (pipeline/config.py ``SourceConfig.resolved``); every task of the
  run reads it from here, never the sources file again.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""
import importlib.util
from pathlib import Path

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _released(name: str):
    """A released migration's module, read for its SQL (never edited: 0012 builds on its text)."""
    spec = importlib.util.spec_from_file_location(f"released_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patched(text: str, *edits: tuple[str, str]) -> str:
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"0012: expected one {old!r} in the released SQL")
        text = text.replace(old, new)
    return text


_0010 = _released("0010_history_by_changes")
HISTORY_TABLES = "balance_snapshots, balance_history_store, balance_latest_cache"

# ``p_wait``: how long to wait for another writer of the source (a
# lock_timeout); the table locks wait the session's lock_timeout, since only
# maintenance (a TRUNCATE, a LOCK TABLE) holds them against a writer.
TAKE_TURN = f"""
CREATE FUNCTION balance_history_take_turn(p_source text, p_wait text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_lock_timeout text := current_setting('lock_timeout');
BEGIN
    -- Tables first, the row second, in every writer: see the migration's docstring.
    LOCK TABLE {HISTORY_TABLES} IN ROW EXCLUSIVE MODE;
    IF p_wait IS NOT NULL THEN
        PERFORM set_config('lock_timeout', p_wait, true);
    END IF;
    INSERT INTO source_locks (source) VALUES (p_source) ON CONFLICT DO NOTHING;
    PERFORM FROM source_locks WHERE source = p_source FOR UPDATE;
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
END
$$
"""

# Stored rows of the source in the month before a snapshot that has no
# predecessor in balance_snapshots can only be rows no snapshot lists.
REQUIRE_CLEAN_MONTH = """
CREATE FUNCTION balance_history_require_clean_month(p_source text, p_as_of timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_month_start timestamptz := date_trunc('month', p_as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
BEGIN
    IF EXISTS (SELECT FROM balance_history_store
                WHERE source = p_source AND as_of >= v_month_start AND as_of < p_as_of) THEN
        RAISE EXCEPTION 'balance_history_store holds rows of % before % in its month that balance_snapshots '
                        'does not list (was balance_snapshots truncated or edited by hand?): a keyframe there '
                        'would show them; delete them or restore their snapshots', p_source, p_as_of
            USING ERRCODE = 'data_corrupted';
    END IF;
END
$$
"""

PUT = _patched(
    _0010.PUT,
    ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
    ("BEGIN\n    PERFORM balance_history_ensure_partition(p_as_of);",
     "BEGIN\n    PERFORM balance_history_take_turn(p_source);\n"
     "    PERFORM balance_history_ensure_partition(p_as_of);"),
    ("     WHERE s.source = p_source AND s.as_of >= v_month_start AND s.as_of < p_as_of;\n",
     "     WHERE s.source = p_source AND s.as_of >= v_month_start AND s.as_of < p_as_of;\n"
     "    IF v_prev IS NULL THEN\n"
     "        PERFORM balance_history_require_clean_month(p_source, p_as_of);\n"
     "    END IF;\n"),
)

# The view's write trigger: the turn first, then the row as it is now.
_WRITE_FUNCTION = _0010.TRIGGERS.split("CREATE TRIGGER", 1)[0].strip().removesuffix(";")
WRITE = _patched(
    _WRITE_FUNCTION,
    ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
    ("    stored bigint;\nBEGIN", "    stored bigint;\n    now_shown balance_history;\nBEGIN"),
    ("    SELECT * INTO snap FROM balance_snapshots WHERE source = target.source AND as_of = target.as_of;",
     """    PERFORM balance_history_take_turn(target.source);
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        -- The statement read OLD before the turn: the row may have moved since.
        SELECT h.* INTO now_shown FROM balance_history h
         WHERE h.source = OLD.source AND h.as_of = OLD.as_of AND h.account = OLD.account AND h.asset = OLD.asset;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        IF now_shown::text IS DISTINCT FROM OLD::text THEN
            RAISE EXCEPTION 'balance_history: the row of % % at % (%) was changed by another transaction since '
                            'this statement read it', OLD.account, OLD.asset, OLD.as_of, OLD.source
                USING ERRCODE = 'serialization_failure', HINT = 'run the statement again';
        END IF;
    END IF;
    SELECT * INTO snap FROM balance_snapshots WHERE source = target.source AND as_of = target.as_of;"""),
)

# 0011's invalidation, and since 0012 the turn before it.
_INVALIDATE = """
CREATE OR REPLACE FUNCTION balance_latest_cache_invalidate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'ROW' THEN{turn}
        UPDATE balance_latest_cache SET valid = false
         WHERE source = OLD.source AND as_of = OLD.as_of AND valid;
    ELSE
        UPDATE balance_latest_cache SET valid = false WHERE valid;
    END IF;
    RETURN NULL;
END
$$
"""
# A change made outside any turn (maintenance SQL) waits for the source's
# publish in flight, which then cannot keep its staging as valid after it.
INVALIDATE = _INVALIDATE.format(turn="\n        PERFORM balance_history_take_turn(OLD.source);")

TRUNCATED = """
CREATE FUNCTION balance_history_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    month timestamptz := CASE WHEN TG_NARGS > 0 THEN TG_ARGV[0]::timestamptz END;
    left_empty bigint;
BEGIN
    IF TG_TABLE_NAME = 'balance_snapshots' THEN
        IF EXISTS (SELECT FROM balance_history_store) THEN
            RAISE EXCEPTION 'TRUNCATE balance_snapshots alone would orphan the stored history: the next publish '
                            'would show holdings the provider no longer reports; truncate both in one statement '
                            '(TRUNCATE balance_history_store, balance_snapshots)'
                USING ERRCODE = 'restrict_violation';
        END IF;
        RETURN NULL;
    END IF;
    SELECT count(*) INTO left_empty FROM balance_snapshots
     WHERE holdings > 0 AND (month IS NULL OR month_start = month);
    IF left_empty > 0 AND month IS NULL THEN
        RAISE EXCEPTION 'TRUNCATE % would leave % snapshot(s) listed in balance_snapshots without their holdings; '
                        'truncate both in one statement (TRUNCATE balance_history_store, balance_snapshots)',
                        TG_TABLE_NAME, left_empty
            USING ERRCODE = 'restrict_violation';
    ELSIF left_empty > 0 THEN
        RAISE EXCEPTION 'TRUNCATE % would leave % snapshot(s) of its month listed in balance_snapshots without '
                        'their holdings; delete them first in the same transaction (DELETE FROM balance_snapshots '
                        'WHERE month_start = %L)', TG_TABLE_NAME, left_empty, month
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NULL;
END
$$
"""


def _month_trigger(part: str, first_day: str) -> str:
    return (f'CREATE TRIGGER balance_history_truncated AFTER TRUNCATE ON "{part}"'
            f" FOR EACH STATEMENT EXECUTE FUNCTION balance_history_truncated('{first_day}')")


# Each new month gets the TRUNCATE check too (statement triggers are not
# inherited by partitions).
ENSURE_PARTITION = _patched(
    _0010.ENSURE_PARTITION,
    ("                part, first_day, first_day + interval '1 month');\n",
     "                part, first_day, first_day + interval '1 month');\n"
     "            EXECUTE format('CREATE TRIGGER balance_history_truncated AFTER TRUNCATE ON %I FOR EACH STATEMENT'\n"
     "                           ' EXECUTE FUNCTION balance_history_truncated(%L)', part, first_day);\n"),
)


def _months(bind) -> list[tuple[str, str]]:
    """Each month of the stored history: its partition and first instant."""
    names = [r[0] for r in bind.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'balance_history_store'::regclass ORDER BY 1").fetchall()]
    return [(name, _0010._first_day(name).isoformat()) for name in names]


def upgrade() -> None:
    bind = op.get_bind()
    op.execute("ALTER TABLE snapshot_runs ADD COLUMN config jsonb")
    op.execute(TAKE_TURN)
    op.execute(REQUIRE_CLEAN_MONTH)
    for function in ("balance_history_take_turn(text, text)",
                     "balance_history_require_clean_month(text, timestamptz)"):
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
    op.execute(PUT)
    op.execute(WRITE)
    op.execute(INVALIDATE)
    op.execute(TRUNCATED)
    op.execute("REVOKE EXECUTE ON FUNCTION balance_history_truncated() FROM PUBLIC")
    for table in ("balance_snapshots", "balance_history_store"):
        op.execute(f"CREATE TRIGGER balance_history_truncated AFTER TRUNCATE ON {table}"
                   " FOR EACH STATEMENT EXECUTE FUNCTION balance_history_truncated()")
    for part, first_day in _months(bind):
        op.execute(_month_trigger(part, first_day))
    op.execute(ENSURE_PARTITION)


def downgrade() -> None:
    bind = op.get_bind()
    op.execute(_0010.ENSURE_PARTITION)
    for part, _ in _months(bind):
        op.execute(f'DROP TRIGGER IF EXISTS balance_history_truncated ON "{part}"')
    for table in ("balance_snapshots", "balance_history_store"):
        op.execute(f"DROP TRIGGER balance_history_truncated ON {table}")
    op.execute("DROP FUNCTION balance_history_truncated()")
    op.execute(_INVALIDATE.format(turn=""))
    op.execute(_patched(_WRITE_FUNCTION, ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")))
    op.execute(_patched(_0010.PUT, ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")))
    op.execute("DROP FUNCTION balance_history_require_clean_month(text, timestamptz)")
    op.execute("DROP FUNCTION balance_history_take_turn(text, text)")
    op.execute("ALTER TABLE snapshot_runs DROP COLUMN config")
