"""Run bookkeeping: one ``snapshot_runs`` row per attempt to take a snapshot.

This module owns a run's lifecycle: it starts runs, moves them from one
:class:`~loaders.statuses.RunStatus` to the next, holds and releases them
(:mod:`loaders.leases`) and reaps the ones whose process died, dropping
their staging (:mod:`loaders.staging`). It depends on those modules, never
the other way round. The steps every kind of run shares (:func:`resume`,
:func:`add_progress`, :func:`finish`, :func:`record_failure`) also serve
``movement_runs`` (``kind=leases.MOVEMENTS``, :mod:`loaders.movements`).

Text that reaches these rows from a provider (errors, warnings) goes
through :func:`extractors.text.safe_text` here, at the storage boundary: a
NUL or a lone surrogate in a provider's message must not make recording
the failure fail too. Rejected records are kept by :mod:`loaders.rejections`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

import psycopg2
from psycopg2 import sql

from extractors.text import one_line, safe_text
from loaders import leases, staging
from loaders.db import transaction
from loaders.statuses import RunStatus

log = logging.getLogger(__name__)

MAX_WARNINGS_KEPT = 100
# Stored text is cut to these lengths (characters): enough to say what
# went wrong, never a provider's whole body in an error column.
MAX_ERROR_CHARS = 10_000
MAX_WARNING_CHARS = 2_000
# The table of each kind of run these steps serve.
_TABLES = {leases.SNAPSHOT: sql.Identifier("snapshot_runs"), leases.MOVEMENTS: sql.Identifier("movement_runs")}


@dataclass(slots=True, frozen=True)
class Run:
    run_id: int
    source: str
    provider: str
    status: RunStatus
    scheduled_for: datetime
    as_of: datetime | None
    as_of_raw: str | None
    shards: int = 1
    # The source's configuration as the run was begun (migration 0012); None
    # for runs begun before it was kept.
    config: dict | None = None


def start_run(conn, source: str, provider: str, scheduled_for: datetime, *,
              dag_run_id: str | None = None, shards: int = 1, hold: bool = False,
              config: dict | None = None) -> int:
    """A new ``running`` run; with ``hold``, held by this session from its first moment.

    Held in the same transaction, a concurrent reaper never sees it unheld.
    ``config`` is the source's configuration (JSON), kept for every step of the run.
    """
    with transaction(conn) as cur:
        cur.execute(
            """
            INSERT INTO snapshot_runs (source, provider, scheduled_for, dag_run_id, shards, status, config)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            RETURNING run_id
            """,
            (source, provider, scheduled_for, dag_run_id, shards, RunStatus.RUNNING, _json(config)),
        )
        run_id = cur.fetchone()[0]
        if hold:
            leases.take(cur, leases.SNAPSHOT, run_id)
        return run_id


def record_skipped(conn, source: str, provider: str, scheduled_for: datetime, reason: str, *,
                   dag_run_id: str | None = None, config: dict | None = None) -> int:
    """A run that did nothing, and why (kept in ``error``, as for ``no_snapshot``)."""
    with transaction(conn) as cur:
        cur.execute(
            """
            INSERT INTO snapshot_runs (source, provider, scheduled_for, dag_run_id, status, error, finished_at,
                                       config)
            VALUES (%s, %s, %s, %s, %s, %s, now(), %s)
            RETURNING run_id
            """,
            (source, provider, scheduled_for, dag_run_id, RunStatus.SKIPPED,
             safe_text(reason, MAX_ERROR_CHARS), _json(config)),
        )
        return cur.fetchone()[0]


def _json(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value)


def published_run(cur, source: str, scheduled_for: datetime, *, other_than: int | None = None) -> int | None:
    """The first published run of ``source`` for the interval ending at ``scheduled_for``, if any."""
    cur.execute("SELECT min(run_id) FROM snapshot_runs WHERE source = %s AND scheduled_for = %s"
                " AND status = %s AND run_id IS DISTINCT FROM %s",
                (source, scheduled_for, RunStatus.PUBLISHED, other_than))
    return cur.fetchone()[0]


def get_run(conn, run_id: int, *, for_update: bool = False) -> Run:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT run_id, source, provider, status, scheduled_for, as_of, as_of_raw, shards, config"
            " FROM snapshot_runs WHERE run_id = %s" + (" FOR UPDATE" if for_update else ""),
            (run_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"no snapshot run {run_id}")
    run_id, source, provider, status, *rest = row
    return Run(run_id, source, provider, RunStatus(status), *rest)


def resume(conn, run_id: int, *, kind: str = leases.SNAPSHOT) -> None:
    """A retried task picks the run up again."""
    with transaction(conn) as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET status = %s, error = NULL, finished_at = NULL"
                    " WHERE run_id = %s AND status IN (%s, %s, %s)").format(_TABLES[kind]),
            (RunStatus.RUNNING, run_id, RunStatus.RUNNING, RunStatus.FAILED, RunStatus.ABANDONED),
        )


def set_snapshot(conn, run_id: int, as_of: datetime, as_of_raw: str) -> str:
    """Record the provider's snapshot time; every shard must agree on it.

    Returns the snapshot text already recorded, so a caller can detect that
    another shard saw a different snapshot.
    """
    with transaction(conn) as cur:
        cur.execute(
            """
            UPDATE snapshot_runs
               SET as_of = COALESCE(as_of, %s), as_of_raw = COALESCE(as_of_raw, %s)
             WHERE run_id = %s
         RETURNING as_of_raw
            """,
            (as_of, as_of_raw, run_id),
        )
        return cur.fetchone()[0]


def forget_snapshot(conn, run_id: int) -> None:
    """Clear the snapshot time an earlier, discarded crawl of the run recorded.

    For runs whose one crawl reads the present (no snapshot chosen up
    front): a retried task or a crawl started again reads a new present.
    """
    with transaction(conn) as cur:
        cur.execute("UPDATE snapshot_runs SET as_of = NULL, as_of_raw = NULL WHERE run_id = %s",
                    (run_id,))


def add_progress(conn, run_id: int, *, pages: int, requests: int, retries: int,
                 warnings: Iterable[str] = (), kind: str = leases.SNAPSHOT) -> None:
    warnings = [safe_text(w, MAX_WARNING_CHARS) for w in list(warnings)[:MAX_WARNINGS_KEPT]]
    with transaction(conn) as cur:
        cur.execute(
            sql.SQL("""
            UPDATE {}
               SET pages = pages + %s, requests = requests + %s, retries = retries + %s,
                   warnings = CASE WHEN jsonb_array_length(warnings) >= %s THEN warnings
                                   ELSE warnings || %s::jsonb END
             WHERE run_id = %s
            """).format(_TABLES[kind]),
            (pages, requests, retries, MAX_WARNINGS_KEPT, json.dumps(warnings), run_id),
        )


def finish(conn, run_id: int, status: str, *, error: str | None = None, kind: str = leases.SNAPSHOT) -> None:
    """End the run as ``status``, unless it is already published (a published run stays so)."""
    with transaction(conn) as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET status = %s, error = %s, finished_at = now()"
                    " WHERE run_id = %s AND status <> %s").format(_TABLES[kind]),
            (str(status), None if error is None else safe_text(error, MAX_ERROR_CHARS), run_id,
             RunStatus.PUBLISHED),
        )


def record_failure(conn, run_id: int, error: str, status: RunStatus = RunStatus.FAILED, *,
                   kind: str = leases.SNAPSHOT) -> bool:
    """Mark the run failed with ``error``; never raises, True if it was recorded.

    Called while another error is on its way up: that error is the one the
    caller re-raises, so a broken connection here is logged, not raised.
    What the caller was doing in the open transaction failed: it is rolled back.
    """
    message = safe_text(error, MAX_ERROR_CHARS)
    # The second try is for a database whose encoding cannot hold some
    # character of the message: ASCII with escapes fits every encoding.
    for text in (message, ascii(message)[1:-1]):
        try:
            if conn.closed:
                break
            conn.rollback()
            finish(conn, run_id, status, error=text, kind=kind)
            return True
        except (psycopg2.DataError, UnicodeEncodeError):
            continue
        except Exception as exc:
            log.error("run %d failed (%s) and the failure could not be recorded: %s",
                      run_id, one_line(message[:500]), one_line(safe_text(exc, 500)))
            return False
    log.error("run %d failed (%s) and the failure could not be recorded", run_id, one_line(message[:500]))
    return False


def summary(conn, run_id: int) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT run_id, source, provider, status, scheduled_for, as_of, as_of_raw, pages,
                   requests, retries, rows, rows_inserted, rows_stored, rejected, warnings, error,
                   started_at, finished_at
              FROM snapshot_runs WHERE run_id = %s
            """,
            (run_id,),
        )
        names = [d.name for d in cur.description]
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"no snapshot run {run_id}")
    return dict(zip(names, row))


