"""Alerts on breaks: the reconciliation DAG's SmtpNotifier against a local SMTP server.

The server is aiosmtpd on 127.0.0.1 with a login (so the SMTP password is a
secret the message must not carry); it keeps every message it receives.
"""
from __future__ import annotations

import email
import email.policy
import os
import secrets
import socket
import tomllib
from datetime import timedelta

import pytest

from reconciliation.alerts import notify_new_breaks
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.connections import ConnectionMissing
from reconciliation.reconcile import reconcile
from reconciliation.checks import load_checks
from tests.conftest import fetch, load_dag, write_config
from tests.test_reconcile import CONFIG, FROM, TO, h, seed, snapshot

SMTP_USER = "balances-alerts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Capture:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.raw: list[str] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server, session, envelope):
        self.raw.append(envelope.content.decode("utf-8", "replace"))
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp(monkeypatch):
    """A capturing SMTP server and the Connection ``smtp_alerts`` pointing at it (with a login)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    password = "smtp-" + secrets.token_hex(12)

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login.decode() == SMTP_USER and auth_data.password.decode() == password
        return AuthResult(success=ok)

    capture = Capture()
    port = free_port()
    controller = Controller(capture, hostname="127.0.0.1", port=port, authenticator=authenticate,
                            auth_require_tls=False)
    controller.start()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", f"smtp://{SMTP_USER}:{password}@127.0.0.1:{port}"
                                                   "?disable_ssl=true&disable_tls=true&timeout=10&retry_limit=1")
    capture.password = password
    try:
        yield capture
    finally:
        controller.stop()


ALERTS = """
[alerts]
smtp_conn_id = "{conn_id}"
to = ["treasury-ops@example.com", "oncall@example.com"]
from_email = "balances@example.com"
"""


def body(message) -> str:
    return message.get_body(("html", "plain")).get_content()


@pytest.mark.airflow
def test_each_new_break_is_mailed_once(airflow_env, db, smtp):
    seed(db)
    write_config(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    dag = load_dag("reconcile_balances")
    assert [t.task_id for t in dag.topological_sort()] == ["reconcile_window", "notify_breaks"]

    run = dag.test(run_after=TO, logical_date=None)
    assert run.state == "success"
    assert len(smtp.messages) == 1
    first = smtp.messages[0]
    assert sorted(smtp.recipients[0]) == ["oncall@example.com", "treasury-ops@example.com"]
    assert first["From"] == "balances@example.com"
    # Seven breaks and one stale stretch (see test_reconcile.EXPECTED).
    assert first["Subject"] == "[balances] 7 new reconciliation breaks; stale source: formance_main"
    text = body(first)
    assert "formance_main user:1 USD/2" in text and "negative_balance" in text
    assert "formance_main treasury:hedera HBAR/8 vs hedera_mainnet 0.0.1234 HBAR" in text
    assert "difference=0.01000000" in text
    assert text.count("<tr>") == 1 + 8
    assert smtp.password not in smtp.raw[0]
    assert fetch(db, "SELECT count(*) FROM break_notifications") == [(8,)]

    # The same breaks found again: nothing sent.
    assert dag.test(run_after=TO + timedelta(minutes=1), logical_date=None).state == "success"
    assert len(smtp.messages) == 1

    # A later snapshot brings new breaks: only those are sent.
    snapshot(db, "formance_main", h(6), rows=[("user:1", "USD/2", "-700", 2)])
    assert dag.test(run_after=h(6) + timedelta(minutes=1), logical_date=None).state == "success"
    assert len(smtp.messages) == 2
    second = body(smtp.messages[1])
    assert h(6).isoformat() in second and "-7.00" in second
    assert h(4).isoformat() not in second and "user:2" not in second
    open_breaks = fetch(db, "SELECT count(*) FROM reconciliation_breaks WHERE status = 'open'")[0][0]
    assert fetch(db, "SELECT count(*) FROM break_notifications") == [(open_breaks,)]


@pytest.mark.airflow
def test_missing_smtp_connection_fails_the_task_with_one_line(airflow_env, db, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SMTP_NOWHERE", raising=False)
    seed(db)
    config_path = write_config(CONFIG + ALERTS.format(conn_id="smtp_nowhere"))
    config = load_config(config_path)
    reconcile(db, load_checks(config), FROM, TO)
    with pytest.raises(ConnectionMissing) as caught:
        notify_new_breaks(db, config)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("alerts.smtp_conn_id: Airflow connection 'smtp_nowhere' is not defined")
    assert "AIRFLOW_CONN_SMTP_NOWHERE" in message
    assert fetch(db, "SELECT count(*) FROM break_notifications") == [(0,)]

    run = load_dag("reconcile_balances").test(run_after=TO, logical_date=None)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"reconcile_window": "success", "notify_breaks": "failed"}


def test_a_failed_send_claims_nothing_and_the_next_run_sends(db, smtp, monkeypatch):
    seed(db)
    config = parse_config(tomllib.loads(CONFIG + ALERTS.format(conn_id="smtp_alerts")))
    reconcile(db, load_checks(config), FROM, TO)
    good = os.environ["AIRFLOW_CONN_SMTP_ALERTS"]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", good.replace(good.split("@")[1].split("?")[0],
                                                                f"127.0.0.1:{free_port()}"))
    with pytest.raises(Exception):
        notify_new_breaks(db, config)
    assert fetch(db, "SELECT count(*) FROM break_notifications") == [(0,)]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", good)
    assert notify_new_breaks(db, config) == 8
    assert notify_new_breaks(db, config) == 0
    assert len(smtp.messages) == 1


@pytest.mark.parametrize("table, message", [
    ('[alerts]\nto = ["a@example.com"]', "alerts.smtp_conn_id: missing"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = "nobody"', "alerts.to[0]: 'nobody' is not an e-mail address"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["ops@example.com\\r\\nBcc: x@evil.example"]',
     "alerts.to[0]: 'ops@example.com\\r\\nBcc: x@evil.example' is not an e-mail address"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["ops@example.com"]\nfrom_email = "b@example.com\\nX: y"',
     "alerts.from_email: 'b@example.com\\nX: y' is not an e-mail address"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["ops@example.com"]\nsubject_prefix = "[b]\\r\\nBcc: x@evil.example"',
     "alerts.subject_prefix: expected at most 100 printable characters"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = []', "alerts.to: expected one or more e-mail addresses"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["a@example.com"]\nwebhook = "x"', "alerts.webhook: unknown key"),
    ('alerts = 3', "alerts: must be a table"),
])
def test_alerts_config_mistakes_name_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(table))
    assert str(caught.value).startswith(message)
