"""Running the configured checks over a time window and recording the breaks.

All values are compared in whole units: ``balance / 10^decimals`` when the
row has decimals, else ``balance / spark_factor``, else the balance as is.
Every comparison is exact (NUMERIC in SQL, Decimal in Python).

What each check finds (``kind`` of the break in brackets):

* pair — at each check time (every published snapshot time of the left
  source in the window) the left holding at that snapshot is compared with
  the right holding in the right source's latest published snapshot at or
  before it. The right snapshot older than ``max_skew`` is a break of its
  own [skew], as is a side without a snapshot or without the holding in it
  [missing]. Otherwise the pair breaks [mismatch] when
  ``|l - r| > abs_tolerance`` AND ``|l - r| > rel_tolerance * max(|l|, |r|)``:
  a difference is tolerated when either tolerance allows it. The recorded
  tolerance is the larger of the two, the difference is ``l - r``.
* aggregate — for every snapshot of the source in the window that carries
  provider aggregates, per asset: the aggregate (left) against the sum of
  the accounts of the same snapshot (right) [mismatch] when
  ``|l - r| > abs_tolerance``; an asset missing on one side counts as 0.
* continuity — [gap] a time the source's schedule fired in the window with
  no published or no_snapshot run; [stale] the source's newest snapshot
  older than ``max_staleness``, once per stale stretch, at the moment it
  became stale (values in seconds: age, allowed, excess); [available_above_balance]
  and [negative_balance] per row of the snapshots in the window.
* rollforward — for every window of the source (two consecutive published
  snapshots) ending in the reconciliation window whose movements are
  loaded, per holding: left = the change of the balance over it (closing -
  opening, a holding a snapshot lacks being 0 there), right = the sum of its
  movements (inflows - outflows) [unexplained_change] when
  ``|left - right| > tolerance``; a holding neither snapshot lists but
  movements name [movement_without_holding] (right = their sum). Windows
  recorded ``not_available`` (the provider offers no movements) and assets
  the provider cannot explain in a window are never breaks: the run's note
  says so.

A break is identified by check, kind, subject and check time. Rerunning a
window updates ``last_seen`` of the breaks still found and resolves the
check's open breaks in the window that are no longer found. Each check also
reports every check time it examined, per kind of break (:class:`Findings`):
consecutive breaks of one subject are one incident, resolved at the first
check time after them at which the check held (:mod:`reconciliation.incidents`),
recorded in the same transaction as the breaks.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Callable, Iterable

from psycopg2.extras import Json, execute_values

from extractors.records import UNIT_COLUMNS
from extractors.text import human_duration, safe_text
from loaders import leases
from loaders.db import transaction
from loaders.runs import MAX_ERROR_CHARS
from loaders.statuses import ReconciliationStatus, RunStatus
from pipeline.progress import Progress
from reconciliation import incidents
from reconciliation.checks import (AggregateCheck, Check, ContinuityCheck, PairCheck, RollforwardCheck,
                                   fire_times)

log = logging.getLogger(__name__)

# Without --from/--to (and in the DAG) a reconciliation looks back this far.
DEFAULT_LOOKBACK = timedelta(days=3)


def whole_units(value: str, alias: str | None, *, has: tuple[str, ...] = UNIT_COLUMNS) -> str:
    """SQL for ``value`` in whole units, exactly (migration 0004's ``balance_whole_units``).

    Read with the unit columns of the row ``alias`` (bare names without one);
    a unit column the row does not have (not in ``has``) counts as NULL.
    """
    args = ", ".join((f"{alias}.{c}" if alias else c) if c in has else "NULL" for c in UNIT_COLUMNS)
    return f"balance_whole_units({value}, {args})"


@dataclass(frozen=True, slots=True)
class Break:
    kind: str
    subject: dict[str, Any]
    check_time: datetime
    left_value: Decimal | None = None
    right_value: Decimal | None = None
    difference: Decimal | None = None
    tolerance: Decimal | None = None
    detail: str = ""

    @property
    def key(self) -> tuple:
        return self.kind, json.dumps(self.subject, sort_keys=True), self.check_time


@dataclass(slots=True)
class Findings:
    """What one check found over a window: its breaks, and per kind of break every check time it examined.

    A check time examined without a break of a subject is a time the check
    held for it: what ends an incident.
    """

    breaks: list[Break] = field(default_factory=list)
    checked: dict[str, list[datetime]] = field(default_factory=dict)


@dataclass(slots=True)
class Reconciliation:
    run_id: int
    window_from: datetime
    window_to: datetime
    checks: list[str]
    status: ReconciliationStatus = ReconciliationStatus.RUNNING
    checks_run: int = 0
    breaks_open: int = 0
    breaks_new: int = 0
    breaks_resolved: int = 0
    per_check: dict[str, dict[str, int]] = field(default_factory=dict)
    # What a check could not look at, in a sentence (a roll-forward not available, windows not loaded).
    notes: dict[str, str] = field(default_factory=dict)


def default_window(end: datetime, lookback: timedelta = DEFAULT_LOOKBACK) -> tuple[datetime, datetime]:
    return end - lookback, end


def reconcile(conn, checks: dict[str, Check], window_from: datetime, window_to: datetime, *,
              dag_run_id: str | None = None, progress: Progress | None = None,
              flap_window: timedelta = timedelta(0)) -> Reconciliation:
    """Run ``checks`` over ``[window_from, window_to]``; one transaction per check.

    ``progress`` hears of each check as it ends (see :mod:`pipeline.progress`).
    A subject broken again within ``flap_window`` of its incident's
    resolution reopens that incident (``[alerts] flap_window``).

    The run is held by this session while it works (:mod:`loaders.leases`),
    so a reconciliation whose process died is reaped (``abandoned``) by the
    next one; one that fails ends ``failed`` with its error.
    """
    if window_from > window_to:
        raise ValueError(f"the window starts ({window_from.isoformat()}) after it ends ({window_to.isoformat()})")
    for run_id in reap_abandoned(conn):
        log.warning("reconciliation run %d was abandoned by a process that stopped", run_id)
    with transaction(conn) as cur:
        cur.execute(
            """
            INSERT INTO reconciliation_runs (window_from, window_to, status, checks, dag_run_id)
            VALUES (%s, %s, %s, %s, %s) RETURNING run_id
            """,
            (window_from, window_to, ReconciliationStatus.RUNNING, list(checks), dag_run_id),
        )
        run = Reconciliation(cur.fetchone()[0], window_from, window_to, list(checks))
        leases.take(cur, leases.RECONCILIATION, run.run_id)
    try:
        for number, check in enumerate(checks.values(), 1):
            started = time.monotonic()
            findings = examine(conn, check, window_from, window_to)
            counts = record_breaks(conn, run.run_id, check, findings, window_from, window_to,
                                   flap_window=flap_window)
            note = check_note(conn, check, window_from, window_to)
            if note:
                run.notes[check.name] = note
            if progress is not None:
                progress.step(f"check {number}/{len(checks)} {check.name}",
                              f"{counts['open']} open, {counts['new']} new, {counts['resolved']} resolved; "
                              f"incidents {counts['incidents_opened']} opened, "
                              f"{counts['incidents_resolved']} resolved in {time.monotonic() - started:.1f}s"
                              + (f"; {note}" if note else ""))
            run.per_check[check.name] = counts
            run.checks_run += 1
            run.breaks_open += counts["open"]
            run.breaks_new += counts["new"]
            run.breaks_resolved += counts["resolved"]
        _finish(conn, run, ReconciliationStatus.SUCCEEDED, None)
    except BaseException as exc:
        _record_failure(conn, run, exc)
        raise
    finally:
        leases.release(conn, leases.RECONCILIATION, run.run_id)
    return run


def reap_abandoned(conn) -> list[int]:
    """Mark reconciliation runs whose process died as ``abandoned``."""
    with transaction(conn) as cur:
        cur.execute("SELECT run_id FROM reconciliation_runs WHERE status = %s ORDER BY run_id",
                    (ReconciliationStatus.RUNNING,))
        candidates = [r[0] for r in cur.fetchall()]
    reaped = []
    for run_id in candidates:
        with transaction(conn) as cur:
            if leases.abandon(cur, leases.RECONCILIATION, run_id,
                              "the process running this reconciliation stopped before finishing it"):
                reaped.append(run_id)
    return reaped


def _finish(conn, run: Reconciliation, status: ReconciliationStatus, error: str | None) -> None:
    run.status = status
    with transaction(conn) as cur:
        cur.execute(
            """
            UPDATE reconciliation_runs
               SET status = %s, error = %s, finished_at = now(), checks_run = %s,
                   breaks_open = %s, breaks_new = %s, breaks_resolved = %s
             WHERE run_id = %s
            """,
            (status, error, run.checks_run, run.breaks_open, run.breaks_new, run.breaks_resolved, run.run_id),
        )


def _record_failure(conn, run: Reconciliation, exc: BaseException) -> None:
    """Mark the run failed with ``exc``; never raises, so ``exc`` is what the caller sees."""
    error = safe_text(f"{type(exc).__name__}: {exc}", MAX_ERROR_CHARS)
    try:
        conn.rollback()
        _finish(conn, run, ReconciliationStatus.FAILED, error)
    except Exception as second:
        run.status = ReconciliationStatus.FAILED
        log.error("reconciliation run %d failed (%s) and the failure could not be recorded: %s",
                  run.run_id, error[:500], safe_text(second, 500))


def examine(conn, check: Check, window_from: datetime, window_to: datetime) -> Findings:
    """Run one check over the window: its breaks and the check times it examined."""
    finder: Callable[..., Iterable[Break]] = _FINDERS[check.kind]
    findings = Findings()
    with conn.cursor() as cur:
        found = list(finder(cur, check, window_from, window_to, findings.checked))
    conn.commit()
    # One row per key: the upsert cannot touch the same row twice.
    findings.breaks = list({b.key: b for b in found}.values())
    return findings


def find_breaks(conn, check: Check, window_from: datetime, window_to: datetime) -> list[Break]:
    """The breaks one check finds over the window, recording nothing."""
    return examine(conn, check, window_from, window_to).breaks


def record_breaks(conn, run_id: int, check: Check, findings: Findings, window_from: datetime,
                  window_to: datetime, *, flap_window: timedelta = timedelta(0)) -> dict[str, int]:
    """Upsert what was found, resolve what no longer holds, follow the incidents; counts of each."""
    found = findings.breaks
    with transaction(conn) as cur:
        rows = execute_values(
            cur,
            """
            INSERT INTO reconciliation_breaks AS b
                   (check_name, check_kind, kind, subject, check_time, sources, left_value, right_value,
                    difference, tolerance, status, first_seen, last_seen, first_run_id, last_run_id, detail)
            VALUES %s
            ON CONFLICT ON CONSTRAINT reconciliation_breaks_key DO UPDATE
               SET sources = EXCLUDED.sources, left_value = EXCLUDED.left_value,
                   right_value = EXCLUDED.right_value, difference = EXCLUDED.difference,
                   tolerance = EXCLUDED.tolerance, detail = EXCLUDED.detail, status = 'open',
                   resolved_at = NULL, last_seen = EXCLUDED.last_seen, last_run_id = EXCLUDED.last_run_id
            RETURNING break_id, xmax = 0, kind, subject, check_time
            """,
            [(check.name, check.kind, b.kind, Json(b.subject), b.check_time, list(check.sources),
              b.left_value, b.right_value, b.difference, b.tolerance, run_id, run_id, b.detail)
             for b in found],
            template="(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'open', now(), now(), %s, %s, %s)",
            fetch=True,
        ) if found else []
        cur.execute(
            """
            UPDATE reconciliation_breaks
               SET status = 'resolved', resolved_at = now(), last_run_id = %s
             WHERE check_name = %s AND status = 'open' AND check_time BETWEEN %s AND %s
               AND NOT (break_id = ANY(%s))
            """,
            (run_id, check.name, window_from, window_to, [r[0] for r in rows]),
        )
        resolved = cur.rowcount
        ids = {(kind, json.dumps(subject, sort_keys=True), t): break_id for break_id, _, kind, subject, t in rows}
        changed = incidents.track(cur, run_id, check, [(ids[b.key], b) for b in found], findings.checked,
                                  window_from, flap_window)
    return {"open": len(rows), "new": sum(1 for r in rows if r[1]), "resolved": resolved,
            "incidents_opened": changed["opened"], "incidents_resolved": changed["resolved"]}


def pair_breaks(cur, check: PairCheck, window_from: datetime, window_to: datetime,
                checked: dict[str, list[datetime]]) -> Iterable[Break]:
    cur.execute(
        f"""
        WITH times AS (
            SELECT DISTINCT as_of AS t FROM snapshot_runs
             WHERE source = %(ls)s AND status = %(published)s AND as_of BETWEEN %(from)s AND %(to)s
        )
        SELECT t, l.units, rs.as_of, r.units, l.units - r.units,
               greatest(%(abs)s, %(rel)s * greatest(abs(l.units), abs(r.units)))
          FROM times
          LEFT JOIN LATERAL (
               SELECT {whole_units('b.balance', 'b')} AS units FROM balance_history b
                WHERE b.source = %(ls)s AND b.account = %(la)s AND b.asset = %(lx)s AND b.as_of = t) l ON true
          LEFT JOIN LATERAL (
               SELECT max(as_of) AS as_of FROM snapshot_runs
                WHERE source = %(rs)s AND status = %(published)s AND as_of <= t) rs ON true
          LEFT JOIN LATERAL (
               SELECT {whole_units('b.balance', 'b')} AS units FROM balance_history b
                WHERE b.source = %(rs)s AND b.account = %(ra)s AND b.asset = %(rx)s AND b.as_of = rs.as_of) r ON true
         ORDER BY t
        """,
        {"ls": check.left.source, "la": check.left.account, "lx": check.left.asset,
         "rs": check.right.source, "ra": check.right.account, "rx": check.right.asset,
         "from": window_from, "to": window_to, "abs": check.abs_tolerance, "rel": check.rel_tolerance,
         "published": RunStatus.PUBLISHED},
    )
    subject = {"left": check.left.as_dict(), "right": check.right.as_dict()}
    rows = cur.fetchall()
    for kind in ("mismatch", "skew", "missing"):
        checked[kind] = [r[0] for r in rows]
    # Differences and tolerances come from SQL: Python's Decimal rounds
    # arithmetic to 28 digits, NUMERIC does not (comparisons are exact in both).
    for t, left, right_as_of, right, difference, tolerance in rows:
        values = {"left_value": left, "right_value": right, "difference": difference}
        if right_as_of is None:
            yield Break("missing", subject, t, **values,
                        detail=f"{check.right.source} has no published snapshot at or before {t.isoformat()}")
        elif t - right_as_of > check.max_skew:
            yield Break("skew", subject, t, **values,
                        detail=f"{check.right.source} snapshot {right_as_of.isoformat()} is {t - right_as_of} "
                               f"older than {check.left.source} snapshot {t.isoformat()} (max_skew {human_duration(check.max_skew)})")
        elif left is None or right is None:
            side, holding, as_of = ("left", check.left, t) if left is None else ("right", check.right, right_as_of)
            yield Break("missing", subject, t, **values,
                        detail=f"{side}: no row for account {holding.account!r} asset {holding.asset!r} "
                               f"in {holding.source} snapshot {as_of.isoformat()}")
        elif difference.copy_abs() > tolerance:
            yield Break("mismatch", subject, t, left, right, difference, tolerance,
                        detail=f"{check.left.source} {left} vs {check.right.source} {right} "
                               f"(snapshot {right_as_of.isoformat()})")


def aggregate_breaks(cur, check: AggregateCheck, window_from: datetime, window_to: datetime,
                     checked: dict[str, list[datetime]]) -> Iterable[Break]:
    cur.execute(
        f"""
        WITH agg AS (
            SELECT a.as_of, a.asset, sum({whole_units('a.balance', 'a', has=('decimals',))}) AS units
              FROM aggregate_balances a
             WHERE a.source = %(source)s AND a.as_of BETWEEN %(from)s AND %(to)s
             GROUP BY 1, 2
        ), accounts AS (
            SELECT b.as_of, b.asset, sum({whole_units('b.balance', 'b')}) AS units
              FROM balance_history b
             WHERE b.source = %(source)s AND b.as_of IN (SELECT as_of FROM agg)
             GROUP BY 1, 2
        )
        SELECT as_of, asset, coalesce(agg.units, 0), coalesce(accounts.units, 0),
               coalesce(agg.units, 0) - coalesce(accounts.units, 0), agg.units IS NULL, accounts.units IS NULL,
               abs(coalesce(agg.units, 0) - coalesce(accounts.units, 0)) > %(tolerance)s
          FROM agg FULL JOIN accounts USING (as_of, asset)
         WHERE (%(assets)s::text[] IS NULL OR asset = ANY(%(assets)s::text[]))
         ORDER BY as_of, asset
        """,
        {"source": check.source, "from": window_from, "to": window_to,
         "assets": list(check.assets) if check.assets else None, "tolerance": check.abs_tolerance},
    )
    rows = cur.fetchall()
    checked["mismatch"] = sorted({r[0] for r in rows})
    for as_of, asset, aggregate, accounts, difference, no_aggregate, no_accounts, broken in rows:
        if not broken:
            continue
        detail = ("asset missing from the provider's aggregate" if no_aggregate
                  else "no account holds this asset" if no_accounts
                  else "aggregate differs from the sum of the accounts")
        yield Break("mismatch", {"source": check.source, "asset": asset}, as_of, aggregate, accounts,
                    difference, check.abs_tolerance, detail)


def continuity_breaks(cur, check: ContinuityCheck, window_from: datetime, window_to: datetime,
                      checked: dict[str, list[datetime]]) -> Iterable[Break]:
    yield from _gaps(cur, check, window_from, window_to, checked)
    times = _published_times(cur, check, window_from, window_to)
    snapshots = [t for t in times if window_from <= t <= window_to]
    # The source was fresh at each of its snapshots: what ends a stale stretch.
    checked["stale"] = snapshots
    yield from _stale(check, times, window_from, window_to)
    for kind in ("negative_balance", "available_above_balance"):
        checked[kind] = snapshots
    yield from _impossible_balances(cur, check, window_from, window_to)


def _gaps(cur, check: ContinuityCheck, window_from: datetime, window_to: datetime,
          checked: dict[str, list[datetime]]) -> Iterable[Break]:
    if check.cron is None:
        return
    scheduled = fire_times(check.cron, max(window_from, check.start_date), window_to)
    # The newest scheduled run is due to have published only once the next
    # one is due: until then it may still be on its way. (A reconciliation
    # triggered by one source's publish at 13:30:20 would otherwise report
    # every other source's 13:30 run, still crawling, as a gap.)
    scheduled = scheduled[:-1]
    checked["gap"] = scheduled
    if not scheduled:
        return
    cur.execute(
        """
        SELECT scheduled_for, bool_or(status IN (%s, %s)),
               string_agg(status, ', ' ORDER BY run_id)
          FROM snapshot_runs
         WHERE source = %s AND scheduled_for = ANY(%s)
         GROUP BY scheduled_for
        """,
        (RunStatus.PUBLISHED, RunStatus.NO_SNAPSHOT, check.source, scheduled),
    )
    runs = {t: (done, statuses) for t, done, statuses in cur.fetchall()}
    for t in scheduled:
        done, statuses = runs.get(t, (False, None))
        if not done:
            yield Break("gap", {"source": check.source}, t,
                        detail=f"no published snapshot for the run scheduled at {t.isoformat()} "
                               f"({'runs: ' + statuses if statuses else 'no run'})")


def _published_times(cur, check: ContinuityCheck, window_from: datetime, window_to: datetime) -> list[datetime]:
    """The source's snapshot times in the window, and the last one before it."""
    # From the last snapshot before the window, so a stale stretch that
    # began before it is still seen.
    cur.execute(
        """
        SELECT DISTINCT as_of FROM snapshot_runs
         WHERE source = %(source)s AND status = %(published)s AND as_of <= %(to)s
           AND as_of >= coalesce((SELECT max(as_of) FROM snapshot_runs
                                   WHERE source = %(source)s AND status = %(published)s AND as_of <= %(from)s),
                                 %(from)s)
         ORDER BY as_of
        """,
        {"source": check.source, "from": window_from, "to": window_to, "published": RunStatus.PUBLISHED},
    )
    return [r[0] for r in cur.fetchall()]


def _stale(check: ContinuityCheck, times: list[datetime], window_from: datetime,
           window_to: datetime) -> Iterable[Break]:
    # The window's end closes the last stretch.
    allowed = Decimal(int(check.max_staleness.total_seconds()))
    for as_of, until in zip(times, times[1:] + [window_to]):
        stale_at = as_of + check.max_staleness
        if until > stale_at and window_from <= stale_at <= window_to:
            age = Decimal(int((until - as_of).total_seconds()))
            yield Break("stale", {"source": check.source}, stale_at, age, None, age - allowed, allowed,
                        detail=f"no snapshot newer than {as_of.isoformat()} until {until.isoformat()} "
                               f"({human_duration(until - as_of)}, allowed {human_duration(check.max_staleness)})")


def _impossible_balances(cur, check: ContinuityCheck, window_from: datetime,
                         window_to: datetime) -> Iterable[Break]:
    allowed = check.allow_negative
    cur.execute(
        f"""
        SELECT account, asset, as_of, {whole_units('b.balance', 'b')},
               {whole_units('b.available_balance', 'b')},
               {whole_units('b.available_balance - b.balance', 'b')},
               available_balance > balance,
               balance < 0 AND NOT %(any_negative)s AND NOT (account = ANY(%(allowed)s))
          FROM balance_history b
         WHERE source = %(source)s AND as_of BETWEEN %(from)s AND %(to)s
           AND (available_balance > balance
                OR (balance < 0 AND NOT %(any_negative)s AND NOT (account = ANY(%(allowed)s))))
         ORDER BY as_of, account, asset
        """,
        {"source": check.source, "from": window_from, "to": window_to,
         "any_negative": allowed is True, "allowed": list(allowed) if isinstance(allowed, tuple) else []},
    )
    for account, asset, as_of, balance, available, excess, above, negative in cur.fetchall():
        subject = {"source": check.source, "account": account, "asset": asset}
        if above:
            yield Break("available_above_balance", subject, as_of, available, balance, excess,
                        Decimal(0), detail=f"available {available} > balance {balance}")
        if negative:
            yield Break("negative_balance", subject, as_of, balance, None, balance, Decimal(0),
                        detail=f"balance {balance} below zero")


def rollforward_breaks(cur, check: RollforwardCheck, window_from: datetime,
                       window_to: datetime, checked: dict[str, list[datetime]]) -> Iterable[Break]:
    if not check.available:
        return
    # Every window loaded is a time the check looked at each holding: where it holds, an incident ends.
    cur.execute("SELECT DISTINCT period_end FROM movement_runs WHERE source = %s AND status = 'published'"
                " AND period_end BETWEEN %s AND %s ORDER BY 1", (check.source, window_from, window_to))
    checked["unexplained_change"] = checked["movement_without_holding"] = [t for (t,) in cur.fetchall()]
    # Values from SQL, in whole units: each side converted exactly, the difference exact.
    cur.execute(
        f"""
        SELECT account, asset, period_start, period_end, status, movements,
               {whole_units("coalesce(closing, 0) - coalesce(opening, 0)", None)},
               {whole_units("inflow - outflow", None)}
          FROM balance_rollforward
         WHERE source = %(source)s AND period_end BETWEEN %(from)s AND %(to)s
           AND status IN ('unexplained', 'movement_without_holding')
           AND (%(accounts)s::text[] IS NULL OR account = ANY(%(accounts)s::text[]))
           AND (%(assets)s::text[] IS NULL OR asset = ANY(%(assets)s::text[]))
         ORDER BY period_end, account, asset
        """,
        {"source": check.source, "from": window_from, "to": window_to,
         "accounts": list(check.accounts) if check.accounts else None,
         "assets": list(check.assets) if check.assets else None},
    )
    for account, asset, start, end, status, movements, change, moved in cur.fetchall():
        subject = {"source": check.source, "account": account, "asset": asset}
        period = f"({start.isoformat()}, {end.isoformat()}]"
        if status == "movement_without_holding":
            yield Break("movement_without_holding", subject, end, None, moved, None, check.tolerance,
                        detail=f"{movements} movement(s) over {period} (net {moved:f}) on a holding neither "
                               "snapshot lists")
            continue
        difference = change - moved
        if difference.copy_abs() > check.tolerance:
            yield Break("unexplained_change", subject, end, change, moved, difference, check.tolerance,
                        detail=f"the balance changed by {change:f} over {period}; its {movements} movement(s) "
                               f"explain {moved:f}")


def check_note(conn, check: Check, window_from: datetime, window_to: datetime) -> str | None:
    """What the check could not look at in the window, in a sentence; None when nothing."""
    if not isinstance(check, RollforwardCheck):
        return None
    if not check.available:
        return f"roll-forward not available: {check.provider} offers no movements"
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT count(*) FILTER (WHERE r.status = 'published'),
                   count(*) FILTER (WHERE r.status = 'published' AND r.unexplainable <> '{}'::jsonb),
                   count(*) FILTER (WHERE r.run_id IS NULL),
                   (SELECT string_agg(DISTINCT u.value, '; ') FROM movement_runs x, jsonb_each_text(x.unexplainable) u
                     WHERE x.source = %(source)s AND x.status = 'published' AND x.period_end BETWEEN %(from)s AND %(to)s)
              FROM (SELECT as_of AS b, lag(as_of) OVER (ORDER BY as_of) AS a
                      FROM balance_snapshots WHERE source = %(source)s AND as_of <= %(to)s) w
              LEFT JOIN movement_runs r ON r.source = %(source)s AND r.period_start = w.a AND r.period_end = w.b
                                       AND r.status IN ('published', 'not_available')
             WHERE w.a IS NOT NULL AND w.b >= %(from)s
            """,
            {"source": check.source, "from": window_from, "to": window_to},
        )
        loaded, partial, pending, reasons = cur.fetchone()
    conn.commit()
    parts = []
    if pending:
        parts.append(f"{pending} window(s) whose movements are not loaded yet")
    if partial:
        parts.append(f"{partial} of {loaded} window(s) with assets the provider cannot explain ({reasons})")
    return ", ".join(parts) or None


_FINDERS: dict[str, Callable[..., Iterable[Break]]] = {
    "pair": pair_breaks,
    "aggregate": aggregate_breaks,
    "continuity": continuity_breaks,
    "rollforward": rollforward_breaks,
}


def open_breaks(conn, *, checks: list[str] | None = None, source: str | None = None,
                window: tuple[datetime, datetime] | None = None, limit: int | None = None) -> list[dict]:
    """Open breaks, newest check time first (optionally of some checks, a source, a window)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT break_id, check_name, check_kind, kind, subject, subject_label, check_time, sources,
                   left_value, right_value, difference, tolerance, first_seen, last_seen, detail
              FROM reconciliation_breaks_detail
             WHERE status = 'open'
               AND (%(checks)s::text[] IS NULL OR check_name = ANY(%(checks)s::text[]))
               AND (%(source)s::text IS NULL OR %(source)s = ANY(sources))
               AND (%(from)s::timestamptz IS NULL OR check_time BETWEEN %(from)s AND %(to)s)
             ORDER BY check_time DESC, check_name, kind, break_id
             LIMIT %(limit)s
            """,
            {"checks": checks, "source": source, "from": window[0] if window else None,
             "to": window[1] if window else None, "limit": limit},
        )
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    conn.commit()
    return rows


def triggering_time(context: dict) -> datetime:
    """When an Airflow run was triggered: its newest triggering Asset event, else its run_after."""
    events = context.get("triggering_asset_events") or {}
    times = [e.timestamp for asset_events in events.values() for e in asset_events]
    return max(times) if times else context["dag_run"].run_after
