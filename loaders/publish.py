"""Publishing: staged rows become visible in ``balance_history`` at once.

One transaction moves every shard's staging table into the history, marks
the run published and drops the staging tables. A reader sees the whole
snapshot or none of it. Holdings already present for the same source,
account, asset and snapshot time are left alone, so a rerun adds nothing;
but if the provider now reports a *different* balance for a snapshot we
already hold, the run fails loudly instead of keeping either silently.

Since migration 0010 the history is stored by changes (docs/SCHEMA.md,
"History stored by changes"): the first snapshot of a source in a month is
stored whole, later ones only as the holdings that changed, appeared or
disappeared since the previous snapshot. ``balance_history`` is a view
answering every holding at every snapshot, as the table did.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2.errors
from psycopg2 import sql

from extractors.records import ROW_COLUMNS
from loaders import latest_cache, leases, partitions, rejections, runs, staging
from loaders.db import transaction
from loaders.runs import RunStatus

# The row's own columns, as balance_history and staging both have them.
_STAGED_ROW = sql.SQL(", ").join(sql.Identifier("s", c.name) for c in ROW_COLUMNS)
# What a holding holds, its key (account, asset) aside: the amounts and how
# to read them, whichever columns the row contract (BalanceRow) has.
_VALUE_NAMES = tuple(c.name for c in ROW_COLUMNS if c.name not in ("account", "asset"))


def _values(alias: str | None = None) -> sql.Composable:
    """The value columns, as ``alias.balance, alias.decimals, ...`` (bare without an alias)."""
    return sql.SQL(", ").join(sql.Identifier(*((alias,) if alias else ()), name) for name in _VALUE_NAMES)


# A holding is stored again when any column but its key differs from the
# previous snapshot (``f`` the new row, ``p`` the previous); numeric
# equality ignores the scale, which the text of an amount keeps (12.5 is
# not 12.50), so the scale of amounts is compared too.
_ROW_DIFFERS = sql.SQL(" OR ").join(
    sql.SQL("f.{0} IS DISTINCT FROM p.{0}" + (" OR scale(f.{0}) IS DISTINCT FROM scale(p.{0})"
                                             if c.kind == "amount" else "")).format(sql.Identifier(c.name))
    for c in ROW_COLUMNS if c.name not in ("account", "asset")
)
_VALUES_DIFFER = sql.SQL("f.provider IS DISTINCT FROM p.provider OR ") + _ROW_DIFFERS
# A snapshot loaded again must bring the same amounts.
_AMOUNT_CHANGED = sql.SQL(" OR ").join(
    sql.SQL("h.{0} IS DISTINCT FROM s.{0}").format(sql.Identifier(c.name))
    for c in ROW_COLUMNS if c.kind == "amount"
)


class PublishError(RuntimeError):
    """The snapshot cannot be published; nothing was."""


@dataclass(slots=True, frozen=True)
class PublishResult:
    run_id: int
    status: RunStatus
    rows_staged: int
    rows_published: int  # holdings new to balance_history (0 for a rerun)
    rejected: int
    rows_stored: int = 0  # rows written to storage: changes, tombstones, or a whole keyframe


def publish(conn, run_id: int, *, max_rejected: int = 0, once_per_interval: bool = False) -> PublishResult:
    """Publish the run's staged snapshot; a failure is recorded on the run, then raised.

    The snapshot is every shard the run was begun with (``snapshot_runs.shards``),
    whatever the sources file says now: a shard missing is a refusal, never a
    smaller snapshot.

    With ``once_per_interval`` (a provider that reports only the present), a
    run whose interval another run has already published is marked
    ``skipped`` instead: its snapshot, taken later, would be a second one
    for the same interval. A run that failed (a publish cut off by a
    timeout or a lost connection) is picked up again: every check below is
    made anew. More rejected records than ``max_rejected`` over all shards
    raise :class:`~loaders.rejections.RejectedRecordsError`.
    """
    run = runs.get_run(conn, run_id)
    if run.status in (RunStatus.NO_SNAPSHOT, RunStatus.SKIPPED):
        return PublishResult(run_id, run.status, 0, 0, 0)
    if run.status == RunStatus.PUBLISHED:
        raise PublishError(f"run {run_id} is already published")
    try:
        return _publish(conn, run, max_rejected, once_per_interval)
    except BaseException as exc:
        # Refusals are stored as they read; anything else names its type.
        refused = isinstance(exc, (PublishError, rejections.RejectedRecordsError))
        runs.record_failure(conn, run_id, str(exc) if refused else f"{type(exc).__name__}: {exc}")
        raise


def _publish(conn, run: runs.Run, max_rejected: int, once_per_interval: bool) -> PublishResult:
    run_id, shards = run.run_id, run.shards
    if run.status == RunStatus.FAILED:
        runs.resume(conn, run_id)
    if run.as_of is None:
        raise PublishError(f"run {run_id} has no snapshot time: was it crawled?")
    # Rows go straight into the month's partition: routing each row through
    # the partitioned parent cost 7-18% of a keyframe's insert (docs/BENCHMARKS.md, B8).
    partition = sql.Identifier(partitions.ensure_partition(conn, run.as_of))
    with transaction(conn) as cur:
        run = runs.get_run(conn, run_id, for_update=True)
        if run.status != RunStatus.RUNNING:
            raise PublishError(f"run {run_id} is {run.status}, not ready to publish")
        rejected = rejections.count(cur, run_id)
        rejections.check_threshold(run_id, run.source, rejected, max_rejected)
        leases.take_publish_turn(cur, run.source)
        if once_per_interval:
            earlier = runs.published_run(cur, run.source, run.scheduled_for, other_than=run_id)
            if earlier is not None:
                cur.execute(
                    "UPDATE snapshot_runs SET status = %s, finished_at = now(), error = %s"
                    " WHERE run_id = %s",
                    (RunStatus.SKIPPED,
                     f"run {earlier} published the interval ending {run.scheduled_for.isoformat()} "
                     "first; this provider reports only the present, so this later snapshot is not "
                     "stored as a second one", run_id),
                )
                for shard in range(shards):
                    staging.drop(cur, run_id, shard)
                return PublishResult(run_id, RunStatus.SKIPPED, 0, 0, rejected)
        # The key-order sort of a whole snapshot, or the hash of one, then
        # fits in memory. JIT compiling these one-off statements costs up to
        # half a second (inlining and optimising for a million rows) and
        # saves less than that.
        cur.execute("SET LOCAL work_mem = '256MB'")
        cur.execute("SET LOCAL jit = off")
        tables = [staging.table_name(run_id, shard) for shard in range(shards)]
        _require_tables(cur, run_id, shards)
        rows_staged = _check_staging_intact(cur, run_id, shards)
        staged = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT * FROM {}").format(t) for t in tables
        )
        cur.execute("SELECT provider, as_of_raw, scheduled_for, run_id, loaded_at FROM balance_snapshots"
                    " WHERE source = %s AND as_of = %s", (run.source, run.as_of))
        held = cur.fetchone()
        newest = False
        if held is None:
            snapshot = (run.provider, run.as_of_raw, run.scheduled_for, run_id, None)
            previous, later, newest = _neighbours(cur, run.source, run.as_of)
            if later:
                # A backfill before a snapshot of the same month: the database
                # function stores it and that later one again against it.
                cur.execute(sql.SQL("CREATE TEMP TABLE balance_put ON COMMIT DROP AS {}").format(
                    _holdings(staged)), {"provider": run.provider})
                rows_published = cur.rowcount
                rows_stored = _put(cur, run.source, run.as_of, snapshot)[1]
                cur.execute("DROP TABLE pg_temp.balance_put")
            else:
                # The usual case: the newest snapshot of its month.
                rows_published, rows_stored = _append(cur, run, previous, staged, rows_staged, partition)
            if rows_published != rows_staged:
                # Only now is the (costly) check worth it: some holding came twice.
                _refuse_duplicates(cur, staged)
        else:
            rows_published, rows_stored = _publish_again(cur, staged, run, held)
        _publish_totals(cur, run, shards)
        cur.execute(
            """
            UPDATE snapshot_runs
               SET status = %s, rows = %s, rows_inserted = %s, rows_stored = %s,
                   rejected = %s, finished_at = now(), error = NULL
             WHERE run_id = %s
            """,
            (RunStatus.PUBLISHED, rows_staged, rows_published, rows_stored, rejected, run_id),
        )
        if newest:
            # The source's newest snapshot: its staging becomes what the next
            # publish compares against, if it holds each holding once.
            if rows_published == rows_staged:
                latest_cache.keep(cur, run.source, run.as_of, run_id, shards, run.provider, rows_published)
            else:
                latest_cache.forget(cur, run.source)
        for shard in range(shards):
            staging.drop(cur, run_id, shard)
    return PublishResult(run_id, RunStatus.PUBLISHED, rows_staged, rows_published, rejected, rows_stored)


def _publish_totals(cur, run: runs.Run, shards: int) -> None:
    """The provider's own totals the shards staged, into aggregate_balances."""
    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
        (staging.SCHEMA, [staging.totals_table_name(run.run_id, n).strings[-1] for n in range(shards)]),
    )
    for (name,) in cur.fetchall():
        cur.execute(
            sql.SQL(
                """
                INSERT INTO aggregate_balances
                    (source, provider, asset, balance, decimals, as_of, as_of_raw, scheduled_for, run_id)
                SELECT %s, %s, a.asset, a.balance, a.decimals, %s, %s, %s, %s FROM {} a
                ON CONFLICT (source, asset, as_of) DO NOTHING
                """
            ).format(sql.Identifier(staging.SCHEMA, name)),
            (run.source, run.provider, run.as_of, run.as_of_raw, run.scheduled_for, run.run_id),
        )


