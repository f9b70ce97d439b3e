"""Movements, the PostgreSQL side: movement runs, their staging, and the publish of a window.

A **window** is the span ``(period_start, period_end]`` between two
consecutive published snapshots of a source. One ``movement_runs`` row is
one attempt to load a window's movements: its shards stream movement legs
into private staging tables (``balance_staging.movements_<run>_shard_<n>``,
COPY, as a snapshot's rows are staged), and :func:`publish` moves all of
them into ``balance_movements`` in one transaction, or nothing:

* it takes the source's turn (:func:`loaders.leases.take_publish_turn`), so
  the snapshots that bound the window cannot change under it;
* a window that is no longer one (a snapshot backfilled between its ends,
  an end no longer held) or that another run published first ends the run
  ``skipped``: a rerun adds nothing;
* a published window that overlaps this one (the window a backfilled
  snapshot just split) is ``superseded``: its movements are removed in the
  same transaction, and the two smaller windows hold them again once both
  are loaded;
* a movement the provider sent twice alike is stored once; twice with other
  values, or already held by another window, fails the run naming it.

A provider without movements gets its windows recorded ``not_available``
(:func:`record_not_available`): the roll-forward shows them without
inflows or outflows and no check reports a break on them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

import psycopg2.errors
from psycopg2 import sql

from extractors.records import MOVEMENT_COLUMNS, MovementRow, Rejection, Window
from extractors.text import safe_text
from loaders import leases, rejections, runs, staging
from loaders.db import transaction
from loaders.publish import PublishError
from loaders.statuses import MovementStatus

log = logging.getLogger(__name__)

RUNS = "movement_runs"
_ENCODE = staging.encoder(MOVEMENT_COLUMNS)
_COLUMNS_DDL = staging.columns_ddl(MOVEMENT_COLUMNS)
_NAMES = sql.SQL(", ").join(sql.Identifier(c.name) for c in MOVEMENT_COLUMNS)
_STAGED_NAMES = sql.SQL(", ").join(sql.Identifier("s", c.name) for c in MOVEMENT_COLUMNS)
# Two legs with one movement_id are the same leg only if every value is the same text.
_LEG_TEXT = sql.SQL("({})").format(sql.SQL(", ").join(
    sql.SQL("s.{}::text").format(sql.Identifier(c.name)) for c in MOVEMENT_COLUMNS))


@dataclass(slots=True, frozen=True)
class MovementRun:
    run_id: int
    source: str
    provider: str
    status: MovementStatus
    window: Window
    shards: int
    snapshot_run_id: int | None
    config: dict | None
    unexplainable: dict


@dataclass(slots=True, frozen=True)
class PublishedWindow:
    run_id: int
    status: MovementStatus
    movements: int  # legs stored
    rejected: int
    superseded: tuple[int, ...] = ()  # runs whose overlapping windows this one replaced
    reason: str | None = None  # why a run ended skipped


def table_name(run_id: int, shard: int) -> sql.Identifier:
    # Built from integers we generated, never from input.
    return sql.Identifier(staging.SCHEMA, f"movements_{int(run_id)}_shard_{int(shard)}")


def drop_run(cur, run_id: int) -> None:
    """Drop every staging table of a movement run, whatever its shards."""
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
                (staging.SCHEMA, f"movements\\_{int(run_id)}\\_shard\\_%"))
    for (name,) in cur.fetchall():
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(staging.SCHEMA, name)))


# -- the windows -----------------------------------------------------------------------


def windows(conn, source: str, *, start: datetime | None = None, end: datetime | None = None) -> list[Window]:
    """Every window of ``source``: consecutive published snapshots, those ending in [start, end]."""
    with transaction(conn) as cur:
        cur.execute(
            """
            SELECT w.* FROM (
                SELECT lag(as_of) OVER o, lag(as_of_raw) OVER o, as_of, as_of_raw
                  FROM balance_snapshots WHERE source = %(source)s WINDOW o AS (ORDER BY as_of)) w (a, ar, b, br)
             WHERE w.a IS NOT NULL
               AND (%(start)s::timestamptz IS NULL OR w.b >= %(start)s)
               AND (%(end)s::timestamptz IS NULL OR w.b <= %(end)s)
             ORDER BY w.b
            """,
            {"source": source, "start": start, "end": end},
        )
        return [Window(*row) for row in cur.fetchall()]


def adjoining(conn, source: str, as_of: datetime) -> list[Window]:
    """The windows a published snapshot bounds: the one ending at it, the one starting at it."""
    with transaction(conn) as cur:
        cur.execute(
            """
            SELECT p.as_of, p.as_of_raw, s.as_of, s.as_of_raw, n.as_of, n.as_of_raw
              FROM balance_snapshots s
              LEFT JOIN LATERAL (SELECT as_of, as_of_raw FROM balance_snapshots
                                  WHERE source = s.source AND as_of < s.as_of ORDER BY as_of DESC LIMIT 1) p ON true
              LEFT JOIN LATERAL (SELECT as_of, as_of_raw FROM balance_snapshots
                                  WHERE source = s.source AND as_of > s.as_of ORDER BY as_of LIMIT 1) n ON true
             WHERE s.source = %s AND s.as_of = %s
            """,
            (source, as_of),
        )
        row = cur.fetchone()
    if row is None:
        return []
    found = []
    if row[0] is not None:
        found.append(Window(row[0], row[1], row[2], row[3]))
    if row[4] is not None:
        found.append(Window(row[2], row[3], row[4], row[5]))
    return found


def latest_run(conn, source: str, window: Window) -> int | None:
    """The newest movement run of ``window``, whatever its status."""
    with transaction(conn) as cur:
        cur.execute("SELECT max(run_id) FROM movement_runs WHERE source = %s AND period_start = %s AND period_end = %s",
                    (source, window.start, window.end))
        return cur.fetchone()[0]


def held(conn, source: str, window: Window) -> int | None:
    """The run that holds ``window`` (published it, or found it not available), if one does."""
    with transaction(conn) as cur:
        return _holder(cur, source, window)


def _holder(cur, source: str, window: Window) -> int | None:
    cur.execute("SELECT run_id FROM movement_runs WHERE source = %s AND period_start = %s AND period_end = %s"
                " AND status IN (%s, %s)",
                (source, window.start, window.end, MovementStatus.PUBLISHED, MovementStatus.NOT_AVAILABLE))
    row = cur.fetchone()
    return row[0] if row else None


def _not_a_window(cur, source: str, window: Window) -> str | None:
    """Why ``window`` is no longer a window of ``source`` (its ends not both held, or a snapshot between)."""
    cur.execute(
        """
        SELECT (SELECT as_of_raw FROM balance_snapshots WHERE source = %(s)s AND as_of = %(a)s),
               (SELECT as_of_raw FROM balance_snapshots WHERE source = %(s)s AND as_of = %(b)s),
               (SELECT min(as_of) FROM balance_snapshots WHERE source = %(s)s AND as_of > %(a)s AND as_of < %(b)s)
        """,
        {"s": source, "a": window.start, "b": window.end},
    )
    start_raw, end_raw, between = cur.fetchone()
    for side, raw, wanted in (("start", start_raw, window.start_raw), ("end", end_raw, window.end_raw)):
        if raw != wanted:
            now = "is no longer held" if raw is None else f"is now snapshot {raw}"
            return f"window {window}: its {side} snapshot {wanted} {now}"
    if between is not None:
        return (f"window {window}: a snapshot at {between.isoformat()} was published inside it since; "
                "the windows on either side of it replace it")
    return None


def _supersede(cur, source: str, window: Window, run_id: int) -> tuple[int, ...]:
    """Remove the held windows that overlap ``window``: their movements, and their hold."""
    cur.execute(
        """
        UPDATE movement_runs SET status = %s, finished_at = coalesce(finished_at, now()),
               error = 'superseded by run ' || %s || ', window (' || %s || ', ' || %s || ']'
         WHERE source = %s AND status IN (%s, %s) AND period_start < %s AND period_end > %s
           AND NOT (period_start = %s AND period_end = %s)
        RETURNING run_id
        """,
        (MovementStatus.SUPERSEDED, run_id, window.start_raw, window.end_raw, source,
         MovementStatus.PUBLISHED, MovementStatus.NOT_AVAILABLE, window.end, window.start, window.start, window.end),
    )
    gone = tuple(r[0] for r in cur.fetchall())
    if gone:
        cur.execute("DELETE FROM balance_movements WHERE run_id = ANY(%s)", (list(gone),))
    return gone


# -- runs --------------------------------------------------------------------------------


def begin(conn, source: str, provider: str, window: Window, *, shards: int = 1, snapshot_run_id: int | None = None,
          dag_run_id: str | None = None, config: dict | None = None, hold: bool = False) -> int:
    """A new ``running`` movement run for ``window``; with ``hold``, held by this session from the start."""
    with transaction(conn) as cur:
        cur.execute(
            """
            INSERT INTO movement_runs (source, provider, period_start, period_end, start_raw, end_raw,
                                       snapshot_run_id, dag_run_id, shards, status, config)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            RETURNING run_id
            """,
            (source, provider, window.start, window.end, window.start_raw, window.end_raw, snapshot_run_id,
             dag_run_id, shards, MovementStatus.RUNNING, None if config is None else json.dumps(config)),
        )
        run_id = cur.fetchone()[0]
        if hold:
            leases.take(cur, leases.MOVEMENTS, run_id)
        return run_id


def drop_stale(conn, source: str, window: Window) -> None:
    """Drop the staging of the window's earlier runs that failed: a new run reads the window again."""
    with transaction(conn) as cur:
        cur.execute("SELECT run_id FROM movement_runs WHERE source = %s AND period_start = %s AND period_end = %s"
                    " AND status IN (%s, %s)",
                    (source, window.start, window.end, MovementStatus.FAILED, MovementStatus.ABANDONED))
        for (run_id,) in cur.fetchall():
            drop_run(cur, run_id)


