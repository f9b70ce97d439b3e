"""CoreLedger TEOS: extractor and pipeline against the fake, into Postgres."""
from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import unquote

import pytest

from extractors.coreledger import Settings, balances_path, decimals_of, plan_batches
from extractors.credentials import Credentials
from extractors.errors import HistoryUnavailable, ProviderError
from pipeline.config import ConfigError
from pipeline.snapshot import RejectedRecordsError, take_snapshot
from sandbox.coreledger import (
    DEMO_ADDRESSES,
    DEMO_ASSETS,
    SANDBOX_API_KEY,
    Asset,
    TeosApi,
    demo_app,
    parse_call,
)
from sandbox.server import Fault, json_response
from tests.conftest import fetch, make_source

CREDENTIALS = Credentials(password=SANDBOX_API_KEY)
GOLD, FRANC, WINE = (a.id for a in DEMO_ASSETS)
ODD = "0xAb'c,d)]/é ?#%'"  # a quote to double and characters that must be encoded


def now() -> datetime:
    return datetime.now(timezone.utc)


def teos_source(server, **keys):
    keys.setdefault("addresses", list(DEMO_ADDRESSES))
    keys.setdefault("unique_asset_ids", [a.id for a in DEMO_ASSETS])
    keys.setdefault("rate_limit", 1000.0)  # the documented 5/s would only slow the tests down
    return make_source("teos_test", provider="coreledger", base_url=server.url, conn_id="teos_test", **keys)


def history(db):
    return fetch(db, "SELECT account, asset, balance, decimals, spark_factor, as_of FROM balance_history"
                     " WHERE source = 'teos_test' ORDER BY account, asset")


def balance_calls(server):
    return [r for r in server.requests if "GetAssetsBalances" in r.path]


def requested_pairs(server) -> Counter:
    pairs: Counter = Counter()
    for request in balance_calls(server):
        _, args = parse_call(unquote(request.path).split("/Balances/", 1)[1])
        pairs.update((a, s) for a in args["addresses"] for s in args["uniqueassetids"])
    return pairs


def test_demo_grid_lands_exactly_with_spark_factors(db, serve):
    app = demo_app()
    server = serve(app)
    before = now()
    summary = take_snapshot(db, teos_source(server), before, credentials=CREDENTIALS)
    assert summary["status"] == "published" and summary["rows"] == 12
    rows = history(db)
    assert len(rows) == 12
    by_pair = {(r[0], r[1]): r for r in rows}
    treasury = by_pair[(DEMO_ADDRESSES[0], FRANC)]
    assert treasury[2] == Decimal("98765432109876543210987") and treasury[3:5] == (2, Decimal(100))
    assert by_pair[(DEMO_ADDRESSES[1], GOLD)][2:5] == (Decimal(50001), 6, Decimal(1000000))
    # 750 Sparks a bottle: no decimals, but the factor is kept and divides exactly.
    assert by_pair[(DEMO_ADDRESSES[1], WINE)][2:5] == (Decimal(18375), None, Decimal(750))
    units = fetch(db, "SELECT balance / spark_factor FROM balance_history WHERE account = %s AND asset = %s",
                  (DEMO_ADDRESSES[1], WINE))
    assert units[0][0] == Decimal("24.5")
    # No history: the snapshot time is the time of the fetch.
    assert {r[5] for r in rows} == {summary["as_of"]}
    assert before <= summary["as_of"] <= now()
    assert all(r.header("authorization") == f"Bearer {SANDBOX_API_KEY}" for r in server.requests)
    assert app.hits[f"/odata/v1.1/Assets('{WINE}')"] == 1


@pytest.mark.parametrize("shape", ["array", "value"])
def test_bare_array_and_value_wrapper_are_both_read(db, serve, shape):
    app = demo_app()
    app.shape = shape
    server = serve(app)
    take_snapshot(db, teos_source(server), now(), credentials=CREDENTIALS)
    body = balance_calls(server)[0]
    assert body.path.startswith("/odata/v1.1/Balances/GetAssetsBalances(addresses=%5B'")
    assert len(history(db)) == 12


