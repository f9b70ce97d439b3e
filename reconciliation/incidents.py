"""Incidents: a lasting problem as one thing, whatever the number of its breaks.

A break is one check time at which a check did not hold for one subject, so
a problem that lasts is a new break at every snapshot. An incident groups
the consecutive breaks of one check, kind and subject: consecutive means no
check time in between at which the check looked at that subject and found
it holding. The check time at which it holds again resolves the incident
(``resolved_at``); a break after that is a new incident, except within
``[alerts] flap_window`` of the resolution, where it reopens the old one.

Each reconciliation run tells, per kind of break, every check time it
examined in its window (:class:`~reconciliation.reconcile.Findings`);
:func:`follow` turns that and the run's breaks into incidents, merging with
what earlier runs recorded:

* a window looked at again finds the same breaks and changes nothing;
* the window's start moving on leaves the older part of an incident alone;
* a break that a rerun of the same check time no longer finds (the other
  side's snapshot arrived) counts as the check holding at that time;
* an older window (``balances reconcile --from ... --to ...``) adds breaks
  to the incidents they fall in, or adds incidents of its own, resolved
  when the window shows their end.

Incidents are never split or deleted: a break found later inside an
incident's span joins it. Acknowledgements (:func:`acknowledge`) are
appended, never changed. Tables: ``break_incidents``,
``incident_acknowledgements``; readers use the view
``reconciliation_incidents`` (migration 0014).
"""
from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable

from psycopg2.extras import Json, execute_values

from loaders.db import transaction

# An acknowledgement's note and name are for people; longer is a paste gone wrong.
MAX_NOTE_CHARS = 2000
MAX_NAME_CHARS = 200


@dataclass(slots=True)
class Span:
    """One incident as tracking sees it: its breaks' first and last check time, and its end."""

    opened_at: datetime
    last_seen: datetime
    resolved_at: datetime | None = None
    reopened: int = 0
    incident_id: int | None = None
    recorded: tuple | None = field(default=None, repr=False)  # the fields as stored, to tell a change

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None

    @property
    def state(self) -> tuple:
        return self.opened_at, self.last_seen, self.resolved_at, self.reopened

    @property
    def changed(self) -> bool:
        return self.state != self.recorded


@dataclass(frozen=True, slots=True)
class Episode:
    """Consecutive check times at which the check was broken, and the next one, at which it held."""

    times: tuple[datetime, ...]
    cleared_at: datetime | None

    @property
    def first(self) -> datetime:
        return self.times[0]

    @property
    def last(self) -> datetime:
        return self.times[-1]


def episodes(broken: Iterable[datetime], checked: Iterable[datetime]) -> list[Episode]:
    """The runs of consecutive broken times among every time examined, in order."""
    broken = set(broken)
    found: list[Episode] = []
    current: list[datetime] = []
    for t in sorted(broken | set(checked)):
        if t in broken:
            current.append(t)
        elif current:
            found.append(Episode(tuple(current), t))
            current = []
    if current:
        found.append(Episode(tuple(current), None))
    return found


def follow(spans: list[Span], broken: Iterable[datetime], checked: Iterable[datetime],
           flap_window: timedelta = timedelta(0)) -> dict[datetime, Span]:
    """Bring one subject's incidents up to date with one look at a window; which incident each break joins.

    ``spans`` are the subject's incidents that the window may touch (every
    open one, and those resolved at or after the window's start minus
    ``flap_window``); they are updated in place and new ones appended.
    ``broken`` are the check times at which the window found the subject
    broken, ``checked`` every check time it examined for that kind of break.
    """
    broken = sorted(set(broken))
    broken_set = set(broken)
    holding = sorted(set(checked) - broken_set)
    spans.sort(key=lambda s: s.opened_at)
    owner: dict[datetime, Span] = {}

    def open_span() -> Span | None:
        return next((s for s in spans if s.is_open), None)

    def held(at_or_after: datetime, before: datetime | None = None) -> datetime | None:
        """The first time the check held, at or after ``at_or_after`` (and before ``before``)."""
        i = bisect.bisect_left(holding, at_or_after)
        if i < len(holding) and (before is None or holding[i] < before):
            return holding[i]
        return None

    for episode in episodes(broken, holding):
        first, last = episode.first, episode.last
        current = open_span()
        target = next((s for s in spans if s.opened_at <= last
                       and (s.last_seen >= first if s.is_open else first < s.resolved_at)), None)
        if target is None and current is not None:
            between = held(current.last_seen, first) if current.last_seen < first else None
            if current.last_seen < first and between is None:
                target = current  # nothing in between showed the check holding
            elif last < current.opened_at and episode.cleared_at is None:
                target = current  # an older window whose last breaks run into the open incident
            elif current.last_seen < first:
                current.resolved_at = between
        if target is None and flap_window > timedelta(0) and spans:
            latest = spans[-1]
            if (not latest.is_open and latest.opened_at <= first
                    and latest.resolved_at <= first <= latest.resolved_at + flap_window):
                latest.resolved_at = None
                latest.reopened += 1
                target = latest
        if target is None:
            target = Span(first, last)
            bisect.insort(spans, target, key=lambda s: s.opened_at)
        _extend(target, episode, open_span(), owner)

    current = open_span()
    if current is not None:
        end = held(current.last_seen)
        if end is not None:
            current.resolved_at = end
    return owner