def record_not_available(conn, source: str, provider: str, window: Window, reason: str, *,
                         snapshot_run_id: int | None = None, dag_run_id: str | None = None) -> int | None:
    """Record ``window`` as one the provider cannot explain; the run, or None if nothing was recorded.

    Nothing is recorded for a window already held or no longer a window.
    """
    with transaction(conn) as cur:
        leases.take_publish_turn(cur, source)
        if _holder(cur, source, window) is not None or _not_a_window(cur, source, window):
            return None
        cur.execute(
            """
            INSERT INTO movement_runs (source, provider, period_start, period_end, start_raw, end_raw,
                                       snapshot_run_id, dag_run_id, status, unexplainable, finished_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
            RETURNING run_id
            """,
            (source, provider, window.start, window.end, window.start_raw, window.end_raw, snapshot_run_id,
             dag_run_id, MovementStatus.NOT_AVAILABLE, json.dumps({"*": safe_text(reason, 2000)})),
        )
        run_id = cur.fetchone()[0]
        _supersede(cur, source, window, run_id)
        return run_id


def get(conn, run_id: int, *, for_update: bool = False) -> MovementRun:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT run_id, source, provider, status, period_start, start_raw, period_end, end_raw, shards,"
            " snapshot_run_id, config, unexplainable FROM movement_runs WHERE run_id = %s"
            + (" FOR UPDATE" if for_update else ""),
            (run_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"no movement run {run_id}")
    run_id, source, provider, status, start, start_raw, end, end_raw, *rest = row
    return MovementRun(run_id, source, provider, MovementStatus(status), Window(start, start_raw, end, end_raw),
                       *rest)


