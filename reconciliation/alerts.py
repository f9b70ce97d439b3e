"""Alerts on incidents, sent through Airflow's own notifiers.

Configured in the sources file::

    [alerts]
    smtp_conn_id = "smtp_alerts"           # an Airflow SMTP Connection (host, port, login, password)
    to = ["treasury-ops@example.com"]
    from_email = "balances@example.com"    # optional when the Connection's extra has from_email
    # subject_prefix = "[balances]"
    # slack_conn_id = "slack_alerts"       # a Slack incoming webhook: SlackWebhookNotifier
    # remind_every = "24h"                 # "0": no reminders
    # flap_window = "0"                    # a problem back this soon after its end reopens the incident

Either channel or both. Per incident (:mod:`reconciliation.incidents`) and
channel: one alert when it opens, one when it resolves, and while it stays
open and nobody acknowledged it, a reminder every ``remind_every``. A
resolution is announced once it has lasted ``flap_window``: a problem that
comes back within it reopens the same incident, which was never announced
as over. A source gone stale is the ``stale`` incident of its continuity
check, like any other. Each run sends at most one message per channel,
listing every alert due.

No alert goes out twice, whatever stops the process. Each alert is claimed
in ``incident_notifications`` (unique per incident, channel, event and
number) and the claim committed before the message is sent; the claim
names the database session sending it, as a lease does
(:mod:`loaders.leases`). The send done, the claim becomes ``sent``; a send
that fails withdraws its claims, so the next run sends them again. A claim
whose session ended before either (the process killed mid-send) is marked
``in doubt`` and never sent again: the channel may have taken it, and a
second message cannot be taken back. Two runs at once claim each alert
once between them: the incident rows are locked while alerts are chosen
and the unique key settles any remaining race.

Messages carry check names, subjects, values and times, never a URL or a
credential: every secret of the configured Connections is masked from
them, and from what the Slack client logs while it sends.
"""
from __future__ import annotations

import html
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator

from extractors.text import one_line
from loaders.db import reconnect_like, transaction
from pipeline.config import AlertsConfig

log = logging.getLogger(__name__)

MAX_LISTED = 50  # alerts spelled out in one message; the rest are counted
EVENTS = ("opened", "reminder", "resolved")
# The logger slack_sdk's webhook client is given (send()): it logs the webhook
# URL, whose path is the secret, when it retries; secrets are masked here.
SLACK_CLIENT_LOGGER = "reconciliation.alerts.slack"


def flap_window(config) -> timedelta:
    """``[alerts] flap_window`` of a loaded config (0 without ``[alerts]``): how incidents are grouped."""
    return config.alerts.flap_window if config.alerts is not None else timedelta(0)


def check_connection(alerts: AlertsConfig) -> None:
    """Fail with one line naming what is missing when a notifier's Connection is not defined."""
    from pipeline.connections import ConnectionMissing, get_connection

    for key, conn_id in alerts.conn_ids.items():
        try:
            conn = get_connection(conn_id)
        except ConnectionMissing as exc:
            raise ConnectionMissing(f"alerts.{key}: {exc}") from None
        if key == "smtp_conn_id" and not conn.host:
            raise ConnectionMissing(f"alerts.{key}: Airflow connection {conn_id!r} has no host")
        if key == "slack_conn_id" and not (conn.password or "").strip():
            raise ConnectionMissing(f"alerts.{key}: Airflow connection {conn_id!r} has no password"
                                    " (the webhook's token or URL)")


def known_secrets(config) -> list[str]:
    """Every password and login of the Connections the sources and alerts use."""
    from pipeline.connections import ConnectionMissing, get_connection

    ids = {s.conn_id for s in config.sources.values() if s.conn_id}
    if config.alerts is not None:
        ids |= set(config.alerts.conn_ids.values())
    found = []
    for conn_id in sorted(ids) + ["balances_db"]:
        try:
            conn = get_connection(conn_id)
        except ConnectionMissing:
            continue
        found += [conn.password or "", conn.login or ""]
        # A webhook's secret is the last part of its path, also when logged in another form.
        found.append((conn.password or "").rstrip("/").rsplit("/", 1)[-1])
        for value in (conn.extra_dejson or {}).values():
            if isinstance(value, str) and conn_id != "balances_db":
                found.append(value)
    return [s for s in found if len(s) >= 4]


# -- choosing what is due ------------------------------------------------------------

