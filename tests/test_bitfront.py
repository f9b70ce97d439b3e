"""BitFront: request signing, statusCode handling and exact amounts, against the fake, into Postgres."""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import requests

from extractors.bitfront import BitfrontAuth, sign
from extractors.credentials import Credentials
from extractors.errors import HistoryUnavailable, MalformedResponseError, ProviderError
from pipeline.config import ConfigError
from pipeline.snapshot import RejectedRecordsError, take_snapshot
from sandbox import bitfront as fake
from sandbox.bitfront import SANDBOX_KEY, SANDBOX_SECRET, BitfrontExchange, holding
from sandbox.server import Fault, Response, dumps, json_response
from tests.conftest import fetch, make_source

DOC_SECRET = "dwjnGqCVzfHlW6Q9r4BjXpmiK1WCdMBI"
DOC_SIGNATURE = "f6f55e74ebe513b5c5b26a1c056923ce7a8dd56c0ea890d22fa603688b28ace0"
CREDENTIALS = Credentials(login=SANDBOX_KEY, password=SANDBOX_SECRET)
WALLET = [
    holding("ETH", "1000107794.9999858"),
    holding("BCH", "1e-8", "1e-8"),
    holding("BTC", "3999974992.35615", "3999970806.72614"),
    {"currency": "XRP", "balance": 1000000000, "availableBalance": "999998671.673"},
    {"currency": "HBAR", "balance": Decimal("1.5E+3"), "availableBalance": Decimal("0")},
]


class RecordingClock:
    """The fake's clock, remembering the last ``responseTime`` it gave."""

    def __init__(self, skew_ms: int = 0) -> None:
        self.skew_ms = skew_ms
        self.last: int | None = None

    def __call__(self) -> int:
        self.last = time.time_ns() // 1_000_000 + self.skew_ms
        return self.last


def now() -> datetime:
    return datetime.now(timezone.utc)


def bitfront_source(server, **keys):
    # A high rate limit: the shared request budget would otherwise pace this module's runs.
    keys.setdefault("rate_limit", 1000.0)
    return make_source("bitfront_test", provider="bitfront", base_url=server.url,
                       conn_id="bitfront_test", **keys)


def history(db):
    return fetch(db, "SELECT account, asset, balance, available_balance, as_of, as_of_raw"
                     " FROM balance_history WHERE source = 'bitfront_test' ORDER BY asset")


def signed_get(url: str, **auth_kwargs) -> dict:
    auth = BitfrontAuth(auth_kwargs.pop("key", SANDBOX_KEY), auth_kwargs.pop("secret", SANDBOX_SECRET),
                        **auth_kwargs)
    response = requests.get(url + "/v1/account/balances", auth=auth, timeout=5)
    assert response.status_code == 200
    return response.json()


def test_signature_reproduces_the_documented_test_vector():
    message_parts = ("12345", "1523864107010", "GET", "/v1/trade/openOrders",
                     "market=ETH&currency=BTC&max=100")
    assert sign(DOC_SECRET, *message_parts) == DOC_SIGNATURE
    request = requests.Request(
        "GET", "https://openapi.bitfront.me/v1/trade/openOrders?market=ETH&currency=BTC&max=100").prepare()
    BitfrontAuth("6W206egN32nCQ0VB", DOC_SECRET, clock=lambda: 1523864107010, nonce=lambda: 12345)(request)
    assert request.headers["X-API-KEY"] == "6W206egN32nCQ0VB"
    assert request.headers["X-API-TIMESTAMP"] == "1523864107010"
    assert request.headers["X-API-NONCE"] == "12345"
    assert request.headers["X-API-SIGN"] == DOC_SIGNATURE


def test_documented_post_example_signs_the_body_too():
    request = requests.Request("POST", "https://openapi.bitfront.me/v1/trade/marketOrders",
                               data="quantity=1&coinPair=BCH.ETH&orderSide=BUY").prepare()
    BitfrontAuth("6W206egN32nCQ0VB", DOC_SECRET, clock=lambda: 1523864107010, nonce=lambda: 12345)(request)
    assert request.headers["X-API-SIGN"] == "03838b25c336e0a6fb3617b9b07c9da9d91d96ab0e61598aa7e6cd1396b2b3ef"


