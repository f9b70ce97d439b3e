"""Run bookkeeping: one ``snapshot_runs`` row per attempt to take a snapshot."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from psycopg2.extras import execute_values

from loaders.db import transaction

MAX_WARNINGS_KEPT = 100
# First key of the advisory locks that mark a run as being worked on; the
# second is the run id. Postgres drops a session's locks when its process
# dies, which is how a killed crawl is told apart from a running one.
LOCK_NAMESPACE = 7312
SHARD_LOCK_NAMESPACE = 7314  # 7313 is publish's per-snapshot lock


@dataclass(slots=True, frozen=True)
class Run:
    run_id: int
    source: str
    provider: str
    status: str
    scheduled_for: datetime
    as_of: datetime | None
    as_of_raw: str | None


def start_run(conn, source: str, provider: str, scheduled_for: datetime, *,
              dag_run_id: str | None = None, shards: int = 1) -> int:
    with transaction(conn) as cur:
        cur.execute(
            """
            INSERT INTO snapshot_runs (source, provider, scheduled_for, dag_run_id, shards, status)
            VALUES (%s, %s, %s, %s, %s, 'running')
            RETURNING run_id
            """,
            (source, provider, scheduled_for, dag_run_id, shards),
        )
        return cur.fetchone()[0]


def get_run(conn, run_id: int, *, for_update: bool = False) -> Run:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT run_id, source, provider, status, scheduled_for, as_of, as_of_raw"
            " FROM snapshot_runs WHERE run_id = %s" + (" FOR UPDATE" if for_update else ""),
            (run_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"no snapshot run {run_id}")
    return Run(*row)


def resume(conn, run_id: int) -> None:
    """A retried task picks the run up again."""
    with transaction(conn) as cur:
        cur.execute(
            "UPDATE snapshot_runs SET status = 'running', error = NULL, finished_at = NULL"
            " WHERE run_id = %s AND status IN ('running', 'failed', 'abandoned')",
            (run_id,),
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


def add_progress(conn, run_id: int, *, pages: int, requests: int, retries: int,
                 warnings: Iterable[str] = ()) -> None:
    warnings = list(warnings)[:MAX_WARNINGS_KEPT]
    with transaction(conn) as cur:
        cur.execute(
            """
            UPDATE snapshot_runs
               SET pages = pages + %s, requests = requests + %s, retries = retries + %s,
                   warnings = CASE WHEN jsonb_array_length(warnings) >= %s THEN warnings
                                   ELSE warnings || %s::jsonb END
             WHERE run_id = %s
            """,
            (pages, requests, retries, MAX_WARNINGS_KEPT, json.dumps(warnings), run_id),
        )


def forget_staged(cur, run_id: int, shard: int) -> None:
    """A shard starting (again) has staged nothing yet."""
    cur.execute("UPDATE snapshot_runs SET staged = staged - %s WHERE run_id = %s", (str(shard), run_id))


def record_staged(cur, run_id: int, shard: int, rows: int, aggregates: int) -> None:
    """Written durably once the shard's rows are committed to staging."""
    cur.execute(
        "UPDATE snapshot_runs SET staged = staged || jsonb_build_object(%s::text,"
        " jsonb_build_object('rows', %s::bigint, 'aggregates', %s::bigint)) WHERE run_id = %s",
        (str(shard), rows, aggregates, run_id),
    )


def staged_counts(cur, run_id: int) -> dict[int, tuple[int, int]]:
    cur.execute("SELECT staged FROM snapshot_runs WHERE run_id = %s", (run_id,))
    staged = cur.fetchone()[0]
    return {int(shard): (v["rows"], v["aggregates"]) for shard, v in staged.items()}


def clear_rejections(cur, run_id: int, shard: int) -> None:
    """A retried shard replaces what its earlier attempt recorded."""
    cur.execute("DELETE FROM rejected_records WHERE run_id = %s AND shard = %s", (run_id, shard))


def add_rejections(cur, run_id: int, shard: int, rejections: Iterable[tuple[str, str]]) -> None:
    """Keep rejected records with their raw text and the reason."""
    execute_values(
        cur,
        "INSERT INTO rejected_records (run_id, shard, raw, reason) VALUES %s",
        [(run_id, shard, raw, reason) for raw, reason in rejections],
    )


def count_rejections(cur, run_id: int) -> int:
    cur.execute("SELECT count(*) FROM rejected_records WHERE run_id = %s", (run_id,))
    return cur.fetchone()[0]


def finish(conn, run_id: int, status: str, *, error: str | None = None) -> None:
    with transaction(conn) as cur:
        cur.execute(
            "UPDATE snapshot_runs SET status = %s, error = %s, finished_at = now()"
            " WHERE run_id = %s AND status <> 'published'",
            (status, error, run_id),
        )


def summary(conn, run_id: int) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT run_id, source, provider, status, scheduled_for, as_of, as_of_raw, pages,
                   requests, retries, rows, rows_inserted, rejected, warnings, error,
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

    A shard's crawl holds the run *shared*, so the shards of one run crawl
    side by side, and its own shard exclusively, so a retry cannot crawl a
    shard its zombie predecessor is still writing. Either way the reaper's
    exclusive try-lock fails while anyone works on the run.
    """
    with transaction(conn) as cur:
        if shard is None:
            cur.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, run_id))
        else:
            cur.execute("SELECT pg_advisory_lock_shared(%s, %s)", (LOCK_NAMESPACE, run_id))
            cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (SHARD_LOCK_NAMESPACE, f"{run_id}/{shard}"))


def release(conn, run_id: int, shard: int | None = None) -> None:
    with transaction(conn) as cur:
        if shard is None:
            cur.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, run_id))
        else:
            cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (SHARD_LOCK_NAMESPACE, f"{run_id}/{shard}"))
            cur.execute("SELECT pg_advisory_unlock_shared(%s, %s)", (LOCK_NAMESPACE, run_id))


def reap_abandoned(conn, source: str) -> list[int]:
    """Mark runs of ``source`` whose process died as ``abandoned``; drop their staging.

    Only runs nobody holds are reaped. Runs started outside Airflow are
    reaped at once; Airflow retries its own runs (a retried task resumes
    the run), so those are reaped only when a day old.
    """
    from loaders import staging

    with transaction(conn) as cur:
        cur.execute(
            """
            SELECT run_id FROM snapshot_runs
             WHERE source = %s AND status = 'running'
               AND (dag_run_id IS NULL OR started_at < now() - interval '1 day')
            """,
            (source,),
        )
        candidates = [r[0] for r in cur.fetchall()]
    reaped = []
    for run_id in candidates:
        with transaction(conn) as cur:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, run_id))
            if not cur.fetchone()[0]:
                continue  # someone is working on it
            cur.execute(
                "UPDATE snapshot_runs SET status = 'abandoned', finished_at = now(),"
                " error = 'the process taking this snapshot stopped before publishing it'"
                " WHERE run_id = %s AND status = 'running'",
                (run_id,),
            )
            staging.drop_run(cur, run_id)
            reaped.append(run_id)
    return reaped
