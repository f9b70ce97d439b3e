"""Formance ledger: OAuth2, cursor pages, v1/v2 layouts, against the fake, into Postgres."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qsl

import pytest
import requests

from extractors.credentials import Credentials
from extractors.errors import HistoryUnavailable, MalformedResponseError, ProviderError
from extractors.formance import asset_decimals, format_pit
from extractors.records import RecordError
from extractors.registry import provider
from pipeline.config import ConfigError
from pipeline.snapshot import RejectedRecordsError, build_extractor, take_snapshot
from sandbox.formance import TOKEN_PATH, FormanceStack, Ledger
from sandbox.server import Fault, Response, json_response
from tests.conftest import fetch, make_source

CLIENT, SECRET = "balances-test", "s3cret-client-value-9d2e"
CREDS = Credentials(login=CLIENT, password=SECRET)
BIG = 2**80 + 12_000  # far beyond int64
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
T1 = datetime(2024, 5, 3, tzinfo=timezone.utc)
BETWEEN = datetime(2024, 5, 2, 12, 30, 15, 250000, tzinfo=timezone.utc)
AFTER = datetime(2024, 5, 4, tzinfo=timezone.utc)
BALANCES = "/api/ledger/main/balances"


def book() -> Ledger:
    """Six accounts (three full pages of two), balanced per asset, one without movements."""
    return Ledger.of(T0, {
        "world": {"USD/2": -(BIG + 345), "COIN": -7, "HBAR/8": -12_345_678_900_000_000},
        "users:001": {"USD/2": BIG},
        "users:002": {"USD/2": 345, "EUR/2": 0},
        "users:003": {"COIN": 7},
        "users:004": {},
        "treasury:hedera": {"HBAR/8": 12_345_678_900_000_000},
    })


def moving_book() -> Ledger:
    """Movements on two days, for point-in-time reads."""
    ledger = Ledger().transfer(T0, "world", "users:001", "USD/2", BIG)
    ledger.transfer(T1, "users:001", "users:002", "USD/2", 100)
    ledger.open("users:003", T0).open("users:late", T1)
    return ledger


def stack(ledger: Ledger | None = None, **kwargs) -> FormanceStack:
    return FormanceStack({"main": ledger or book()}, clients={CLIENT: SECRET}, **kwargs)


def formance_source(server, **keys):
    keys.setdefault("ledger", "main")
    return make_source("formance_test", provider="formance", base_url=server.url, **keys)


def history(db):
    return fetch(db, "SELECT account, asset, balance, decimals, as_of, as_of_raw FROM balance_history"
                     " WHERE source = 'formance_test' ORDER BY account, asset")


def aggregates(db):
    return fetch(db, "SELECT asset, balance, decimals, as_of FROM aggregate_balances ORDER BY asset")


def ledger_requests(server, suffix="balances"):
    return [r for r in server.requests if r.path != TOKEN_PATH and r.path.endswith(suffix)]


def now() -> datetime:
    return datetime.now(timezone.utc)


class Rewrite:
    """The fake, with each JSON body of ``path`` passed through ``change(body)``."""

    def __init__(self, app, path, change):
        self.app, self.path, self.change = app, path, change

    def __call__(self, request):
        response = self.app(request)
        if request.path == self.path and response.status == 200:
            response = json_response(self.change(json.loads(response.body)))
        return response


# -- v1 through the pipeline ---------------------------------------------------


def test_v1_snapshot_lands_exactly_with_decimals_from_the_asset(db, serve):
    server = serve(stack())
    started = now()
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published"
    rows = history(db)
    as_of = rows[0][4]
    assert [r[:4] for r in rows] == [
        ("treasury:hedera", "HBAR/8", Decimal(12_345_678_900_000_000), 8),
        ("users:001", "USD/2", Decimal(BIG), 2),
        ("users:002", "EUR/2", Decimal(0), 2),
        ("users:002", "USD/2", Decimal(345), 2),
        ("users:003", "COIN", Decimal(7), 0),
        ("world", "COIN", Decimal(-7), 0),
        ("world", "HBAR/8", Decimal(-12_345_678_900_000_000), 8),
        ("world", "USD/2", Decimal(-(BIG + 345)), 2),
    ]
    # users:004 is {} in the API: listed, but it holds nothing.
    assert not any(r[0] == "users:004" for r in rows)
    # v1 has no history: the snapshot is the time of the fetch, one for the whole run.
    assert started <= as_of <= now()
    assert {(r[4], r[5]) for r in rows} == {(as_of, format_pit(as_of))}
    assert summary["as_of"] == as_of and summary["pages"] == 3 + 1


def test_v1_stops_on_has_more_and_follow_ups_send_only_the_cursor(db, serve):
    bodies = []
    app = Rewrite(stack(), BALANCES, lambda body: bodies.append(body) or body)
    server = serve(app)
    take_snapshot(db, formance_source(server, page_size=2, address="users:.*"), now(), credentials=CREDS)
    requests = ledger_requests(server, "/main/balances")
    # users:001..004 fill exactly two pages: hasMore false on the second, no third request.
    assert len(requests) == 2
    assert sorted(requests[0].query) == [("address", "users:.*"), ("pageSize", "2")]
    assert [name for name, _ in requests[1].query] == ["cursor"]
    assert requests[1].params("cursor") == [bodies[0]["cursor"]["next"]]
    # The last page omits next (absent, not null) and the crawl ended cleanly.
    assert bodies[-1]["cursor"]["hasMore"] is False and "next" not in bodies[-1]["cursor"]
    assert {r[0] for r in history(db)} == {"users:001", "users:002", "users:003"}


def test_cursor_with_other_params_is_refused_by_the_fake_as_by_the_api(serve):
    server = serve(stack())
    extractor = build_extractor(formance_source(server), CREDS)
    cursor = extractor.client.get_json(BALANCES, {"pageSize": 2})["cursor"]["next"]
    assert extractor.client.get_json(BALANCES, {"cursor": cursor})["cursor"]["data"]
    with pytest.raises(ProviderError) as caught:
        extractor.client.get_json(BALANCES, [("cursor", cursor), ("pageSize", 2)])
    assert caught.value.code == "VALIDATION" and caught.value.status == 400
    assert not caught.value.retriable
    assert "no other query params can be set with 'cursor'" in str(caught.value)


def test_has_more_without_next_is_malformed(db, serve):
    def drop_next(body):
        body["cursor"].pop("next", None)
        body["cursor"]["hasMore"] = True
        return body

    server = serve(Rewrite(stack(), BALANCES, drop_next))
    with pytest.raises(MalformedResponseError, match="cursor.next is missing"):
        take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert history(db) == []


def test_aggregate_lands_beside_the_snapshot_it_was_read_with(db, serve):
    server = serve(stack())
    take_snapshot(db, formance_source(server, address="users:.*"), now(), credentials=CREDS)
    as_of = history(db)[0][4]
    assert aggregates(db) == [("COIN", Decimal(7), 0, as_of), ("EUR/2", Decimal(0), 2, as_of),
                              ("USD/2", Decimal(BIG + 345), 2, as_of)]
    summed = fetch(db, "SELECT asset, sum(balance) FROM balance_history GROUP BY asset ORDER BY asset")
    assert summed == [(a, b) for a, b, _, _ in aggregates(db)]
    aggregate_request = ledger_requests(server, "/aggregate/balances")[0]
    assert aggregate_request.query == [("address", "users:.*")]


def test_v1_refuses_a_past_snapshot_time(db, serve):
    server = serve(stack())
    with pytest.raises(HistoryUnavailable, match="only reports current balances"):
        take_snapshot(db, formance_source(server), now() - timedelta(hours=2), credentials=CREDS)
    assert server.request_count == 0
    assert provider("formance").answers_for_past(formance_source(server).settings) is False
    assert provider("formance").answers_for_past(formance_source(server, api="v2").settings) is True


def test_v1_standalone_uses_the_ledgers_own_paths(db, serve):
    server = serve(stack(mounts=("",)))
    with pytest.raises(ProviderError) as caught:
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    assert caught.value.status == 404 and caught.value.code == "NOT_FOUND"
    server.clear()
    summary = take_snapshot(db, formance_source(server, api="v1-standalone"), now(), credentials=CREDS)
    assert summary["status"] == "published" and len(history(db)) == 8
    assert {r.path for r in server.requests if r.path != TOKEN_PATH} == {
        "/main/balances", "/main/aggregate/balances"}


def test_provider_error_is_surfaced_with_its_code(db, serve):
    server = serve(stack())
    with pytest.raises(ProviderError) as caught:
        take_snapshot(db, formance_source(server, ledger="nope"), now(), credentials=CREDS)
    assert caught.value.code == "NOT_FOUND" and not caught.value.retriable
    error = fetch(db, "SELECT status, error FROM snapshot_runs")[0]
    assert error[0] == "failed"
    assert "HTTP 404" in error[1] and "NOT_FOUND: ledger nope not found" in error[1]


def test_5xx_with_empty_body_and_internal_errors_are_retried(db, serve):
    server = serve(stack())
    server.inject(Fault("status", path=BALANCES, after=1, response=Response(status=503)))
    server.inject(Fault("status", path="/api/ledger/main/aggregate", response=json_response(
        {"errorCode": "INTERNAL", "errorMessage": "storage unavailable"}, 500)))
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published" and summary["retries"] == 2
    assert len(history(db)) == 8 and len(aggregates(db)) == 4


def test_bad_record_is_quarantined_and_the_rest_publishes(db, serve):
    def add_a_fraction(body):
        body["cursor"]["data"].append({"users:003": {"EUR/2": 1.5}})
        return body

    ledger = Ledger.of(T0, {"users:001": {"USD/2": 5}, "users:002": {"usd": 3}})
    server = serve(Rewrite(stack(ledger), BALANCES, add_a_fraction))
    # Two account records, and the aggregate's total of the bad asset.
    with pytest.raises(RejectedRecordsError, match="3 record"):
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    reasons = fetch(db, "SELECT raw, reason FROM rejected_records ORDER BY raw")
    assert [r[0] for r in reasons] == [
        '{"usd":3}', '{"users:002":{"usd":3}}', '{"users:003":{"EUR/2":"1.5"}}']
    assert "not a Formance asset" in reasons[0][1] and "not a Formance asset" in reasons[1][1]
    assert "expected an integer" in reasons[2][1]
    db_rows = take_snapshot(db, formance_source(server, max_rejected=3), now(), credentials=CREDS)
    assert db_rows["status"] == "published"
    assert [r[:3] for r in history(db)] == [("users:001", "USD/2", Decimal(5))]


def test_asset_scale_comes_from_the_suffix():
    assert [asset_decimals(a) for a in ("USD/2", "COIN", "HBAR/8", "EUR_CENTS/0")] == [2, 0, 8, 0]
    for bad in ("usd/2", "USD/", "USD/2/3", "USD/x"):
        with pytest.raises(RecordError):
            asset_decimals(bad)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="api: must be one of v1, v1-standalone, v2"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", api="v3")
    with pytest.raises(ConfigError, match="page_size: must be between 1 and 100 for the v2 API"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", api="v2", page_size=500)
    with pytest.raises(ConfigError, match="ledger"):
        make_source("f", provider="formance", base_url="http://f", ledger="a/b")
    source = make_source("f", provider="formance", base_url="http://f", ledger="main", conn_id="x")
    assert (source.settings.api, source.settings.page_size, source.conn_id) == ("v1", 100, "x")


# -- OAuth2 -------------------------------------------------------------------


def test_token_is_fetched_once_and_sent_on_every_request(db, serve):
    app = stack()
    server = serve(app)
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert app.tokens_issued == 1
    # The token fetch counts among the run's requests: 1 + 3 pages + the aggregate.
    assert summary["requests"] == server.request_count == 5
    token_request = server.requests[0]
    assert token_request.method == "POST" and token_request.path == TOKEN_PATH
    form = dict(parse_qsl(token_request.body.decode()))
    assert form == {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET}
    calls = [r for r in server.requests if r.path != TOKEN_PATH]
    assert len(calls) == 4
    assert {r.header("authorization") for r in calls} == {f"Bearer {app.issued[0]}"}


def test_without_a_connection_no_auth_is_sent(db, serve):
    app = FormanceStack({"main": book()})
    server = serve(app)
    take_snapshot(db, formance_source(server), now())
    assert all(r.header("authorization") is None for r in server.requests)
    assert app.tokens_issued == 0 and len(history(db)) == 8
    guarded = serve(stack())
    with pytest.raises(ProviderError, match="HTTP 401.*no access token sent") as caught:
        take_snapshot(db, formance_source(guarded), now())
    assert caught.value.status == 401 and guarded.app.refused == 1


def test_token_is_renewed_shortly_before_it_expires(serve):
    app = stack(token_lifetime=1)
    server = serve(app)
    pages = build_extractor(formance_source(server, page_size=2), CREDS).pages(now())
    next(pages)
    time.sleep(0.8)  # past the token's 1 s lifetime minus its renewal margin
    rest = list(pages)
    assert len(rest) == 3
    assert app.tokens_issued == 2 and app.refused == 0
    # The fake does expire tokens: once its second is over, the first one is refused.
    time.sleep(0.3)
    expired = requests.get(f"{server.url}{BALANCES}",
                           headers={"Authorization": f"Bearer {app.issued[0]}"})
    assert expired.status_code == 401 and app.refused == 1


def test_401_renews_the_token_once_and_resends(db, serve):
    app = stack()
    server = serve(app)
    server.inject(Fault("status", path=BALANCES, after=1, response=Response(status=401)))
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published" and summary["retries"] == 0
    assert app.tokens_issued == 2 and len(history(db)) == 8
    assert summary["requests"] == server.request_count == 7
    # The resent request carried the new token.
    resent = ledger_requests(server, "/main/balances")[2]
    assert resent.header("authorization") == f"Bearer {app.issued[1]}"


def test_revoked_token_is_replaced_mid_crawl(serve):
    app = stack()
    server = serve(app)
    pages = build_extractor(formance_source(server, page_size=2), CREDS).pages(now())
    next(pages)
    app.revoke_tokens()
    assert len(list(pages)) == 3
    assert app.refused == 1 and app.tokens_issued == 2


def test_second_401_is_fatal(db, serve):
    app = stack()
    server = serve(app)
    server.inject(Fault("status", times=2, path=BALANCES, response=Response(status=401)))
    with pytest.raises(ProviderError) as caught:
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    assert caught.value.status == 401 and not caught.value.retriable
    assert "after renewing the access token" in str(caught.value)
    assert app.tokens_issued == 2 and len(ledger_requests(server)) == 2
    assert fetch(db, "SELECT status FROM snapshot_runs") == [("failed",)]


def test_scope_and_token_url_come_from_the_connection_extra(serve):
    app = stack()
    server = serve(app)
    creds = Credentials(CLIENT, SECRET,
                        {"token_url": f"{server.url}{TOKEN_PATH}", "scope": "ledger:read"})
    list(build_extractor(formance_source(server), creds).pages(now()))
    assert app.scopes == ["ledger:read"]
    missing = Credentials(CLIENT, SECRET, {"token_url": "/elsewhere/token"})
    with pytest.raises(ProviderError, match="HTTP 404 from .*/elsewhere/token: token endpoint refused"):
        list(build_extractor(formance_source(server), missing).pages(now()))


def test_secret_and_tokens_never_reach_errors_logs_or_tables(db, serve, caplog):
    caplog.set_level(logging.DEBUG)
    app = stack()
    server = serve(app)
    wrong = Credentials(CLIENT, "wrong-secret-value-71f3")
    with pytest.raises(ProviderError) as caught:
        take_snapshot(db, formance_source(server), now(), credentials=wrong)
    assert caught.value.status == 401 and caught.value.code == "invalid_client"
    assert "wrong-secret-value-71f3" not in str(caught.value) + repr(caught.value)
    server.inject(Fault("status", path="/api/ledger/main/aggregate", response=json_response(
        {"errorCode": "VALIDATION", "errorMessage": "bad"}, 400)))
    with pytest.raises(ProviderError):
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    assert app.tokens_issued == 2
    stored = fetch(db, "SELECT string_agg(t::text, ' ') FROM snapshot_runs t")[0][0]
    stored += str(fetch(db, "SELECT raw, reason FROM rejected_records"))
    stored += str(fetch(db, "SELECT * FROM balance_history"))
    assert "invalid_client" in stored
    auth = repr(build_extractor(formance_source(server), CREDS).client.auth)
    for secret in [SECRET, "wrong-secret-value-71f3", *app.issued]:
        assert secret not in caplog.text and secret not in stored and secret not in auth


# -- v2 -----------------------------------------------------------------------


def test_v2_backfill_reads_the_ledger_at_the_scheduled_time(db, serve):
    server = serve(stack(moving_book()))
    source = formance_source(server, api="v2", page_size=2)
    summary = take_snapshot(db, source, BETWEEN, credentials=CREDS)
    assert summary["status"] == "published"
    assert summary["as_of"] == BETWEEN == summary["scheduled_for"]
    assert summary["as_of_raw"] == "2024-05-02T12:30:15.250000Z"
    assert [r[:4] for r in history(db)] == [("users:001", "USD/2", Decimal(BIG), 2),
                                            ("world", "USD/2", Decimal(-BIG), 2)]
    assert aggregates(db) == [("USD/2", Decimal(0), 2, BETWEEN)]
    first, *follow_ups = ledger_requests(server, "/accounts")
    assert sorted(first.query) == [("expand", "volumes"), ("pageSize", "2"), ("pit", format_pit(BETWEEN))]
    assert follow_ups and all([k for k, _ in r.query] == ["cursor"] for r in follow_ups)
    assert ledger_requests(server, "/aggregate/balances")[0].query == [("pit", format_pit(BETWEEN))]
    assert all(r.header("formance-bigint-as-string") == "true" for r in ledger_requests(server, ""))

    take_snapshot(db, source, AFTER, credentials=CREDS)
    later = [r[:3] for r in history(db) if r[4] == AFTER]
    assert later == [("users:001", "USD/2", Decimal(BIG - 100)), ("users:002", "USD/2", Decimal(100)),
                     ("world", "USD/2", Decimal(-BIG))]


def test_v2_amounts_are_exact_as_strings_and_as_numbers(serve):
    seen = []
    app = Rewrite(stack(moving_book()), "/v2/main/accounts", lambda body: seen.append(body) or body)
    server = serve(app)
    extractor = build_extractor(formance_source(server, api="v2"), CREDS)
    as_strings = [r for p in extractor.pages(AFTER) for r in p.rows]
    extractor.client.session.headers.pop("Formance-Bigint-As-String")
    as_numbers = [r for p in extractor.pages(AFTER) for r in p.rows]
    def world(body):
        return next(a for a in body["cursor"]["data"] if a["address"] == "world")["volumes"]["USD/2"]

    assert world(seen[0]) == {"input": "0", "output": str(BIG), "balance": str(-BIG)}
    assert world(seen[1]) == {"input": 0, "output": BIG, "balance": -BIG}
    assert as_strings == as_numbers
    assert [(r.account, r.balance) for r in as_numbers if r.account] == [
        ("world", -BIG), ("users:002", 100), ("users:001", BIG - 100)]


def test_v2_address_filter_goes_in_the_body(db, serve):
    ledger = moving_book().transfer(T0, "world", "users:001:savings", "USD/2", 9)
    server = serve(stack(ledger))
    take_snapshot(db, formance_source(server, api="v2", address="users:"), AFTER, credentials=CREDS)
    assert {r[0] for r in history(db)} == {"users:001", "users:002"}
    assert aggregates(db) == [("USD/2", Decimal(BIG), 2, AFTER)]
    for request in ledger_requests(server, ""):
        assert json.loads(request.body) == {"$match": {"address": "users:"}}


# -- the demo -----------------------------------------------------------------


def test_demo_source_and_connection_work_together(db, serve, monkeypatch):
    from pipeline import connections
    from sandbox import formance as sandbox

    server = serve(sandbox.demo_app())
    conn_id, uri = sandbox.DEMO_CONNECTION
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)
    source = make_source("formance_test", **sandbox.demo_source(server.url))
    assert source.conn_id == conn_id and source.schedule
    summary = take_snapshot(db, source, now(), credentials=connections.credentials(source.conn_id))
    assert summary["status"] == "published"
    rows = {(r[0], r[1]): (r[2], r[3]) for r in history(db)}
    assert rows[("treasury:hedera", "HBAR/8")] == (Decimal(12_345_678_900_000_000), 8)
    assert {asset for _, asset in rows} == {"HBAR/8", "USD/2", "EUR/2", "COIN"}