def _require_tables(cur, run_id: int, shards: int) -> None:
    cur.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
        (staging.SCHEMA, [f"run_{run_id}_shard_{n}" for n in range(shards)]),
    )
    found = cur.fetchone()[0]
    if found != shards:
        raise PublishError(f"run {run_id}: {shards - found} of {shards} shard(s) have no staged rows")


def _check_staging_intact(cur, run_id: int, shards: int) -> int:
    """Every shard finished, and its staging still holds what it staged; the row total.

    Staging tables are UNLOGGED (fast COPY, no WAL): crash recovery empties
    them. Publishing what is left would make a partial snapshot look whole.
    """
    recorded = staging.staged_counts(cur, run_id)
    total = 0
    for shard in range(shards):
        if shard not in recorded:
            raise PublishError(f"run {run_id}: shard {shard} did not finish staging")
        rows, aggregates = recorded[shard]
        found = _count(cur, staging.table_name(run_id, shard))
        found_aggregates = _count(cur, staging.totals_table_name(run_id, shard)) if aggregates else 0
        if (found, found_aggregates) != (rows, aggregates):
            raise PublishError(
                f"run {run_id}: shard {shard} staged {rows} rows but its staging table now holds "
                f"{found} (the database restarted since the crawl, and crash recovery empties "
                "staging); nothing published: take this snapshot again"
            )
        total += rows
    return total