def test_a_nonce_never_repeats_within_one_timestamp():
    draws = iter([12345, 12345, 12345, 54321, 12345])
    auth = BitfrontAuth("k", "s3cr3tValue", clock=lambda: 1, nonce=lambda: next(draws))
    first, second = (auth(requests.Request("GET", "http://x/a").prepare()) for _ in range(2))
    assert (first.headers["X-API-NONCE"], second.headers["X-API-NONCE"]) == ("12345", "54321")
    assert "s3cr3tValue" not in repr(auth)


def test_snapshot_lands_exact_amounts_and_the_response_time(db, serve):
    clock = RecordingClock()
    server = serve(BitfrontExchange(WALLET, clock=clock))
    summary = take_snapshot(db, bitfront_source(server), now(), credentials=CREDENTIALS)
    assert summary["status"] == "published"
    as_of = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=clock.last)
    assert summary["as_of_raw"] == str(clock.last) and summary["as_of"] == as_of
    assert history(db) == [
        ("main", "BCH", Decimal("0.00000001"), Decimal("0.00000001"), as_of, str(clock.last)),
        ("main", "BTC", Decimal("3999974992.35615"), Decimal("3999970806.72614"), as_of, str(clock.last)),
        ("main", "ETH", Decimal("1000107794.9999858"), Decimal("1000107794.9999858"), as_of, str(clock.last)),
        ("main", "HBAR", Decimal(1500), Decimal(0), as_of, str(clock.last)),
        ("main", "XRP", Decimal(1000000000), Decimal("999998671.673"), as_of, str(clock.last)),
    ]
    # The amounts crossed the wire in their awkward forms, not as strings.
    assert b'"balance":1000107794.9999858' in dumps(WALLET) and b'"balance":1E-8' in dumps(WALLET)
    (request,) = server.requests
    assert request.header("X-API-KEY") == SANDBOX_KEY
    assert len(request.header("X-API-NONCE")) == 5 and request.header("X-API-SIGN")
    assert abs(int(request.header("X-API-TIMESTAMP")) - clock.last) < 1000


def test_account_label_comes_from_the_source(db, serve):
    server = serve(BitfrontExchange([holding("BTC", "1")]))
    take_snapshot(db, bitfront_source(server, account="treasury"), now(), credentials=CREDENTIALS)
    assert [r[:2] for r in history(db)] == [("treasury", "BTC")]


@pytest.mark.parametrize("code", [6004, 5000, 5001, 5002])
def test_rate_limit_and_server_side_codes_are_retried_then_succeed(db, serve, code):
    app = BitfrontExchange(WALLET)
    server = serve(app)
    app.fail_next(code, times=2)
    summary = take_snapshot(db, bitfront_source(server), now(), credentials=CREDENTIALS)
    assert summary["status"] == "published" and len(history(db)) == len(WALLET)
    assert fetch(db, "SELECT requests, retries FROM snapshot_runs") == [(3, 2)]
    # Every attempt was signed anew: the fake refuses a nonce or signature twice.
    assert len({(r.header("X-API-NONCE"), r.header("X-API-SIGN")) for r in server.requests}) == 3


@pytest.mark.parametrize("code, message", [(3401, "Internal core system error"),
                                           (6001, "Unregistered API KEY")])
def test_other_codes_are_fatal_with_the_code_and_message(db, serve, code, message):
    app = BitfrontExchange(WALLET)
    server = serve(app)
    app.fail_next(code, times=5)
    with pytest.raises(ProviderError) as raised:
        take_snapshot(db, bitfront_source(server), now(), credentials=CREDENTIALS)
    assert raised.value.code == str(code) and raised.value.status == 200
    assert f"statusCode {code}: {message}" in str(raised.value)
    assert server.request_count == 1
    (status, error), = fetch(db, "SELECT status, error FROM snapshot_runs")
    assert status == "failed" and f"statusCode {code}: {message}" in error
    assert history(db) == []