def test_quotes_are_doubled_and_the_path_is_percent_encoded(db, serve):
    app = demo_app()
    app.balances[(ODD, WINE)] = 1500
    server = serve(app)
    take_snapshot(db, teos_source(server, addresses=[DEMO_ADDRESSES[0], ODD]), now(), credentials=CREDENTIALS)
    sent = balance_calls(server)[0].path
    assert "0xAb''c%2Cd%29%5D%2F%C3%A9%20%3F%23%25''" in sent
    assert "[" not in sent and " " not in sent
    # The fake decoded the path and read the doubled quotes back as one.
    assert requested_pairs(server)[(ODD, WINE)] == 1
    odd = [r for r in history(db) if r[0] == ODD]
    assert {r[1]: r[2] for r in odd} == {GOLD: 0, FRANC: 0, WINE: 1500}


def test_large_grid_is_batched_within_the_url_limit_covering_each_pair_once(db, serve):
    addresses = [f"0x{i:040x}" for i in range(1, 301)]
    assets = {f"0x{i:024x}0001": Asset(f"0x{i:024x}0001", f"Asset {i}", "pcs", "1000") for i in range(1, 6)}
    balances = {(a, s): 10**30 + n for n, (a, s) in enumerate((a, s) for a in addresses for s in assets)}
    app = TeosApi(assets=assets, balances=balances)
    server = serve(app)
    # The server refuses anything longer, so a batch over the limit would fail the run.
    app.max_url_length = 2000 - len(server.url)
    source = teos_source(server, addresses=addresses, unique_asset_ids=list(assets), max_url_length=2000)
    summary = take_snapshot(db, source, now(), credentials=CREDENTIALS)
    calls = balance_calls(server)
    assert summary["status"] == "published" and 1 < len(calls) == summary["pages"]
    assert max(len(server.url + r.path) for r in calls) <= 2000
    pairs = requested_pairs(server)
    assert set(pairs) == set(balances) and set(pairs.values()) == {1}
    rows = history(db)
    assert len(rows) == 1500
    assert {(r[0], r[1]): r[2] for r in rows} == {k: Decimal(v) for k, v in balances.items()}
    assert len({r[5] for r in rows}) == 1  # one as_of for every page
    # The SparkFactor of each asset was fetched once, not once per batch.
    asset_hits = {p: n for p, n in app.hits.items() if p.startswith("/odata/v1.1/Assets(")}
    assert len(asset_hits) == 5 and set(asset_hits.values()) == {1}


def test_batch_plan_splits_assets_too_and_every_url_fits():
    addresses = [f"{'x' * (40 + i % 30)}-{i}" for i in range(120)]  # varied, IC-length ones too
    assets = [f"0x{i:025x}" for i in range(60)]
    settings = Settings(addresses=addresses, unique_asset_ids=assets, max_url_length=1200)
    batches = plan_batches(settings)
    assert all(len(settings.base_url + balances_path("1.1", b.addresses, b.asset_ids)) <= 1200 for b in batches)
    covered = Counter((a, s) for b in batches for a in b.addresses for s in b.asset_ids)
    assert len(covered) == 120 * 60 and set(covered.values()) == {1}
    assert any(len(b.asset_ids) < 60 for b in batches)


def test_url_refused_by_the_server_fails_with_a_hint(db, serve):
    app = demo_app()
    app.max_url_length = 150
    server = serve(app)
    with pytest.raises(ProviderError, match="HTTP 414.*max_url_length"):
        take_snapshot(db, teos_source(server), now(), credentials=CREDENTIALS)
    assert fetch(db, "SELECT status, retries FROM snapshot_runs") == [("failed", 0)]


