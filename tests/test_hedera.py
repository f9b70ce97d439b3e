"""Hedera mirror node: extractor and pipeline against the fake, into Postgres."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from extractors.errors import MalformedResponseError, PaginationError, ProviderError
from extractors.hedera import format_timestamp, parse_timestamp
from pipeline.snapshot import RejectedRecordsError, begin, crawl, publish, take_snapshot
from sandbox.hedera import Account, HederaMirror, Snapshot
from sandbox.server import Fault, Response, json_response
from tests.conftest import fetch, make_source
from tests.hedera_data import BIG, NETWORK_NUMS, T1, T2, T3, mirror, network, network_book

AFTER_T3 = datetime(2023, 11, 14, 23, 0, tzinfo=timezone.utc)  # later than every snapshot
BETWEEN_T2_T3 = datetime.fromtimestamp(1700001000, tz=timezone.utc)


def hedera_source(server, **keys):
    return make_source("hedera_test", provider="hedera", base_url=server.url, **keys)


def history(db, source="hedera_test"):
    return fetch(db, "SELECT account, asset, balance, decimals, as_of_raw FROM balance_history"
                     " WHERE source = %s ORDER BY account, asset", (source,))


def test_timestamps_round_trip_to_microseconds():
    at = parse_timestamp("1700000900.123456789")
    assert at == datetime(2023, 11, 14, 22, 28, 20, 123456, tzinfo=timezone.utc)
    assert format_timestamp(at) == "1700000900.123456000"


def test_crawl_follows_every_page_and_lands_exactly(db, serve):
    server = serve(mirror(accounts=57))
    summary = take_snapshot(db, hedera_source(server, limit=10), AFTER_T3)
    assert summary["status"] == "published"
    rows = history(db)
    # 57 accounts + the treasury, HBAR each, plus a token row for 1005, 1010, ... 1055.
    assert len(rows) == 58 + 11
    assert summary["rows"] == len(rows) == summary["rows_inserted"]
    treasury = [r for r in rows if r[0] == "0.0.2"]
    assert treasury == [("0.0.2", "HBAR", Decimal(BIG + 3), 8, T3)]
    assert all(r[4] == T3 for r in rows)
    # 58 accounts at 10 per page: 6 pages, the last one short.
    assert summary["pages"] == 6
    balances_requests = [r for r in server.requests if r.path == "/api/v1/balances"]
    # One unfiltered lookup chose the snapshot, then the 6 pages asked for exactly it.
    assert len(balances_requests) == 7
    assert balances_requests[0].query == [("timestamp", f"lte:{format_timestamp(AFTER_T3)}"), ("limit", "1")]
    assert all(("timestamp", f"lte:{T3}") in r.query for r in balances_requests[1:])
    # Follow-up requests used the server's own unencoded next link.
    assert "account.id=lt:0.0." in balances_requests[2].raw_query


def test_token_rows_carry_the_tokens_decimals_fetched_once(db, serve):
    server = serve(mirror(accounts=57))
    take_snapshot(db, hedera_source(server, limit=100), AFTER_T3)
    tokens = fetch(db, "SELECT account, balance, decimals FROM balance_history WHERE asset = '0.0.7001'"
                       " ORDER BY account")
    assert tokens[0] == ("0.0.1005", Decimal(1005 * 10 + 3), 4)
    assert len(tokens) == 11
    token_lookups = [r for r in server.requests if r.path.startswith("/api/v1/tokens/")]
    assert len(token_lookups) == 1


def test_include_tokens_false_loads_only_hbar(db, serve):
    server = serve(mirror())
    take_snapshot(db, hedera_source(server, include_tokens=False), AFTER_T3)
    assert {r[1] for r in history(db)} == {"HBAR"}


def test_exactly_full_last_page_is_followed_by_an_empty_page(db, serve):
    server = serve(mirror(accounts=19))  # 20 accounts with the treasury
    summary = take_snapshot(db, hedera_source(server, limit=10), AFTER_T3)
    assert summary["pages"] == 3
    assert summary["rows"] == 20 + 3
    last = [r for r in server.requests if r.path == "/api/v1/balances"][-1]
    # desc order: the second page ended at the lowest account, the treasury 0.0.2.
    assert last.raw_query.endswith("account.id=lt:0.0.2")


def test_timestamp_selects_the_snapshot_and_as_of_is_what_the_server_returned(db, serve):
    server = serve(mirror())
    summary = take_snapshot(db, hedera_source(server), BETWEEN_T2_T3)
    assert summary["as_of_raw"] == T2
    assert summary["as_of"] == parse_timestamp(T2)
    assert summary["scheduled_for"] == BETWEEN_T2_T3
    first = [r for r in server.requests if r.path == "/api/v1/balances"][0]
    assert ("timestamp", f"lte:{format_timestamp(BETWEEN_T2_T3)}") in first.query
    assert {r[4] for r in history(db)} == {T2}


def test_rerun_of_the_same_snapshot_adds_nothing(db, serve):
    server = serve(mirror())
    source = hedera_source(server)
    first = take_snapshot(db, source, AFTER_T3)
    second = take_snapshot(db, source, AFTER_T3)
    assert first["rows_inserted"] == first["rows"] > 0
    assert second["status"] == "published"
    assert second["rows_inserted"] == 0
    count = fetch(db, "SELECT count(*), count(DISTINCT (account, asset)) FROM balance_history")[0]
    assert count == (first["rows"], first["rows"])


def test_backfill_loads_an_older_snapshot_beside_the_newer(db, serve):
    server = serve(mirror())
    source = hedera_source(server)
    take_snapshot(db, source, AFTER_T3)
    take_snapshot(db, source, datetime.fromtimestamp(1700000001, tz=timezone.utc))
    snapshots = fetch(db, "SELECT as_of_raw, count(*), sum(balance) FILTER (WHERE account = '0.0.1001')"
                          " FROM balance_history GROUP BY 1 ORDER BY 1")
    assert [s[0] for s in snapshots] == [T1, T3]
    assert snapshots[0][1] == snapshots[1][1]
    assert snapshots[0][2] == Decimal(1001 * 1000 + 1)


def test_no_snapshot_yet_ends_cleanly_and_loads_nothing(db, serve):
    server = serve(mirror())
    summary = take_snapshot(db, hedera_source(server), datetime(2020, 1, 1, tzinfo=timezone.utc))
    assert summary["status"] == "no_snapshot"
    assert "no balance snapshot" in summary["error"]
    assert history(db) == []


def test_changed_history_for_a_held_snapshot_is_refused(db, serve):
    app = mirror()
    server = serve(app)
    source = hedera_source(server)
    take_snapshot(db, source, AFTER_T3)
    app.snapshots[-1].account = lambda num, old=app.snapshots[-1].account: Account(
        old(num).balance + 1, old(num).tokens)
    with pytest.raises(Exception, match="already loaded with other balances"):
        take_snapshot(db, source, AFTER_T3)
    statuses = fetch(db, "SELECT status FROM snapshot_runs ORDER BY run_id")
    assert statuses == [("published",), ("failed",)]


def test_failure_mid_crawl_leaves_no_partial_snapshot(db, serve):
    server = serve(mirror())
    # The snapshot lookup and two pages get through.
    server.inject(Fault("status", times=100, path="/api/v1/balances", after=3,
                        response=json_response({"_status": {"messages": [{"message": "down"}]}}, 503)))
    source = hedera_source(server, limit=10, max_attempts=3)
    with pytest.raises(ProviderError, match="HTTP 503"):
        take_snapshot(db, source, AFTER_T3)
    assert history(db) == []
    run = fetch(db, "SELECT status, pages, retries, error FROM snapshot_runs")[0]
    assert run[0] == "failed" and run[1] == 2 and run[2] == 2
    assert "503" in run[3] and "down" in run[3]
    staging = fetch(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'balance_staging'")
    assert staging == [(0,)]


def test_malformed_record_is_quarantined_and_fails_the_run(db, serve):
    app = mirror(accounts=20)
    good = app.snapshots[-1].account

    def account(num):
        if num == 1007:
            return Account(balance="12.5")  # not an integer
        return good(num)

    app.snapshots[-1].account = account
    server = serve(app)
    with pytest.raises(RejectedRecordsError, match="1 record"):
        take_snapshot(db, hedera_source(server), AFTER_T3)
    assert history(db) == []
    rejected = fetch(db, "SELECT raw, reason FROM rejected_records")
    assert len(rejected) == 1
    assert '"account":"0.0.1007"' in rejected[0][0] and '"12.5"' in rejected[0][0]
    assert "balance" in rejected[0][1]
    assert fetch(db, "SELECT status, rejected FROM snapshot_runs") in ([("failed", 0)], [("failed", 1)])


def test_rejection_threshold_lets_the_rest_publish(db, serve):
    app = HederaMirror([Snapshot.of(T3, {5: Account(balance=10), 6: Account(balance=-3),
                                          7: Account(balance=True)})])
    server = serve(app)
    summary = take_snapshot(db, hedera_source(server, max_rejected=2), AFTER_T3)
    assert summary["status"] == "published" and summary["rejected"] == 2
    assert [r[0] for r in history(db)] == ["0.0.5"]
    reasons = sorted(r[0] for r in fetch(db, "SELECT reason FROM rejected_records"))
    assert any("boolean" in r for r in reasons) and any("-3, below" in r for r in reasons)


def test_fifty_tokens_are_flagged_as_possibly_truncated(db, serve):
    tokens = [(f"0.0.{8000 + i}", i) for i in range(50)]
    app = HederaMirror([Snapshot.of(T3, {9: Account(balance=1, tokens=tokens)})],
                       tokens={t: 0 for t, _ in tokens})
    server = serve(app)
    summary = take_snapshot(db, hedera_source(server), AFTER_T3)
    assert summary["rows"] == 51
    assert any("0.0.9" in w and "truncated" in w for w in summary["warnings"])


def test_429_with_retry_after_is_retried_and_counted(db, serve):
    server = serve(mirror())
    server.inject(Fault("status", times=2, path="/api/v1/balances",
                        response=json_response({"_status": {"messages": [{"message": "Too many requests"}]}},
                                               429, {"Retry-After": "0"})))
    summary = take_snapshot(db, hedera_source(server, max_attempts=3), AFTER_T3)
    assert summary["status"] == "published" and summary["retries"] == 2


def test_retry_after_is_honoured(db, serve):
    server = serve(mirror())
    server.inject(Fault("status", times=1, path="/api/v1/balances",
                        response=Response(status=429, headers={"Retry-After": "1"})))
    started = datetime.now(timezone.utc)
    summary = take_snapshot(db, hedera_source(server), AFTER_T3)
    assert (datetime.now(timezone.utc) - started).total_seconds() >= 1.0
    assert summary["retries"] == 1


def test_unknown_parameter_gets_the_providers_message(db, serve):
    server = serve(mirror())
    source = hedera_source(server)
    from pipeline.snapshot import build_extractor

    extractor = build_extractor(source)
    with pytest.raises(ProviderError) as caught:
        extractor.client.get_json("/api/v1/balances", {"bogus": "1"})
    assert caught.value.status == 400 and not caught.value.retriable
    assert "Unknown query parameter: bogus" in str(caught.value)


class _LinkTo:
    """A mirror whose next link is replaced by ``links`` in turn."""

    def __init__(self, links):
        self.links = list(links)
        self.app = mirror()

    def __call__(self, request):
        response = self.app(request)
        # The snapshot lookup (limit=1) follows no link: only crawl pages are relinked.
        if request.path == "/api/v1/balances" and self.links and ("limit", "1") not in request.query:
            import json

            body = json.loads(response.body)
            body["links"]["next"] = self.links.pop(0)
            response = json_response(body)
        return response


def test_next_link_to_another_origin_is_refused_and_gets_no_credential(db, serve, monkeypatch):
    other = serve(mirror())
    server = serve(_LinkTo([f"{other.url}/api/v1/balances?limit=10"]))
    monkeypatch.setenv("AIRFLOW_CONN_HEDERA_KEYED", "http://:sekret-api-key-1234@mirror")
    source = hedera_source(server, conn_id="hedera_keyed", limit=10)
    from pipeline import connections

    creds = connections.credentials("hedera_keyed")
    with pytest.raises(PaginationError, match="leaves the configured origin"):
        take_snapshot(db, source, AFTER_T3, credentials=creds)
    assert other.request_count == 0
    assert server.requests[0].header("x-api-key") == "sekret-api-key-1234"
    assert "sekret" not in fetch(db, "SELECT error FROM snapshot_runs")[0][0]
    assert history(db) == []


def test_pagination_cycle_is_detected(db, serve):
    a = "/api/v1/balances?limit=10&account.id=lt:0.0.1050"
    b = "/api/v1/balances?limit=10&account.id=lt:0.0.1040"
    server = serve(_LinkTo([a, b, a, b]))
    with pytest.raises(PaginationError, match="loop"):
        take_snapshot(db, hedera_source(server, limit=10), AFTER_T3)
    assert history(db) == []


def test_page_cap_stops_an_endless_crawl(db, serve):
    server = serve(mirror())
    with pytest.raises(PaginationError, match="page cap"):
        take_snapshot(db, hedera_source(server, limit=5, max_pages=3), AFTER_T3)


def test_invalid_json_is_kept_as_a_rejection(db, serve):
    server = serve(mirror())
    server.inject(Fault("status", path="/api/v1/balances",
                        response=Response(status=200, body=b"<html>oops</html>", content_type="text/html")))
    with pytest.raises(MalformedResponseError, match="not valid JSON"):
        take_snapshot(db, hedera_source(server), AFTER_T3)
    assert fetch(db, "SELECT raw FROM rejected_records") == [("<html>oops</html>",)]


def test_snapshot_changing_between_pages_is_an_error(db, serve):
    app = mirror()

    class Drifting:
        calls = 0

        def __call__(self, request):
            if request.path == "/api/v1/balances":
                Drifting.calls += 1
                if Drifting.calls == 2:
                    app.snapshots[-1].timestamp = "1700001801.000000000"
            return app(request)

    server = serve(Drifting())
    with pytest.raises(Exception, match="snapshot"):
        take_snapshot(db, hedera_source(server, limit=10), AFTER_T3)
    assert history(db) == []


def test_steps_can_run_separately_like_airflow_tasks(db, serve):
    server = serve(mirror())
    source = hedera_source(server)
    run_id = begin(db, source, AFTER_T3, dag_run_id="manual__x")
    result = crawl(db, source, run_id)
    assert result.status == "staged" and result.rows > 0
    # Staged but not yet published: a reader sees nothing.
    assert history(db) == []
    published = publish(db, source, run_id)
    assert published.rows_published == result.rows == len(history(db))


def test_sharded_crawl_loads_the_same_snapshot_as_one_crawl(db, serve):
    server = serve(mirror(accounts=57))
    whole = take_snapshot(db, hedera_source(server, limit=10), AFTER_T3)
    expected = history(db)
    with db.cursor() as cur:
        cur.execute("TRUNCATE balance_history_store, balance_snapshots")
    db.commit()
    sharded = take_snapshot(db, hedera_source(server, limit=10, shards=3), AFTER_T3)
    assert history(db) == expected
    assert sharded["rows"] == whole["rows"]
    # The highest account is 0.0.1057: three ranges of 353 account numbers,
    # the first open below, the last open above.
    queries = [r.query for r in server.requests if r.path == "/api/v1/balances"]
    assert any(q[2:] == [("account.id", "lte:0.0.352")] for q in queries)
    assert any(q[2:] == [("account.id", "gte:0.0.353"), ("account.id", "lte:0.0.705")] for q in queries)
    assert any(q[2:] == [("account.id", "gte:0.0.706")] for q in queries)


def test_shards_are_refused_for_providers_that_cannot_split(db):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="shards"):
        make_source("x", provider="hedera", base_url="http://h", shards=0)


def test_request_budget_is_shared_and_paces_requests(db, serve):
    import threading
    import time as clock

    from loaders.budget import RequestBudget
    from loaders.db import reconnect_like

    budget_a = RequestBudget("test_budget", rate=20.0, burst=2.0, like=db)
    budget_b = RequestBudget("test_budget", rate=20.0, burst=2.0, like=reconnect_like(db, application_name="t"))
    started = clock.monotonic()
    workers = [threading.Thread(target=lambda b=b: [b.acquire() for _ in range(11)]) for b in (budget_a, budget_b)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = clock.monotonic() - started
    # 22 tokens at 20/s with a burst of 2: at least (22 - 2) / 20 = 1.0 s, whoever asks.
    assert elapsed >= 0.95
    assert budget_a.waited > 0 and budget_b.waited > 0
    budget_a.close()
    budget_b.close()


def test_source_rate_limit_paces_a_crawl(db, serve):
    server = serve(mirror(accounts=57))
    import time as clock

    started = clock.monotonic()
    summary = take_snapshot(db, hedera_source(server, limit=10, rate_limit=10), AFTER_T3)
    # The snapshot lookup, 6 balance pages, 1 token lookup at 10 requests/s, burst 10: no wait needed...
    assert summary["requests"] == 8
    fast = clock.monotonic() - started
    started = clock.monotonic()
    take_snapshot(db, hedera_source(server, limit=10, rate_limit=2), AFTER_T3)
    # ...at 2/s with a bucket of 2, the 8 requests need at least 3 s.
    assert clock.monotonic() - started >= 2.9 > fast


# --- the sandbox answers as the real mirror node's rest/ module does -------------

def ask(app, query: str):
    """One request to the sandbox app, without a server: (status, body)."""
    import json
    from urllib.parse import parse_qsl

    from sandbox.server import Request

    path, _, raw = query.partition("?") if query.startswith("/") else ("/api/v1/balances", "", query)
    response = app(Request("GET", path, raw, parse_qsl(raw, keep_blank_values=True), {}))
    return response.status, json.loads(response.body)


def accounts_of(body) -> list[str]:
    return [b["account"] for b in body["balances"]]


def test_sandbox_empty_page_after_a_full_last_page_has_a_null_timestamp():
    status, body = ask(network(), f"account.id=lte:0.0.1098&limit=100&timestamp=lte:{T2}")
    assert status == 200 and len(body["balances"]) == 100 and body["timestamp"] == T2
    # The anchor replaces the lte: bound (rest/utils.js updateReqQuery).
    assert body["links"]["next"] == f"/api/v1/balances?limit=100&timestamp=lte:{T2}&account.id=lt:0.0.2"
    assert ask(network(), body["links"]["next"]) == (
        200, {"timestamp": None, "balances": [], "links": {"next": None}})


def test_sandbox_ands_repeated_account_ids_and_lists_exact_ones():
    assert ask(network(), f"account.id=0.0.98&account.id=gte:0.0.1000&timestamp=lte:{T2}")[1] == {
        "timestamp": None, "balances": [], "links": {"next": None}}
    _, body = ask(network(), f"account.id=0.0.98&account.id=0.0.1001&account.id=0.0.98&timestamp=lte:{T2}")
    assert accounts_of(body) == ["0.0.1001", "0.0.98"] and body["timestamp"] == T2
    _, body = ask(network(), f"account.id=gte:0.0.1100&account.id=lt:0.0.1103&timestamp=lte:{T2}")
    assert accounts_of(body) == ["0.0.1102", "0.0.1101", "0.0.1100"]


def test_sandbox_next_link_of_exact_ids_repeats_the_request():
    query = f"account.id=0.0.2&account.id=0.0.98&account.id=0.0.1100&limit=2&timestamp=lte:{T2}"
    _, body = ask(network(), query)
    assert accounts_of(body) == ["0.0.1100", "0.0.98"]
    assert body["links"]["next"] == "/api/v1/balances?" + query
    # An exact id first and a range after: JavaScript tests "0.0.5,gte:..." against
    # ^[gl]te?: and adds no anchor either.
    _, body = ask(network(), f"account.id=0.0.1100&account.id=gte:0.0.1000&limit=1&timestamp=lte:{T2}")
    assert body["links"]["next"] == f"/api/v1/balances?account.id=0.0.1100&account.id=gte:0.0.1000&limit=1&timestamp=lte:{T2}"


def test_sandbox_links_as_in_the_real_specs():
    # rest/__tests__/specs/balances/limit.json: no account.id, asc: the anchor goes last.
    _, body = ask(network(), f"limit=2&order=asc&timestamp={T2}")
    assert body["links"]["next"] == f"/api/v1/balances?limit=2&order=asc&timestamp={T2}&account.id=gt:0.0.98"
    # Same file: gte:0.0.20, limit 2, desc ends on 0.0.20: the link's range is empty, so no link.
    _, body = ask(network(), f"account.id=gte:0.0.1247&limit=2&timestamp={T2}")
    assert accounts_of(body) == ["0.0.1248", "0.0.1247"] and body["links"]["next"] is None
    # A range kept beside the anchor.
    _, body = ask(network(), f"account.id=gte:0.0.1000&limit=2&timestamp={T2}")
    assert body["links"]["next"] == f"/api/v1/balances?account.id=gte:0.0.1000&account.id=lt:0.0.1247&limit=2&timestamp={T2}"


def test_sandbox_snapshot_choice_and_empty_answers():
    empty = {"timestamp": None, "balances": [], "links": {"next": None}}
    # timestamp-empty-result.json: nothing at or before the time.
    assert ask(network(), "timestamp=1600000000")[1] == empty
    # eq (and no operator) means lte for balances.
    assert ask(network(), "timestamp=eq:1700000899&limit=1")[1]["timestamp"] == T1
    assert ask(network(), "timestamp=1700000900.123456789&limit=1")[1]["timestamp"] == T2
    assert ask(network(), "timestamp=lt:1700000900.123456789&limit=1")[1]["timestamp"] == T1
    # not-found.json: a filter matching nothing in an existing snapshot.
    assert ask(network(), f"account.id=gte:0.0.5000&timestamp=lte:{T2}")[1] == empty


@pytest.mark.parametrize("query, message", [
    ("account.id=0.0.98%0A", "Invalid parameter: account.id"),
    ("account.id=%EF%BC%90.0.98", "Invalid parameter: account.id"),
    ("account.id=like:0.0.98", "Invalid parameter: account.id"),
    ("limit=0", "Invalid parameter: limit"),
    ("timestamp=12.5.1", "Invalid parameter: timestamp"),
    ("token.id=0.0.1", "Unknown query parameter: token.id"),
    ("&".join(["account.id=0.0.1"] * 101), "Parameter values count exceeds maximum number allowed: account.id"),
])
def test_sandbox_refuses_what_the_real_node_refuses(query, message):
    status, body = ask(network(), query)
    assert status == 400 and body["_status"]["messages"][0]["message"].startswith(message)


# --- every configuration the README documents loads what the node holds ---------

class Recording:
    """The app, keeping each balances answer so a test can see what the node said."""

    def __init__(self, app):
        self.app, self.answers = app, []

    def __call__(self, request):
        import json

        response = self.app(request)
        if request.path == "/api/v1/balances":
            self.answers.append((request.query, json.loads(response.body)))
        return response


def network_rows(nums, step=2) -> list[tuple]:
    """The history rows that the network's snapshot ``step`` holds for ``nums``."""
    book = network_book(step)
    rows = []
    for num in nums:
        rows.append((f"0.0.{num}", "HBAR", Decimal(book[num].balance), 8, T2))
        rows.extend((f"0.0.{num}", t, Decimal(b), 4, T2) for t, b in book[num].tokens)
    return sorted(rows)