def test_rate_limit_that_outlasts_the_retries_fails_the_run(db, serve):
    app = BitfrontExchange(WALLET)
    server = serve(app)
    app.fail_next(6004, times=10)
    with pytest.raises(ProviderError, match="statusCode 6004: API RPS limit exceeded"):
        take_snapshot(db, bitfront_source(server, max_attempts=3), now(), credentials=CREDENTIALS)
    assert server.request_count == 3
    assert fetch(db, "SELECT status, retries FROM snapshot_runs") == [("failed", 2)]


def test_wrong_secret_is_fatal_and_no_secret_or_signature_is_logged_or_stored(db, serve, caplog):
    caplog.set_level(logging.DEBUG)
    app = BitfrontExchange(WALLET)
    server = serve(app)
    app.fail_next(6004, times=1)  # a retry, so retry logging runs too
    source = bitfront_source(server)
    take_snapshot(db, source, now(), credentials=CREDENTIALS)
    wrong = Credentials(login=SANDBOX_KEY, password="notTheSandboxSecret0000000000000")
    with pytest.raises(ProviderError, match="statusCode 4003: Invalid signature") as raised:
        take_snapshot(db, source, now(), credentials=wrong)
    assert raised.value.code == "4003"
    signatures = [r.header("X-API-SIGN") for r in server.requests]
    assert len(signatures) == 3
    stored = fetch(db, "SELECT concat_ws('|', r.*) FROM snapshot_runs r ORDER BY run_id")
    stored += fetch(db, "SELECT concat_ws('|', h.*) FROM balance_history h")
    stored += fetch(db, "SELECT concat_ws('|', j.*) FROM rejected_records j")
    texts = [caplog.text, str(raised.value)] + [row[0] for row in stored]
    assert "4003" in stored[1][0] and "retry" in caplog.text
    for text in texts:
        for secret in [SANDBOX_SECRET, wrong.password, SANDBOX_KEY, *signatures]:
            assert secret not in text


def test_bad_records_become_rejections_with_their_raw_json(db, serve):
    bad = [
        {"currency": "DOGE", "balance": "1_000", "availableBalance": "1_000"},
        {"currency": "ADA", "balance": True},
        {"balance": 5},
        {"currency": "SOL", "balance": -5, "availableBalance": 0},
        {"currency": "DOT", "balance": 1, "availableBalance": 2},
        {"currency": "XLM", "balance": "NaN"},
        {"currency": "BTC", "balance": 7},  # listed twice
    ]
    server = serve(BitfrontExchange([holding("BTC", "2")] + bad))
    source = bitfront_source(server)
    with pytest.raises(RejectedRecordsError):
        take_snapshot(db, source, now(), credentials=CREDENTIALS)
    rejected = fetch(db, "SELECT raw, reason FROM rejected_records ORDER BY rejected_id")
    assert [r[0] for r in rejected] == [dumps(record).decode() for record in bad]
    reasons = " / ".join(r[1] for r in rejected)
    for expected in ("'1_000'", "boolean", "missing field 'currency'", "cannot be negative",
                     "exceeds its balance", "'NaN'", "listed twice"):
        assert expected in reasons
    assert history(db) == []
    summary = take_snapshot(db, bitfront_source(server, max_rejected=len(bad)), now(),
                            credentials=CREDENTIALS)
    assert summary["status"] == "published"
    assert [r[1:3] for r in history(db)] == [("BTC", Decimal(2))]


def test_amounts_sent_as_strings_or_exponents_are_exact(db, serve):
    server = serve(BitfrontExchange([
        {"currency": "USDT", "balance": "1000107794.9999858", "availableBalance": "1e-8"},
        {"currency": "ETH", "balance": Decimal("1.000E+2"), "availableBalance": Decimal("99.99999999999999999")},
    ]))
    take_snapshot(db, bitfront_source(server), now(), credentials=CREDENTIALS)
    assert [r[1:4] for r in history(db)] == [
        ("ETH", Decimal(100), Decimal("99.99999999999999999")),
        ("USDT", Decimal("1000107794.9999858"), Decimal("0.00000001")),
    ]


def test_a_past_snapshot_time_is_refused_before_any_request(db, serve):
    server = serve(BitfrontExchange(WALLET))
    with pytest.raises(HistoryUnavailable, match="only reports current balances"):
        take_snapshot(db, bitfront_source(server), now() - timedelta(hours=2), credentials=CREDENTIALS)
    assert server.request_count == 0 and fetch(db, "SELECT count(*) FROM snapshot_runs") == [(0,)]


