"""One hostile id carried through every surface that shows provider text.

``HOSTILE`` is an account id built to do harm wherever it is shown as
anything but data: an HTML link and a remote image (phishing and a beacon
in a dashboard or a report), a mathtext expression matplotlib cannot parse
(the report's chart), a newline opening a Markdown heading, an ANSI escape
that clears a terminal. Each surface gets one test:

* the snapshot: a provider sending it (or a NUL, a lone surrogate, 3,000
  characters) gets a rejected record (``invalid_id``) that counts against
  ``max_rejected``, never a failed run;
* every other surface (views, report.html, report.md, the PNG chart, the
  alert mail, the CLI, the Superset dashboard in ``tests/test_dashboard.py``)
  is shown it as history written before ids were checked: the row is
  published through staging directly, and each surface must show it as text.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from extractors.credentials import Credentials
from extractors.records import BalanceRow, Page, id_problem
from loaders.rejections import RejectedRecordsError
from pipeline.snapshot import take_snapshot
from sandbox.formance import FormanceStack, Ledger
from tests.conftest import REPO, fetch, make_source
from tests.test_alerts import smtp  # noqa: F401  (the capturing SMTP server, a fixture)
from tests.test_views import publish_snapshot

HOSTILE = ("users:$\\notacommand{x}$<a href=https://phish.example style=\"position:fixed;top:0\">Session "
           "expired: log in</a><img src=https://beacon.example/x.png>\n## injected heading\x1b[2J")
SOURCE = "hostile_src"
CLIENT, SECRET = "hostile-client", "hostile-secret-value-77c1"


def hostile_history(db) -> datetime:
    """A snapshot holding HOSTILE: the largest account (so charts draw it), and overdrawn (so it is a break)."""
    as_of = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    publish_snapshot(db, SOURCE, as_of, [BalanceRow(HOSTILE, "BIG", 10**15, decimals=0),
                                         BalanceRow(HOSTILE, "USD/2", -500, decimals=2),
                                         BalanceRow("users:plain", "BIG", 5, decimals=0)])
    return as_of


CHECKS = f"""
[sources.{SOURCE}]
provider = "hedera"
base_url = "http://127.0.0.1:9"

