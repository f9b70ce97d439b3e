"""Alerts on reconciliation breaks, sent through Airflow's own notifiers.

Configured in the sources file::

    [alerts]
    smtp_conn_id = "smtp_alerts"           # an Airflow SMTP Connection (host, port, login, password)
    to = ["treasury-ops@example.com"]
    from_email = "balances@example.com"    # optional when the Connection's extra has from_email
    # subject_prefix = "[balances]"

After each reconciliation run, every open break that no alert has reported
yet is sent, once: one message per run lists them (a source gone stale is
a ``stale`` break of its continuity check, so it is reported the same way,
once per stale stretch). A break is claimed in ``break_notifications`` in
the transaction that sends it: a failed send claims nothing and is retried
by the next run, and a break that resolves and reopens is not sent again.
Messages carry check names, subjects, values and times, never a URL or a
credential: every secret of the configured Connections is masked from them.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from extractors.text import one_line
from pipeline.config import ConfigError

MAX_LISTED = 50  # breaks spelled out in one message; the rest are counted


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    smtp_conn_id: str
    to: tuple[str, ...]
    from_email: str | None = None
    subject_prefix: str = "[balances]"

    @property
    def channels(self) -> list[str]:
        return [f"smtp:{self.smtp_conn_id}"]


_KEYS = {"smtp_conn_id", "to", "from_email", "subject_prefix"}


def parse_alerts(table: Any) -> AlertsConfig | None:
    """The ``[alerts]`` table; None when the file has none. Mistakes name ``alerts.<key>``."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("alerts: must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"alerts.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    conn_id = table.get("smtp_conn_id")
    if not isinstance(conn_id, str) or not conn_id.strip():
        raise ConfigError("alerts.smtp_conn_id: missing (the Airflow SMTP Connection that sends alerts)")
    to = table.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise ConfigError(f"alerts.to: expected one or more e-mail addresses, got {to!r}")
    to = [email_address(a, f"alerts.to[{i}]") for i, a in enumerate(to)]
    sender = table.get("from_email")
    if sender is not None:
        sender = email_address(sender, "alerts.from_email")
    prefix = table.get("subject_prefix", "[balances]")
    if not isinstance(prefix, str) or not _HEADER_TEXT.fullmatch(prefix):
        raise ConfigError(f"alerts.subject_prefix: expected at most 100 printable characters, got {prefix!r}")
    return AlertsConfig(smtp_conn_id=conn_id.strip(), to=tuple(a.strip() for a in to),
                        from_email=sender, subject_prefix=prefix)


# An address as it may stand in a mail header: local@domain, printable ASCII,
# no space, no CR/LF (a header line break in 'to' made every alert fail, and
# could add headers), none of the characters that separate addresses.
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_HEADER_TEXT = re.compile(r"[^\x00-\x1f\x7f]{0,100}")


def email_address(value: Any, where: str) -> str:
    """A mail address checked as it is read, so an alert never fails on it (ConfigError naming ``where``)."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value.strip()) or len(value.strip()) > 254:
        raise ConfigError(f"{where}: {value!r} is not an e-mail address (local@domain, ASCII, no spaces or "
                          "line breaks)")
    return value.strip()


def check_connection(alerts: AlertsConfig) -> None:
    """Fail with one line naming what is missing when the notifier's Connection is not defined."""
    from pipeline.connections import ConnectionMissing, get_connection

    try:
        conn = get_connection(alerts.smtp_conn_id)
    except ConnectionMissing as exc:
        raise ConnectionMissing(f"alerts.smtp_conn_id: {exc}") from None
    if not conn.host:
        raise ConnectionMissing(f"alerts.smtp_conn_id: Airflow connection {alerts.smtp_conn_id!r} has no host")