def mark_in_doubt(conn) -> list[tuple]:
    """Claims whose sending session ended before it knew the outcome: ``in doubt``, never sent again."""
    from loaders.leases import holder_alive

    with transaction(conn) as cur:
        cur.execute(
            f"""
            UPDATE incident_notifications l SET outcome = 'in doubt'
             WHERE l.outcome = 'sending' AND NOT {holder_alive('l')}
            RETURNING l.incident_id, l.channel, l.event, l.claimed_at
            """
        )
        doubtful = cur.fetchall()
    for incident_id, channel, event, claimed_at in doubtful:
        log.warning("the %s alert of incident %d on %s may not have gone out: the process sending it "
                    "(claimed %s) stopped before it knew; it is not sent again", event, incident_id, channel,
                    claimed_at.isoformat())
    return doubtful


def claim_due(cur, alerts: AlertsConfig, channel: str, now: datetime) -> list[dict]:
    """Claim, for this session, every alert due on ``channel``; the claimed alerts with their incidents."""
    if channel.startswith("smtp:"):
        count_per_break_reports(cur, channel)
    return claim(cur, channel, now, choose_due(cur, alerts, channel, now))


def count_per_break_reports(cur, channel: str) -> None:
    """An incident whose breaks the per-break alerts (before migration 0014) reported was announced then."""
    cur.execute(
        """
        INSERT INTO incident_notifications (incident_id, channel, event, seq, claimed_at, sent_at, outcome)
        SELECT b.incident_id, %s, 'opened', 0, min(n.notified_at), min(n.notified_at), 'reported per break'
          FROM reconciliation_breaks b JOIN break_notifications n USING (break_id)
         WHERE b.incident_id IS NOT NULL
           AND NOT EXISTS (SELECT FROM incident_notifications x
                            WHERE x.incident_id = b.incident_id AND x.channel = %s)
         GROUP BY b.incident_id
        ON CONFLICT DO NOTHING
        """,
        (channel, channel),
    )


def choose_due(cur, alerts: AlertsConfig, channel: str, now: datetime) -> list[tuple[int, str, int | None]]:
    """The alerts due on ``channel``: (incident, event, the incident's last alert on it or None).

    The last alert of each incident on the channel says what is due next.
    Incidents being written (a reconciliation) or chosen (another run) are
    skipped: the next run sees them.
    """
    cur.execute(
        """
        WITH last AS (
            SELECT DISTINCT ON (incident_id) incident_id, notification_id, event, claimed_at
              FROM incident_notifications WHERE channel = %(channel)s
             ORDER BY incident_id, notification_id DESC
        ), due AS (
            SELECT i.incident_id, l.notification_id AS last_id,
                   CASE WHEN i.resolved_at IS NULL AND (l.event IS NULL OR l.event = 'resolved') THEN 'opened'
                        WHEN i.resolved_at IS NULL AND %(remind)s > interval '0'
                             AND l.claimed_at + %(remind)s <= %(now)s
                             AND NOT EXISTS (SELECT FROM incident_acknowledgements k
                                              WHERE k.incident_id = i.incident_id) THEN 'reminder'
                        WHEN i.resolved_at IS NOT NULL AND l.event IN ('opened', 'reminder')
                             AND i.resolved_at + %(flap)s <= %(now)s THEN 'resolved'
                   END AS event
              FROM break_incidents i
              LEFT JOIN last l USING (incident_id)
             WHERE i.resolved_at IS NULL OR l.event IN ('opened', 'reminder')
        )
        SELECT i.incident_id, due.event, due.last_id
          FROM break_incidents i JOIN due USING (incident_id)
         WHERE due.event IS NOT NULL
         ORDER BY i.opened_at, i.incident_id
           FOR UPDATE OF i SKIP LOCKED
        """,
        {"channel": channel, "remind": alerts.remind_every, "flap": alerts.flap_window, "now": now},
    )
    return cur.fetchall()