def _extend(target: Span, episode: Episode, current: Span | None, owner: dict[datetime, Span]) -> None:
    """Join the episode's breaks to ``target``, moving its ends as they show."""
    # Breaks past a resolution that the window contradicts belong to the
    # incident open now, when that is another one: incidents never merge.
    split = current is not None and current is not target and not target.is_open
    for t in episode.times:
        joins = current if split and t >= target.resolved_at else target
        owner[t] = joins
        joins.opened_at = min(joins.opened_at, t)
        joins.last_seen = max(joins.last_seen, t)
    if split:
        return
    if episode.cleared_at is not None:
        if episode.cleared_at >= target.last_seen:
            target.resolved_at = episode.cleared_at
    elif not target.is_open and target.resolved_at <= episode.last:
        target.resolved_at = None  # broken up to the newest time examined: open again


def subject_key(subject: dict) -> str:
    return json.dumps(subject, sort_keys=True)


def track(cur, run_id: int, check, found: list[tuple[int, Any]], checked: dict[str, list[datetime]],
          window_from: datetime, flap_window: timedelta = timedelta(0)) -> dict[str, int]:
    """Record the incidents of one check's findings, in the caller's transaction; counts opened, resolved.

    ``found`` pairs each break's id with its :class:`~reconciliation.reconcile.Break`;
    ``checked`` gives, per kind of break, the check times the run examined.
    """
    # One tracker at a time (it reads, then writes, a subject's incidents);
    # alerts lock single rows and readers take nothing this waits for.
    cur.execute("LOCK TABLE break_incidents IN SHARE ROW EXCLUSIVE MODE")
    cur.execute(
        """
        SELECT incident_id, kind, subject, opened_at, last_seen, resolved_at, reopened
          FROM break_incidents
         WHERE check_name = %s AND (resolved_at IS NULL OR resolved_at >= %s)
         ORDER BY opened_at
        """,
        (check.name, window_from - flap_window),
    )
    spans: dict[tuple[str, str], list[Span]] = defaultdict(list)
    subjects: dict[tuple[str, str], dict] = {}
    for incident_id, kind, subject, opened_at, last_seen, resolved_at, reopened in cur.fetchall():
        key = (kind, subject_key(subject))
        span = Span(opened_at, last_seen, resolved_at, reopened, incident_id)
        span.recorded = span.state
        spans[key].append(span)
        subjects[key] = subject
    breaks: dict[tuple[str, str], dict[datetime, int]] = defaultdict(dict)
    for break_id, b in found:
        key = (b.kind, subject_key(b.subject))
        breaks[key][b.check_time] = break_id
        subjects[key] = b.subject
    links: list[tuple[int, Span]] = []
    for key in set(breaks) | {k for k, s in spans.items() if any(x.is_open for x in s)}:
        if key[0] not in checked and key not in breaks:
            continue  # this run did not look at that kind of break
        owner = follow(spans[key], breaks[key], checked.get(key[0], ()), flap_window)
        links += [(breaks[key][t], span) for t, span in owner.items()]
    counts = _save(cur, run_id, check, spans, subjects)
    rows = [(break_id, span.incident_id) for break_id, span in links]
    if rows:
        execute_values(cur, """
            UPDATE reconciliation_breaks b SET incident_id = v.incident_id
              FROM (VALUES %s) AS v (break_id, incident_id)
             WHERE b.break_id = v.break_id AND b.incident_id IS DISTINCT FROM v.incident_id
            """, rows)
    return counts