def test_a_gateway_error_without_a_bitfront_body_is_retried(db, serve):
    server = serve(BitfrontExchange(WALLET))
    server.inject(Fault("status", response=Response(status=503, body=b"<html>bad gateway</html>",
                                                    content_type="text/html")))
    summary = take_snapshot(db, bitfront_source(server), now(), credentials=CREDENTIALS)
    assert summary["status"] == "published" and server.request_count == 2


def test_a_body_without_status_code_is_malformed(db, serve):
    server = serve(BitfrontExchange(WALLET))
    server.inject(Fault("status", response=json_response({"responseData": []})))
    with pytest.raises(MalformedResponseError, match="no statusCode"):
        take_snapshot(db, bitfront_source(server), now(), credentials=CREDENTIALS)


def test_a_source_without_credentials_fails_with_a_reason(db, serve):
    server = serve(BitfrontExchange(WALLET))
    with pytest.raises(Exception, match="needs conn_id"):
        take_snapshot(db, bitfront_source(server), now(), credentials=None)
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("failed",)]
    assert server.request_count == 0


def test_fake_verifies_signatures_timestamps_and_nonces(serve):
    clock = RecordingClock()
    server = serve(BitfrontExchange(WALLET, clock=clock))
    real = RecordingClock()
    assert signed_get(server.url)["statusCode"] == 1000
    assert signed_get(server.url, secret="x" * 32)["statusCode"] == 4003
    assert signed_get(server.url, key="unknownKey000000")["statusCode"] == 6001
    assert signed_get(server.url, clock=lambda: real() - 2_000)["statusCode"] == 6005
    assert signed_get(server.url, clock=lambda: real() + 6_000)["statusCode"] == 6005
    assert signed_get(server.url, nonce=lambda: 123)["statusCode"] == 4018
    missing = requests.get(server.url + "/v1/account/balances", timeout=5)
    assert (missing.status_code, missing.json()["statusCode"]) == (200, 4001)
    # A signed request replayed as is: one-time signatures.
    with requests.Session() as session:
        prepared = session.prepare_request(requests.Request(
            "GET", server.url + "/v1/account/balances", auth=BitfrontAuth(SANDBOX_KEY, SANDBOX_SECRET)))
        first, replay = (session.send(prepared, timeout=5).json() for _ in range(2))
    assert (first["statusCode"], replay["statusCode"]) == (1000, 4005)
    assert replay["statusMessage"] == "Duplicate signature usage detected" and "responseData" not in replay


def test_fake_enforces_three_requests_per_second(serve):
    server = serve(BitfrontExchange(WALLET))
    codes = [signed_get(server.url)["statusCode"] for _ in range(4)]
    assert codes == [1000, 1000, 1000, 6004]


def test_config_defaults_and_refused_sharding():
    source = make_source("bitfront_cfg", provider="bitfront", conn_id="bitfront_cfg")
    assert source.settings.base_url == "https://openapi.bitfront.me"
    assert source.conn_id == "bitfront_cfg"
    with pytest.raises(ConfigError, match="shards"):
        make_source("bitfront_cfg", provider="bitfront", shards=2)
    with pytest.raises(ConfigError, match="base_url"):
        make_source("bitfront_cfg", provider="bitfront", base_url="openapi.bitfront.me")


def test_demo_source_and_connection_take_a_snapshot(db, serve, monkeypatch):
    from pipeline.connections import credentials

    conn_id, uri = fake.DEMO_CONNECTION
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)
    server = serve(fake.demo_app())
    keys = fake.demo_source(server.url)
    assert keys["conn_id"] == conn_id
    source = make_source("bitfront_test", rate_limit=1000.0, **keys)
    summary = take_snapshot(db, source, now(), credentials=credentials(conn_id))
    assert summary["status"] == "published"
    assets = {r[1]: r[2] for r in history(db)}
    assert {"BTC", "ETH", "USDT", "HBAR"} <= set(assets)
    assert assets["ETH"] == Decimal("1000107794.9999858") and assets["BCH"] == Decimal("1E-8")