def _count(cur, table: sql.Composable) -> int:
    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
    return cur.fetchone()[0]


def _refuse_duplicates(cur, staged: sql.Composable) -> None:
    """One snapshot must not report the same holding twice with two balances."""
    cur.execute(
        sql.SQL(
            "SELECT account, asset FROM ({}) s GROUP BY account, asset"
            " HAVING count(DISTINCT balance) > 1 LIMIT 3"
        ).format(staged)
    )
    clashes = cur.fetchall()
    if clashes:
        listed = ", ".join(f"{a}/{b}" for a, b in clashes)
        raise PublishError(f"the snapshot reports different balances for the same holding: {listed}")


def _neighbours(cur, source: str, as_of) -> tuple:
    """The snapshot of the source before ``as_of`` in its month (or None), whether one follows in
    the month, and whether ``as_of`` is the source's newest."""
    cur.execute(
        """
        SELECT (SELECT max(as_of) FROM balance_snapshots
                 WHERE source = %(source)s AND as_of < %(as_of)s
                   AND as_of >= date_trunc('month', %(as_of)s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
               EXISTS (SELECT FROM balance_snapshots
                        WHERE source = %(source)s AND as_of > %(as_of)s
                          AND as_of < (date_trunc('month', %(as_of)s AT TIME ZONE 'UTC') + interval '1 month')
                                      AT TIME ZONE 'UTC'),
               NOT EXISTS (SELECT FROM balance_snapshots WHERE source = %(source)s AND as_of > %(as_of)s)
        """,
        {"source": source, "as_of": as_of},
    )
    return cur.fetchone()


def _holdings(staged: sql.Composable) -> sql.Composable:
    """The snapshot's holdings, one row each (DISTINCT ON drops a holding listed twice alike), in key order.

    Shaped as ``balance_history_put`` reads them; the provider is the parameter ``provider``.
    """
    return sql.SQL(
        """
        SELECT DISTINCT ON (s.account, s.asset) %(provider)s::text AS provider, {},
               NULL::text AS as_of_raw, NULL::timestamptz AS scheduled_for,
               NULL::bigint AS run_id, NULL::timestamptz AS loaded_at
          FROM ({}) s
         ORDER BY s.account, s.asset
        """
    ).format(_STAGED_ROW, staged)