@pytest.mark.parametrize("keys, field", [
    ({"max_url_length": 100}, "max_url_length"),
    ({"api_version": "v1.1"}, "api_version"),
    ({"addresses": [DEMO_ADDRESSES[0], DEMO_ADDRESSES[0].upper()]}, "addresses"),
    ({"unique_asset_ids": []}, "unique_asset_ids"),
    ({"base_url": "https://teosapi.coreledger.net/odata/v1.1"}, "base_url"),
])
def test_bad_settings_are_refused(keys, field):
    table = {"provider": "coreledger", "addresses": list(DEMO_ADDRESSES), "unique_asset_ids": [GOLD]}
    with pytest.raises(ConfigError, match=f"sources.x.{field}"):
        make_source("x", **{**table, **keys})


def test_decimals_only_for_powers_of_ten():
    assert [decimals_of(f) for f in (1, 10, 1000000, 750, 1024, 20)] == [0, 1, 6, None, None, None]


def test_error_body_code_message_and_trace_id_are_surfaced(db, serve):
    server = serve(demo_app())
    source = teos_source(server, unique_asset_ids=[GOLD, "0xdoesnotexist0001"])
    with pytest.raises(ProviderError) as caught:
        take_snapshot(db, source, now(), credentials=CREDENTIALS)
    error = caught.value
    assert error.status == 400 and error.code == "21000" and not error.retriable
    message = str(error)
    assert "21000 One or more preconditions failed" in message
    assert "[1001] Asset with uinque Id '0xdoesnotexist0001' does not exist" in message
    assert "clTraceId" in message
    run = fetch(db, "SELECT status, retries, error FROM snapshot_runs")[0]
    assert run[0] == "failed" and run[1] == 0 and "21000" in run[2] and "clTraceId" in run[2]


def test_wrong_key_is_fatal_with_the_providers_code(db, serve):
    server = serve(demo_app())
    with pytest.raises(ProviderError, match="11001 UserId was not found") as caught:
        take_snapshot(db, teos_source(server), now(), credentials=Credentials(password="wrong-key-1234"))
    assert caught.value.status == 401 and len(server.requests) == 1
    assert "wrong-key-1234" not in fetch(db, "SELECT error FROM snapshot_runs")[0][0]


@pytest.mark.parametrize("status, code", [(400, "13000"), (429, "13000"), (429, None)])
def test_rate_limit_is_retried_after_the_reset(db, serve, status, code):
    app = demo_app()
    app.rate_limit(1, status=status, code=code, reset_in=0.7)
    server = serve(app)
    started = time.monotonic()
    summary = take_snapshot(db, teos_source(server), now(), credentials=CREDENTIALS)
    # backoff_base is 0.01 s in tests: only the reset header explains the wait.
    assert time.monotonic() - started >= 0.6
    assert summary["status"] == "published" and summary["retries"] == 1
    assert len(history(db)) == 12


def test_reset_beyond_what_the_source_allows_fails_the_run(db, serve):
    app = demo_app()
    app.rate_limit(1, reset_in=6 * 3600)  # the daily quota is spent
    server = serve(app)
    with pytest.raises(ProviderError, match="13000.*more than the 120s"):
        take_snapshot(db, teos_source(server), now(), credentials=CREDENTIALS)


def test_missing_pair_is_rejected_never_zero_and_fails_the_run(db, serve):
    app = demo_app()
    app.drop = {(DEMO_ADDRESSES[2], WINE)}
    server = serve(app)
    with pytest.raises(RejectedRecordsError, match="1 record"):
        take_snapshot(db, teos_source(server), now(), credentials=CREDENTIALS)
    assert history(db) == []
    rejected = fetch(db, "SELECT raw, reason FROM rejected_records")
    assert len(rejected) == 1
    raw, reason = rejected[0]
    assert DEMO_ADDRESSES[2] in raw and WINE in raw and "missing" in reason
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("failed",)]


def test_missing_pair_can_be_tolerated_by_max_rejected(db, serve):
    app = demo_app()
    app.drop = {(DEMO_ADDRESSES[2], WINE)}
    server = serve(app)
    summary = take_snapshot(db, teos_source(server, max_rejected=1), now(), credentials=CREDENTIALS)
    assert summary["status"] == "published" and summary["rows"] == 11
    assert (DEMO_ADDRESSES[2], WINE) not in {(r[0], r[1]) for r in history(db)}