def test_range_ending_on_a_full_page_loads_every_account(db, serve):
    app = Recording(network())
    summary = take_snapshot(db, hedera_source(serve(app), account_ids=["lte:0.0.1098"]), BETWEEN_T2_T3)
    assert summary["status"] == "published"
    assert history(db) == network_rows([n for n in NETWORK_NUMS if n <= 1098])
    # The node gave the full page a link, and the page behind it no timestamp.
    assert app.answers[-2][1]["links"]["next"] is not None
    assert app.answers[-1][1] == {"timestamp": None, "balances": [], "links": {"next": None}}


def test_network_a_multiple_of_limit_loads_whole(db, serve):
    app = Recording(network())
    summary = take_snapshot(db, hedera_source(serve(app), limit=50), BETWEEN_T2_T3)
    assert summary["status"] == "published" and summary["pages"] == 6
    assert history(db) == network_rows(NETWORK_NUMS)
    assert app.answers[-1][1]["timestamp"] is None


def test_readme_example_loads_the_account_and_the_range(db, serve):
    app = Recording(network())
    source = hedera_source(serve(app), account_ids=["0.0.98", "gte:0.0.1000"])
    summary = take_snapshot(db, source, BETWEEN_T2_T3)
    assert summary["status"] == "published" and summary["rejected"] == 0
    assert history(db) == network_rows([n for n in NETWORK_NUMS if n == 98 or n >= 1000])
    # Each expression on its own: never both account.id values in one request.
    for query, _ in app.answers:
        assert len([v for k, v in query if k == "account.id" and not v.startswith("lt:")]) <= 1