[checks.hostile_negative]
kind = "continuity"
source = "{SOURCE}"
"""


def reconciled(db, tmp_path) -> None:
    """The continuity check turns the overdrawn hostile holding into an open break."""
    from pipeline.config import load_config
    from reconciliation.checks import load_checks
    from reconciliation.reconcile import reconcile

    config = tmp_path / "hostile.toml"
    config.write_text(CHECKS)
    now = datetime.now(timezone.utc)
    reconcile(db, load_checks(load_config(config)), now - timedelta(hours=1), now)
    assert fetch(db, "SELECT count(*) FROM reconciliation_breaks WHERE status = 'open'"
                     " AND subject->>'account' = %s", (HOSTILE,)) == [(1,)]


# -- ingest ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, why", [
    (HOSTILE, "address pattern"), ("users:\x00nul", "address pattern"), ("users:\ud800", "address pattern"),
    ("users:" + "a" * 3000, "3006 bytes of UTF-8, more than 512"),  # the server's pattern, but not our index
])
def test_a_provider_sending_a_hostile_id_gets_a_rejected_record_not_a_failed_run(db, serve, bad, why):
    app = FormanceStack({"main": Ledger.of(datetime(2024, 5, 1, tzinfo=timezone.utc),
                                           {"world": {"USD/2": -150}, "users:001": {"USD/2": 100},
                                            bad: {"USD/2": 50}})}, clients={CLIENT: SECRET})
    server = serve(app)
    source = make_source("hostile_formance", provider="formance", base_url=server.url, ledger="main",
                         max_rejected=1, allow_empty=False)
    summary = take_snapshot(db, source, datetime.now(timezone.utc), credentials=Credentials(CLIENT, SECRET))
    assert summary["status"] == "published", summary
    assert summary["rejected"] == 1
    stored = fetch(db, "SELECT account FROM balance_history WHERE source = 'hostile_formance' ORDER BY account")
    assert stored == [("users:001",), ("world",)]
    [(code, reason, raw)] = fetch(db, "SELECT reason_code, reason, raw FROM rejected_records")
    assert code == "invalid_id" and why in reason
    assert "\x00" not in raw and "\x00" not in reason  # storable, whatever was sent


def test_a_hostile_id_counts_against_max_rejected(db, serve):
    app = FormanceStack({"main": Ledger.of(datetime(2024, 5, 1, tzinfo=timezone.utc),
                                           {"world": {"USD/2": -50}, HOSTILE: {"USD/2": 50}})},
                        clients={CLIENT: SECRET})
    source = make_source("hostile_formance", provider="formance", base_url=serve(app).url, ledger="main")
    with pytest.raises(RejectedRecordsError, match="1 record.s. rejected, more than the 0"):
        take_snapshot(db, source, datetime.now(timezone.utc), credentials=Credentials(CLIENT, SECRET))
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


@pytest.mark.parametrize("account, asset, problem", [
    ("ok", "A\x00B", "holds '\\x00'"), ("ok\n", "X", "holds '\\n'"), ("\u202eevil", "X", "holds '\\u202e'"),
    ("x" * 513, "X", "513 bytes"), ("é" * 257, "X", "514 bytes"), ("", "X", "not a non-empty string"),
])
def test_the_records_layer_rejects_unsafe_ids_for_every_provider(account, asset, problem):
    page = Page(as_of=datetime.now(timezone.utc), as_of_raw="t",
                rows=[BalanceRow("good", "X", 1), BalanceRow(account, asset, 2)])
    page.reject_bad_ids()
    assert page.rows == [BalanceRow("good", "X", 1)]
    [rejection] = page.rejected
    assert rejection.code == "invalid_id" and problem in rejection.reason
    assert id_problem("x" * 512, "account") is None and id_problem("é" * 256, "account") is None


@pytest.mark.parametrize("account", ["0.0.1", "x" * 512, "x" * 513, "a b", "del\x7f", "é", "\u00a0", "", 5, None])
def test_a_page_of_plain_ids_is_judged_as_each_id_alone(account):
    # reject_bad_ids checks a page of printable ASCII ids at once; the verdict must be id_problem's.
    page = Page(as_of=datetime.now(timezone.utc), as_of_raw="t",
                rows=[BalanceRow("0.0.2", "HBAR", 1), BalanceRow(account, "HBAR", 2)])
    page.reject_bad_ids()
    assert len(page.rows) == (2 if id_problem(account, "account") is None else 1)


# -- surfaces -------------------------------------------------------------------------------------

def test_views_give_the_id_back_exactly_as_data(db, reader):
    hostile_history(db)
    with reader.cursor() as cur:
        cur.execute("SELECT DISTINCT account FROM balance_latest WHERE source = %s ORDER BY 1", (SOURCE,))
        accounts = [a for (a,) in cur.fetchall()]
    reader.rollback()
    assert accounts == [HOSTILE, "users:plain"]  # byte for byte: stored safely, not altered


def report_files(db, database_url, tmp_path) -> dict[str, bytes]:
    hostile_history(db)
    reconciled(db, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "BALANCES_"))}
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "cli.main", "--db-url", database_url, "report", "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # before: exit 1, mathtext could not parse the label
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_report_html_shows_the_id_as_text(db, database_url, tmp_path):
    page = report_files(db, database_url, tmp_path)["report.html"].decode()
    assert "&lt;a href=https://phish.example" in page and "&lt;img src=https://beacon.example" in page
    assert "<a " not in page and "<img src=https" not in page and "\x1b" not in page


def test_report_markdown_shows_the_id_as_text(db, database_url, tmp_path):
    from markdown_it import MarkdownIt

    text = report_files(db, database_url, tmp_path)["report.md"].decode()
    assert "\x1b" not in text
    assert not any(line.startswith("## injected") for line in text.splitlines())
    rendered = MarkdownIt("commonmark").enable("table").render(text)
    assert "<a " not in rendered and "<img src=\"https://beacon" not in rendered and "<h2>injected" not in rendered
    assert "&lt;img src=https://beacon.example/x.png&gt;" in rendered  # shown, as text


def test_report_chart_draws_the_id_as_a_plain_label(db, database_url, tmp_path):
    files = report_files(db, database_url, tmp_path)
    chart = files[f"balances_{SOURCE}.png"]
    assert chart.startswith(b"\x89PNG") and len(chart) > 5_000


def test_alert_mail_shows_the_id_as_text(db, tmp_path, smtp):  # noqa: F811 (the fixture)
    from pipeline.config import parse_config
    from reconciliation.alerts import notify_incidents

    hostile_history(db)
    reconciled(db, tmp_path)
    config = parse_config({"sources": {}, "alerts": {"smtp_conn_id": "smtp_alerts", "to": ["ops@example.com"],
                                                     "from_email": "balances@example.com"}})
    assert notify_incidents(db, config, {}).opened >= 1
    [message] = smtp.messages
    html_part = message.get_body(("html",)).get_content()
    assert "&lt;img src=https://beacon.example" in html_part and "<img src=https" not in html_part
    assert "<a href=https://phish" not in html_part and "\x1b" not in html_part


def test_cli_shows_the_id_with_control_characters_escaped(db, database_url, tmp_path):
    hostile_history(db)
    reconciled(db, tmp_path)
    config = tmp_path / "hostile.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "BALANCES_"))}
    for args in (["latest", SOURCE], ["reconcile", "--check", "hostile_negative"]):
        done = subprocess.run([sys.executable, "-m", "cli.main", "--db-url", database_url, "--config",
                               str(config), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout  # shown escaped (or cut off with the rest of a long id)
        assert [line for line in done.stdout.splitlines() if "phish.example" in line]
        assert not re.search(r"^## injected", done.stdout, re.M)  # the newline did not start a line


