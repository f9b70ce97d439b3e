"""Publishing: staged rows become visible in ``balance_history`` at once.

One transaction moves every shard's staging table into the history table,
marks the run published and drops the staging tables. A reader sees the
whole snapshot or none of it. Rows already present for the same source,
account, asset and snapshot time are left alone, so a rerun adds nothing;
but if the provider now reports a *different* balance for a snapshot we
already hold, the run fails loudly instead of keeping either silently.
"""
from __future__ import annotations

from dataclasses import dataclass

from psycopg2 import sql

from extractors.records import ROW_COLUMNS
from loaders import leases, partitions, rejections, runs, staging
from loaders.db import transaction
from loaders.runs import RunStatus

# The row's own columns, as balance_history and staging both have them.
_ROW = sql.SQL(", ").join(sql.Identifier(c.name) for c in ROW_COLUMNS)
_STAGED_ROW = sql.SQL(", ").join(sql.Identifier("s", c.name) for c in ROW_COLUMNS)
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
    rows_published: int
    rejected: int


def publish(conn, run_id: int, *, shards: int = 1, max_rejected: int = 0,
            once_per_interval: bool = False) -> PublishResult:
    """Publish the run's staged snapshot; a failure is recorded on the run, then raised.

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
        return _publish(conn, run, shards, max_rejected, once_per_interval)
    except BaseException as exc:
        # Refusals are stored as they read; anything else names its type.
        refused = isinstance(exc, (PublishError, rejections.RejectedRecordsError))
        runs.record_failure(conn, run_id, str(exc) if refused else f"{type(exc).__name__}: {exc}")
        raise


def _publish(conn, run: runs.Run, shards: int, max_rejected: int, once_per_interval: bool) -> PublishResult:
    run_id = run.run_id
    if run.status == RunStatus.FAILED:
        runs.resume(conn, run_id)
    if run.as_of is None:
        raise PublishError(f"run {run_id} has no snapshot time: was it crawled?")
    partitions.ensure_partition(conn, run.as_of)
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
        # The key-order sort of a whole snapshot then fits in memory.
        cur.execute("SET LOCAL work_mem = '256MB'")
        tables = [staging.table_name(run_id, shard) for shard in range(shards)]
        _require_tables(cur, run_id, shards)
        rows_staged = _check_staging_intact(cur, run_id, shards)
        staged = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT * FROM {}").format(t) for t in tables
        )
        snapshot_is_new = _refuse_changed_history(cur, staged, run)
        # Sorted in key order, the inserts walk the primary-key index left
        # to right instead of touching random pages (~25% faster). A new
        # snapshot (the usual case) needs no conflict handling, which
        # halves the cost; DISTINCT ON drops a holding listed twice alike.
        cur.execute(
            sql.SQL(
                """
                INSERT INTO balance_history
                    (source, provider, {}, as_of, as_of_raw, scheduled_for, run_id)
                SELECT DISTINCT ON (s.account, s.asset)
                       %s, %s, {}, %s, %s, %s, %s
                  FROM ({}) s
                 ORDER BY s.account, s.asset
                {}
                """
            ).format(_ROW, _STAGED_ROW, staged, sql.SQL("" if snapshot_is_new else
                                     "ON CONFLICT (source, account, asset, as_of) DO NOTHING")),
            (run.source, run.provider, run.as_of, run.as_of_raw, run.scheduled_for, run_id),
        )
        rows_published = cur.rowcount
        _publish_aggregates(cur, run, shards)
        if snapshot_is_new and rows_published != rows_staged:
            # Only now is the (costly) check worth it: some holding came twice.
            _refuse_duplicates(cur, staged)
        cur.execute(
            """
            UPDATE snapshot_runs
               SET status = %s, rows = %s, rows_inserted = %s,
                   rejected = %s, finished_at = now(), error = NULL
             WHERE run_id = %s
            """,
            (RunStatus.PUBLISHED, rows_staged, rows_published, rejected, run_id),
        )
        for shard in range(shards):
            staging.drop(cur, run_id, shard)
    return PublishResult(run_id, RunStatus.PUBLISHED, rows_staged, rows_published, rejected)


def _publish_aggregates(cur, run: runs.Run, shards: int) -> None:
    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
        (staging.SCHEMA, [f"run_{run.run_id}_shard_{n}_aggregate" for n in range(shards)]),
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
        found_aggregates = _count(cur, staging.aggregate_table_name(run_id, shard)) if aggregates else 0
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


def _refuse_changed_history(cur, staged: sql.Composable, run: runs.Run) -> bool:
    """Fail if the snapshot is already held with other balances; True if it is new."""
    cur.execute(
        "SELECT EXISTS (SELECT 1 FROM balance_history WHERE source = %s AND as_of = %s)",
        (run.source, run.as_of),
    )
    if not cur.fetchone()[0]:
        return True  # the usual case: a new snapshot, nothing to compare with
    cur.execute(
        sql.SQL(
            """
            SELECT s.account, s.asset, h.balance, s.balance
              FROM ({}) s
              JOIN balance_history h
                ON h.source = %s AND h.as_of = %s AND h.account = s.account AND h.asset = s.asset
             WHERE {}
             LIMIT 3
            """
        ).format(staged, _AMOUNT_CHANGED),
        (run.source, run.as_of),
    )
    changed = cur.fetchall()
    if changed:
        listed = "; ".join(f"{a}/{b}: stored {old}, now {new}" for a, b, old, new in changed)
        raise PublishError(
            f"snapshot {run.as_of_raw} of {run.source} was already loaded with other balances "
            f"({listed}); refusing to mix two versions of one snapshot"
        )
    return False