def test_exact_ids_beyond_one_page_are_asked_in_groups(db, serve):
    app = Recording(network())
    source = hedera_source(serve(app), account_ids=["0.0.2", "0.0.98", "0.0.1100"], limit=2)
    summary = take_snapshot(db, source, BETWEEN_T2_T3)
    assert summary["status"] == "published"
    assert history(db) == network_rows([2, 98, 1100])
    lookups = [q for q, _ in app.answers if ("limit", "2") in q]
    assert [[v for k, v in q if k == "account.id"] for q in lookups] == [["0.0.2", "0.0.98"], ["0.0.1100"]]
    # The first answer's next link repeats the request: it was not followed.
    assert app.answers[1][1]["links"]["next"].endswith("account.id=0.0.2&account.id=0.0.98")


def test_shards_with_an_empty_range_publish_the_whole_snapshot(db, serve):
    app = Recording(network())
    summary = take_snapshot(db, hedera_source(serve(app), shards=3), BETWEEN_T2_T3)
    assert summary["status"] == "published"
    assert history(db) == network_rows(NETWORK_NUMS)
    # 0.0.1248 is the top: the middle third (0.0.417 to 0.0.833) holds no account.
    middle = [body for q, body in app.answers if ("account.id", "gte:0.0.417") in q]
    assert middle == [{"timestamp": None, "balances": [], "links": {"next": None}}]


