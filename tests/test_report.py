"""The balances report: files, charts and the open breaks in them."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from reconciliation.checks import load_checks
from pipeline.config import parse_config
from reconciliation.reconcile import reconcile
from reconciliation.report import write_report
from tests.conftest import REPO, fetch
from tests.test_reconcile import CONFIG, FROM, TO, h, seed

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_shows_balances_and_open_breaks(db, database_url, tmp_path):
    seed(db)
    reconcile(db, load_checks(parse_config(tomllib.loads(CONFIG))), FROM, TO)
    # A resolved break is not an open one: it must not appear.
    with db.cursor() as cur:
        cur.execute("UPDATE reconciliation_breaks SET status = 'resolved', resolved_at = now()"
                    " WHERE kind = 'negative_balance'")
    db.commit()

    paths = write_report(database_url, tmp_path / "out", FROM, TO)
    html_path, md_path, *charts = paths
    assert [p.name for p in paths] == ["report.html", "report.md", "balances_formance_main.png",
                                       "balances_hedera_mainnet.png"]
    for chart in charts:
        assert chart.read_bytes().startswith(PNG) and chart.stat().st_size > 5000
    from markdown_it import MarkdownIt

    html, md = html_path.read_text(), md_path.read_text()
    # The Markdown as a reader sees it (every punctuation character of its text is escaped).
    shown = MarkdownIt("commonmark").enable("table").render(md)
    for text in (html, shown):
        assert "7 open break(s)." in text
        assert "balances_formance_main.png" in text and "balances_hedera_mainnet.png" in text
        assert "treasury_hbar" in text and "available_above_balance" in text
        # Exact values, never floats or exponents.
        assert "0.99000000" in text and "0.01000000" in text and "0.00000005" in text
        assert "5E-8" not in text and "negative_balance" not in text
    # The pair break belongs to both sources' sections.
    assert shown.count("<td>treasury_hbar</td>\n<td>mismatch</td>") == 2
    assert html.count("<td>treasury_hbar</td><td>mismatch</td>") == 2


def test_cli_report_prints_the_paths(db, database_url, tmp_path):
    seed(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(BALANCES_DB_URL=database_url)
    result = subprocess.run([sys.executable, "-m", "cli.main", "report", "--out", str(tmp_path),
                             "--from", FROM.isoformat(), "--to", h(1).isoformat()],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.split()]
    assert printed == [tmp_path / "report.html", tmp_path / "report.md",
                       tmp_path / "balances_formance_main.png", tmp_path / "balances_hedera_mainnet.png"]
    assert all(p.exists() for p in printed)
    assert "0 open break(s)." in (tmp_path / "report.md").read_text()
    assert fetch(db, "SELECT count(*) FROM reconciliation_runs") == [(0,)]
