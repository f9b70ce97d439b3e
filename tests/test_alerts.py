"""Alerts on incidents, through Airflow's SmtpNotifier and SlackWebhookNotifier, against local servers.

The SMTP server is aiosmtpd on 127.0.0.1 with a login (so the SMTP password
is a secret the message must not carry); it keeps every message it
receives. The Slack webhook is ``sandbox/slack_webhook.py`` behind
``sandbox.server.FakeServer``. Reconciliations run over known histories
(``tests/test_reconcile.py``'s, and a source with a snapshot every 15
minutes); the clock the alerts measure reminders against is passed in, so
a day of snapshots takes seconds.
"""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import pytest

from loaders.db import connect
from pipeline import connections
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.connections import ConnectionMissing
from reconciliation.alerts import SLACK_CLIENT_LOGGER, notify_incidents
from reconciliation.checks import load_checks
from reconciliation.incidents import acknowledge
from reconciliation.reconcile import default_window, reconcile
from sandbox.server import FakeServer
from sandbox.slack_webhook import SlackWebhook
from tests.conftest import REPO, fetch, load_dag, wait_for, write_config
from tests.entry_points import documented_blocks, run_block, user_env
from tests.test_incidents import LEDGER, t
from tests.test_reconcile import CONFIG, FROM, TO, h, seed, snapshot

SMTP_USER = "balances-alerts"
README = REPO / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Capture:
    """What the SMTP server received; ``on_data`` runs as a message arrives, before the server answers."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.raw: list[str] = []
        self.recipients: list[list[str]] = []
        self.on_data = None
        self.port = 0
        self.password = ""

    async def handle_DATA(self, server, session, envelope):
        self.raw.append(envelope.content.decode("utf-8", "replace"))
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        self.recipients.append(list(envelope.rcpt_tos))
        if self.on_data is not None:
            self.on_data()
        return "250 Message accepted for delivery"

    def subjects(self) -> list[str]:
        return [m["Subject"] for m in self.messages]


def start_smtp(tls_context: ssl.SSLContext | None = None):
    """A capturing SMTP server with a login (over STARTTLS when given a context); capture, controller."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    capture = Capture()
    capture.password = "smtp-" + secrets.token_hex(12)

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login.decode() == SMTP_USER and auth_data.password.decode() == capture.password
        return AuthResult(success=ok)

    capture.port = free_port()
    controller = Controller(capture, hostname="127.0.0.1", port=capture.port, authenticator=authenticate,
                            auth_require_tls=tls_context is not None, tls_context=tls_context,
                            require_starttls=tls_context is not None)
    controller.start()
    return capture, controller


@pytest.fixture
def smtp(monkeypatch):
    """A capturing SMTP server and the Connection ``smtp_alerts`` pointing at it (with a login)."""
    capture, controller = start_smtp()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", f"smtp://{SMTP_USER}:{capture.password}@127.0.0.1:{capture.port}"
                                                   "?disable_ssl=true&disable_tls=true&timeout=10&retry_limit=1")
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


def config_of(text: str):
    return parse_config(tomllib.loads(text))


def claims(db) -> list[tuple]:
    return fetch(db, "SELECT incident_id, channel, event, seq, outcome FROM incident_notifications"
                     " ORDER BY notification_id")