def hold(conn, run_id: int, shard: int | None = None) -> None:
    """Mark the run as being worked on by this session (until release or death).

    A shard's crawl holds only its shard, so the shards of one run crawl
    side by side, and a retry cannot crawl a shard its zombie predecessor
    is still writing; a process that takes the whole snapshot holds the
    whole run. Either way the reaper leaves the run alone while its holder
    is connected (see :mod:`loaders.leases`).
    """
    leases.claim(conn, leases.SNAPSHOT, run_id, leases.WHOLE_RUN if shard is None else shard)


def release(conn, run_id: int, shard: int | None = None) -> None:
    leases.release(conn, leases.SNAPSHOT, run_id, leases.WHOLE_RUN if shard is None else shard)


def reap_abandoned(conn, source: str) -> list[int]:
    """Mark runs of ``source`` whose process died as ``abandoned``; drop their staging.

    Only runs nobody holds are reaped. Runs started outside Airflow are
    reaped at once; Airflow retries its own runs (a retried task resumes
    the run), so those are reaped only when a day old.
    """
    with transaction(conn) as cur:
        cur.execute(
            """
            SELECT run_id FROM snapshot_runs
             WHERE source = %s AND status = %s
               AND (dag_run_id IS NULL OR started_at < now() - interval '1 day')
            """,
            (source, RunStatus.RUNNING),
        )
        candidates = [r[0] for r in cur.fetchall()]
    reaped = []
    for run_id in candidates:
        with transaction(conn) as cur:
            if leases.abandon(cur, leases.SNAPSHOT, run_id,
                              "the process taking this snapshot stopped before publishing it"):
                staging.drop_run(cur, run_id)
                reaped.append(run_id)
    return reaped