def _changes(holdings: sql.Composable, state: sql.Composable, partition: sql.Identifier) -> sql.Composable:
    """Store the rows that make ``holdings`` out of the previous ``state``: changed, new, gone.

    Returns one row: rows stored, holdings new since ``state``, holdings gone.
    """
    return sql.SQL(
        """
        WITH d AS MATERIALIZED (
            SELECT coalesce(f.provider, p.provider) AS provider, coalesce(f.account, p.account) AS account,
                   coalesce(f.asset, p.asset) AS asset, {f_values},
                   f.account IS NULL AS gone, p.account IS NULL AS new
              FROM ({holdings}) f
              FULL JOIN ({state}) p ON p.account = f.account AND p.asset = f.asset
             WHERE f.account IS NULL OR p.account IS NULL OR {differ}),
        stored AS (
            INSERT INTO {partition} (source, provider, account, asset, {values}, as_of, gone)
            SELECT %(source)s, provider, account, asset, {values}, %(new)s, gone
              FROM d
            RETURNING 1)
        SELECT (SELECT count(*) FROM stored), count(*) FILTER (WHERE new), count(*) FILTER (WHERE gone) FROM d
        """
    ).format(holdings=holdings, state=state, differ=_VALUES_DIFFER, f_values=_values("f"), values=_values(),
             partition=partition)


def _append(cur, run: runs.Run, previous, staged: sql.Composable, rows_staged: int,
            partition: sql.Identifier) -> tuple[int, int]:
    """Store the staged snapshot as the source's newest of its month, in its ``partition``;
    (holdings, rows stored).

    Against the previous snapshot of the month: the holdings that are new
    or changed, and a tombstone for each one gone. With none before it in
    the month, the snapshot is the month's keyframe and is stored whole.
    """
    kept = None
    if previous is not None:
        kept = latest_cache.previous_holdings(cur, run.source, previous, run.provider)
    else:
        # A keyframe: stored rows of the month that no snapshot lists would show through it.
        cur.execute("SELECT balance_history_require_clean_month(%s, %s)", (run.source, run.as_of))
    params = {"source": run.source, "as_of": previous, "new": run.as_of, "provider": run.provider}
    with _hash_joins(cur):
        cur.execute("SAVEPOINT balance_append")
        try:
            if kept is not None:
                holdings, stored = _append_to_kept(cur, run, previous, staged, kept, rows_staged, partition, params)
            else:
                holdings, stored = _append_by_join(cur, run, previous, _staged_rows(staged), _STATE, partition,
                                                   params)
        except psycopg2.errors.UniqueViolation:
            # Some holding came twice and was written twice: unless its rows
            # differ (refused here), store the snapshot with one row per holding.
            cur.execute("ROLLBACK TO SAVEPOINT balance_append")
            _refuse_duplicates(cur, staged)
            state = _staged_rows(kept) if kept is not None else _STATE
            holdings, stored = _append_by_join(cur, run, previous, _holdings(staged), state, partition, params)
        cur.execute("RELEASE SAVEPOINT balance_append")
    cur.execute(
        """
        INSERT INTO balance_snapshots (source, as_of, month_start, provider, as_of_raw, scheduled_for, run_id,
                                       holdings, stored, keyframe)
        VALUES (%s, %s, date_trunc('month', %s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', %s, %s, %s, %s, %s, %s, %s)
        """,
        (run.source, run.as_of, run.as_of, run.provider, run.as_of_raw, run.scheduled_for, run.run_id,
         holdings, stored, previous is None),
    )
    return holdings, stored


def _staged_rows(staged: sql.Composable) -> sql.Composable:
    """Staged rows with the run's provider, as the history has them."""
    return sql.SQL("SELECT %(provider)s::text AS provider, s.* FROM ({}) s").format(staged)


def _previous_count(cur, source: str, previous) -> int:
    cur.execute("SELECT holdings FROM balance_snapshots WHERE source = %s AND as_of = %s", (source, previous))
    return cur.fetchone()[0]


