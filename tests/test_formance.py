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
from extractors.errors import (HistoryUnavailable, LedgerUnavailable, MalformedResponseError, ProviderError,
                               SnapshotError, SnapshotInFuture, SnapshotMoved)
from extractors.formance import address_matches, asset_decimals, format_pit, v1_snapshot_raw
from extractors.records import PageKind, RecordError
from extractors.registry import provider
from pipeline.config import ConfigError
from pipeline.snapshot import RejectedRecordsError, build_extractor, take_snapshot
from sandbox.formance import (GATEWAY, INDEX_ADDRESS_SEGMENTS, MOVES_HISTORY, TOKEN_PATH, FormanceStack, Ledger,
                              v1x_address_matches, v2_address_matches)
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
    app = stack()
    server = serve(app)
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
    # v1 has no history: the snapshot is the time of the fetch, one for the whole run, and
    # the ledger state it read: the number of transactions in its log.
    assert started <= as_of <= now()
    assert app.ledgers["main"].transactions == 8
    assert {(r[4], r[5]) for r in rows} == {(as_of, f"{format_pit(as_of)} transactions=8")}
    assert summary["as_of_raw"] == v1_snapshot_raw(as_of, 8)
    assert summary["as_of"] == as_of and summary["pages"] == 3 + 1


def test_v1_stops_on_has_more_and_follow_ups_send_only_the_cursor(db, serve):
    bodies = []
    app = Rewrite(stack(), BALANCES, lambda body: bodies.append(body) or body)
    server = serve(app)
    take_snapshot(db, formance_source(server, page_size=2, address="users:"), now(), credentials=CREDS)
    requests = ledger_requests(server, "/main/balances")
    # users:001..004 fill exactly two pages: hasMore false on the second, no third request.
    assert len(requests) == 2
    assert sorted(requests[0].query) == [("address", "users:"), ("pageSize", "2")]
    assert [name for name, _ in requests[1].query] == ["cursor"]
    assert requests[1].params("cursor") == [bodies[0]["cursor"]["next"]]
    # The last page omits next (absent, not null) and the crawl ended cleanly.
    assert bodies[-1]["cursor"]["hasMore"] is False and "next" not in bodies[-1]["cursor"]
    assert {r[0] for r in history(db)} == {"users:001", "users:002", "users:003"}


def test_cursor_with_other_params_is_refused_by_the_fake_as_by_the_api(serve):
    # v1.x refuses a cursor beside after, address, pageSize or page_size, and only those.
    server = serve(stack(server="v1.x"))
    extractor = build_extractor(formance_source(server), CREDS)
    cursor = extractor.client.get_json(BALANCES, {"pageSize": 2})["cursor"]["next"]
    assert extractor.client.get_json(BALANCES, {"cursor": cursor})["cursor"]["data"]
    for name in ("after", "address", "pageSize", "page_size"):
        with pytest.raises(ProviderError) as caught:
            extractor.client.get_json(BALANCES, [("cursor", cursor), (name, 2)])
        assert caught.value.code == "VALIDATION" and caught.value.status == 400
        assert not caught.value.retriable
        assert "no other query params can be set with 'cursor'" in str(caught.value)
    assert extractor.client.get_json(BALANCES, [("cursor", cursor), ("expand", "x")])["cursor"]["data"]
    # v2.x reads the cursor and ignores the rest.
    newer = serve(stack(server="v2.4.12"))
    extractor = build_extractor(formance_source(newer), CREDS)
    cursor = extractor.client.get_json(BALANCES, {"pageSize": 2})["cursor"]["next"]
    page = extractor.client.get_json(BALANCES, [("cursor", cursor), ("pageSize", 5), ("address", "x:")])
    assert [a for r in page["cursor"]["data"] for a in r] == ["users:002", "users:003"]


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
    take_snapshot(db, formance_source(server, address="users:"), now(), credentials=CREDS)
    as_of = history(db)[0][4]
    assert aggregates(db) == [("COIN", Decimal(7), 0, as_of), ("EUR/2", Decimal(0), 2, as_of),
                              ("USD/2", Decimal(BIG + 345), 2, as_of)]
    summed = fetch(db, "SELECT asset, sum(balance) FROM balance_history GROUP BY asset ORDER BY asset")
    assert summed == [(a, b) for a, b, _, _ in aggregates(db)]
    aggregate_request = ledger_requests(server, "/aggregate/balances")[0]
    assert aggregate_request.query == [("address", "users:")]


def test_v1_refuses_a_past_snapshot_time(db, serve):
    server = serve(stack())
    with pytest.raises(HistoryUnavailable, match="only reports current balances"):
        take_snapshot(db, formance_source(server), now() - timedelta(hours=2), credentials=CREDS)
    assert server.request_count == 0
    assert provider("formance").answers_for_past(formance_source(server).settings) is False
    for api in ("v2", "v2-standalone"):
        assert provider("formance").answers_for_past(formance_source(server, api=api).settings) is True