def test_shards_and_account_ids_split_the_union(db, serve):
    server = serve(network())
    source = hedera_source(server, shards=3, account_ids=["0.0.98", "0.0.1100", "gte:0.0.1200"])
    summary = take_snapshot(db, source, BETWEEN_T2_T3)
    assert summary["status"] == "published" and summary["warnings"] == []
    assert history(db) == network_rows([n for n in NETWORK_NUMS if n in (98, 1100) or n >= 1200])


def test_overlapping_entries_load_each_account_once(db, serve):
    app = Recording(network())
    source = hedera_source(serve(app), account_ids=["gte:0.0.1050", "lte:0.0.1100", "0.0.1060", "gt:0.0.1200"])
    summary = take_snapshot(db, source, BETWEEN_T2_T3)
    assert history(db) == network_rows(NETWORK_NUMS)
    assert summary["rows"] == summary["rows_inserted"] == len(history(db))
    # Together they cover every id: one unfiltered crawl.
    assert all(k != "account.id" or v.startswith("lt:") for q, _ in app.answers for k, v in q)


def test_exact_id_absent_from_the_snapshot_is_missing_not_zero(db, serve):
    server = serve(network())
    source = hedera_source(server, account_ids=["0.0.98", "0.0.99"])
    with pytest.raises(RejectedRecordsError, match="1 record"):
        take_snapshot(db, source, BETWEEN_T2_T3)
    assert history(db) == []
    [(raw, reason)] = fetch(db, "SELECT raw, reason FROM rejected_records")
    assert raw == '{"account":"0.0.99"}' and reason.startswith("missing:") and T2 in reason

    summary = take_snapshot(db, hedera_source(server, account_ids=["0.0.98", "0.0.99"], max_rejected=1),
                            BETWEEN_T2_T3)
    assert summary["status"] == "published" and summary["rejected"] == 1
    assert history(db) == network_rows([98])


