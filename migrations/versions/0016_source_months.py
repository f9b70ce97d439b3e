"""Each new month of the stored history holds one table per source; a keyframe is built apart and attached.

Until now a month of ``balance_history_store`` was one table for every
source, under one unique index, so the month's first snapshot of a
source (its keyframe, stored whole) went into that index row by row:
about 2.2 µs a row, half a second at 257,000 rows, most of the publish
(docs/BENCHMARKS.md, B8). Since this migration a month created by
``balance_history_ensure_partition`` is itself partitioned by source
(``PARTITION BY LIST (source)``): one table per source and month,
``balance_history_YYYY_MM_<source>`` (a source name too long for that is
cut and ends in a hash of itself). A keyframe's table does not exist
before its publish, so the publish builds it apart, in the same
transaction: created with a ``CHECK`` naming its source and month, filled
without an index, its unique index built in one sort, then attached
(``ATTACH PARTITION``, which the ``CHECK`` spares a scan): 0.38-0.41 s
instead of 0.53-0.59 s at 257,142 rows. Until the publish commits, no
reader sees the table; if the publish fails, it is gone with it.

* ``balance_history_new_source_month(source, at)``: the table of the
  source's month, created and not yet attached, or NULL if the month
  cannot take one (it is a month stored before this migration, or the
  source's table is there already). Holds SHARE UPDATE EXCLUSIVE on the
  month until the transaction ends, so two writers never create one
  table twice; readers (ACCESS SHARE) and other writers (ROW EXCLUSIVE)
  do not wait for it.
* ``balance_history_attach_source_month(source, at)``: attach it (its
  index is built now if it has none) and give it the TRUNCATE check.
* ``balance_history_ensure_source_month(source, at)``: the table rows of
  the source at ``at`` go into, created (empty) if missing; for a month
  stored before this migration, the month itself.
  ``balance_history_put`` (backfills, writes through the view) uses it.

Months already holding rows stay one table for every source, and keep
working as they did; months created ahead and still empty are remade
per source. The downgrade makes every month one table again.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""
import importlib.util
from pathlib import Path

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def _released(name: str):
    """A released migration's module, read for its SQL (never edited: 0016 builds on its text)."""
    spec = importlib.util.spec_from_file_location(f"released_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_0012 = _released("0012_one_writer_per_source")

ENSURE_PARTITION = _0012._patched(
    _0012.ENSURE_PARTITION,
    ("'CREATE TABLE %I (LIKE balance_history_store INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',\n"
     "                           part);",
     "'CREATE TABLE %I (LIKE balance_history_store INCLUDING DEFAULTS INCLUDING CONSTRAINTS)'\n"
     "                           ' PARTITION BY LIST (source)', part);"),
)

SOURCE_MONTHS = """
CREATE FUNCTION balance_history_source_month_name(p_month text, p_source text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN length(p_month || '_' || p_source) <= 63 THEN p_month || '_' || p_source
                ELSE p_month || '_' || left(p_source, 28) || '_' || left(md5(p_source), 10) END
$$;

CREATE FUNCTION balance_history_new_source_month(p_source text, at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    month     text := balance_history_ensure_partition(at);
    leaf      text := balance_history_source_month_name(month, p_source);
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(month)) <> 'p' THEN
        RETURN NULL;  -- a month stored before 0016: one table for every source
    END IF;
    -- One writer creates a month's table at a time; the lock is held to the end.
    EXECUTE format('LOCK TABLE %I IN SHARE UPDATE EXCLUSIVE MODE', month);
    IF to_regclass(leaf) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- The CHECK implies the partition's bounds: ATTACH then needs no scan.
    EXECUTE format('CREATE TABLE %I (LIKE balance_history_store INCLUDING DEFAULTS INCLUDING CONSTRAINTS,'
                   ' CONSTRAINT balance_history_source_month CHECK (source = %L AND as_of >= %L AND as_of < %L))',
                   leaf, p_source, first_day, first_day + interval '1 month');
    RETURN leaf;
END
$$;

CREATE FUNCTION balance_history_attach_source_month(p_source text, at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    month     text := balance_history_ensure_partition(at);
    leaf      text := balance_history_source_month_name(month, p_source);
BEGIN
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES IN (%L)', month, leaf, p_source);
    EXECUTE format('CREATE TRIGGER balance_history_truncated AFTER TRUNCATE ON %I FOR EACH STATEMENT'
                   ' EXECUTE FUNCTION balance_history_truncated(%L)', leaf, first_day);
    RETURN leaf;
END
$$;

CREATE FUNCTION balance_history_ensure_source_month(p_source text, at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month text := balance_history_ensure_partition(at);
    leaf  text := balance_history_source_month_name(month, p_source);
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(month)) <> 'p' THEN
        RETURN month;
    END IF;
    IF to_regclass(leaf) IS NULL AND balance_history_new_source_month(p_source, at) IS NOT NULL THEN
        PERFORM balance_history_attach_source_month(p_source, at);
    END IF;
    -- A table of that name must be this source's, in this month.
    IF NOT EXISTS (SELECT FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
                    WHERE c.oid = to_regclass(leaf) AND i.inhparent = to_regclass(month)
                      AND pg_get_expr(c.relpartbound, c.oid) = format('FOR VALUES IN (%L)', p_source)) THEN
        RAISE EXCEPTION 'table % exists but is not the partition of % for source %', leaf, month, p_source;
    END IF;
    RETURN leaf;
END
$$;
"""
FUNCTIONS = ("balance_history_new_source_month(text, timestamptz)",
             "balance_history_attach_source_month(text, timestamptz)",
             "balance_history_ensure_source_month(text, timestamptz)")

_MONTH_ONLY = "    PERFORM balance_history_ensure_partition(p_as_of);\n"
PUT = _0012._patched(_0012.PUT, (_MONTH_ONLY, "    PERFORM balance_history_ensure_source_month(p_source, p_as_of);\n"))


def _months(bind) -> list[tuple[str, str, bool, bool]]:
    """Each month: its table, first instant, whether it is split by source, whether it holds rows."""
    months = []
    for name, first_day in _0012._months(bind):
        kind, empty = bind.exec_driver_sql(
            f'SELECT (SELECT relkind FROM pg_class WHERE oid = \'"{name}"\'::regclass),'
            f' NOT EXISTS (SELECT FROM "{name}")').fetchone()
        months.append((name, first_day, kind == "p", not empty))
    return months


def _remake(name: str, first_day: str, *, by_source: bool, keep_rows: bool) -> None:
    """Replace month ``name`` by a new table, split by source or not, with its rows if ``keep_rows``."""
    split = " PARTITION BY LIST (source)" if by_source else ""
    # "-" is in no source's name, so no source's table of the month is called that.
    new = f'"{name}-new"'
    op.execute(f"CREATE TABLE {new} (LIKE balance_history_store INCLUDING DEFAULTS INCLUDING CONSTRAINTS){split}")
    if keep_rows:
        op.execute(f'INSERT INTO {new} SELECT * FROM "{name}"')
    op.execute(f'ALTER TABLE balance_history_store DETACH PARTITION "{name}"')
    op.execute(f'DROP TABLE "{name}" CASCADE')
    op.execute(f'ALTER TABLE {new} RENAME TO "{name}"')
    op.execute(f"ALTER TABLE balance_history_store ATTACH PARTITION \"{name}\" FOR VALUES FROM ('{first_day}')"
               f" TO ('{first_day}'::timestamptz + interval '1 month')")
    op.execute(_0012._month_trigger(name, first_day))


def upgrade() -> None:
    bind = op.get_bind()
    op.execute(ENSURE_PARTITION)
    op.execute(SOURCE_MONTHS)
    for function in FUNCTIONS:
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
    op.execute(PUT)
    for name, first_day, by_source, holds_rows in _months(bind):
        if not by_source and not holds_rows:
            _remake(name, first_day, by_source=True, keep_rows=False)


def downgrade() -> None:
    bind = op.get_bind()
    for name, first_day, by_source, _ in _months(bind):
        if by_source:
            _remake(name, first_day, by_source=False, keep_rows=True)
    op.execute(_0012.PUT)
    op.execute(_0012.ENSURE_PARTITION)
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP FUNCTION balance_history_source_month_name(text, text)")