def test_v1_standalone_uses_the_ledgers_own_paths(db, serve):
    app = stack(mounts=("",))
    server = serve(app)
    with pytest.raises(LedgerUnavailable, match='is a standalone ledger .*api = "v1-standalone"'):
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    server.clear()
    summary = take_snapshot(db, formance_source(server, api="v1-standalone"), now(), credentials=CREDS)
    assert summary["status"] == "published" and len(history(db)) == 8
    assert {r.path for r in server.requests if r.path != TOKEN_PATH} == {
        "/_info", "/v2/main", "/main/stats", "/main/balances", "/main/aggregate/balances"}
    assert app.created == []


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
    with pytest.raises(ConfigError, match="api: must be one of v1, v1-standalone, v2, v2-standalone"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", api="v3")
    with pytest.raises(ConfigError, match="page_size: must be between 1 and 100 for the v2 API"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", api="v2", page_size=500)
    with pytest.raises(ConfigError, match="ledger"):
        make_source("f", provider="formance", base_url="http://f", ledger="a/b")
    with pytest.raises(ConfigError, match="pit_margin: must be between 0 and 3600 seconds, got 7200"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", pit_margin=7200)
    source = make_source("f", provider="formance", base_url="http://f", ledger="main", conn_id="x")
    assert (source.settings.api, source.settings.page_size, source.conn_id) == ("v1", 100, "x")
    assert (source.settings.scopes, source.settings.pit_margin) == (None, 60.0)


# -- OAuth2 -------------------------------------------------------------------


def test_token_is_fetched_once_and_sent_on_every_request(db, serve):
    app = stack()
    server = serve(app)
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert app.tokens_issued == 1
    # The token fetch counts among the run's requests: the root's /_info (public: sent
    # without a token), 1 token, the gateway's /_info, the ledger, the log's count before
    # and after the 3 pages and the aggregate.
    assert summary["requests"] == server.request_count == 10
    root, token_request, *calls = server.requests
    assert root.path == "/_info" and root.header("authorization") is None
    assert token_request.method == "POST" and token_request.path == TOKEN_PATH
    form = dict(parse_qsl(token_request.body.decode()))
    assert form == {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET,
                    "scope": "ledger:read"}
    assert len(calls) == 8
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
    app = stack(token_lifetime=4)
    server = serve(app)
    pages = build_extractor(formance_source(server, page_size=2), CREDS).pages(now())
    next(pages)
    # Past the token's 4 s lifetime minus its renewal margin (a quarter of it), counted
    # from the whole second its expiry is written in.
    time.sleep(3.1)
    rest = list(pages)
    assert len(rest) == 3
    assert app.tokens_issued == 2 and app.refused == 0
    # The fake does expire tokens: once its 4 s are over, the first one is refused.
    time.sleep(1.0)
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
    assert summary["requests"] == server.request_count == 12
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
    assert "refused the access token after renewing it" in str(caught.value)
    assert "without scope 'ledger:read'" in str(caught.value) and "asked for: ledger:read" in str(caught.value)
    assert app.tokens_issued == 2 and len(ledger_requests(server, "/main/balances")) == 2
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
    source = formance_source(server, api="v2", page_size=1)
    summary = take_snapshot(db, source, BETWEEN, credentials=CREDS)
    assert summary["status"] == "published"
    assert summary["as_of"] == BETWEEN == summary["scheduled_for"]
    assert summary["as_of_raw"] == "2024-05-02T12:30:15.250000Z"
    assert [r[:4] for r in history(db)] == [("users:001", "USD/2", Decimal(BIG), 2),
                                            ("world", "USD/2", Decimal(-BIG), 2)]
    assert aggregates(db) == [("USD/2", Decimal(0), 2, BETWEEN)]
    first, *follow_ups = ledger_requests(server, "/volumes")
    # Volumes by insertion date up to pit: every move inserted by then, on every account.
    assert sorted(first.query) == [("endTime", format_pit(BETWEEN)), ("insertionDate", "true"),
                                   ("pageSize", "1")]
    assert follow_ups and all([k for k, _ in r.query] == ["cursor"] for r in follow_ups)
    # On the volumes' time axis: insertion dates.
    assert ledger_requests(server, "/aggregate/balances")[0].query == [
        ("pit", format_pit(BETWEEN)), ("useInsertionDate", "true")]
    assert all(r.header("formance-bigint-as-string") == "true" for r in ledger_requests(server, ""))

    take_snapshot(db, source, AFTER, credentials=CREDS)
    later = [r[:3] for r in history(db) if r[4] == AFTER]
    assert later == [("users:001", "USD/2", Decimal(BIG - 100)), ("users:002", "USD/2", Decimal(100)),
                     ("world", "USD/2", Decimal(-BIG))]


def test_v2_amounts_are_exact_as_strings_and_as_numbers(serve):
    seen = []
    app = Rewrite(stack(moving_book()), "/api/ledger/v2/main/volumes", lambda body: seen.append(body) or body)
    server = serve(app)
    extractor = build_extractor(formance_source(server, api="v2"), CREDS)
    as_strings = [r for p in extractor.pages(AFTER) for r in p.rows]
    extractor.client.session.headers.pop("Formance-Bigint-As-String")
    as_numbers = [r for p in extractor.pages(AFTER) for r in p.rows]
    def world(body):
        return next(v for v in body["cursor"]["data"] if v["account"] == "world")

    assert world(seen[0]) == {"account": "world", "asset": "USD/2", "input": "0", "output": str(BIG),
                              "balance": str(-BIG)}
    assert world(seen[1]) == {"account": "world", "asset": "USD/2", "input": 0, "output": BIG, "balance": -BIG}
    assert as_strings == as_numbers
    # v2 lists accounts in ascending address order.
    assert [(r.account, r.balance) for r in as_numbers if r.account] == [
        ("users:001", BIG - 100), ("users:002", 100), ("world", -BIG)]


def test_v2_address_filter_goes_in_the_body(db, serve):
    ledger = moving_book().transfer(T0, "world", "users:001:savings", "USD/2", 9)
    server = serve(stack(ledger))
    take_snapshot(db, formance_source(server, api="v2", address="users:"), AFTER, credentials=CREDS)
    assert {r[0] for r in history(db)} == {"users:001", "users:002"}
    assert aggregates(db) == [("USD/2", Decimal(BIG), 2, AFTER)]
    reads = ledger_requests(server, "/volumes") + ledger_requests(server, "/aggregate/balances")
    assert len(reads) == 2
    for request in reads:
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
    # The EVM wallet's book, in wei: above 2**64, exact (the demo's treasury_eth pair check).
    assert rows[("treasury:evm", "ETH/18")] == (Decimal(sandbox.TREASURY_ETH), 18)
    assert {asset for _, asset in rows} == {"HBAR/8", "ETH/18", "USD/2", "EUR/2", "COIN"}


# -- the real server's behaviours (issue 12's table, row by row) ----------------


def runs(db):
    return fetch(db, "SELECT status, error, warnings FROM snapshot_runs ORDER BY run_id")


@pytest.mark.parametrize("server_version", ["v1.x", "v2.2", "v2.4.12"])
def test_1_unknown_ledger_is_an_error_and_nothing_is_created(db, serve, server_version):
    app = stack(server=server_version)
    server = serve(app)
    # The trap: a v1 route on an unknown ledger creates it and answers empty.
    trap = requests.get(f"{server.url}/api/ledger/typo/balances",
                        headers={"Authorization": f"Bearer {_token(server)}"})
    assert trap.status_code == 200 and trap.json()["cursor"]["data"] == [] and app.created == ["typo"]
    with pytest.raises(LedgerUnavailable, match="ledger 'nope' does not exist .*'main'"):
        take_snapshot(db, formance_source(server, ledger="nope"), now(), credentials=CREDS)
    assert app.created == ["typo"] and "nope" not in app.ledgers
    assert [r.path for r in ledger_requests(server, "_info")] == ["/_info", "/api/ledger/_info"]
    assert not ledger_requests(server, "/nope/balances") and history(db) == []
    assert runs(db)[0][0] == "failed" and "does not exist" in runs(db)[0][1]


def test_1_unknown_ledger_on_v2_is_an_error(db, serve):
    app = stack()
    server = serve(app)
    with pytest.raises(LedgerUnavailable, match=r"ledger 'nope' does not exist \(the server has 'main'\).*"
                                                 "HTTP 404 .*NOT_FOUND"):
        take_snapshot(db, formance_source(server, ledger="nope", api="v2"), AFTER, credentials=CREDS)
    assert [r.path for r in server.requests if r.path != TOKEN_PATH] == [
        "/_info", "/api/ledger/_info", "/api/ledger/v2/nope"]
    assert "nope" not in app.ledgers


def test_1_a_ledger_holding_no_account_fails_unless_allowed(db, serve):
    server = serve(FormanceStack({"main": Ledger(), "other": book()}, clients={CLIENT: SECRET}))
    with pytest.raises(SnapshotError, match="holds no account with a balance .*allow_empty = true"):
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    # A filter that matches nothing looks the same.
    with pytest.raises(SnapshotError, match=r"ledger 'other' \(address 'nobody:'\) holds no account"):
        take_snapshot(db, formance_source(server, ledger="other", address="nobody:"), now(), credentials=CREDS)
    summary = take_snapshot(db, formance_source(server, allow_empty=True), now(), credentials=CREDS)
    assert summary["status"] == "published" and history(db) == []
    assert any("holds no account" in w for w in runs(db)[-1][2])


def test_2_only_filters_that_mean_the_same_everywhere_are_accepted():
    for bad, why in [("users:.*", "not a literal"), ("users:00[12]", "not a literal"), ("*", "not a literal"),
                     ("users:...", "not a literal"), ("users:001,users:002", "comma"),
                     ("u", "one character")]:
        with pytest.raises(ConfigError, match=f"^sources.f.address: .*{why}"):
            make_source("f", provider="formance", base_url="http://f", ledger="main", address=bad)
    for good in ("users:", "users:001", "treasury:hedera", ":001", "users::savings", "a-b_c:"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", address=good)
    make_source("f", provider="formance", base_url="http://f", ledger="main", address="u", api="v2")
    # What the refused ones would do: a regex on v1.x, nothing on a v2.x server's v1 routes.
    assert v1x_address_matches("users:.*", "users:001:savings")
    assert not v2_address_matches("users:.*", "users:001") and not v2_address_matches("users:00[12]", "users:001")
    assert v1x_address_matches("users:00[12]", "users:001")
    assert address_matches("users:", "users:001") and not address_matches("users:", "users:001:savings")


def test_2_the_sandbox_serves_v1_filters_as_each_server_does(serve):
    ledger = book().transfer(T0, "world", "users:001:savings", "USD/2", 9)
    listed = {}
    for version in ("v1.x", "v2.2", "v2.3", "v2.4.12"):
        server = serve(stack(ledger, server=version))
        headers = {"Authorization": f"Bearer {_token(server)}"}
        for pattern in ("users:.*", "users:", "users:..."):
            body = requests.get(f"{server.url}{BALANCES}", params={"address": pattern}, headers=headers).json()
            listed[version, pattern] = sorted(a for r in body["cursor"]["data"] for a in r)
    two = ["users:001", "users:002", "users:003"]
    assert listed["v1.x", "users:.*"] == sorted(two + ["users:001:savings"])
    assert listed["v1.x", "users:"] == two  # v1.x lists only accounts that moved: no users:004
    assert all(listed[v, "users:.*"] == [] for v in ("v2.2", "v2.3", "v2.4.12"))
    assert listed["v2.2", "users:"] == listed["v2.4.12", "users:"] == two + ["users:004"]
    assert listed["v2.3", "users:"] == sorted(two + ["users:004", "users:001:savings"])
    assert listed["v2.3", "users:..."] == two + ["users:004"] and listed["v2.2", "users:..."] == []
    assert listed["v2.4.12", "users:..."] == sorted(two + ["users:004", "users:001:savings"])


def test_2_a_stray_address_fails_the_run_and_is_never_stored(db, serve):
    # v2.3.0 to v2.4.11 match a trailing ':' at any depth.
    ledger = book().transfer(T0, "world", "users:001:savings", "USD/2", 9)
    server = serve(stack(ledger, server="v2.3"))
    for api in ("v1", "v2"):
        with pytest.raises(SnapshotError, match="listed 'users:001:savings', outside the address filter "
                                                r"\(v2.3.0 to v2.3.21 .* at any depth"):
            # pit_margin 0: the run fails on the stray address, not on a wait for the server's clock.
            take_snapshot(db, formance_source(server, address="users:", api=api, pit_margin=0), now(),
                          credentials=CREDS)
    assert history(db) == [] and aggregates(db) == []
    assert [r[0] for r in runs(db)] == ["failed", "failed"]


def test_3_v2_2_compatibility_layer_losing_the_filter_fails_the_run(db, serve):
    server = serve(stack(server="v2.2"))
    with pytest.raises(SnapshotError, match="listed 'world', outside the address filter .*v2.3.0 fixed it"):
        take_snapshot(db, formance_source(server, address="users:", page_size=3), now(), credentials=CREDS)
    # Page 2 was asked with the cursor alone and came back unfiltered.
    follow_up = ledger_requests(server, "/main/balances")[-1]
    assert [k for k, _ in follow_up.query] == ["cursor"]
    assert history(db) == []
    fixed = serve(stack(server="v2.4.12"))
    summary = take_snapshot(db, formance_source(fixed, address="users:", page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published"
    assert {r[0] for r in history(db)} == {"users:001", "users:002", "users:003"}


def test_4_v2_through_the_gateway_and_standalone(db, serve):
    gateway = serve(stack(moving_book(), mounts=(GATEWAY,)))
    take_snapshot(db, formance_source(gateway, api="v2"), AFTER, credentials=CREDS)
    assert {r.path for r in gateway.requests if r.path != TOKEN_PATH} == {
        "/_info", "/api/ledger/_info", "/api/ledger/v2/main", "/api/ledger/v2/main/volumes",
        "/api/ledger/v2/main/aggregate/balances"}
    with pytest.raises(LedgerUnavailable, match='no Formance ledger at http.*/_info: a stack gateway .*api = "v2"'):
        take_snapshot(db, formance_source(gateway, api="v2-standalone"), AFTER, credentials=CREDS)
    standalone = serve(stack(moving_book(), mounts=("",)))
    with pytest.raises(LedgerUnavailable, match='is a standalone ledger .*api = "v2-standalone"'):
        take_snapshot(db, formance_source(standalone, api="v2"), AFTER, credentials=CREDS)
    summary = take_snapshot(db, formance_source(standalone, api="v2-standalone", ledger="main"),
                            AFTER - timedelta(minutes=1), credentials=CREDS)
    assert summary["status"] == "published"
    assert {r.path for r in standalone.requests if r.path.startswith("/v2/")} == {
        "/v2/main", "/v2/main/volumes", "/v2/main/aggregate/balances"}
    # A v1.x server has no v2 API at all.
    old = serve(stack(moving_book(), server="v1.x", mounts=("",)))
    with pytest.raises(LedgerUnavailable, match=r"ledger v1.10.16 has only the v1 API .*api = "
                                                 '"v1-standalone"'):
        take_snapshot(db, formance_source(old, api="v2-standalone"), AFTER, credentials=CREDS)


LAYOUTS = [("v2.4.12", GATEWAY), ("v2.4.12", ""), ("v2.2", ""), ("v1.x", GATEWAY), ("v1.x", "")]


@pytest.mark.parametrize("version,mount", LAYOUTS)
def test_4_no_setting_of_api_creates_anything(db, serve, version, mount):
    """Every api against every layout: the right one reads, the others are refused; none creates."""
    app = stack(server=version, mounts=(mount,))
    server = serve(app)
    right = ("v1" if version == "v1.x" else "v2") + ("-standalone" if mount == "" else "")
    for api in ("v1", "v1-standalone", "v2", "v2-standalone"):
        source = formance_source(server, api=api)
        at = AFTER if api in ("v2", "v2-standalone") else now()
        if api == right or (api.startswith("v1") and api.endswith("-standalone") == (mount == "")):
            assert take_snapshot(db, source, at, credentials=CREDS)["status"] == "published"
        else:
            with pytest.raises(LedgerUnavailable, match=r'api = "v[12](-standalone)?"'):
                take_snapshot(db, source, at, credentials=CREDS)
    assert app.created == [] and sorted(app.ledgers) == ["main"]


def test_4_the_sandbox_creates_ledgers_as_chi_does(serve):
    """What the layout check protects against: a standalone v2.x server's /{ledger}/* mount."""
    app = stack(mounts=("",))
    server = serve(app)
    headers = {"Authorization": f"Bearer {_token(server)}"}
    info = requests.get(f"{server.url}/_info")  # public, top-level: creates nothing
    assert info.status_code == 200 and app.created == []
    trap = requests.get(f"{server.url}/api/ledger/_info", headers=headers)
    assert trap.status_code == 404 and app.created == ["api"]
    requests.get(f"{server.url}/api/ledger/v2/main", headers=headers)
    assert app.created == ["api"]  # one ledger 'api', created once
    # gin (v1.x) runs the ledger's middleware for its own routes only.
    old = stack(server="v1.x", mounts=("",))
    old_server = serve(old)
    assert requests.get(f"{old_server.url}/api/ledger/_info", headers=headers).status_code == 404
    assert old.created == []


def test_5_backdated_transaction_keeps_one_time_axis(db, serve):
    # Effective before the snapshot time, inserted after it.
    ledger = moving_book().transfer(T0, "world", "users:003", "USD/2", 50, inserted=AFTER + timedelta(hours=1))
    server = serve(stack(ledger))
    url = f"{server.url}/api/ledger/v2/main/aggregate/balances"
    headers = {"Authorization": f"Bearer {_token(server)}"}
    by_effective = requests.get(url, params={"pit": format_pit(AFTER)}, headers=headers).json()["data"]
    by_insertion = requests.get(url, params={"pit": format_pit(AFTER), "useInsertionDate": "true"},
                                headers=headers).json()["data"]
    assert by_effective == {"USD/2": 0} and by_insertion == {"USD/2": 0}
    filtered = {"$match": {"address": "users:"}}
    assert requests.get(url, params={"pit": format_pit(AFTER)}, headers=headers,
                        json=filtered).json()["data"] == {"USD/2": BIG + 50}
    take_snapshot(db, formance_source(server, api="v2", address="users:"), AFTER, credentials=CREDS)
    # The volumes do not hold the backdated 50 yet; neither does the aggregate read beside them.
    assert {r[0]: r[2] for r in history(db)} == {"users:001": BIG - 100, "users:002": 100}
    assert aggregates(db) == [("USD/2", Decimal(BIG), 2, AFTER)]


def test_5_a_ledger_lacking_a_feature_is_named(db, serve):
    ledger = moving_book()
    ledger.features[MOVES_HISTORY] = "DISABLED"
    server = serve(stack(ledger))
    with pytest.raises(LedgerUnavailable, match="feature MOVES_HISTORY='DISABLED'.*need MOVES_HISTORY=ON"):
        take_snapshot(db, formance_source(server, api="v2"), AFTER, credentials=CREDS)
    # What the server itself answers, should it be asked anyway.
    ledger.features["MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES"] = "DISABLED"
    extractor = build_extractor(formance_source(server, api="v2"), CREDS)
    with pytest.raises(ProviderError, match='missing feature "MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES"'
                                            ".*created without a feature"):
        extractor.client.get_json("/api/ledger/v2/main/aggregate/balances", {"pit": format_pit(AFTER)})


def test_6_an_account_added_between_pages_makes_the_crawl_start_again(db, serve):
    app = stack()
    server = serve(app)
    moved_at = []

    def move(ledger):
        moved_at.append(now())
        ledger.transfer(moved_at[0], "world", "users:000", "USD/2", 5)

    # Sorted ascending, users:000 lands before the offset: page 2 repeats an address.
    app.after_pages(1, move)
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published"
    # The snapshot is the second pass's: its time is after the move, not the voided first pass's.
    assert summary["as_of"] > moved_at[0]
    assert {r[4] for r in history(db)} == {summary["as_of"]}
    [(_, _, warnings)] = runs(db)
    assert any("listed twice" in w and "reading it again" in w for w in warnings)
    rows = {(r[0], r[1]): r[2] for r in history(db)}
    assert rows[("users:000", "USD/2")] == 5 and rows[("world", "USD/2")] == -(BIG + 345 + 5)
    # One aggregate, read by the second pass (the first was cut short by the repeat), inside
    # the log's count read before and after each pass.
    assert len(ledger_requests(server, "/main/aggregate/balances")) == 1
    assert len(ledger_requests(server, "/main/stats")) == 3


def test_6_movement_inside_the_filter_or_between_read_accounts_is_caught(db, serve):
    app = stack()
    server = serve(app)
    app.after_pages(1, lambda ledger: ledger.transfer(now(), "world", "users:003", "COIN", 1))
    take_snapshot(db, formance_source(server, page_size=2, address="users:"), now(), credentials=CREDS)
    assert any("its log went from 8 to 9 transactions" in w for w in runs(db)[-1][2])
    assert {(r[0], r[1]): r[2] for r in history(db)}[("users:003", "COIN")] == 8
    # Unfiltered, a transfer between two accounts keeps the aggregate (always 0): the log shows it.
    app.after_pages(1, lambda ledger: ledger.transfer(now(), "world", "users:001", "COIN", 2))
    take_snapshot(db, formance_source(server, page_size=2), now() + timedelta(seconds=1), credentials=CREDS)
    assert any("its log went from 9 to 10 transactions" in w for w in runs(db)[-1][2])


def test_6_a_ledger_that_never_holds_still_fails_the_run(db, serve):
    app = stack()
    server = serve(app)
    for i in range(1, 40):
        app.after_pages(i, lambda ledger, i=i: ledger.transfer(now(), "world", f"users:000{i}", "USD/2", 1))
    with pytest.raises(SnapshotMoved, match='moved during each of 3 crawls .*Use api = "v2"'):
        take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert history(db) == [] and runs(db)[0][0] == "failed"
    # As many crawls as the source allows.
    def crawls():
        return [r for r in ledger_requests(server, "/main/balances") if r.params("pageSize")]

    assert len(crawls()) == 3
    app.after_pages(1, lambda ledger: ledger.transfer(now(), "world", "users:0000", "USD/2", 1))
    with pytest.raises(SnapshotMoved, match="moved during each of 1 crawls"):
        take_snapshot(db, formance_source(server, page_size=2, max_crawls=1), now(), credentials=CREDS)
    assert len(crawls()) == 4
    assert fetch(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'balance_staging'") == [(0,)]


def test_7_v1x_aggregate_regex_is_unanchored_so_such_filters_are_refused(serve):
    assert v1x_address_matches("users:00.", "users:001")
    assert not v1x_address_matches("users:00.", "users:x001")
    assert v1x_address_matches("users:00.", "users:x001", aggregate=True)  # like_regex, unanchored
    assert v1x_address_matches("users:001", "users:001", aggregate=True)
    assert not v1x_address_matches("users:001", "users:x001", aggregate=True)  # word segments: ==
    with pytest.raises(ConfigError, match="sources.f.address: segment '00.'"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", address="users:00.")


def test_8_v1x_filter_details(db, serve):
    server = serve(stack(server="v1.x"))
    headers = {"Authorization": f"Bearer {_token(server)}"}
    crash = requests.get(f"{server.url}{BALANCES}", params={"address": "u"}, headers=headers)
    assert crash.status_code == 500 and crash.content == b""
    assert v1x_address_matches("users:", "users:001") and v1x_address_matches("users:*", "users:001")
    assert v1x_address_matches("users:.*", "users") and v1x_address_matches("users:.*", "users:1:2")
    summary = take_snapshot(db, formance_source(server, address="users:", page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published"
    assert {r[0] for r in history(db)} == {"users:001", "users:002", "users:003"}


def test_9_asset_notation_as_the_server_defines_it(db, serve):
    assert [asset_decimals(a) for a in ("USD/999", "EUR_CENTS/2", "A/16383", "X1_Y")] == [999, 2, 16383, 0]
    with pytest.raises(RecordError, match="valid on the ledger, but above 16383"):
        asset_decimals("USD/999999")
    for bad in ("USD/1000000", "USD_/2", "USD_cents/2", "USD/\u0662", "USD/2\n", "_USD"):
        with pytest.raises(RecordError, match="not a Formance asset"):
            asset_decimals(bad)
    ledger = Ledger.of(T0, {"world": {"GOLD/300": -7, "EUR_CENTS/2": -3}, "users:001": {"GOLD/300": 7},
                            "users:002": {"EUR_CENTS/2": 3}})
    server = serve(stack(ledger))
    take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    assert {(r[0], r[1]): (r[2], r[3]) for r in history(db)}[("users:001", "GOLD/300")] == (7, 300)
    units = fetch(db, "SELECT balance_units FROM balance_history_units WHERE account = 'users:001'")
    assert units == [(Decimal(7).scaleb(-300),)]


def test_10_sort_orders_differ_and_the_crawl_does_not_care(db, serve):
    orders = {}
    for version in ("v1.x", "v2.4.12"):
        server = serve(stack(server=version))
        headers = {"Authorization": f"Bearer {_token(server)}"}
        body = requests.get(f"{server.url}{BALANCES}", headers=headers).json()
        orders[version] = [a for r in body["cursor"]["data"] for a in r]
        take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert orders["v1.x"] == sorted(orders["v1.x"], reverse=True)
    assert orders["v2.4.12"] == sorted(orders["v2.4.12"])
    server = serve(stack())
    body = requests.get(f"{server.url}/api/ledger/v2/main/accounts",
                        headers={"Authorization": f"Bearer {_token(server)}"}).json()
    assert [a["address"] for a in body["cursor"]["data"]] == sorted(orders["v2.4.12"])
    assert [r[0] for r in runs(db)] == ["published", "published"]


def _token(server) -> str:
    answer = requests.post(f"{server.url}{TOKEN_PATH}", data={
        "grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET})
    return answer.json()["access_token"]


# -- issue 25: one instant of the ledger, proved by the ledger's own log ----------------


def test_25_1_offsetting_moves_between_pages_make_the_crawl_start_again(db, serve):
    """Two moves that keep every sum: page 1 read before them, page 2 after."""
    ledger = Ledger.of(T0, {"world": {"USD/2": -5_000}, "merchants:acme": {"USD/2": 1_000},
                            "users:001": {"USD/2": 3_000}, "users:999": {"USD/2": 1_000}})
    app = stack(ledger)
    server = serve(app)

    def move(book):
        book.transfer(now(), "users:001", "users:999", "USD/2", 1_000)
        book.transfer(now(), "world", "merchants:acme", "USD/2", 1_000)

    # Ascending: page 1 is merchants:acme and users:001, page 2 users:999 and world.
    app.after_pages(1, move)
    summary = take_snapshot(db, formance_source(server, page_size=2), now(), credentials=CREDS)
    assert summary["status"] == "published"
    assert {r[0]: r[2] for r in history(db)} == {"merchants:acme": 2_000, "users:001": 2_000,
                                                  "users:999": 2_000, "world": -6_000}
    [(_, _, warnings)] = runs(db)
    assert any("its log went from 4 to 6 transactions" in w and "reading it again" in w for w in warnings)
    # The snapshot says which ledger state it is: the log's count, read before and after it.
    assert summary["as_of_raw"].endswith(" transactions=6")
    assert {r[5] for r in history(db)} == {summary["as_of_raw"]}
    # No check that cannot fail: one aggregate per pass, none before the pages.
    assert len(ledger_requests(server, "/main/aggregate/balances")) == 2


def test_25_2_an_account_opened_by_a_future_dated_transaction_is_in_the_snapshot(db, serve):
    # Inserted before pit, dated after it: its account's first use lies after pit.
    ledger = moving_book().transfer(AFTER + timedelta(days=30), "world", "users:new", "USD/2", 70,
                                    inserted=T1)
    server = serve(stack(ledger))
    take_snapshot(db, formance_source(server, api="v2"), AFTER, credentials=CREDS)
    assert {r[0]: r[2] for r in history(db)} == {"users:001": BIG - 100, "users:002": 100,
                                                  "users:new": 70, "world": -BIG - 70}
    assert aggregates(db) == [("USD/2", Decimal(0), 2, AFTER)]


def test_25_2_an_account_missing_from_the_listing_fails_the_run(db, serve):
    def drop_users_002(body):
        body["cursor"]["data"] = [v for v in body["cursor"]["data"] if v["account"] != "users:002"]
        return body

    server = serve(Rewrite(stack(moving_book()), "/api/ledger/v2/main/volumes", drop_users_002))
    with pytest.raises(SnapshotError, match="do not add up to its aggregate balances at pit .*Nothing stored"):
        take_snapshot(db, formance_source(server, api="v2"), AFTER, credentials=CREDS)
    assert history(db) == [] and aggregates(db) == [] and runs(db)[0][0] == "failed"


def test_25_3_a_pit_after_the_servers_clock_is_refused(db, serve):
    app = stack(moving_book(), clock_skew=-3600)  # the server's clock an hour behind ours
    server = serve(app)
    with pytest.raises(SnapshotInFuture, match=r"pit .* is 0:5\d:\d\d.* after the server's clock"):
        take_snapshot(db, formance_source(server, api="v2"), now() - timedelta(minutes=2), credentials=CREDS)
    assert ledger_requests(server, "/volumes") == [] and history(db) == []
    assert runs(db)[0][0] == "failed"


def test_25_3_a_recent_pit_is_read_once_the_servers_clock_is_past_it_by_the_margin(db, serve):
    app = stack(moving_book())
    server = serve(app)
    pit = now() - timedelta(seconds=0.5)
    summary = take_snapshot(db, formance_source(server, api="v2", pit_margin=2), pit, credentials=CREDS)
    assert summary["status"] == "published"
    reads = [(path, at) for path, at in app.served_at if path.endswith(("/volumes", "/aggregate/balances"))]
    assert reads and all(at >= pit.timestamp() + 2 for _, at in reads)


def _sources_with_history() -> list:
    """Each provider's sandbox source, Formance's on v2: those that answer for a past time."""
    from pipeline.config import parse_source
    from tests.sandboxes import PROVIDERS, source_keys

    found = []
    for name in PROVIDERS:
        keys = source_keys(name, "http://127.0.0.1:9", **({"api": "v2"} if name == "formance" else {}))
        source = parse_source("future_test", keys)
        if provider(name).answers_for_past(source.settings):
            found.append(pytest.param(source, id=name))
    return found


@pytest.mark.parametrize("source", _sources_with_history())
def test_25_3_a_snapshot_time_in_the_future_is_refused_for_every_provider_with_history(db, source):
    from pipeline.snapshot import begin

    with pytest.raises(SnapshotInFuture, match=r"^future_test: the snapshot time .* is 0:59:5\d.* in the future"):
        begin(db, source, now() + timedelta(hours=1))
    assert fetch(db, "SELECT count(*) FROM snapshot_runs") == [(0,)]


def test_25_5_the_token_asks_for_the_read_scope_the_server_checks(db, serve):
    app = stack(check_scopes=True, client_scopes={"ledger:read"})
    server = serve(app)
    summary = take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    assert summary["status"] == "published" and app.scopes == ["ledger:read"]
    # A client the stack never gave the scope: its token carries none, and 401 names it.
    bare = stack(check_scopes=True, client_scopes={"wallets:read"})
    server = serve(bare)
    with pytest.raises(ProviderError, match=r"HTTP 401 .*without scope 'ledger:read'.*asked for: ledger:read; "
                                            "granted: not said") as caught:
        take_snapshot(db, formance_source(server), now(), credentials=CREDS)
    assert caught.value.status == 401


def test_25_5_v1x_refusals_name_its_route_scopes(db, serve):
    app = stack(server="v1.x", mounts=("",), check_scopes=True)
    server = serve(app)
    with pytest.raises(ProviderError, match=r"HTTP 403 .*/main/stats.*without scope 'stats' for this route.*"
                                            "asked for: ledger:read; granted: ledger:read") as caught:
        take_snapshot(db, formance_source(server, api="v1-standalone"), now(), credentials=CREDS)
    assert caught.value.status == 403 and not caught.value.retriable
    scoped = formance_source(server, api="v1-standalone", scopes=["accounts:read", "stats"])
    assert take_snapshot(db, scoped, now(), credentials=CREDS)["status"] == "published"
    assert app.scopes[-1] == "accounts:read stats"
    # The Connection's extra still names scopes for a source that sets none.
    extra = Credentials(CLIENT, SECRET, {"scope": "accounts:read stats"})
    assert take_snapshot(db, formance_source(server, api="v1-standalone"), now(),
                         credentials=extra)["status"] == "published"
    with pytest.raises(ConfigError, match=r"sources.f.scopes: 'a b' is not an OAuth2 scope"):
        make_source("f", provider="formance", base_url="http://f", ledger="main", scopes=["a b"])


def test_25_5_v1x_refuses_a_token_it_no_longer_accepts_with_403_and_it_is_renewed(serve):
    app = stack(server="v1.x", mounts=("",))
    server = serve(app)
    pages = build_extractor(formance_source(server, api="v1-standalone", page_size=2), CREDS).pages(now())
    next(pages)
    app.revoke_tokens()
    assert len(list(pages)) == 3
    assert app.refused == 1 and app.tokens_issued == 2


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_25_6_a_missing_index_is_named_before_any_read(db, serve, api):
    ledger = book()
    ledger.features[INDEX_ADDRESS_SEGMENTS] = "OFF"
    app = stack(ledger, server="v2.2")
    server = serve(app)
    with pytest.raises(LedgerUnavailable, match=r"feature INDEX_ADDRESS_SEGMENTS='OFF'; an address filter with "
                                                r"an empty segment \('users:'\) need INDEX_ADDRESS_SEGMENTS=ON"):
        take_snapshot(db, formance_source(server, api=api, address="users:"), AFTER if api == "v2" else now(),
                      credentials=CREDS)
    assert app.pages_served == 0 and ledger_requests(server, "/aggregate/balances") == []
    # What the server answers when asked anyway: the v1 layer a bare 500, v2 a 400.
    extractor = build_extractor(formance_source(server, api=api), CREDS)
    with pytest.raises(ProviderError) as caught:
        if api == "v1":
            extractor.client.policy.max_attempts = 1
            extractor.client.get_json(BALANCES, {"address": "users:"})
        else:
            extractor.client.get_json("/api/ledger/v2/main/volumes", json_body={"$match": {"address": "users:"}})
    assert caught.value.status == (500 if api == "v1" else 400)
    assert ("created without a feature" if api == "v2" else "500 for any error it does not classify") \
        in str(caught.value)
    # A literal filter needs no index.
    assert take_snapshot(db, formance_source(server, api="v1", address="users:001"), now(),
                         credentials=CREDS)["status"] == "published"


def test_25_8_the_sandbox_answers_auth_as_each_server_does(serve):
    for version, mount, invalid, no_token, info_public in [
            ("v1.x", "", 403, 401, True), ("v2.4.12", "", 401, 401, True),
            ("v1.x", GATEWAY, 401, 401, False), ("v2.2", GATEWAY, 401, 401, False)]:
        server = serve(stack(server=version, mounts=(mount,)))
        url = f"{server.url}{mount}"
        bad = {"Authorization": "Bearer not-a-token"}
        assert requests.get(f"{url}/main/balances", headers=bad).status_code == invalid, version
        assert requests.get(f"{url}/main/balances").status_code == no_token
        assert (requests.get(f"{url}/_info").status_code == 200) == info_public, (version, mount)
    # v2's own /_info is not public; scopes missing: 401 from v2.x, 403 from v1.x's routes.
    server = serve(stack(mounts=("",), check_scopes=True))
    assert requests.get(f"{server.url}/v2/_info").status_code == 401
    answer = requests.post(f"{server.url}{TOKEN_PATH}", data={
        "grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET, "scope": "other"})
    headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}
    assert requests.get(f"{server.url}/v2/main", headers=headers).status_code == 401
    old = serve(stack(server="v1.x", mounts=("",), check_scopes=True))
    answer = requests.post(f"{old.url}{TOKEN_PATH}", data={
        "grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET, "scope": "stats"})
    headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}
    assert requests.get(f"{old.url}/main/stats", headers=headers).status_code == 200
    refused = requests.get(f"{old.url}/main/balances", headers=headers)
    assert refused.status_code == 403 and refused.content == b""


def test_25_8_the_sandbox_follows_each_release(serve):
    features = {}
    for version in ("v2.2", "v2.3", "v2.4.12"):
        server = serve(stack(moving_book(), server=version))
        headers = {"Authorization": f"Bearer {_token(server)}", "Formance-Bigint-As-String": "true"}
        features[version] = requests.get(f"{server.url}/api/ledger/v2/main", headers=headers).json()["data"]["features"]
        body = requests.get(f"{server.url}/api/ledger/v2/main/volumes", headers=headers).json()
        world = next(v for v in body["cursor"]["data"] if v["account"] == "world")
        # The bigint header is honoured from v2.3.0 on.
        assert world["balance"] == (-BIG if version == "v2.2" else str(-BIG)), version
        assert "Date" in requests.get(f"{server.url}/_info").headers
    # pkg/features/features.go: v2.3.0 dropped the two index features.
    assert INDEX_ADDRESS_SEGMENTS in features["v2.2"] and INDEX_ADDRESS_SEGMENTS not in features["v2.4.12"]
    assert features["v2.3"] == features["v2.4.12"] and features["v2.4.12"][MOVES_HISTORY] == "ON"
    # v2.2's legacy store (an upgrade not finished) lists accounts in descending order.
    orders = {}
    for legacy in (False, True):
        server = serve(stack(server="v2.2", legacy_store=legacy))
        body = requests.get(f"{server.url}{BALANCES}", headers={"Authorization": f"Bearer {_token(server)}"}).json()
        orders[legacy] = [a for r in body["cursor"]["data"] for a in r]
    assert orders[False] == sorted(orders[False]) and orders[True] == sorted(orders[False], reverse=True)


def test_25_7_crawl_memory_does_not_grow_with_the_ledger(serve):
    """Ten times the accounts, the same peak: nothing is kept per address (figures: bench b7)."""
    import tracemalloc

    from bench.b7_formance_memory import LEDGER, GeneratedLedger

    peaks = {}
    for accounts in (5_000, 50_000):
        server = serve(GeneratedLedger(accounts))
        source = formance_source(server, api="v1-standalone", ledger=LEDGER, page_size=1000)
        extractor = build_extractor(source)
        tracemalloc.start()
        try:
            rows = sum(len(page.rows) for page in extractor.pages(now()) if page.kind is PageKind.BALANCES)
            peaks[accounts] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert rows == accounts
    # Digests of every address (the code before issue 25) took about 4 MB more here.
    assert peaks[50_000] - peaks[5_000] < 1_000_000, peaks


# -- movements: the roll-forward of a window --------------------------------------------------


def test_v2_an_account_whose_assets_straddle_two_pages_is_not_listed_twice(db, serve):
    ledger = Ledger().transfer(T0, "world", "users:001", "USD/2", 500).transfer(T0, "world", "users:001", "EUR/2", 7)
    server = serve(stack(ledger))
    summary = take_snapshot(db, formance_source(server, api="v2", page_size=1, pit_margin=0), T1, credentials=CREDS)
    assert summary["status"] == "published", summary["error"]
    assert [r[:3] for r in history(db)] == [("users:001", "EUR/2", Decimal(7)), ("users:001", "USD/2", Decimal(500)),
                                            ("world", "EUR/2", Decimal(-7)), ("world", "USD/2", Decimal(-500))]


def rollforward(db):
    return {(r[0], r[1]): r[2:] for r in fetch(db, """
        SELECT account, asset, opening, inflow, outflow, closing, unexplained, status FROM balance_rollforward
         WHERE source = 'formance_test'""")}


def test_v2_a_window_counts_a_move_inserted_at_a_snapshot_time_once_and_in_the_window_it_ends(db, serve):
    from pipeline import movements

    first, second, third = T0 + timedelta(hours=1), T0 + timedelta(hours=2), T0 + timedelta(hours=3)
    ledger = Ledger().transfer(T0, "world", "users:001", "USD/2", 1_000)
    # Effective earlier, inserted exactly at the second snapshot's pit: in (first, second], not after it.
    ledger.transfer(T0, "users:001", "users:002", "USD/2", 300, inserted=second)
    ledger.transfer(second + timedelta(microseconds=1), "users:002", "users:003", "USD/2", 100)
    server = serve(stack(ledger))
    source = formance_source(server, api="v2", pit_margin=0)
    for at in (first, second, third):
        take_snapshot(db, source, at, credentials=CREDS)
    windows = movements.missing_windows(db, source)
    movements.load_windows(db, source, windows, credentials=CREDS)
    volumes = [dict(r.query) for r in ledger_requests(server, "/volumes") if ("startTime", format_pit(
        first + timedelta(microseconds=1))) in r.query or ("startTime", format_pit(second + timedelta(microseconds=1)))
        in r.query]
    # From one microsecond after the window's start (the server counts startTime itself), to its end.
    assert [(v["startTime"], v["endTime"], v["insertionDate"]) for v in volumes] == [
        ("2024-05-01T01:00:00.000001Z", "2024-05-01T02:00:00Z", "true"),
        ("2024-05-01T02:00:00.000001Z", "2024-05-01T03:00:00Z", "true")]
    flows = fetch(db, """SELECT period_end, account, inflow, outflow FROM balance_rollforward
                          WHERE inflow <> 0 OR outflow <> 0 ORDER BY 1, 2""")
    assert flows == [(second, "users:001", 0, 300), (second, "users:002", 300, 0),
                     (third, "users:002", 0, 100), (third, "users:003", 100, 0)]
    assert {r[-1] for r in rollforward(db).values()} == {"explained"}


@pytest.mark.parametrize("server_version", ["v1.x", "v2.4.12"])
def test_v1_a_window_is_the_transactions_between_its_two_counts(db, serve, server_version):
    from pipeline import movements

    app = stack(book(), server=server_version)
    server = serve(app)
    source = formance_source(server, page_size=2, address="users:")
    first = take_snapshot(db, source, now(), credentials=CREDS, force=True)
    ledger = app.ledgers["main"]
    counted = ledger.transactions
    ledger.transfer(now(), "users:001", "users:002", "USD/2", 1_234)
    ledger.transfer(now(), "users:002", "users:003", "COIN", 0)  # moves nothing, still a transaction
    ledger.transfer(now(), "world", "users:004", "EUR/2", BIG)
    ledger.transfer(now(), "users:003", "world", "COIN", 2)
    time.sleep(0.002)
    second = take_snapshot(db, source, now(), credentials=CREDS, force=True)
    assert (first["as_of_raw"].endswith(f"transactions={counted}"),
            second["as_of_raw"].endswith(f"transactions={counted + 4}")) == (True, True)
    server.clear()
    [summary] = movements.load_windows(db, source, movements.missing_windows(db, source), credentials=CREDS)
    assert summary["status"] == "published"
    listed = ledger_requests(server, "/transactions")
    assert listed[0].query == [("pageSize", "2"), ("after", str(counted + 4))]
    assert all([k for k, _ in r.query] == ["cursor"] for r in listed[1:])
    legs = fetch(db, "SELECT movement_id, account, amount, kind, counterparty FROM balance_movements"
                     " ORDER BY length(movement_id), movement_id")
    # The address filter keeps the users' legs; world's are not the source's.
    assert legs == [(f"tx {counted} leg 0", "users:001", -1_234, "transfer", "users:002"),
                    (f"tx {counted} leg 1", "users:002", 1_234, "transfer", "users:001"),
                    (f"tx {counted + 1} leg 0", "users:002", 0, "transfer", "users:003"),
                    (f"tx {counted + 1} leg 1", "users:003", 0, "transfer", "users:002"),
                    (f"tx {counted + 2} leg 1", "users:004", BIG, "mint", "world"),
                    (f"tx {counted + 3} leg 0", "users:003", -2, "burn", "world")]
    statement = rollforward(db)
    assert statement[("users:004", "EUR/2")] == (None, BIG, 0, BIG, 0, "explained")
    assert {r[-1] for r in statement.values()} == {"explained"}


def test_v1_a_window_whose_transaction_ids_skip_one_fails_rather_than_guess(db, serve):
    from pipeline import movements

    app = stack(book(), server="v2.4.12")
    server = serve(app)
    source = formance_source(server)
    take_snapshot(db, source, now(), credentials=CREDS, force=True)
    ledger = app.ledgers["main"]
    counted = ledger.transactions
    ledger.transfer(now(), "users:001", "users:002", "USD/2", 5)
    ledger.skip_id()  # a transaction took an id from the sequence and failed
    ledger.transfer(now(), "users:002", "users:003", "USD/2", 1)
    time.sleep(0.002)
    take_snapshot(db, source, now(), credentials=CREDS, force=True)
    # Ids counted + 0 and + 2: the count says two transactions, so the window asks below counted + 2.
    with pytest.raises(SnapshotError, match=f"holds transactions {counted} to {counted + 1}, but after {counted + 2} "
                                            f"the ledger listed {counted}, not {counted + 1}: its ids are not "
                                            "contiguous"):
        movements.load_windows(db, source, movements.missing_windows(db, source), credentials=CREDS)
    assert fetch(db, "SELECT status FROM movement_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]


def test_a_window_with_snapshots_of_both_apis_is_unexplainable_never_guessed(db, serve):
    from pipeline import movements

    server = serve(stack(moving_book()))
    take_snapshot(db, formance_source(server, api="v2", pit_margin=0), T1 + timedelta(hours=1), credentials=CREDS)
    v1 = formance_source(server)
    take_snapshot(db, v1, now(), credentials=CREDS)
    [summary] = movements.load_windows(db, v1, movements.missing_windows(db, v1), credentials=CREDS)
    assert summary["status"] == "published" and "cannot be placed in it" in summary["unexplainable"]["*"]
    assert {r[-1] for r in rollforward(db).values()} == {"unexplainable"}