def test_exact_id_inside_a_range_is_checked_too(db, serve):
    server = serve(network())
    source = hedera_source(server, account_ids=["lte:0.0.1000", "0.0.500"], max_rejected=1)
    summary = take_snapshot(db, source, BETWEEN_T2_T3)
    assert summary["rejected"] == 1
    assert fetch(db, "SELECT raw FROM rejected_records") == [('{"account":"0.0.500"}',)]
    assert history(db) == network_rows([2, 98])


def test_range_matching_nothing_is_a_warning(db, serve):
    server = serve(network())
    source = hedera_source(server, account_ids=["0.0.98", "gte:0.0.5000"])
    summary = take_snapshot(db, source, BETWEEN_T2_T3)
    assert summary["status"] == "published"
    assert history(db) == network_rows([98])
    assert summary["warnings"] == [f"account_ids entry 'gte:0.0.5000' matches no account in snapshot {T2}"]


def test_snapshot_is_chosen_once_even_when_a_newer_one_appears(db, serve):
    app = network()
    newer = Snapshot.of(T3, network_book(3))

    class Publishing:
        """The node writes T3 just after the run chose T2 (the run's time is after both)."""

        def __call__(self, request):
            response = app(request)
            if request.path == "/api/v1/balances" and newer not in app.snapshots:
                app.snapshots.append(newer)
            return response

    server = serve(Publishing())
    summary = take_snapshot(db, hedera_source(server, limit=50, shards=2), AFTER_T3)
    assert summary["as_of_raw"] == T2
    assert {r[4] for r in history(db)} == {T2}
    assert history(db) == network_rows(NETWORK_NUMS)