def test_past_time_is_refused_before_any_request(db, serve):
    server = serve(demo_app())
    with pytest.raises(HistoryUnavailable, match="only reports current balances"):
        take_snapshot(db, teos_source(server), now() - timedelta(hours=2), credentials=CREDENTIALS)
    assert server.request_count == 0 and history(db) == []


def test_retired_api_version_fails(db, serve):
    server = serve(demo_app())
    with pytest.raises(ProviderError, match="HTTP 404"):
        take_snapshot(db, teos_source(server, api_version="0.7"), now(), credentials=CREDENTIALS)
    assert balance_calls(server)[0].path.startswith("/odata/v0.7/Balances/")


def test_api_key_is_never_logged_stored_or_raised(db, serve, monkeypatch, caplog, capfd):
    from pipeline import connections

    monkeypatch.setenv("AIRFLOW_CONN_TEOS_TEST", f"http://:{SANDBOX_API_KEY}@teosapi")
    credentials = connections.credentials("teos_test")
    assert credentials.password == SANDBOX_API_KEY
    app = demo_app()
    app.drop = {(DEMO_ADDRESSES[0], GOLD)}
    app.rate_limit(1, reset_in=0.1)
    server = serve(app)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RejectedRecordsError):
        take_snapshot(db, teos_source(server), now(), credentials=credentials)
    # A server that echoes the Authorization header into its error message.
    server.inject(Fault("status", path="/odata/", response=json_response(
        {"code": "12002", "message": f"Input binding failed: Bearer {SANDBOX_API_KEY}",
         "clTraceId": "t-1"}, 400)))
    with pytest.raises(ProviderError) as caught:
        take_snapshot(db, teos_source(server), now(), credentials=credentials)
    assert "12002 Input binding failed" in fetch(db, "SELECT error FROM snapshot_runs ORDER BY run_id")[-1][0]
    assert SANDBOX_API_KEY not in str(caught.value) and "***" in str(caught.value)
    captured = capfd.readouterr()
    logs = caplog.text + captured.out + captured.err  # Airflow may route logging to stdout
    assert "retry 1/" in logs
    stored = fetch(db, "SELECT concat_ws(' ', error, warnings::text, as_of_raw) FROM snapshot_runs"
                       " UNION ALL SELECT raw || reason FROM rejected_records"
                       " UNION ALL SELECT account || asset FROM balance_history")
    assert len(stored) >= 3
    assert all(SANDBOX_API_KEY not in text for (text,) in stored)
    assert SANDBOX_API_KEY not in logs
    assert SANDBOX_API_KEY not in repr(credentials)
    assert server.requests[0].header("authorization") == f"Bearer {SANDBOX_API_KEY}"


def test_defaults_point_at_the_public_api():
    source = make_source("x", provider="coreledger", addresses=[DEMO_ADDRESSES[0]], unique_asset_ids=[GOLD])
    settings = source.settings
    assert (settings.base_url, settings.api_version, settings.max_url_length) == (
        "https://teosapi.coreledger.net", "1.1", 2000)
    [batch] = plan_batches(settings)
    assert settings.base_url + balances_path("1.1", batch.addresses, batch.asset_ids) == (
        f"https://teosapi.coreledger.net/odata/v1.1/Balances/GetAssetsBalances("
        f"addresses=%5B'{DEMO_ADDRESSES[0]}'%5D,uniqueAssetIds=%5B'{GOLD}'%5D)")


def test_demo_source_and_connection_take_a_snapshot(db, serve, monkeypatch):
    from pipeline.connections import credentials
    from sandbox import coreledger as fake

    conn_id, uri = fake.DEMO_CONNECTION
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)
    server = serve(fake.demo_app())
    keys = fake.demo_source(server.url)
    assert keys["conn_id"] == conn_id and keys["schedule"]
    source = make_source("teos_test", rate_limit=1000.0, **keys)
    summary = take_snapshot(db, source, now(), credentials=credentials(conn_id))
    assert summary["status"] == "published" and summary["rows"] == len(DEMO_ADDRESSES) * len(DEMO_ASSETS)