def claim(cur, channel: str, now: datetime, due: list[tuple[int, str, int | None]]) -> list[dict]:
    """Claim the ``due`` alerts for this session; those claimed, with their incidents.

    An alert is claimed only if its incident's last alert on the channel is
    still the one it was chosen after: a run that chose it from a snapshot
    taken before another run's claim committed (and then locked the row
    that run had just let go) claims nothing. Two claims inserted at once
    meet on the unique key, and the second does nothing.
    """
    from loaders.leases import HOLDER

    if not due:
        return []
    cur.execute(
        f"""
        INSERT INTO incident_notifications (incident_id, channel, event, seq, claimed_at, outcome,
                                            pid, backend_start, holder_role)
        SELECT d.incident_id, %(channel)s, d.event,
               (SELECT count(*) FROM incident_notifications x
                 WHERE x.incident_id = d.incident_id AND x.channel = %(channel)s AND x.event = d.event),
               %(now)s, 'sending', h.pid, h.backend_start, h.holder_role
          FROM unnest(%(ids)s::bigint[], %(events)s::text[], %(lasts)s::bigint[]) AS d (incident_id, event, last_id),
               ({HOLDER}) h
         WHERE (SELECT max(x.notification_id) FROM incident_notifications x
                 WHERE x.incident_id = d.incident_id AND x.channel = %(channel)s) IS NOT DISTINCT FROM d.last_id
        ON CONFLICT DO NOTHING
        RETURNING notification_id, incident_id, event
        """,
        {"channel": channel, "now": now, "ids": [d[0] for d in due], "events": [d[1] for d in due],
         "lasts": [d[2] for d in due]},
    )
    claimed = {incident_id: (notification_id, event) for notification_id, incident_id, event in cur.fetchall()}
    if not claimed:
        return []
    cur.execute(
        """
        SELECT incident_id, check_name, kind, status, subject_label, opened_at, last_seen, resolved_at, breaks,
               worst_difference_text, detail, acknowledged_by
          FROM reconciliation_incidents WHERE incident_id = ANY(%s)
         ORDER BY opened_at, incident_id
        """,
        (list(claimed),),
    )
    names = [d[0] for d in cur.description]
    alerts_due = []
    for row in cur.fetchall():
        incident = dict(zip(names, row))
        incident["notification_id"], incident["event"] = claimed[incident["incident_id"]]
        alerts_due.append(incident)
    return alerts_due


# -- what a message says ---------------------------------------------------------------

def summary(alerts: AlertsConfig, due: list[dict]) -> str:
    """One line: the subject of a message listing ``due``."""
    counts = {event: sum(1 for d in due if d["event"] == event) for event in EVENTS}
    parts = []
    if counts["opened"]:
        parts.append(f"{counts['opened']} incident{'s' if counts['opened'] != 1 else ''} opened")
    stale = sorted({d["subject_label"] for d in due if d["event"] == "opened" and d["kind"] == "stale"})
    if stale:
        parts.append(f"stale source{'s' if len(stale) != 1 else ''}: {', '.join(stale)}")
    if counts["resolved"]:
        parts.append(f"{counts['resolved']} resolved")
    if counts["reminder"]:
        parts.append(f"{counts['reminder']} still open")
    return f"{alerts.subject_prefix} {'; '.join(parts)}".strip()


def _cells(d: dict) -> tuple[str, ...]:
    """One incident's cells; provider text (subjects, details) with control characters shown escaped."""
    return tuple(one_line(c) for c in (
        d["event"], f"#{d['incident_id']}", d["check_name"], d["kind"], d["subject_label"],
        d["opened_at"].isoformat(), (d["resolved_at"] or d["last_seen"]).isoformat(), str(d["breaks"]),
        d["worst_difference_text"] or "", d["detail"] or ""))


HEADERS = ("alert", "incident", "check", "kind", "subject", "opened (UTC)", "last seen or resolved (UTC)",
           "breaks", "worst difference", "latest detail")


def compose_html(due: list[dict]) -> str:
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(d)) + "</tr>" for d in due[:MAX_LISTED]]
    more = len(due) - MAX_LISTED
    return ("<p>Reconciliation incidents: opened, still open, or resolved since the last alert.</p>"
            "<table border=\"1\" cellpadding=\"4\"><tr>" + "".join(f"<th>{h}</th>" for h in HEADERS) + "</tr>"
            + "".join(rows) + "</table>"
            + (f"<p>and {more} more: see the view reconciliation_incidents.</p>" if more > 0 else "")
            + "<p>Acknowledge one (stops its reminders): balances incidents ack ID --note TEXT</p>")