def test_balances_without_a_timestamp_stay_an_error(db, serve):
    class Stripped:
        app = network()

        def __call__(self, request):
            import json

            response = self.app(request)
            body = json.loads(response.body)
            if ("limit", "1") not in request.query and body.get("balances"):
                body["timestamp"] = None
            return json_response(body)

    with pytest.raises(MalformedResponseError, match="without a snapshot timestamp"):
        take_snapshot(db, hedera_source(serve(Stripped())), BETWEEN_T2_T3)
    assert history(db) == []


@pytest.mark.parametrize("entry", ["\uff10.0.98", "0.0.\u0669", "ne:0.0.98", "0.0.x", "lt:0.0.0",
                                   "gte: 0.0.1", "0.0.98\n0.0.99", "99999.0.1", "0.0.274877906944"])
def test_account_ids_the_node_cannot_answer_are_one_line_config_errors(entry):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_source("h", provider="hedera", base_url="http://h", account_ids=["0.0.2", entry])
    message = str(caught.value)
    assert message.startswith("sources.h.account_ids") and "\n" not in message


@pytest.mark.parametrize("entry", ["0.0.98\n", "0.0.98 ", " 0.0.98"])
def test_account_id_patterns_match_the_whole_string(entry):
    # The config file strips surrounding blanks first; the pattern itself takes none.
    from extractors.hedera import Settings

    with pytest.raises(ValueError, match="account_ids"):
        Settings("http://h", account_ids=[entry])