def pending_breaks(cur) -> list[dict]:
    """Open breaks never reported, locked for this transaction (concurrent runs skip them)."""
    cur.execute(
        """
        SELECT b.break_id, d.check_name, d.kind, d.subject_label, d.check_time, d.left_text, d.right_text,
               d.difference_text, d.detail
          FROM reconciliation_breaks b
          JOIN reconciliation_breaks_detail d USING (break_id)
         WHERE b.status = 'open'
           AND NOT EXISTS (SELECT FROM break_notifications n WHERE n.break_id = b.break_id)
         ORDER BY d.check_time, d.check_name, d.kind, b.break_id
           FOR UPDATE OF b SKIP LOCKED
        """
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def compose(alerts: AlertsConfig, breaks: list[dict], secrets: list[str]) -> tuple[str, str]:
    """Subject and HTML body of one message listing ``breaks``, secrets masked."""
    from pipeline.connections import scrub

    stale = [b for b in breaks if b["kind"] == "stale"]
    others = len(breaks) - len(stale)
    parts = []
    if others:
        parts.append(f"{others} new reconciliation break{'s' if others != 1 else ''}")
    if stale:
        names = sorted({b["subject_label"] for b in stale})
        parts.append(f"stale source{'s' if len(names) != 1 else ''}: {', '.join(names)}")
    subject = f"{alerts.subject_prefix} {'; '.join(parts)}".strip()
    rows = []
    for b in breaks[:MAX_LISTED]:
        values = " ".join(f"{k}={b[k + '_text']}" for k in ("left", "right", "difference")
                          if b[k + "_text"] is not None)
        cells = (b["check_time"].isoformat(), b["check_name"], b["kind"], b["subject_label"], values,
                 b["detail"] or "")
        rows.append("<tr>" + "".join(f"<td>{html.escape(one_line(str(c)))}</td>" for c in cells) + "</tr>")
    more = len(breaks) - MAX_LISTED
    body = ("<p>Open breaks found by the reconciliation that no alert reported before.</p>"
            "<table border=\"1\" cellpadding=\"4\"><tr><th>check time (UTC)</th><th>check</th><th>kind</th>"
            "<th>subject</th><th>values</th><th>detail</th></tr>" + "".join(rows) + "</table>"
            + (f"<p>and {more} more: see the view reconciliation_breaks_detail.</p>" if more > 0 else ""))
    return scrub(subject, secrets), scrub(body, secrets)


def known_secrets(config) -> list[str]:
    """Every password and login of the Connections the sources and alerts use."""
    from pipeline.connections import ConnectionMissing, get_connection

    ids = {s.conn_id for s in config.sources.values() if s.conn_id}
    if config.alerts is not None:
        ids.add(config.alerts.smtp_conn_id)
    found = []
    for conn_id in sorted(ids) + ["balances_db"]:
        try:
            conn = get_connection(conn_id)
        except ConnectionMissing:
            continue
        found += [conn.password or "", conn.login or ""]
        for value in (conn.extra_dejson or {}).values():
            if isinstance(value, str) and conn_id != "balances_db":
                found.append(value)
    return [s for s in found if len(s) >= 4]


def notify_new_breaks(conn, config, context: dict | None = None) -> int:
    """Send one alert for the open breaks not reported yet; how many it reported."""
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    alerts: AlertsConfig | None = config.alerts
    if alerts is None:
        return 0
    check_connection(alerts)
    secrets = known_secrets(config)
    with conn.cursor() as cur:
        try:
            breaks = pending_breaks(cur)
            if not breaks:
                conn.rollback()
                return 0
            subject, body = compose(alerts, breaks, secrets)
            cur.execute(
                "INSERT INTO break_notifications (break_id, channels) SELECT unnest(%s::bigint[]), %s",
                ([b["break_id"] for b in breaks], alerts.channels),
            )
            notifier = SmtpNotifier(to=list(alerts.to), from_email=alerts.from_email, subject=subject,
                                    html_content=body, smtp_conn_id=alerts.smtp_conn_id)
            # notify(), not __call__: the message is final text, never a Jinja template.
            notifier.notify(dict(context or {}))
        except BaseException:
            conn.rollback()
            raise
    conn.commit()
    return len(breaks)