def _save(cur, run_id: int, check, spans: dict[tuple[str, str], list[Span]],
          subjects: dict[tuple[str, str], dict]) -> dict[str, int]:
    counts = {"opened": 0, "resolved": 0}
    # Ends first, then reopenings, then new incidents: at every step at most
    # one incident of a subject is open (break_incidents_one_open).
    changed = [(k, s) for k, group in spans.items() for s in group if s.incident_id is not None and s.changed]
    for key, span in sorted(changed, key=lambda ks: ks[1].is_open):
        counts["resolved"] += span.resolved_at is not None and span.recorded[2] is None
        counts["opened"] += span.is_open and span.recorded[2] is not None
        cur.execute(
            """
            UPDATE break_incidents SET opened_at = %s, last_seen = %s, resolved_at = %s, reopened = %s,
                   last_run_id = %s
             WHERE incident_id = %s
            """,
            (*span.state, run_id, span.incident_id),
        )
    for key, group in spans.items():
        for span in (s for s in group if s.incident_id is None):
            counts["opened"] += 1
            counts["resolved"] += span.resolved_at is not None
            cur.execute(
                """
                INSERT INTO break_incidents (check_name, check_kind, kind, subject, sources, opened_at, last_seen,
                                             resolved_at, reopened, first_run_id, last_run_id)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING incident_id
                """,
                (check.name, check.kind, key[0], Json(subjects[key]), list(check.sources), *span.state,
                 run_id, run_id),
            )
            span.incident_id = cur.fetchone()[0]
    return counts


# -- reading and acknowledging -----------------------------------------------------

INCIDENT_COLUMNS = ("incident_id", "status", "check_name", "kind", "subject_label", "opened_at", "last_seen",
                    "resolved_at", "breaks", "worst_difference", "acknowledged_by", "acknowledged_at",
                    "acknowledgement_note", "detail", "sources")


def list_incidents(conn, *, unresolved: bool = True, source: str | None = None) -> list[dict]:
    """Incidents, newest first: unresolved ones (open or acknowledged), or all; of one source."""
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {', '.join(INCIDENT_COLUMNS)} FROM reconciliation_incidents
             WHERE (NOT %(unresolved)s OR status <> 'resolved')
               AND (%(source)s::text IS NULL OR %(source)s = ANY(sources))
             ORDER BY opened_at DESC, incident_id DESC
            """,
            {"unresolved": unresolved, "source": source},
        )
        rows = [dict(zip(INCIDENT_COLUMNS, r)) for r in cur.fetchall()]
    conn.rollback()
    return rows


def acknowledge(conn, incident_id: int, note: str, by: str) -> dict:
    """Append an acknowledgement of an unresolved incident; the incident as it is now.

    Raises LookupError for an unknown incident, ValueError for a resolved
    one (nothing is left to acknowledge) or an empty or overlong note or name.
    """
    note, by = note.strip(), by.strip()
    if not note or len(note) > MAX_NOTE_CHARS:
        raise ValueError(f"--note: say why, in 1 to {MAX_NOTE_CHARS} characters")
    if not by or len(by) > MAX_NAME_CHARS:
        raise ValueError(f"--by: a name of 1 to {MAX_NAME_CHARS} characters")
    with transaction(conn) as cur:
        # The row lock orders this against a tracker resolving the incident.
        cur.execute("SELECT resolved_at FROM break_incidents WHERE incident_id = %s FOR SHARE", (incident_id,))
        row = cur.fetchone()
        if row is None:
            raise LookupError(f"no incident {incident_id}")
        if row[0] is not None:
            raise ValueError(f"incident {incident_id} resolved at {row[0].isoformat()}: nothing to acknowledge")
        cur.execute("INSERT INTO incident_acknowledgements (incident_id, acknowledged_by, note) VALUES (%s, %s, %s)",
                    (incident_id, by, note))
        cur.execute(f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM reconciliation_incidents WHERE incident_id = %s",
                    (incident_id,))
        return dict(zip(INCIDENT_COLUMNS, cur.fetchone()))
