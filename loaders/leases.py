"""Leases: which live database session is working on a run.

A run in progress must be told apart from one whose process died, so the
next run can reap the dead one (mark it ``abandoned``, drop its staging),
and a retried shard must not crawl beside a predecessor still writing it.

A lease names the session holding it: backend pid, backend start time and
role, as ``pg_stat_activity`` shows them. It lasts exactly as long as that
session is connected: a killed process, a dropped connection or a
restarted server ends it, with nothing to clean up first, and a pid reused
by a later session does not revive it (its start time differs). Leases are
rows of ``run_leases``, a table no login in ``balances_reader`` can read,
write or lock (migration 0008).

Why not the alternatives:

* Session advisory locks (what this replaces): any login may take any
  advisory key, the read-only dashboard role included, and run ids are
  predictable, so a reader could stall the next snapshot forever.
* A row lock held for the run's duration: row locks end with their
  transaction, so a second connection would sit in an open transaction for
  the whole crawl. A row lock gives that transaction an xid, which keeps
  VACUUM from removing any row version newer than it anywhere in the
  database (the request-budget row is rewritten on every request), and with
  the crawls of several sources overlapping the horizon would never move.
  An administrator's ``idle_in_transaction_session_timeout`` would also end
  such a lease silently while the crawl goes on.

A claim and a reap of one run take turns on the run's own row (``FOR NO
KEY UPDATE`` / ``FOR UPDATE SKIP LOCKED``), so "is anyone alive on it?"
and "it is mine now" are one step.

Every lock the pipeline takes is here: leases on runs (namespaced by the
kind of run, :data:`SNAPSHOT`, :data:`RECONCILIATION` or :data:`MOVEMENTS`) and the turn that
writers of one source's history take (:func:`take_publish_turn`, a row of
``source_locks`` behind the history tables' locks). Partitions are guarded
inside the database function that creates them (migration 0008). The
session test (:func:`holder_alive`, :data:`HOLDER`) also tells whether the
process sending an alert is still there (reconciliation/alerts.py), and
incident tracking takes its table lock in reconciliation/incidents.py.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from psycopg2 import sql

from loaders.db import transaction
from loaders.statuses import MovementStatus, ReconciliationStatus, RunStatus

log = logging.getLogger(__name__)

# The kinds of run a lease names (run_leases.run_kind), each with its table
# and the status of a run still at work.
SNAPSHOT = "snapshot"
RECONCILIATION = "reconciliation"
MOVEMENTS = "movements"
_RUN_TABLES = {SNAPSHOT: sql.Identifier("snapshot_runs"), RECONCILIATION: sql.Identifier("reconciliation_runs"),
               MOVEMENTS: sql.Identifier("movement_runs")}
_RUNNING = {SNAPSHOT: RunStatus.RUNNING, RECONCILIATION: ReconciliationStatus.RUNNING,
            MOVEMENTS: MovementStatus.RUNNING}
_ABANDONED = {SNAPSHOT: RunStatus.ABANDONED, RECONCILIATION: ReconciliationStatus.ABANDONED,
              MOVEMENTS: MovementStatus.ABANDONED}
WHOLE_RUN = -1
# How long a claim waits for another live session to let go (a retried
# shard behind its zombie predecessor) before failing; the task's retry
# tries again later.
WAIT = timedelta(minutes=5)
_POLL_SECONDS = 0.25


def holder_alive(alias: str) -> str:
    """SQL true while the session named by ``<alias>.pid``, ``.backend_start``, ``.holder_role`` is connected.

    Sessions of another role show no start time to a role without
    pg_read_all_stats: then pid and role must do (never reaping a live run).
    """
    return f"""EXISTS (SELECT FROM pg_stat_get_activity({alias}.pid) a
                     WHERE a.usesysid = {alias}.holder_role
                       AND (a.backend_start = {alias}.backend_start OR a.backend_start IS NULL))"""


_ALIVE = holder_alive("l")
_ME = "pg_stat_get_activity(pg_backend_pid())"
# This session as a holder: a row (pid, backend_start, holder_role) to store
# beside what it holds (run_leases here; claims of alerts, reconciliation/alerts.py).
HOLDER = f"SELECT a.pid, a.backend_start, a.usesysid AS holder_role FROM {_ME} a"


class RunBusy(RuntimeError):
    """Another live session kept what this one asked for longer than the wait."""


def take(cur, kind: str, run_id: int, shard: int = WHOLE_RUN) -> None:
    """Record this session as the holder, unchecked: for a run created in the same transaction."""
    cur.execute(
        f"""
        INSERT INTO run_leases (run_kind, run_id, shard, pid, backend_start, holder_role)
        SELECT %s, %s, %s, a.pid, a.backend_start, a.usesysid FROM {_ME} a
        ON CONFLICT (run_kind, run_id, shard) DO UPDATE
           SET pid = EXCLUDED.pid, backend_start = EXCLUDED.backend_start,
               holder_role = EXCLUDED.holder_role, claimed_at = now()
        """,
        (kind, run_id, shard),
    )


def claim(conn, kind: str, run_id: int, shard: int = WHOLE_RUN, *, wait: timedelta = WAIT) -> None:
    """Hold the run (``shard`` -1) or one shard of it for this session.

    The whole run is exclusive: no other live session may hold it or any of
    its shards. A shard may be held beside other shards, by other sessions,
    but not beside another session's hold on the whole run or on that shard.
    The same session may hold the whole run and its shards. Waits up to
    ``wait`` for a live holder to let go, then raises :class:`RunBusy`.
    """
    deadline = time.monotonic() + wait.total_seconds()
    while True:
        with transaction(conn) as cur:
            cur.execute(sql.SQL("SELECT FROM {} WHERE run_id = %s FOR NO KEY UPDATE").format(_RUN_TABLES[kind]),
                        (run_id,))
            if cur.fetchone() is None:
                raise LookupError(f"no {kind} run {run_id}")
            cur.execute(
                f"""
                SELECT l.shard, l.pid, l.claimed_at FROM run_leases l
                 WHERE l.run_kind = %(kind)s AND l.run_id = %(run)s
                   AND (%(shard)s = -1 OR l.shard IN (-1, %(shard)s))
                   AND NOT (l.pid = pg_backend_pid()
                            AND l.backend_start = (SELECT backend_start FROM {_ME}))
                   AND {_ALIVE}
                 LIMIT 1
                """,
                {"kind": kind, "run": run_id, "shard": shard},
            )
            holder = cur.fetchone()
            if holder is None:
                take(cur, kind, run_id, shard)
                return
        if time.monotonic() >= deadline:
            what = f"{kind} run {run_id}" + ("" if shard == WHOLE_RUN else f" shard {shard}")
            held = "the whole run" if holder[0] == WHOLE_RUN else f"shard {holder[0]}"
            raise RunBusy(f"{what}: another session (database pid {holder[1]}) has held {held} since "
                          f"{holder[2].isoformat()} and is still connected; gave up after "
                          f"{wait.total_seconds():g} s")
        time.sleep(_POLL_SECONDS)


def release(conn, kind: str, run_id: int, shard: int = WHOLE_RUN) -> None:
    """Let go of a lease this session holds. Never raises: a lease of a dead session is void anyway."""
    if conn.closed:
        return
    try:
        with transaction(conn) as cur:
            cur.execute("DELETE FROM run_leases WHERE run_kind = %s AND run_id = %s AND shard = %s"
                        " AND pid = pg_backend_pid()", (kind, run_id, shard))
    except Exception as exc:  # a broken connection: its session, and so the lease, is gone
        log.warning("could not release the lease on %s run %d: %s", kind, run_id, exc)


def reapable(cur, kind: str, run_id: int) -> bool:
    """True if the run is still ``running`` and no live session holds it or any of its shards.

    Locks the run's row for the rest of the caller's transaction; a run
    whose row is locked (being claimed, published, updated) is not reapable now.
    """
    cur.execute(sql.SQL("SELECT FROM {} WHERE run_id = %s AND status = %s FOR UPDATE SKIP LOCKED")
                .format(_RUN_TABLES[kind]), (run_id, _RUNNING[kind]))
    if cur.fetchone() is None:
        return False
    cur.execute(f"SELECT EXISTS (SELECT FROM run_leases l WHERE l.run_kind = %s AND l.run_id = %s AND {_ALIVE})",
                (kind, run_id))
    return not cur.fetchone()[0]


def abandon(cur, kind: str, run_id: int, error: str) -> bool:
    """Mark the run ``abandoned`` with ``error`` if it is :func:`reapable`; True if it was."""
    if not reapable(cur, kind, run_id):
        return False
    cur.execute(sql.SQL("UPDATE {} SET status = %s, finished_at = now(), error = %s"
                        " WHERE run_id = %s AND status = %s").format(_RUN_TABLES[kind]),
                (_ABANDONED[kind], error, run_id, _RUNNING[kind]))
    forget(cur, kind, run_id)
    return True


def forget(cur, kind: str, run_id: int) -> None:
    """Drop every lease of a run that has ended."""
    cur.execute("DELETE FROM run_leases WHERE run_kind = %s AND run_id = %s", (kind, run_id))


def take_publish_turn(cur, source: str) -> None:
    """Writers of one source's history take turns, so what a publish compares against stays true until commit.

    Two runs of one snapshot (a manual run beside the schedule) then publish
    one after the other, and a write through the ``balance_history`` view
    or a TRUNCATE of the history waits for a publish in flight (or it for
    them). The turn is the database function ``balance_history_take_turn``
    (migration 0012): ROW EXCLUSIVE on the history tables, then the
    source's row of ``source_locks``, which no reader may lock, both held
    until the caller's transaction ends. Take it before reading anything
    of the history. Waiting for another writer is expected: that wait may
    last as long as a statement may run. The table locks wait only the
    session's ``lock_timeout``: no writer holds them against another, only
    maintenance does (a ``LOCK TABLE``, a ``TRUNCATE``).
    """
    cur.execute("SELECT balance_history_take_turn(%s, current_setting('statement_timeout'))", (source,))