def add_unexplainable(conn, run_id: int, assets: dict[str, str]) -> None:
    """Name assets whose movements the provider cannot read in the run's window, and why."""
    if not assets:
        return
    with transaction(conn) as cur:
        cur.execute("UPDATE movement_runs SET unexplainable = unexplainable || %s::jsonb WHERE run_id = %s",
                    (json.dumps({a: safe_text(r, 2000) for a, r in assets.items()}), run_id))


def hold(conn, run_id: int, shard: int | None = None) -> None:
    leases.claim(conn, leases.MOVEMENTS, run_id, leases.WHOLE_RUN if shard is None else shard)


def release(conn, run_id: int, shard: int | None = None) -> None:
    leases.release(conn, leases.MOVEMENTS, run_id, leases.WHOLE_RUN if shard is None else shard)


def reap_abandoned(conn, source: str) -> list[int]:
    """Mark movement runs of ``source`` whose process died ``abandoned``; drop their staging.

    As for snapshot runs (:func:`loaders.runs.reap_abandoned`): runs outside
    Airflow at once, Airflow's own (which it retries) when a day old.
    """
    with transaction(conn) as cur:
        cur.execute("SELECT run_id FROM movement_runs WHERE source = %s AND status = %s"
                    " AND (dag_run_id IS NULL OR started_at < now() - interval '1 day')",
                    (source, MovementStatus.RUNNING))
        candidates = [r[0] for r in cur.fetchall()]
    reaped = []
    for run_id in candidates:
        with transaction(conn) as cur:
            if leases.abandon(cur, leases.MOVEMENTS, run_id,
                              "the process loading these movements stopped before publishing them"):
                drop_run(cur, run_id)
                reaped.append(run_id)
    return reaped


