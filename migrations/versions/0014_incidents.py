"""Breaks grouped into incidents, their alerts and their acknowledgements.

A break is keyed by its check time, so a problem that lasts is a new break
at every snapshot. An incident is the problem: consecutive breaks of one
check, kind and subject (reconciliation/incidents.py decides what is
consecutive). Break rows stay the evidence and point at their incident.

* ``break_incidents``: one row per incident. At most one of a check, kind
  and subject is open (``resolved_at`` null) at a time.
* ``reconciliation_breaks.incident_id``: the incident a break belongs to
  (null for breaks no reconciliation has looked at since this migration).
* ``incident_acknowledgements``: who acknowledged an incident, when and
  why. An audit trail: a trigger refuses every UPDATE and DELETE.
* ``incident_notifications``: every alert of an incident on every channel
  (opened, reminder, resolved), claimed before it is sent and confirmed
  after (reconciliation/alerts.py), so no alert goes out twice.
* Views for ``balances_reader``: ``reconciliation_incidents`` (one row per
  incident with its status, break count, worst difference and latest
  acknowledgement) and ``reconciliation_incidents_daily`` (incidents
  opened per UTC day). ``break_subject_label(subject)`` spells a subject
  out as ``reconciliation_breaks_detail`` does (0007).

``break_notifications`` (0009) is no longer written: an incident whose
breaks it lists counts as announced.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

VIEWS = ("reconciliation_incidents", "reconciliation_incidents_daily")


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE break_incidents (
            incident_id   bigserial PRIMARY KEY,
            check_name    text NOT NULL,
            check_kind    text NOT NULL CHECK (check_kind IN ('pair', 'aggregate', 'continuity')),
            kind          text NOT NULL,
            subject       jsonb NOT NULL,
            sources       text[] NOT NULL,
            opened_at     timestamptz NOT NULL,
            last_seen     timestamptz NOT NULL,
            resolved_at   timestamptz,
            reopened      integer NOT NULL DEFAULT 0,
            first_run_id  bigint NOT NULL REFERENCES reconciliation_runs (run_id),
            last_run_id   bigint NOT NULL REFERENCES reconciliation_runs (run_id),
            CHECK (opened_at <= last_seen),
            CHECK (resolved_at >= last_seen)
        )
        """
    )
    op.execute("CREATE UNIQUE INDEX break_incidents_one_open ON break_incidents (check_name, kind, subject)"
               " WHERE resolved_at IS NULL")
    op.execute("CREATE INDEX break_incidents_key ON break_incidents (check_name, kind, subject, opened_at)")
    op.execute("ALTER TABLE reconciliation_breaks"
               " ADD COLUMN incident_id bigint REFERENCES break_incidents (incident_id)")
    op.execute("CREATE INDEX reconciliation_breaks_incident ON reconciliation_breaks (incident_id)")
    op.execute(
        """
        CREATE TABLE incident_acknowledgements (
            acknowledgement_id bigserial PRIMARY KEY,
            incident_id        bigint NOT NULL REFERENCES break_incidents (incident_id),
            acknowledged_at    timestamptz NOT NULL DEFAULT now(),
            acknowledged_by    text NOT NULL CHECK (acknowledged_by <> ''),
            note               text NOT NULL CHECK (note <> '')
        )
        """
    )
    op.execute("CREATE INDEX incident_acknowledgements_incident ON incident_acknowledgements (incident_id)")
    op.execute(
        """
        CREATE FUNCTION incident_acknowledgements_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'incident_acknowledgements is an audit trail: its rows are never changed or removed'
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER incident_acknowledgements_append_only
            BEFORE UPDATE OR DELETE ON incident_acknowledgements
            FOR EACH ROW EXECUTE FUNCTION incident_acknowledgements_append_only()
        """
    )
    # outcome: 'sending' while a process sends it (pid, backend_start and
    # holder_role name that session, as run_leases does), 'sent' once the
    # channel took it, 'in doubt' when that process stopped in between, and
    # 'reported per break' for an opening that break_notifications recorded.
    op.execute(
        """
        CREATE TABLE incident_notifications (
            notification_id bigserial PRIMARY KEY,
            incident_id     bigint NOT NULL REFERENCES break_incidents (incident_id) ON DELETE CASCADE,
            channel         text NOT NULL,
            event           text NOT NULL CHECK (event IN ('opened', 'reminder', 'resolved')),
            seq             integer NOT NULL,
            claimed_at      timestamptz NOT NULL,
            sent_at         timestamptz,
            outcome         text NOT NULL
                            CHECK (outcome IN ('sending', 'sent', 'in doubt', 'reported per break')),
            pid             integer,
            backend_start   timestamptz,
            holder_role     oid,
            UNIQUE (incident_id, channel, event, seq)
        )
        """
    )
    op.execute(
        """
        CREATE FUNCTION break_subject_label(subject jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
            SELECT CASE WHEN subject ? 'left'
                        THEN concat_ws(' ', subject #>> '{left,source}', subject #>> '{left,account}',
                                       subject #>> '{left,asset}')
                             || ' vs '
                             || concat_ws(' ', subject #>> '{right,source}', subject #>> '{right,account}',
                                          subject #>> '{right,asset}')
                        ELSE concat_ws(' ', subject ->> 'source', subject ->> 'account', subject ->> 'asset')
                   END
        $$
        """
    )
    # The worst difference keeps its sign: the one furthest from zero.
    op.execute(
        """
        CREATE VIEW reconciliation_incidents AS
        SELECT i.incident_id, i.check_name, i.check_kind, i.kind,
               CASE WHEN i.resolved_at IS NOT NULL THEN 'resolved'
                    WHEN a.acknowledged_at IS NOT NULL THEN 'acknowledged'
                    ELSE 'open' END AS status,
               i.sources, i.subject, break_subject_label(i.subject) AS subject_label,
               i.opened_at, i.last_seen, i.resolved_at, i.reopened,
               coalesce(b.breaks, 0) AS breaks, b.worst_difference,
               b.worst_difference::text AS worst_difference_text, b.detail,
               a.acknowledged_at, a.acknowledged_by, a.note AS acknowledgement_note
          FROM break_incidents i
          LEFT JOIN LATERAL (
               SELECT count(*) AS breaks,
                      (array_agg(r.difference ORDER BY abs(r.difference) DESC NULLS LAST, r.check_time))[1]
                          AS worst_difference,
                      (array_agg(r.detail ORDER BY r.check_time DESC))[1] AS detail
                 FROM reconciliation_breaks r WHERE r.incident_id = i.incident_id) b ON true
          LEFT JOIN LATERAL (
               SELECT k.acknowledged_at, k.acknowledged_by, k.note FROM incident_acknowledgements k
                WHERE k.incident_id = i.incident_id
                ORDER BY k.acknowledgement_id DESC LIMIT 1) a ON true
        """
    )
    op.execute(
        """
        CREATE VIEW reconciliation_incidents_daily AS
        SELECT (i.opened_at AT TIME ZONE 'UTC')::date AS day, i.check_name, i.check_kind, i.kind,
               count(*) AS opened,
               count(*) FILTER (WHERE i.resolved_at IS NULL) AS still_open
          FROM break_incidents i
         GROUP BY 1, 2, 3, 4
        """
    )
    # Functions a view calls are checked against the reader, not the owner.
    op.execute("GRANT EXECUTE ON FUNCTION break_subject_label(jsonb) TO balances_reader")
    op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO balances_reader")


def downgrade() -> None:
    op.execute(f"DROP VIEW {', '.join(reversed(VIEWS))}")
    op.execute("DROP FUNCTION break_subject_label(jsonb)")
    op.execute("DROP TABLE incident_notifications, incident_acknowledgements")
    op.execute("DROP FUNCTION incident_acknowledgements_append_only()")
    op.execute("ALTER TABLE reconciliation_breaks DROP COLUMN incident_id")
    op.execute("DROP TABLE break_incidents")