@pytest.mark.airflow
def test_incidents_are_mailed_when_they_open_and_when_they_resolve(airflow_env, db, smtp):
    seed(db)
    write_config(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    dag = load_dag("reconcile_balances")
    assert [t.task_id for t in dag.topological_sort()] == ["reconcile_window", "notify_incidents"]

    run = dag.test(run_after=TO, logical_date=None)
    assert run.state == "success"
    assert len(smtp.messages) == 1
    first = smtp.messages[0]
    assert sorted(smtp.recipients[0]) == ["oncall@example.com", "treasury-ops@example.com"]
    assert first["From"] == "balances@example.com"
    # Seven incidents (tests/test_incidents.py SEEDED); the three already
    # resolved were never announced, so their end is not either.
    assert first["Subject"] == "[balances] 4 incidents opened"
    text = body(first)
    assert "formance_main user:1 USD/2" in text and "negative_balance" in text
    assert "formance_main treasury:hedera HBAR/8 vs hedera_mainnet 0.0.1234 HBAR" in text and "skew" in text
    assert "gap" not in text and "stale" not in text
    assert text.count("<tr>") == 1 + 4
    assert smtp.password not in smtp.raw[0]

    # The same problems found again: nothing sent.
    assert dag.test(run_after=TO + timedelta(minutes=1), logical_date=None).state == "success"
    assert len(smtp.messages) == 1

    # Half an hour later user:1 is still overdrawn (the same incident: no mail)
    # and user:2's available balance is back below its balance: resolved.
    snapshot(db, "formance_main", h(4.5), rows=[("user:1", "USD/2", "-700", 2), ("user:2", "USD/2", "1000", 2)])
    assert dag.test(run_after=h(4.5) + timedelta(minutes=1), logical_date=None).state == "success"
    assert smtp.subjects() == ["[balances] 4 incidents opened", "[balances] 1 resolved"]
    second = body(smtp.messages[1])
    assert "resolved" in second and "formance_main user:2 USD/2" in second and "user:1" not in second
    assert sorted(set(c[2:] for c in claims(db))) == [("opened", 0, "sent"), ("resolved", 0, "sent")]


@pytest.mark.airflow
def test_missing_smtp_connection_fails_the_task_with_one_line(airflow_env, db, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SMTP_NOWHERE", raising=False)
    seed(db)
    config_path = write_config(CONFIG + ALERTS.format(conn_id="smtp_nowhere"))
    config = load_config(config_path)
    reconcile(db, load_checks(config), FROM, TO)
    with pytest.raises(ConnectionMissing) as caught:
        notify_incidents(db, config)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("alerts.smtp_conn_id: Airflow connection 'smtp_nowhere' is not defined")
    assert "AIRFLOW_CONN_SMTP_NOWHERE" in message
    assert claims(db) == []

    run = load_dag("reconcile_balances").test(run_after=TO, logical_date=None)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"reconcile_window": "success", "notify_incidents": "failed"}


def test_a_failed_send_claims_nothing_and_the_next_run_sends(db, smtp, monkeypatch):
    seed(db)
    config = config_of(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    reconcile(db, load_checks(config), FROM, TO)
    good = os.environ["AIRFLOW_CONN_SMTP_ALERTS"]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", good.replace(f":{smtp.port}?", f":{free_port()}?"))
    with pytest.raises(Exception):
        notify_incidents(db, config)
    assert claims(db) == []
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", good)
    assert notify_incidents(db, config).opened == 4
    assert notify_incidents(db, config).total == 0
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
    ('[alerts]\nsubject_prefix = "x"', "alerts.smtp_conn_id: missing"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = []', "alerts.to: expected one or more e-mail addresses"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["a@example.com"]\nwebhook = "x"', "alerts.webhook: unknown key"),
    ('[alerts]\nslack_conn_id = ""', "alerts.slack_conn_id: expected an Airflow Connection id"),
    ('[alerts]\nslack_conn_id = "s"\nremind_every = "daily"', "alerts.remind_every: 'daily' is not a duration"),
    ('[alerts]\nslack_conn_id = "s"\nremind_every = 3600', "alerts.remind_every: expected a duration written"),
    ('[alerts]\nslack_conn_id = "s"\nflap_window = "-5m"', "alerts.flap_window: '-5m' is not a duration"),
    ('alerts = 3', "alerts: must be a table"),
])
def test_alerts_config_mistakes_name_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(table))
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("table, message", [
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["ops@example.com", "ops at example.com"]',
     "alerts.to[1]: 'ops at example.com' is not an e-mail address (local@domain, ASCII, no spaces or line breaks)"),
    ('[alerts]\nsmtp_conn_id = "s"\nto = ["ops@example.com"]\nfrom_email = 3',
     "alerts.from_email: 3 is not an e-mail address (local@domain, ASCII, no spaces or line breaks)"),
    ('[alerts]\nsmtp_conn_id = "s"', "alerts.to: expected one or more e-mail addresses, got None"),
    ('[alerts]\nslack_conn_id = "s"\nremind_every = "1 day"',
     "alerts.remind_every: '1 day' is not a duration such as 90s, 15m, 1h or 2d"),
    ('[alerts]\nslack_conn_id = "s"\nflap_window = "400d"', "alerts.flap_window: '400d' is longer than 366 days"),
    ('[alerts]\nslack_conn_id = "s"\nflap_window = 0',
     'alerts.flap_window: expected a duration written as a string such as "1h", got 0'),
    ('[alerts]\nslack_conn_id = "s"\nremind_evry = "1h"',
     "alerts.remind_evry: unknown key (did you mean 'remind_every'?) (known: flap_window, from_email, remind_every,"
     " slack_conn_id, smtp_conn_id, subject_prefix, to)"),
    ('[alerts]\nsmtp_conn_id = " "\nto = ["ops@example.com"]',
     "alerts.smtp_conn_id: missing (the Airflow SMTP Connection that sends alerts; or slack_conn_id alone)"),
])
def test_an_alerts_mistake_is_exactly_one_line(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(table))
    assert str(caught.value) == message