def slack_escape(text: str) -> str:
    """Text Slack shows as written: ``<...>`` would be a link or a mention (@channel) otherwise."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def compose_text(subject: str, due: list[dict]) -> str:
    lines = [slack_escape(subject)]
    for d in due[:MAX_LISTED]:
        event, number, check, kind, label, opened, last, breaks, worst, detail = map(slack_escape, _cells(d))
        lines.append(f"• {event} {number} {check} {kind} {label}: since {opened}, {breaks} break(s)"
                     + (f", worst difference {worst}" if worst else "") + (f"; {detail}" if detail else ""))
    if len(due) > MAX_LISTED:
        lines.append(f"and {len(due) - MAX_LISTED} more: see the view reconciliation_incidents")
    return "\n".join(lines)


# -- sending -----------------------------------------------------------------------------

class _Scrub(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        from pipeline.connections import scrub

        record.msg, record.args = scrub(record.getMessage(), self.secrets), ()
        return True


@contextmanager
def masked_logs(secrets: list[str]) -> Iterator[None]:
    """Secrets masked from what the Slack client logs meanwhile (its retries name the webhook URL)."""
    logger = logging.getLogger(SLACK_CLIENT_LOGGER)
    scrubber = _Scrub(secrets)
    logger.addFilter(scrubber)
    try:
        yield
    finally:
        logger.removeFilter(scrubber)


def send(alerts: AlertsConfig, channel: str, due: list[dict], secrets: list[str], context: dict) -> None:
    """One message listing ``due`` on ``channel``, through the provider's notifier; secrets masked."""
    from pipeline.connections import scrub

    subject = scrub(summary(alerts, due), secrets)
    kind, conn_id = channel.split(":", 1)
    # notify(), not __call__: the message is final text, never a Jinja template.
    if kind == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        SmtpNotifier(to=list(alerts.to), from_email=alerts.from_email, subject=subject,
                     html_content=scrub(compose_html(due), secrets), smtp_conn_id=conn_id).notify(context)
    else:
        from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        notifier = SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=scrub(compose_text(subject, due), secrets))
        # Its own hook would give the client Airflow's logger, which masks
        # nothing outside a task: the same hook, logging where secrets are masked.
        notifier.hook = SlackWebhookHook(slack_webhook_conn_id=conn_id, logger=logging.getLogger(SLACK_CLIENT_LOGGER))
        with masked_logs(secrets):
            notifier.notify(context)


def _settle(conn, ids: list[int], statement: str) -> None:
    """Confirm or withdraw claims; over a new connection if this one broke since (the send is done)."""
    for attempt in (1, 2):
        try:
            target = conn if attempt == 1 else reconnect_like(conn, application_name="balance-snapshots alerts")
            try:
                with transaction(target) as cur:
                    cur.execute(statement, (ids,))
            finally:
                if target is not conn:
                    target.close()
            return
        except Exception as exc:
            if attempt == 2 or not conn.closed:
                raise
            log.warning("the connection broke after the alerts went out; settling %d claim(s) over a new one: %s",
                        len(ids), exc)


@dataclass(slots=True)
class Sent:
    """What one call sent, per event, and on which channels."""

    opened: int = 0
    reminder: int = 0
    resolved: int = 0
    channels: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.opened + self.reminder + self.resolved


def notify_incidents(conn, config, context: dict | None = None, *, now: datetime | None = None) -> Sent:
    """Send every alert due on every configured channel, one message per channel.

    ``now`` is the clock that reminders and ``flap_window`` are measured
    against (default: the present). A channel whose send fails raises
    after its claims are withdrawn; channels before it keep what they sent.
    """
    alerts: AlertsConfig | None = config.alerts
    sent = Sent()
    if alerts is None:
        return sent
    check_connection(alerts)
    secrets = known_secrets(config)
    now = now or datetime.now(timezone.utc)
    mark_in_doubt(conn)
    for channel in alerts.channels:
        with transaction(conn) as cur:
            due = claim_due(cur, alerts, channel, now)
        if not due:
            continue
        ids = [d["notification_id"] for d in due]
        try:
            send(alerts, channel, due, secrets, dict(context or {}))
        except BaseException:
            _settle(conn, ids, "DELETE FROM incident_notifications WHERE notification_id = ANY(%s)"
                               " AND outcome = 'sending'")
            raise
        _settle(conn, ids, "UPDATE incident_notifications SET outcome = 'sent', sent_at = now()"
                           " WHERE notification_id = ANY(%s) AND outcome = 'sending'")
        for d in due:
            setattr(sent, d["event"], getattr(sent, d["event"]) + 1)
        sent.channels += (channel,)
    return sent
