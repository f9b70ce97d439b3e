"""The Superset dashboard in a real browser: Debian's headless Chromium via chromedriver.

Real snapshots of the moving sandboxes (Hedera at three past minutes, the
ledger twice, the others now), the movements of Hedera's windows and a
reconciliation after each ledger snapshot fill the database; Superset (its own virtualenv,
``scripts/superset``) imports ``dashboards/export`` reading the views as a
``balances_reader`` login; the browser logs in, opens the dashboard and
waits for the charts to show the data: the overdrawn account's incident as
one row with its first and last check time and its two breaks, incidents
opened per day, an exact balance beyond float precision, every source's
freshness. The screenshot is kept (``$BALANCES_DASHBOARD_SCREENSHOT``, else
the test's temporary directory).
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from psycopg2 import sql

from pipeline import connections, movements
from reconciliation.checks import load_checks
from pipeline.config import parse_config, parse_source
from devtools.demo import DEMO_CHECKS, write_sources
from reconciliation.reconcile import reconcile
from pipeline.snapshot import take_snapshot
from sandbox import apps, live
from sandbox.server import FakeServer
from extractors.records import BalanceRow
from tests.conftest import REPO, fetch, with_login
from tests.entry_points import documented_blocks, run_block
from tests.test_hostile_ids import HOSTILE, SOURCE as HOSTILE_SOURCE
from tests.test_views import publish_snapshot

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RENDER_TIMEOUT = 120


@pytest.fixture(scope="module")
def superset_venv() -> Path:
    """scripts/superset: installs only when dashboards/requirements.txt changed."""
    result = subprocess.run([str(REPO / "scripts" / "superset")], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    from devtools.superset import venv

    return venv()


def load_demo_data(db, tmp_path: Path) -> None:
    servers = []
    sources = {}
    try:
        for name in apps.available():
            server = FakeServer(live.live_app(name)).start()
            servers.append(server)
            keys = live.live_source(name, server.url)
            keys.update(backoff_base=0.01, rate_limit=1000)
            sources[f"{name}_sandbox"] = keys
            connection = apps.sandbox(name).DEMO_CONNECTION
            if connection:
                os.environ[f"AIRFLOW_CONN_{connection[0].upper()}"] = connection[1]
        if "hedera_sandbox" in sources:
            servers[0].app.page_delay = 0
        now = datetime.now(timezone.utc)
        for keys in sources.values():
            keys["start_date"] = now - timedelta(minutes=1)
        minutes = {"hedera": (6, 3, 0), "formance": (1, 0)}
        # History written before ids were checked, holding markup (tests/test_hostile_ids.py): the
        # dashboard must show it as text, never as a live link or image.
        publish_snapshot(db, HOSTILE_SOURCE, now - timedelta(minutes=2),
                         [BalanceRow(HOSTILE, "BIG", 10**15, decimals=0)])
        config = tmp_path / "balances.toml"
        write_sources(config, sources, DEMO_CHECKS)
        checks = load_checks(parse_config(tomllib.loads(config.read_text()), config))
        for name, keys in sources.items():
            source = parse_source(name, dict(keys))
            for m in minutes.get(keys["provider"], (0,)):
                at = now - timedelta(minutes=m)
                summary = take_snapshot(db, source, at, credentials=connections.credentials(source.conn_id))
                assert summary["status"] == "published", summary
                if keys["provider"] == "formance":
                    # The ledger reads the present: its two snapshots are a moment apart.
                    reconcile(db, checks, now - timedelta(minutes=10), datetime.now(timezone.utc))
                    time.sleep(1)
            if keys["provider"] == "hedera":  # the statement's rows: Hedera's windows
                loaded = movements.load_windows(db, source, movements.missing_windows(db, source),
                                                credentials=connections.credentials(source.conn_id))
                assert loaded and all(w["status"] == "published" for w in loaded), loaded
        reconcile(db, checks, now - timedelta(minutes=10), now + timedelta(seconds=30))
    finally:
        for server in servers:
            server.stop()


def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                f"--user-data-dir={profile}", "--window-size=1600,2100"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, condition, what: str, timeout: float = RENDER_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition(driver)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not shown within {timeout:.0f}s; page text: "
                                 + driver.find_element("tag name", "body").text[:1500])
        time.sleep(1)


def log_in(driver, superset, attempts: int = 3) -> None:
    """Log in through Superset's form, as a user does; again if the form comes back.

    Leaving the login page, Superset's event logger posts what it logged;
    that post goes out with the anonymous session, and when its answer
    arrives after the login's it sets the anonymous session's cookie again,
    undoing the login (seen once in CI: POST /login/ 302, the logger's post
    302, /superset/welcome/ 302 to /login/). A user logs in again; so does
    this, at most ``attempts`` times.
    """
    for attempt in range(1, attempts + 1):
        driver.get(f"{superset.url}/login/")
        wait_for(driver, lambda d: d.find_elements("id", "password"), "the login form")
        driver.find_element("id", "username").send_keys(superset.login)
        driver.find_element("id", "password").send_keys(superset.password)
        driver.find_element("css selector", "button[type=submit]").click()
        try:
            wait_for(driver, lambda d: "/login" not in d.current_url, "the page after logging in",
                     timeout=RENDER_TIMEOUT / attempts)
            return
        except AssertionError:
            if attempt == attempts:
                raise


def test_dashboard_shows_the_demo_data_in_a_browser(db, database_url, superset_venv, tmp_path):
    from devtools.superset import SupersetServer

    # Not a skip: CI must not pass without the browser (.ci/run installs it).
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "Debian's browser is missing: apt-get install -y chromium chromium-driver"

    load_demo_data(db, tmp_path)
    ((subject, opened_at, last_seen, breaks, worst),) = fetch(db, """
        SELECT subject_label, opened_at, last_seen, breaks, worst_difference_text FROM reconciliation_incidents
         WHERE status = 'open' AND kind = 'negative_balance'""")
    assert breaks == 2 and opened_at < last_seen  # one incident for the overdraft seen twice
    (big,) = fetch(db, "SELECT balance_text FROM balance_latest ORDER BY balance_units DESC LIMIT 1")[0]
    assert len(big.replace(".", "")) > 17  # beyond what a float carries exactly
    sources = [s for (s,) in fetch(db, "SELECT source FROM source_freshness ORDER BY source")]
    # The statement's first row as the table orders it: its opening balance is shown nowhere else.
    (paid,) = fetch(db, """SELECT opening_text FROM balance_rollforward
                            WHERE inflow <> 0 OR outflow <> 0 OR status <> 'explained'
                            ORDER BY unexplained_units DESC, period_end DESC, account, asset LIMIT 1""")[0]
    assert fetch(db, "SELECT DISTINCT status FROM balance_rollforward WHERE source = 'hedera_sandbox'") == [
        ("explained",)]

    started = time.monotonic()
    superset = SupersetServer.start(superset_venv, tmp_path / "superset", database_url)
    ready = time.monotonic() - started
    driver = browser(tmp_path)
    try:
        log_in(driver, superset)
        driver.get(f"{superset.url}{superset.dashboard_path}")

        text = lambda d: d.find_element("tag name", "body").text  # noqa: E731
        row = wait_for(driver, lambda d: d.find_elements("xpath", f"//tr[td[normalize-space() = '{subject}']]"),
                       f"the incident of {subject!r}")
        assert [td.text for td in row[0].find_elements("tag name", "td")][:8] == [
            "open", "formance_continuity", "negative_balance", subject, f"{opened_at:%Y-%m-%d %H:%M:%S}",
            f"{last_seen:%Y-%m-%d %H:%M:%S}", "2", worst]
        wait_for(driver, lambda d: big in text(d), f"the exact balance {big}")
        wait_for(driver, lambda d: all(s in text(d) for s in sources), f"the freshness of {sources}")
        # Superset draws a chart once it is scrolled into view: the statement sits below the others.
        scrolled = lambda d: d.execute_script("document.querySelectorAll('.dashboard-content, .grid-container, "  # noqa: E731
                                              "[data-test=dashboard-content-wrapper]').forEach(e => e.scrollTop = "
                                              "e.scrollHeight); window.scrollTo(0, document.body.scrollHeight);")
        wait_for(driver, lambda d: scrolled(d) or paid in text(d), f"the roll-forward's first opening balance {paid}")
        # The five time charts draw on canvases (ECharts), once their data arrived.
        wait_for(driver, lambda d: scrolled(d) or len(d.find_elements("css selector", ".chart-container canvas")) >= 5,
                 "five rendered time charts")
        driver.execute_script("window.scrollTo(0, 0);")
        body = text(driver)
        for title in ("Balance of a holding over time", "Latest balances (exact)", "Source freshness",
                      "Incidents opened per day", "Snapshot runs", "Incidents: open, acknowledged",
                      "Roll-forward statement", "Unexplained balance changes over time",
                      "Pair check treasury_hbar"):
            assert title in body
        assert "Unexpected error" not in body and "No results were returned" not in body
        # The hostile id is on the page as its text, and not one link or image came from it.
        wait_for(driver, lambda d: "Session expired: log in</a>" in text(d), "the hostile id, as text")
        planted = driver.find_elements("css selector", "a[href*='phish.example'], img[src*='beacon.example']")
        assert planted == []
        time.sleep(2)  # animations settle before the picture
        shot = Path(os.environ.get("BALANCES_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
        superset.stop()
    print(f"\ndashboard: Superset ready in {ready:.0f}s, rendered in {time.monotonic() - started - ready:.0f}s;"
          f" screenshot {shot}")


def test_import_against_a_database_without_the_views_is_one_line(db, database_url):
    empty = "balances_dashboard_empty"
    db.autocommit = True
    with db.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(empty)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(empty)))
    db.autocommit = False
    url = database_url.rsplit("/", 1)[0] + "/" + empty
    out = Path(tempfile.mkdtemp()) / "bundle.zip"
    try:
        result = subprocess.run([sys.executable, str(REPO / "dashboards" / "build.py"), "bundle", "--db-url", url,
                                 "--out", str(out)], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    assert result.returncode == 1
    assert result.stderr == (f"dashboards: the database '{empty}' has no view balance_history_units:"
                             " run 'balances migrate' on it first\n")
    assert not out.exists()


def test_import_into_an_existing_superset_as_typed(db, database_url, superset_venv, tmp_path):
    """README's "Into an existing Superset" block, with a running Superset as the existing one."""
    from devtools.superset import SupersetServer

    lines = documented_blocks(REPO / "README.md")["superset-import"].splitlines()
    superset = SupersetServer.start(superset_venv, tmp_path / "superset", database_url, dashboard=False)
    try:
        env = {k: v for k, v in superset.env.items() if not k.startswith("BALANCES_")}
        env["BALANCES_DB_URL"] = database_url  # the operator's own login makes the reader login
        env["PATH"] = f"{superset_venv / 'bin'}:{env['PATH']}"
        made = run_block(lines[0], REPO, env)
        assert made.returncode == 0, made.stderr
        password = re.search(r"^password: (\S+)$", made.stdout, re.M).group(1)
        where = with_login(database_url, "x", "y").split("@", 1)[1]  # host:port/database
        done = run_block("\n".join(lines[1:]), REPO, env,
                         substitutions={"PASSWORD": password, "HOST:5432/balances": where}, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert (REPO / "balances.zip").stat().st_mode & 0o777 == 0o600  # it holds the login's password
        # The dashboard's database now reads as the new login.
        metadata = sqlite3.connect(env["SUPERSET_METADATA_URL"].removeprefix("sqlite:///"))
        uris = [u for (u,) in metadata.execute("SELECT sqlalchemy_uri FROM dbs")]
        slugs = [d for (d,) in metadata.execute("SELECT slug FROM dashboards")]
        metadata.close()
        assert slugs == ["balances"] and any("superset_reader" in u for u in uris), (slugs, uris)
    finally:
        superset.stop()
        (REPO / "balances.zip").unlink(missing_ok=True)
        from loaders.readers import drop_reader

        drop_reader(db, "superset_reader")