def test_alerts_settings_and_their_defaults():
    slack_only = config_of('[alerts]\nslack_conn_id = "slack_alerts"').alerts
    assert (slack_only.channels, slack_only.to, slack_only.remind_every, slack_only.flap_window) == \
        (["slack:slack_alerts"], (), timedelta(hours=24), timedelta(0))
    both = config_of(ALERTS.format(conn_id="m") + 'slack_conn_id = "s"\nremind_every = "0"\nflap_window = "1h30m"')
    assert (both.alerts.channels, both.alerts.remind_every, both.alerts.flap_window) == \
        (["smtp:m", "slack:s"], timedelta(0), timedelta(minutes=90))


def test_check_names_the_channels_and_the_settings(tmp_path):
    path = tmp_path / "balances.toml"
    path.write_text(LEDGER + ALERTS.format(conn_id="smtp_alerts") + 'slack_conn_id = "slack_alerts"\n'
                    'remind_every = "0"\nflap_window = "10m"\n')
    done = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(path), "check"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "  ok     alerts through smtp:smtp_alerts, slack:slack_alerts (mail to 2 recipient(s)), reminders never," \
           " flap_window 10 min\n" in done.stdout


def test_an_incident_the_per_break_alerts_reported_before_0014_is_not_mailed_again(db, smtp):
    seed(db)
    config = config_of(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    reconcile(db, load_checks(config), FROM, TO)
    # What the per-break alerts recorded: the negative balance was mailed an hour ago.
    fetch(db, """INSERT INTO break_notifications (break_id, notified_at, channels)
                 SELECT break_id, now() - interval '1 hour', '{smtp:smtp_alerts}' FROM reconciliation_breaks
                  WHERE kind = 'negative_balance' RETURNING break_id""")
    assert notify_incidents(db, config).opened == 3
    assert smtp.subjects() == ["[balances] 3 incidents opened"] and "negative_balance" not in body(smtp.messages[0])
    assert fetch(db, """SELECT b.kind, n.outcome FROM incident_notifications n
                          JOIN break_incidents b USING (incident_id) WHERE n.outcome = 'reported per break'""") == \
        [("negative_balance", "reported per break")]


# -- one problem over many snapshots --------------------------------------------------

def ledger(db, config, steps, broken, *, ack_at: int | None = None) -> None:
    """A snapshot every 15 minutes, users:005 below zero at ``broken`` steps; reconciled and alerted after each."""
    checks = load_checks(config)
    for n in steps:
        snapshot(db, "ledger", t(n), rows=[("users:005", "USD/2", "-100" if n in broken else "100", 2)])
        reconcile(db, checks, *default_window(t(n) + timedelta(minutes=1)), flap_window=config.alerts.flap_window)
        notify_incidents(db, config, now=t(n) + timedelta(minutes=2))
        if n == ack_at:
            (incident,) = fetch(db, "SELECT incident_id FROM break_incidents WHERE resolved_at IS NULL")[0]
            acknowledge(db, incident, "the client pays back on Monday", "alice")


@pytest.mark.parametrize("remind_every, ack_at, reminders", [
    ("6h", None, 4),     # 24 h 45 min open: reminders at 6, 12, 18 and 24 hours
    ("0", None, 0),      # never
    ("6h", 30, 1),       # the one at 6 hours, then acknowledged at 7 h 30: no more
])
def test_a_problem_lasting_100_snapshots_is_one_mail_when_it_opens_reminders_and_one_when_it_resolves(
        db, smtp, remind_every, ack_at, reminders):
    config = config_of(LEDGER + ALERTS.format(conn_id="smtp_alerts") + f'remind_every = "{remind_every}"\n')
    ledger(db, config, range(101), broken=set(range(100)), ack_at=ack_at)
    assert smtp.subjects() == ["[balances] 1 incident opened"] + ["[balances] 1 still open"] * reminders + \
        ["[balances] 1 resolved"]
    sent = fetch(db, "SELECT event, claimed_at FROM incident_notifications ORDER BY notification_id")
    assert [when for event, when in sent if event == "reminder"] == \
        [t(24 * k) + timedelta(minutes=2) for k in range(1, reminders + 1)]
    assert fetch(db, "SELECT count(*), count(DISTINCT incident_id) FROM reconciliation_breaks") == [(100, 1)]


@pytest.mark.parametrize("flap_window, subjects", [
    # Back 15 minutes after it ended, and again an hour after: three incidents, each announced.
    ("0", ["1 incident opened", "1 resolved", "1 incident opened", "1 resolved", "1 incident opened"]),
    # Within 30 minutes it is the same incident: its end is announced once it lasted 30 minutes.
    ("30m", ["1 incident opened", "1 resolved", "1 incident opened"]),
])
def test_flapping_follows_flap_window(db, smtp, flap_window, subjects):
    config = config_of(LEDGER + ALERTS.format(conn_id="smtp_alerts") + f'flap_window = "{flap_window}"\n')
    ledger(db, config, range(13), broken={0, 1, 2, 3, 5, 6, 7, 12})
    assert smtp.subjects() == [f"[balances] {s}" for s in subjects]
    if flap_window == "30m":
        # Its end was announced at 02:32, two steps after it ended at 02:00.
        assert fetch(db, "SELECT claimed_at FROM incident_notifications WHERE event = 'resolved'") == \
            [(t(10) + timedelta(minutes=2),)]


def test_a_stale_source_is_alerted_once_when_it_goes_stale_and_once_when_it_is_back(db, smtp):
    config = config_of(LEDGER + ALERTS.format(conn_id="smtp_alerts"))
    checks = load_checks(config)
    snapshot(db, "ledger", t(0))
    for n in [*range(1, 8), 8]:
        if n == 8:
            snapshot(db, "ledger", t(8))
        reconcile(db, checks, *default_window(t(n) + timedelta(minutes=1)))
        notify_incidents(db, config, now=t(n) + timedelta(minutes=2))
    stale = [s for s in smtp.subjects() if "stale" in s]
    assert stale == ["[balances] 2 incidents opened; stale source: ledger"]  # with the first missed run
    assert "resolved" in smtp.subjects()[-1]
    assert "stale" in body(smtp.messages[-1])


# -- crashes and races --------------------------------------------------------------------

def backend_pids(conn) -> set[int]:
    return {pid for (pid,) in fetch(conn, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                          " AND pid <> pg_backend_pid()")}


def test_the_database_connection_lost_between_the_send_and_the_commit_sends_once(db, database_url, smtp, caplog):
    seed(db)
    config = config_of(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    reconcile(db, load_checks(config), FROM, TO)
    notifier = connect(database_url)
    (pid,) = fetch(notifier, "SELECT pg_backend_pid()")[0]
    killed = []
    # The server has the message; before it answers, the notifier's session dies.
    smtp.on_data = lambda: killed.append(fetch(db, "SELECT pg_terminate_backend(%s)", (pid,))[0][0])
    with caplog.at_level(logging.WARNING, logger="reconciliation.alerts"):
        sent = notify_incidents(notifier, config)
    assert killed == [True] and notifier.closed
    assert sent.opened == 4 and len(smtp.messages) == 1
    assert "settling 4 claim(s) over a new one" in caplog.text
    assert {c[2:] for c in claims(db)} == {("opened", 0, "sent")}
    smtp.on_data = None
    assert notify_incidents(db, config).total == 0
    assert len(smtp.messages) == 1


KILLED_NOTIFIER = """
import sys
from loaders.db import connect
from pipeline.config import load_config
from reconciliation.alerts import SLACK_CLIENT_LOGGER, notify_incidents
conn = connect(sys.argv[1])
print(conn.get_backend_pid(), flush=True)
sys.stdin.readline()
notify_incidents(conn, load_config(sys.argv[2]))
print("the notifier was not stopped", flush=True)
"""


def test_a_process_killed_between_the_send_and_the_commit_never_sends_twice(db, database_url, smtp, tmp_path,
                                                                               caplog):
    seed(db)
    path = tmp_path / "balances.toml"
    path.write_text(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    config = load_config(path)
    reconcile(db, load_checks(config), FROM, TO)
    notifier = subprocess.Popen([sys.executable, "-c", KILLED_NOTIFIER, database_url, str(path)], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    pid = int(notifier.stdout.readline())
    # The server has the message; before it answers, the process sending it is killed.
    smtp.on_data = lambda: os.kill(notifier.pid, signal.SIGKILL)
    notifier.stdin.write("go\n")
    notifier.stdin.flush()
    assert notifier.wait(timeout=60) == -signal.SIGKILL
    smtp.on_data = None
    assert len(smtp.messages) == 1
    wait_for(lambda: pid not in backend_pids(db), what="the killed process's session to end")
    with caplog.at_level(logging.WARNING, logger="reconciliation.alerts"):
        assert notify_incidents(db, config).total == 0
    assert len(smtp.messages) == 1  # not sent again
    assert {c[2:] for c in claims(db)} == {("opened", 0, "in doubt")}
    assert caplog.text.count("may not have gone out") == 4
    # A later event of the same incident goes out as usual.
    snapshot(db, "formance_main", h(4.5), rows=[("user:1", "USD/2", "-700", 2), ("user:2", "USD/2", "1000", 2)])
    reconcile(db, load_checks(config), FROM, h(4.5))
    assert notify_incidents(db, config).resolved == 1 and len(smtp.messages) == 2


def test_two_reconciliation_runs_at_once_send_each_alert_once(db, database_url, smtp, monkeypatch):
    seed(db)
    config = config_of(CONFIG + ALERTS.format(conn_id="smtp_alerts") + 'slack_conn_id = "slack_alerts"\n')
    webhook = SlackWebhook()
    with FakeServer(webhook) as slack:
        monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", webhook.connection(slack.url))
        # Both runs choose their alerts at the same moment; the server is slow to answer.
        smtp.on_data = lambda: time.sleep(0.5)
        ready = threading.Barrier(2)
        results, errors = [], []

        def run() -> None:
            conn = connect(database_url)
            try:
                reconcile(conn, load_checks(config), FROM, TO)
                ready.wait(timeout=60)
                results.append(notify_incidents(conn, config))
            except BaseException as exc:
                errors.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    assert sorted(r.opened for r in results) == [4, 4] or sorted(r.opened for r in results) == [0, 8]
    assert len(smtp.messages) == 1 and len(webhook.messages) == 1
    assert fetch(db, "SELECT channel, count(*), count(DISTINCT incident_id) FROM incident_notifications"
                     " GROUP BY channel ORDER BY channel") == [("slack:slack_alerts", 4, 4), ("smtp:smtp_alerts", 4, 4)]


def test_alerts_chosen_before_another_runs_claim_committed_are_not_claimed_again(db, database_url):
    """The narrow case of two runs at once: one chooses its alerts from a snapshot taken before the
    other's claims committed, then locks the incidents the other has just let go."""
    from loaders.db import transaction
    from reconciliation.alerts import choose_due, claim, claim_due

    seed(db)
    config = config_of(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    reconcile(db, load_checks(config), FROM, TO)
    now = datetime.now(timezone.utc)
    late = connect(database_url)
    try:
        with transaction(late) as cur:
            chosen = choose_due(cur, config.alerts, "smtp:smtp_alerts", now)
        assert [event for _, event, _ in chosen] == ["opened"] * 4
        with transaction(db) as cur:
            assert len(claim_due(cur, config.alerts, "smtp:smtp_alerts", now)) == 4
        with transaction(late) as cur:
            assert claim(cur, "smtp:smtp_alerts", now, chosen) == []
    finally:
        late.close()
    assert fetch(db, "SELECT count(*) FROM incident_notifications") == [(4,)]


# -- Slack ----------------------------------------------------------------------------------

def test_slack_webhook_gets_the_same_alerts_with_secrets_masked(db, smtp, monkeypatch):
    webhook = SlackWebhook()
    with FakeServer(webhook) as slack:
        monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", webhook.connection(slack.url))
        # A provider's account id that Slack would turn into a mention of everyone.
        seed(db)
        snapshot(db, "formance_main", h(4.5), rows=[("user:1", "USD/2", "-700", 2), ("user:2", "USD/2", "1000", 2, "1500"),
                                                     ("<!channel> pay " + smtp.password, "USD/2", "-1", 2)])
        config = config_of(CONFIG + ALERTS.format(conn_id="smtp_alerts") + 'slack_conn_id = "slack_alerts"\n')
        reconcile(db, load_checks(config), FROM, TO)
        sent = notify_incidents(db, config)
        assert sent.channels == ("smtp:smtp_alerts", "slack:slack_alerts") and sent.opened == 2 * 5
        (message,) = webhook.messages
        text = message["text"]
        assert text.startswith("[balances] 5 incidents opened\n")
        assert text.count("\n• opened #") == 5
        assert "formance_main user:1 USD/2: since 2025-01-01T04:00:00+00:00, 2 break(s), worst difference -7.00" in text
        assert "&lt;!channel&gt; pay ***" in text and "<!channel>" not in text
        assert smtp.password not in text and webhook.secret not in text

        # The channel fails (the channel was archived): the mail already went,
        # the Slack alerts are claimed by nobody and go with the next run.
        # (Every account's problem ends; the pair and the totals go on.)
        snapshot(db, "formance_main", h(5.5), rows=[])
        reconcile(db, load_checks(config), FROM, h(5.5))
        webhook.archived = True
        with pytest.raises(Exception, match="channel_is_archived") as caught:
            notify_incidents(db, config)
        assert webhook.secret not in str(caught.value)
        assert smtp.subjects()[-1] == "[balances] 3 resolved"
        webhook.archived = False
        assert notify_incidents(db, config).channels == ("slack:slack_alerts",)
        assert webhook.messages[-1]["text"].startswith("[balances] 3 resolved\n")
    # Nobody answers any more: slack_sdk logs the request, URL included, as it retries.
    snapshot(db, "formance_main", h(6.5), rows=[("user:1", "USD/2", "-700", 2)])
    reconcile(db, load_checks(config), FROM, h(6.5))
    heard = Heard()
    slack_log = logging.getLogger(SLACK_CLIENT_LOGGER)
    slack_log.addHandler(heard)
    try:
        with pytest.raises(Exception) as caught:
            notify_incidents(db, config)
    finally:
        slack_log.removeHandler(heard)
    logged = "\n".join(heard.lines)
    assert "A retry handler found" in logged  # the line that names the URL
    assert webhook.secret not in logged and webhook.secret not in str(caught.value)


class Heard(logging.Handler):
    """Every line logged where it is attached (the test's own, whatever Airflow did to the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# -- the CLI, the README, the demo ------------------------------------------------------------

def test_cli_reconcile_sends_the_alerts_and_no_alerts_skips_them(db, database_url, smtp, tmp_path):
    seed(db)
    path = tmp_path / "balances.toml"
    path.write_text(CONFIG + ALERTS.format(conn_id="smtp_alerts"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(BALANCES_DB_URL=database_url, AIRFLOW_CONN_SMTP_ALERTS=os.environ["AIRFLOW_CONN_SMTP_ALERTS"])
    args = [sys.executable, "-m", "cli.main", "--config", str(path), "reconcile", "--from", FROM.isoformat(),
            "--to", TO.isoformat()]
    skipped = subprocess.run(args + ["--no-alerts"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert "incidents: 4 unresolved" in skipped.stdout
    assert "alerts: none sent (--no-alerts)" in skipped.stdout and smtp.messages == []
    sent = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.splitlines()[-1] == "alerts: 4 opened, 0 reminder(s), 0 resolved, sent through smtp:smtp_alerts"
    assert smtp.subjects() == ["[balances] 4 incidents opened"]
    again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert again.stdout.splitlines()[-1] == "alerts: 0 opened, 0 reminder(s), 0 resolved: nothing due"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key: what a user's own CA would have signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_readme_alerts_block_as_typed(db, database_url, tmp_path):
    """Port 587 with STARTTLS and a login, as a mail provider offers it; the server's certificate is
    one the user's machine trusts (here through SSL_CERT_FILE). The last hour of a source whose
    users:005 is overdrawn at every snapshot: one incident, one mail."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    capture, controller = start_smtp(tls_context=context)
    try:
        quarter = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        quarter -= timedelta(minutes=quarter.minute % 15)
        start = quarter - timedelta(minutes=45)
        for n in range(4):
            snapshot(db, "ledger", start + timedelta(minutes=15 * n), rows=[("users:005", "USD/2", "-1500", 2)])
        config = tmp_path / "balances.toml"
        config.write_text(LEDGER.replace("start_date = 2025-03-01", f"start_date = {start.isoformat()}")
                          + ALERTS.format(conn_id="smtp_alerts"))
        home = tmp_path / "home"
        home.mkdir()
        env = user_env(home, BALANCES_CONFIG=str(config), BALANCES_DB_URL=database_url, SSL_CERT_FILE=str(cert))
        block = documented_blocks(README)["alerts"]
        done = run_block(block, REPO, env, timeout=300, substitutions={
            "USER:PASSWORD@smtp.example.com:587": f"{SMTP_USER}:{capture.password}@127.0.0.1:{capture.port}"})
    finally:
        controller.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith("incidents: 1 unresolved ('balances incidents' lists them)\n"
                                "alerts: 1 opened, 0 reminder(s), 0 resolved, sent through smtp:smtp_alerts\n")
    assert capture.subjects() == ["[balances] 1 incident opened"]
    assert "ledger users:005 USD/2" in body(capture.messages[0])
    assert capture.password not in capture.raw[0]


def test_ten_minutes_of_the_live_demo_mail_the_overdrawn_account_once(db, smtp, monkeypatch, tmp_path):
    """``scripts/demo --serve --alerts-smtp``'s books, checks and [alerts], a snapshot of the ledger and then
    of the slower mirror node every minute, each followed by a reconciliation and its alerts, as the
    scheduler runs them; an hour in the past, so the minutes need not be waited for (the ledger is read
    through its v2 API, which answers for a past time; the demo's v1 reads the present only)."""
    from devtools.demo import DEMO_CHECKS, demo_alerts, write_sources
    from pipeline.snapshot import take_snapshot
    from sandbox import apps, live
    from sandbox.formance import LiveFormance
    from sandbox.hedera import LiveHedera

    start = live.minute_now() - 60
    clock = [start]
    books = {"formance": LiveFormance(clock=lambda: clock[0]),
             "hedera": LiveHedera(page_delay=0, clock=lambda: clock[0])}
    servers = {name: FakeServer(app).start() for name, app in books.items()}
    try:
        sources = {}
        for name, server in servers.items():
            keys = live.live_source(name, server.url)
            keys.update(backoff_base=0.01, rate_limit=1000, start_date=datetime.fromtimestamp(start * 60, timezone.utc))
            if name == "formance":
                keys["api"] = "v2"
            sources[f"{name}_sandbox"] = keys
            if apps.sandbox(name).DEMO_CONNECTION:
                conn_id, uri = apps.sandbox(name).DEMO_CONNECTION
                monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)
        table, connection = demo_alerts(f"127.0.0.1:{smtp.port}")
        for variable, uri in connection.items():
            monkeypatch.setenv(variable, uri)
        checks = DEMO_CHECKS[:DEMO_CHECKS.index("[checks.bitfront_continuity]")]  # BitFront reports the present only
        path = tmp_path / "balances.toml"
        write_sources(path, sources, checks + table)
        config = load_config(path)
        for minute in range(start, start + 10):
            clock[0] = minute
            at = datetime.fromtimestamp(minute * 60, timezone.utc)
            for offset, name in enumerate(("formance_sandbox", "hedera_sandbox"), 1):
                source = config.sources[name]
                summary = take_snapshot(db, source, at, credentials=connections.credentials(source.conn_id))
                assert summary["status"] == "published", summary
                now = at + timedelta(seconds=20 * offset)
                reconcile(db, load_checks(config), *default_window(now), flap_window=config.alerts.flap_window)
                notify_incidents(db, config, now=now)
    finally:
        for server in servers.values():
            server.stop()
    overdrawn = [body(m) for m in smtp.messages if "users:005" in body(m)]
    assert len(overdrawn) == 1 and "<td>opened</td>" in overdrawn[0]
    assert fetch(db, "SELECT count(*) FROM reconciliation_breaks WHERE kind = 'negative_balance'") == [(10,)]
    print(f"\n10 simulated minutes: {len(smtp.messages)} mail(s): {smtp.subjects()}")