def _append_by_join(cur, run: runs.Run, previous, holdings: sql.Composable, state: sql.Composable,
                    partition: sql.Identifier, params: dict) -> tuple[int, int]:
    """The comparison in one full join of the snapshot with the previous ``state``; a keyframe whole.

    A holding staged twice meets itself: alike and unchanged it is written
    by neither row, and the caller's count tells; otherwise the key refuses
    the second row.
    """
    if previous is None:
        # The month's keyframe: every holding, nothing to compare with.
        cur.execute(sql.SQL(
            """
            INSERT INTO {partition} (source, provider, account, asset, {values}, as_of)
            SELECT %(source)s, f.provider, f.account, f.asset, {f_values}, %(new)s
              FROM ({holdings}) f
             ORDER BY f.account, f.asset
            """).format(holdings=holdings, values=_values(), f_values=_values("f"), partition=partition), params)
        return cur.rowcount, cur.rowcount
    cur.execute(_changes(holdings, state, partition), params)
    stored, new, gone = cur.fetchone()
    return _previous_count(cur, run.source, previous) - gone + new, stored


def _append_to_kept(cur, run: runs.Run, previous, staged: sql.Composable, kept: sql.Composable,
                    rows_staged: int, partition: sql.Identifier, params: dict) -> tuple[int, int]:
    """The comparison against the previous snapshot kept as staged (:mod:`loaders.latest_cache`).

    A full join cannot run in parallel (PostgreSQL 15), a left join can,
    so this takes it in two: the kept holdings left-joined with the staged
    rows (hashed once, the hash shared by the workers that probe it) yield
    the changed holdings and the gone ones. That leaves the new
    holdings, found by a second pass, which is needed only if some staged
    rows matched no kept holding: every kept holding still there matched
    at least one staged row, so if the staged rows are exactly as many as
    those, none is new and none came twice.
    """
    previous_holdings = _previous_count(cur, run.source, previous)
    # CREATE TABLE AS may use parallel workers, INSERT ... SELECT may not.
    cur.execute(sql.SQL(
        """
        CREATE TEMP TABLE balance_changed ON COMMIT DROP AS
        SELECT p.account, p.asset, {f_values}, f.account IS NULL AS gone
          FROM ({kept}) p LEFT JOIN ({staged}) f ON f.account = p.account AND f.asset = p.asset
         WHERE f.account IS NULL OR {differ}
        """).format(kept=kept, staged=staged, differ=_ROW_DIFFERS, f_values=_values("f")))
    cur.execute("SELECT count(*) FILTER (WHERE gone) FROM pg_temp.balance_changed")
    gone = cur.fetchone()[0]
    new_table = sql.SQL("")
    new = 0
    second_pass = rows_staged != previous_holdings - gone
    if second_pass:
        cur.execute(sql.SQL(
            """
            CREATE TEMP TABLE balance_new ON COMMIT DROP AS
            SELECT f.account, f.asset, {f_values}, false AS gone
              FROM ({staged}) f
             WHERE NOT EXISTS (SELECT FROM ({kept}) p WHERE p.account = f.account AND p.asset = f.asset)
            """).format(staged=staged, kept=kept, f_values=_values("f")))
        new = cur.rowcount
        new_table = sql.SQL(" UNION ALL SELECT * FROM pg_temp.balance_new")
    cur.execute(sql.SQL(
        """
        INSERT INTO {partition} (source, provider, account, asset, {values}, as_of, gone)
        SELECT %(source)s, %(provider)s, account, asset, {values}, %(new)s, gone
          FROM (SELECT * FROM pg_temp.balance_changed{new_table}) c
        """).format(values=_values(), new_table=new_table, partition=partition), params)
    stored = cur.rowcount
    cur.execute(sql.SQL("DROP TABLE pg_temp.balance_changed{}").format(
        sql.SQL(", pg_temp.balance_new") if second_pass else sql.SQL("")))
    return previous_holdings - gone + new, stored


def _put(cur, source: str, as_of, snapshot: tuple) -> tuple[int, int]:
    """Make ``pg_temp.balance_put`` snapshot ``as_of`` of ``source``; (holdings, rows stored)."""
    cur.execute("SELECT holdings, stored FROM balance_history_put(%s, %s, %s, %s, %s, %s, %s)",
                (source, as_of, *snapshot))
    return cur.fetchone()