def test_account_id_forms_the_node_accepts():
    from extractors.hedera import Settings

    exprs = Settings("http://h", account_ids=["98", "0.98", "eq:0.0.98", "gt:0.0.1", "lte:1.2.3"]).expressions()
    assert [(e.exact, e.low) for e in exprs[:3]] == [(True, 98)] * 3
    assert exprs[3].low == 2 and not exprs[3].exact
    assert exprs[4].high == (1 << 54) | (2 << 38) | 3


# --- movements: the transactions of a window ----------------------------------------------------

from pipeline import movements  # noqa: E402
from tests.hedera_data import BIG_PAYEE, moving_mirror  # noqa: E402


def _snapshot_time(raw: str) -> datetime:
    """A run time that picks the snapshot ``raw``: a second after it."""
    return parse_timestamp(raw) + timedelta(seconds=1)


def load_all(db, source, times=(T1, T2, T3)) -> list[dict]:
    for raw in times:
        assert take_snapshot(db, source, _snapshot_time(raw))["status"] == "published"
    return movements.load_windows(db, source, movements.missing_windows(db, source))


def legs(db) -> list[tuple]:
    return fetch(db, "SELECT movement_time_raw, account, asset, amount, kind, counterparty FROM balance_movements"
                     " ORDER BY movement_time_raw, movement_id")


def test_the_sandbox_pages_transactions_as_the_real_node_does(serve):
    import requests

    server = serve(moving_mirror())
    # rest/__tests__/specs/transactions/limit.json: a full page links on with lt:<the last timestamp>.
    page = requests.get(f"{server.url}/api/v1/transactions?limit=2").json()
    assert [t["consensus_timestamp"] for t in page["transactions"]] == [T3, "1700001200.000000000"]
    assert page["links"]["next"] == "/api/v1/transactions?limit=2&timestamp=lt:1700001200.000000000"
    window = requests.get(f"{server.url}/api/v1/transactions?limit=1&order=asc&timestamp=gt:{T1}"
                          f"&timestamp=lte:{T2}").json()
    assert window["links"]["next"] == (f"/api/v1/transactions?limit=1&order=asc&timestamp=lte:{T2}"
                                       "&timestamp=gt:1700000000.000000002")
    last = requests.get(f"{server.url}{window['links']['next']}").json()
    # The page ends on the range's own bound: no link (utils.isEmptyRange).
    assert [t["consensus_timestamp"] for t in last["transactions"]] == [T2] and last["links"]["next"] is None
    # Every leg of a transaction is listed, the other accounts' too, by account (the encoded id) then amount.
    [tx] = requests.get(f"{server.url}/api/v1/transactions?account.id=0.0.1005&timestamp={T2}").json()[
        "transactions"] or [None]
    assert tx is None  # 0.0.1005 is not in the transaction at T2
    [tx] = requests.get(f"{server.url}/api/v1/transactions?account.id=0.0.1010&timestamp={T2}").json()["transactions"]
    assert [(t["account"], t["amount"]) for t in tx["transfers"]] == [("0.0.3", 800), ("0.0.98", 200),
                                                                       ("0.0.1010", -1_500), ("0.0.1020", 500)]
    bad = requests.get(f"{server.url}/api/v1/transactions?timestamp=gt:1&timestamp=gte:2")
    assert bad.status_code == 400 and bad.json()["_status"]["messages"] == [
        {"message": "Multiple gt or gte operators not permitted for timestamp param"}]


def test_a_window_is_exact_to_the_nanosecond_and_rolls_forward(db, serve):
    server = serve(moving_mirror())
    summaries = load_all(db, hedera_source(server, limit=3))
    assert [(s["start_raw"], s["end_raw"], s["movements"]) for s in summaries] == [(T1, T2, 8), (T2, T3, 22)]
    by_window = fetch(db, """SELECT r.end_raw, min(m.movement_time_raw), max(m.movement_time_raw)
                               FROM balance_movements m JOIN movement_runs r USING (run_id) GROUP BY 1 ORDER BY 1""")
    # A nanosecond after T1 and exactly T2 in the first window; a nanosecond after T2, and T3, in the second.
    assert by_window == [(T2, "1700000000.000000002", T2), (T3, "1700000900.123456790", T3)]
    requests = [r for r in server.requests if r.path == "/api/v1/transactions"]
    assert requests[0].query == [("limit", "3"), ("order", "asc"), ("timestamp", f"gt:{T1}"), ("timestamp", f"lte:{T2}")]
    statement = fetch(db, "SELECT DISTINCT status FROM balance_rollforward")
    assert statement == [("explained",)]
    # Beyond 2**53, to the tinybar.
    assert fetch(db, "SELECT inflow, closing - opening FROM balance_rollforward WHERE account = %s AND asset = 'HBAR'"
                     " AND period_end > %s", (f"0.0.{BIG_PAYEE}", parse_timestamp(T2))) == [(2**62, 2**62)]