def summary(conn, run_id: int) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT run_id, source, provider, status, period_start, period_end, start_raw, end_raw, pages,
                   requests, retries, movements, rejected, unexplainable, warnings, error, started_at, finished_at
              FROM movement_runs WHERE run_id = %s
            """,
            (run_id,),
        )
        names = [d.name for d in cur.description]
        row = cur.fetchone()
    conn.rollback()
    if row is None:
        raise LookupError(f"no movement run {run_id}")
    return dict(zip(names, row))


# -- staging ------------------------------------------------------------------------------


class MovementWriter:
    """Streams one shard's movement legs into its staging table; rejections into ``rejected_movements``."""

    def __init__(self, conn, run_id: int, shard: int) -> None:
        self.conn = conn
        self.run_id = run_id
        self.shard = shard
        self.rejected = 0
        table = table_name(run_id, shard)
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            cur.execute(sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(table, _COLUMNS_DDL))
            rejections.clear(cur, run_id, shard, rejections.MOVEMENTS)
            staging.forget_staged(cur, run_id, shard, RUNS)
        conn.commit()
        self._copy = staging.CopyBuffer(conn, table, MOVEMENT_COLUMNS, _ENCODE)

    @property
    def rows(self) -> int:
        return self._copy.rows

    def add(self, rows: list[MovementRow], rejected: list[Rejection] = ()) -> None:
        self._copy.add(rows)
        if rejected:
            with self.conn.cursor() as cur:
                rejections.add(cur, self.run_id, self.shard, rejected, rejections.MOVEMENTS)
            self.conn.commit()  # kept even if the run fails
            self.rejected += len(rejected)

    def close(self) -> None:
        self._copy.finish()
        with self.conn.cursor() as cur:
            staging.record_staged(cur, self.run_id, self.shard, self.rows, 0, RUNS)
        self.conn.commit()

    def abort(self) -> None:
        self._copy.discard()
        self.conn.rollback()
        with self.conn.cursor() as cur:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table_name(self.run_id, self.shard)))
        self.conn.commit()


# -- publish ------------------------------------------------------------------------------


def publish(conn, run_id: int, *, max_rejected: int = 0) -> PublishedWindow:
    """Publish the run's window, all of its movements at once; a failure is recorded on the run, then raised."""
    run = get(conn, run_id)
    conn.rollback()
    if run.status in (MovementStatus.NOT_AVAILABLE, MovementStatus.SKIPPED, MovementStatus.SUPERSEDED):
        return PublishedWindow(run_id, run.status, 0, 0)
    if run.status == MovementStatus.PUBLISHED:
        raise PublishError(f"movement run {run_id} is already published")
    try:
        return _publish(conn, run, max_rejected)
    except BaseException as exc:
        refused = isinstance(exc, (PublishError, rejections.RejectedRecordsError))
        runs.record_failure(conn, run_id, str(exc) if refused else f"{type(exc).__name__}: {exc}",
                            kind=leases.MOVEMENTS)
        if refused:  # what is staged will never publish: the window is read again by a new run
            try:
                with transaction(conn) as cur:
                    drop_run(cur, run_id)
            except Exception as second:
                log.error("movement run %d: could not drop its staging: %s", run_id, safe_text(second, 500))
        raise


def _publish(conn, run: MovementRun, max_rejected: int) -> PublishedWindow:
    run_id, window = run.run_id, run.window
    if run.status == MovementStatus.FAILED:
        runs.resume(conn, run_id, kind=leases.MOVEMENTS)
    with transaction(conn) as cur:
        run = get(conn, run_id, for_update=True)
        if run.status != MovementStatus.RUNNING:
            raise PublishError(f"movement run {run_id} is {run.status}, not ready to publish")
        rejected = rejections.count(cur, run_id, rejections.MOVEMENTS)
        rejections.check_threshold(run_id, run.source, rejected, max_rejected, rejections.MOVEMENTS)
        leases.take_publish_turn(cur, run.source)
        holder = _holder(cur, run.source, window)
        reason = (f"run {holder} loaded window {window} first" if holder is not None
                  else _not_a_window(cur, run.source, window))
        if reason is not None:
            _end(cur, run_id, MovementStatus.SKIPPED, reason)
            return PublishedWindow(run_id, MovementStatus.SKIPPED, 0, rejected, reason=reason)
        cur.execute("SET LOCAL work_mem = '256MB'")
        cur.execute("SET LOCAL jit = off")
        staged = _staged(cur, run)
        superseded = _supersede(cur, run.source, window, run_id)
        stored = _insert(cur, run, staged)
        cur.execute(
            "UPDATE movement_runs SET status = %s, movements = %s, rejected = %s, finished_at = now(), error = NULL"
            " WHERE run_id = %s",
            (MovementStatus.PUBLISHED, stored, rejected, run_id),
        )
        drop_run(cur, run_id)
    return PublishedWindow(run_id, MovementStatus.PUBLISHED, stored, rejected, superseded)