# The holdings of a source at one snapshot, with the metadata a row has of
# its own (a rerun's addition), as migration 0010 stores them.
_STATE = sql.SQL("""
    SELECT r.provider, r.account, r.asset, {r_values},
           CASE WHEN r.as_of = %(as_of)s THEN r.as_of_raw END AS as_of_raw,
           CASE WHEN r.as_of = %(as_of)s THEN r.scheduled_for END AS scheduled_for,
           CASE WHEN r.as_of = %(as_of)s THEN r.run_id END AS run_id,
           CASE WHEN r.as_of = %(as_of)s THEN r.loaded_at END AS loaded_at
      FROM (SELECT DISTINCT ON (h.account, h.asset) h.*
              FROM balance_history_store h
             WHERE h.source = %(source)s
               AND h.as_of >= date_trunc('month', %(as_of)s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
               AND h.as_of <= %(as_of)s
             ORDER BY h.account, h.asset, h.as_of DESC) r
     WHERE NOT r.gone
""").format(r_values=_values("r"))


def _publish_again(cur, staged: sql.Composable, run: runs.Run, held: tuple) -> tuple[int, int]:
    """A snapshot already held: fail if it now has other balances; add only holdings it lacked.

    As with full rows keyed by holding and snapshot: a holding already held
    is left alone, one the snapshot lacked is added (with this run as its
    loader); (holdings added, rows stored).
    """
    if _same_as_kept(cur, staged, run):
        return 0, 0
    cur.execute(sql.SQL("CREATE TEMP TABLE balance_put ON COMMIT DROP AS ") + _STATE,
                {"source": run.source, "as_of": run.as_of})
    cur.execute("CREATE INDEX ON pg_temp.balance_put (account, asset)")
    cur.execute(
        sql.SQL(
            """
            SELECT s.account, s.asset, h.balance, s.balance
              FROM ({}) s
              JOIN pg_temp.balance_put h ON h.account = s.account AND h.asset = s.asset
             WHERE {}
             LIMIT 3
            """
        ).format(staged, _AMOUNT_CHANGED),
    )
    changed = cur.fetchall()
    if changed:
        listed = "; ".join(f"{a}/{b}: stored {old}, now {new}" for a, b, old, new in changed)
        raise PublishError(
            f"snapshot {run.as_of_raw} of {run.source} was already loaded with other balances "
            f"({listed}); refusing to mix two versions of one snapshot"
        )
    cur.execute(
        sql.SQL(
            """
            INSERT INTO pg_temp.balance_put
            SELECT DISTINCT ON (s.account, s.asset) %s, {}, %s, %s, %s, now()
              FROM ({}) s
             WHERE NOT EXISTS (SELECT FROM pg_temp.balance_put h
                                WHERE h.account = s.account AND h.asset = s.asset)
             ORDER BY s.account, s.asset
            """
        ).format(_STAGED_ROW, staged),
        (run.provider, run.as_of_raw, run.scheduled_for, run.run_id),
    )
    added = cur.rowcount
    stored = 0
    if added:
        stored = _put(cur, run.source, run.as_of, held)[1]
    cur.execute("DROP TABLE pg_temp.balance_put")
    return added, stored


def _same_as_kept(cur, staged: sql.Composable, run: runs.Run) -> bool:
    """Whether every staged row is a holding of the kept snapshot ``run.as_of`` (:mod:`loaders.latest_cache`)
    with the same amounts: a rerun of the source's newest snapshot that adds nothing and changes nothing.

    The usual rerun (a schedule that fires more often than the provider
    takes snapshots chooses the same one again), answered by one hash join
    of the staged rows with the kept ones instead of rebuilding the
    snapshot from the history: 0.85 s -> 0.14 s at 257,142 rows
    (docs/BENCHMARKS.md, B8). Any other answer, a refusal or a holding to
    add, is left to the history, which words it.
    """
    kept = latest_cache.previous_holdings(cur, run.source, run.as_of, run.provider)
    if kept is None:
        return False
    # Counted, not EXISTS: asked for a first row, the planner loops over
    # the kept rows for each staged one; counting, it hashes one side once.
    with _hash_joins(cur):
        cur.execute(sql.SQL(
            """
            SELECT count(*) FROM ({staged}) s
              LEFT JOIN ({kept}) h ON h.account = s.account AND h.asset = s.asset
             WHERE h.account IS NULL OR {changed}
            """).format(staged=staged, kept=kept, changed=_AMOUNT_CHANGED))
        return cur.fetchone()[0] == 0


@contextmanager
def _hash_joins(cur):
    """Within it, the publish's comparisons hash one side and probe it with the other as they lie.

    That needs no sort of the snapshot; a merge join would sort a million
    rows a side.
    """
    cur.execute("SET LOCAL enable_mergejoin = off")
    yield
    cur.execute("SET LOCAL enable_mergejoin = on")