def test_fees_rewards_tokens_and_nfts_are_legs_of_their_kind(db, serve):
    server = serve(moving_mirror())
    load_all(db, hedera_source(server))
    reward = {leg[1:] for leg in legs(db) if leg[0] == "1700001100.000000000"}
    # The staking reward is in the transfers once (0.0.800 pays it), not counted again from its own list.
    assert reward == {("0.0.1025", "HBAR", 4_000, "transfer", None), ("0.0.3", "HBAR", 800, "fee", None),
                      ("0.0.800", "HBAR", -5_000, "reward", "0.0.1025"), ("0.0.98", "HBAR", 200, "fee", None)}
    token = [leg[1:] for leg in legs(db) if leg[0] == "1700001000.000000000" and leg[2] != "HBAR"]
    assert token == [("0.0.1015", "0.0.7001", -40, "transfer", "0.0.1030"),
                     ("0.0.1030", "0.0.7001", 40, "transfer", "0.0.1015")]
    nft = [leg[1:] for leg in legs(db) if leg[2] == "0.0.9001"]
    assert nft == [("0.0.1040", "0.0.9001", 1, "mint", None)] * 2
    # A payer whose only leg is the fee paid a fee.
    assert ("0.0.1015", "HBAR", -1_000, "fee") in [leg[1:5] for leg in legs(db)]
    assert fetch(db, "SELECT DISTINCT decimals FROM balance_movements WHERE asset = '0.0.7001'") == [(4,)]


def test_account_ids_and_shards_keep_only_their_own_legs(db, serve):
    server = serve(moving_mirror())
    source = hedera_source(server, account_ids=["0.0.1010", "gte:0.0.1040", "0.0.3"])
    load_all(db, source)
    accounts = {leg[1] for leg in legs(db)}
    assert accounts == {"0.0.1010", "0.0.1040", f"0.0.{BIG_PAYEE}", "0.0.3"}
    ranges = [[v for k, v in r.query if k == "account.id"] for r in server.requests if r.path == "/api/v1/transactions"]
    assert ranges[:2] == [["gte:0.0.1040"], ["0.0.3", "0.0.1010"]]  # the range, then the exact ids in one list
    assert fetch(db, "SELECT DISTINCT status FROM balance_rollforward") == [("explained",)]

    # Sharded as the snapshot is: the same legs, each read by the shard its account falls in.
    everything = make_source("hedera_whole", provider="hedera", base_url=server.url)
    sharded = make_source("hedera_sharded", provider="hedera", base_url=server.url, shards=3)
    load_all(db, everything)
    for raw in (T1, T2, T3):
        take_snapshot(db, sharded, _snapshot_time(raw))
    windows = movements.missing_windows(db, sharded)
    planned = movements.plan(db, sharded, windows[:1])
    ranges = [p["account_range"] for p in planned]
    assert len(ranges) == 3 and ranges[0][0] is None and ranges[-1][1] is None
    assert [r[1] for r in ranges[:-1]] == [r[0] for r in ranges[1:]]  # back to back
    for shard in planned:
        movements.crawl(db, sharded, shard["movement_run"], shard=shard["shard"], account_range=shard["account_range"])
    movements.publish(db, sharded, planned[0]["movement_run"])
    movements.load_windows(db, sharded, windows[1:])
    assert fetch(db, "SELECT shards, movements FROM movement_runs WHERE source = 'hedera_sharded' ORDER BY run_id"
                 ) == [(3, 8), (3, 22)]

    def stored(source: str) -> set:
        return set(fetch(db, "SELECT movement_id, account, amount FROM balance_movements WHERE source = %s",
                         (source,)))

    assert stored("hedera_sharded") == stored("hedera_whole") and len(stored("hedera_whole")) == 30


def test_a_page_the_node_ends_early_with_a_link_does_not_end_the_window(db, serve):
    mirror_app = moving_mirror()
    early = {"done": False}

    def bound(request):
        # As a node binding an open range answers (rest/timestampRange.js:bindTimestampRange): no row, a link.
        if request.path == "/api/v1/transactions" and not early["done"]:
            early["done"] = True
            return json_response({"transactions": [], "links": {"next": f"/api/v1/transactions?{request.raw_query}"
                                                                        "&limit=100"}})
        return mirror_app(request)

    server = serve(bound)
    summaries = load_all(db, hedera_source(server), (T1, T2))
    assert [(s["status"], s["movements"]) for s in summaries] == [("published", 8)]


@pytest.mark.parametrize("text, encoded", [
    ("0.0.98", 98), ("0.0.0098", 98), ("0.0.9999999999", 9999999999), ("0.0.12345678901", None), ("0.0.", None),
    ("0.0.\u0665", None), ("0.0.1a", None), ("0.0.+5", None), ("0.0. 5", None), ("0.0.5\n", None),
    ("1.2.3", (1 << 54) | (2 << 38) | 3), ("0.1.3", (1 << 38) | 3), ("1024.0.1", None), (98, None),
])
def test_account_ids_read_by_the_shortcut_and_the_pattern_alike(text, encoded):
    from extractors.hedera import parse_account_id

    assert parse_account_id(text) == encoded