def _end(cur, run_id: int, status: MovementStatus, reason: str) -> None:
    cur.execute("UPDATE movement_runs SET status = %s, error = %s, finished_at = now() WHERE run_id = %s",
                (status, safe_text(reason, 2000), run_id))
    drop_run(cur, run_id)


def _staged(cur, run: MovementRun) -> sql.Composable:
    """The run's staged legs, every shard of them, checked to be what the crawls staged."""
    recorded = staging.staged_counts(cur, run.run_id, RUNS)
    tables = []
    for shard in range(run.shards):
        if shard not in recorded:
            raise PublishError(f"movement run {run.run_id}: shard {shard} did not finish staging")
        table = table_name(run.run_id, shard)
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(cur),))
        found = 0
        if cur.fetchone()[0]:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
            found = cur.fetchone()[0]
        if found != recorded[shard][0]:
            raise PublishError(
                f"movement run {run.run_id}: shard {shard} staged {recorded[shard][0]} movements but its staging "
                f"table now holds {found} (the database restarted since, and crash recovery empties staging); "
                "nothing published: load this window again")
        tables.append(table)
    return sql.SQL(" UNION ALL ").join(sql.SQL("SELECT * FROM {}").format(t) for t in tables)


def _insert(cur, run: MovementRun, staged: sql.Composable) -> int:
    """Store the staged legs; a leg staged twice alike once. Returns the legs stored."""
    params = {"source": run.source, "run": run.run_id}
    insert = sql.SQL("INSERT INTO balance_movements (source, {}, run_id) SELECT %(source)s, {}, %(run)s FROM ({}) s")
    cur.execute("SAVEPOINT movements_insert")
    try:
        cur.execute(insert.format(_NAMES, _STAGED_NAMES, staged), params)
        stored = cur.rowcount
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT movements_insert")
        _refuse_clashes(cur, run, staged)
        once = sql.SQL("SELECT DISTINCT ON (s.movement_id) s.* FROM ({}) s ORDER BY s.movement_id").format(staged)
        cur.execute(insert.format(_NAMES, _STAGED_NAMES, once), params)
        stored = cur.rowcount
    cur.execute("RELEASE SAVEPOINT movements_insert")
    return stored


def _refuse_clashes(cur, run: MovementRun, staged: sql.Composable) -> None:
    """A leg sent twice with other values, or one another window holds, fails the window, named."""
    cur.execute(sql.SQL("SELECT s.movement_id FROM ({}) s GROUP BY s.movement_id"
                        " HAVING count(DISTINCT {}) > 1 ORDER BY 1 LIMIT 3").format(staged, _LEG_TEXT))
    twice = [r[0] for r in cur.fetchall()]
    if twice:
        raise PublishError(f"window {run.window} of {run.source}: the provider reported movement(s) "
                           f"{', '.join(map(repr, twice))} twice with different values; nothing published")
    cur.execute(sql.SQL(
        """
        SELECT s.movement_id, m.run_id, r.start_raw, r.end_raw
          FROM ({}) s JOIN balance_movements m ON m.source = %s AND m.movement_id = s.movement_id
          JOIN movement_runs r ON r.run_id = m.run_id
         ORDER BY 1 LIMIT 3
        """).format(staged), (run.source,))
    held = cur.fetchall()
    if held:
        listed = "; ".join(f"{m!r} (window ({a}, {b}], run {r})" for m, r, a, b in held)
        raise PublishError(f"window {run.window} of {run.source}: movement(s) already loaded by another window: "
                           f"{listed}; a movement belongs to one window, nothing published")
