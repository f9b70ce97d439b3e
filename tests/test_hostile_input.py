"""Hostile input, extractor side: values, bodies and time a provider controls.

Each test is a row of issue 17's table, replayed against the real sandbox
servers and a real PostgreSQL run: a number whose plain digits would not fit
in memory, a gzip bomb, a 200 MB page, a body trickled one byte at a time, a
NUL in an error message, a key twice in one object. Every one must fail the
run quickly and cleanly, say why, and store nothing.

The peak memory of a run is measured in a fresh process (:func:`probe`), so
the figures in docs/RELIABILITY.md are the run's own, not the test session's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from extractors.errors import (DeadlineExceeded, ExtractError, MalformedResponseError, ProviderError,
                               ResponseTooLarge)
from extractors.http import HttpClient, RetryPolicy, error_text
from extractors.jsonbody import DuplicateKeyError, parse_json
from extractors.records import (
    MAX_FRACTION_DIGITS,
    MAX_INTEGER_DIGITS,
    Oversized,
    RecordError,
    Rejection,
    decimal_amount,
    integer_amount,
    to_json_text,
)
from pipeline.snapshot import RejectedRecordsError, take_snapshot
from sandbox.server import Fault, FakeServer, Response, json_response
from tests.conftest import fetch
from tests.sandboxes import PROVIDERS, demo_app, now, start

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
MIB = 1024 ** 2


# --- helpers --------------------------------------------------------------

class Rewriting:
    """A sandbox app whose 200 JSON bodies on ``path`` get ``pattern`` replaced (first match)."""

    def __init__(self, app, path: str, pattern: bytes, replacement: bytes) -> None:
        self.app, self.path = app, path
        self.pattern, self.replacement = re.compile(pattern), replacement
        self.rewritten = 0

    def __call__(self, request):
        response = self.app(request)
        if request.path.startswith(self.path) and response.status == 200:
            body, count = self.pattern.subn(self.replacement, response.body, count=1)
            if count:
                self.rewritten += 1
                response = Response(response.status, body, dict(response.headers), response.content_type)
        return response


def hedera_amount(text: bytes):
    """Hedera's demo mirror with the first balance of every page written as ``text``."""
    return Rewriting(demo_app("hedera"), "/api/v1/balances", rb'"balance":[0-9]+', b'"balance":' + text)


def bitfront_amount(text: bytes):
    """BitFront's demo exchange with its first balance written as ``text``."""
    return Rewriting(demo_app("bitfront"), "/v1/account/balances", rb'"balance":"?[-+0-9.eE]+"?',
                     b'"balance":' + text)


def run_of(db) -> dict:
    [(status, error, requests)] = fetch(db, "SELECT status, error, requests FROM snapshot_runs")
    return {"status": status, "error": error, "requests": requests}


def stored(db) -> int:
    return fetch(db, "SELECT count(*) FROM balance_history")[0][0]


def reasons(db) -> list[str]:
    return [reason for (reason,) in fetch(db, "SELECT reason FROM rejected_records ORDER BY 1")]


# --- values: bounded work per number ---------------------------------------

OVERSIZED = {
    "1e10000000": "exponent has 8 digits",
    "1e999999999": "exponent has 9 digits",
    "1e1000000": "exponent has 7 digits",
    "1E+1000": f"1001 digits before the decimal point, more than the {MAX_INTEGER_DIGITS}",
    "9" * (MAX_INTEGER_DIGITS + 1): "digits before the decimal point",
    "1e-1001": f"1001 digits after the decimal point, more than the {MAX_FRACTION_DIGITS}",
    "0e-999999": "digits after the decimal point",
    "0e999999": "999999 digits before the decimal point",  # zero, but printed with 999999 zeros
    "7" * 100_000: "100000 characters long",
}


@pytest.mark.parametrize("text", list(OVERSIZED), ids=lambda t: t if len(t) < 20 else f"{len(t)}-digits")
def test_an_oversized_number_is_measured_on_its_text_and_never_converted(text):
    started = time.perf_counter()
    document = parse_json(f'{{"balance": {text}, "other": 5}}')
    elapsed = time.perf_counter() - started
    value = document["balance"]
    # Integers Python converts quickly (up to 4300 digits) arrive as int
    # and are refused by the amount readers; anything else is never converted.
    assert isinstance(value, Oversized) or isinstance(value, int) and len(text) <= 4300
    assert document["other"] == 5  # the rest of the document is read as usual
    assert elapsed < 0.05, f"{elapsed:.3f}s to read a {len(text)}-character number"
    for read in (integer_amount, decimal_amount):
        with pytest.raises(RecordError, match=re.escape(OVERSIZED[text])):
            read(value, "balance")
    # Its record is kept as sent, as for any rejection.
    assert json.loads(to_json_text(document), parse_int=str)["balance"] == text


@pytest.mark.parametrize("text", ["1e999", "9" * MAX_INTEGER_DIGITS, "1e-1000", "-0.5E-999", "1e0000000000003",
                                  "123456789012345678901234567890"])
def test_a_number_within_the_bounds_is_read_exactly(text):
    value = parse_json(f"[{text}]")[0]
    assert decimal_amount(value, "balance") == Decimal(text)


@pytest.mark.parametrize("value", ["９８", "98\n", " 98", "+98", "٩٨", "1_000", "Infinity", "NaN", "0x10",
                                   "9" * 5000])
def test_amounts_sent_as_strings_are_ascii_json_numbers(value):
    with pytest.raises(RecordError):
        integer_amount(value, "balance")
    with pytest.raises(RecordError):
        decimal_amount(value, "balance")


def test_oversized_decimal_built_elsewhere_is_refused_before_conversion():
    started = time.perf_counter()
    with pytest.raises(RecordError, match="exponent has 9 digits"):
        integer_amount(Decimal("1e999999999"), "balance")
    with pytest.raises(RecordError, match="exponent has 9 digits"):
        decimal_amount(Decimal("-1e-999999999"), "balance")
    with pytest.raises(RecordError, match="2000 digits after the decimal point"):
        decimal_amount(Decimal("1e-2000"), "balance")
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("exponent", [b"1e10000000", b"1e1000000"])
def test_huge_exponent_in_a_hedera_page_is_a_rejected_record(db, serve, exponent):
    app = hedera_amount(exponent)
    live = start("hedera", serve, app=app)
    started = time.monotonic()
    with pytest.raises(RejectedRecordsError):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert time.monotonic() - started < 10
    assert app.rewritten >= 1
    assert run_of(db)["status"] == "failed"
    assert stored(db) == 0
    found = reasons(db)
    assert found and all("exponent has" in reason for reason in found), found
    raws = [raw for (raw,) in fetch(db, "SELECT raw FROM rejected_records")]
    assert all(exponent.decode() in raw for raw in raws)


def test_huge_exponent_as_a_bitfront_balance_is_a_rejected_record(db, serve):
    app = bitfront_amount(b"1e999999999")
    live = start("bitfront", serve, app=app)
    started = time.monotonic()
    with pytest.raises(RejectedRecordsError):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert time.monotonic() - started < 10
    assert run_of(db)["status"] == "failed"
    assert stored(db) == 0
    [reason] = reasons(db)
    assert reason.startswith("balance of ") and "exponent has 9 digits" in reason


def test_huge_exponent_is_tolerated_like_any_rejection_when_the_source_allows_it(db, serve):
    live = start("bitfront", serve, app=bitfront_amount(b"1e999999999"), max_rejected=1)
    summary = take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert summary["status"] == "published"
    assert stored(db) >= 1  # every other coin landed
    assert len(reasons(db)) == 1


# --- identifiers and keys: exact ------------------------------------------

def test_a_key_twice_in_one_object_is_refused_at_parse():
    with pytest.raises(DuplicateKeyError, match="'balance' appears twice"):
        parse_json('{"balances": [{"account": "0.0.98", "balance": 5, "balance": 7}]}')
    assert parse_json('[{"a": 1}, {"a": 2}]') == [{"a": 1}, {"a": 2}]  # across objects is fine


@pytest.mark.parametrize("text", [
    '{"a":1,"a":2}', '{"a" : 1, "a":2}', '{"a":1,"a"\n:2}', '[{"a":":"},{"b":1,"b":2}]',
    '{"x":{"k":1,"k":2}}', '{"a\\"":1,"a\\"":2}', '{"\\u0061":1,"a":2}', '{"a":"\\":","a":2}',
])
def test_a_key_twice_is_found_however_the_text_is_written(text):
    # Keys are first counted, not hooked (jsonbody._keys_written): no way of writing one defeats the count.
    for body in (text, text.encode(), text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode()):
        with pytest.raises(DuplicateKeyError):
            parse_json(body)


def test_strings_that_look_like_keys_decode_as_written():
    text = '{"a":":","b":"\\":","c" :[{":":":"}], "d":1.5}'
    assert parse_json(text) == parse_json(text.encode()) == {"a": ":", "b": '":', "c": [{":": ":"}],
                                                             "d": Decimal("1.5")}


def test_duplicate_balance_in_a_hedera_page_fails_the_run_instead_of_picking_one(db, serve):
    app = Rewriting(demo_app("hedera"), "/api/v1/balances", rb'"balance":([0-9]+)', rb'"balance":5,"balance":\1')
    live = start("hedera", serve, app=app)
    with pytest.raises(MalformedResponseError, match="'balance' appears twice"):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    run = run_of(db)
    assert run["status"] == "failed" and "appears twice" in run["error"]
    assert stored(db) == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_duplicate_keys_make_the_page_malformed_for_every_provider(db, serve, provider):
    app = Rewriting(demo_app(provider), "/", rb"\{", b'{"dup":1,"dup":2,')
    live = start(provider, serve, app=app)
    with pytest.raises(MalformedResponseError, match="'dup' appears twice"):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert app.rewritten >= 1
    assert run_of(db)["status"] == "failed"
    assert stored(db) == 0


@pytest.mark.parametrize("currency", ["BTC\n", "ＢＴＣ", "BTC\u0000", "", "B" * 40])
def test_a_bitfront_currency_that_is_not_an_ascii_code_is_rejected(db, serve, currency):
    app = Rewriting(demo_app("bitfront"), "/v1/account/balances", rb'"currency":"[A-Z]+"',
                    b'"currency":' + json.dumps(currency).encode().replace(b"\\", b"\\\\"))
    live = start("bitfront", serve, app=app)
    with pytest.raises(RejectedRecordsError):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    [reason] = reasons(db)
    assert "is not a coin code" in reason and "\x00" not in reason
    [(raw,)] = fetch(db, "SELECT raw FROM rejected_records")
    assert json.loads(raw)["currency"] == currency  # kept exactly, NUL included (escaped)
    assert stored(db) == 0


def test_coreledger_pairs_compare_case_insensitively_in_ascii_only():
    from extractors.coreledger import fold

    assert fold("0xABCdef") == fold("0xabcDEF")
    assert fold("0x\u212a1") != fold("0xk1")  # the Kelvin sign is not a k
    assert fold("stra\u00dfe") != fold("strasse")


def test_rejections_are_storable_whatever_a_provider_sent():
    rejection = Rejection(raw='{"a":"\x00\ud800"}', reason="currency \x00\ud800 listed twice")
    for text in (rejection.raw, rejection.reason):
        text.encode("utf-8")  # no lone surrogate
        assert "\x00" not in text
    assert to_json_text({"a": "\ud800\x00"}) == '{"a":"\\ud800\\u0000"}'


@pytest.mark.parametrize("link", ["/api/v1/balances?x=\x00", "/api/v1/balances\nX-Injected: 1",
                                  "/api/v1/balances?account.id=gt:0.0.\uff19\uff18", "\ud800"])
def test_a_link_or_cursor_that_is_not_printable_ascii_makes_the_page_malformed(link):
    from extractors.paginators import CursorPaginator, NextLinkPaginator

    with pytest.raises(MalformedResponseError, match="not printable ASCII"):
        NextLinkPaginator().update_state({"links": {"next": link}})
    with pytest.raises(MalformedResponseError, match="not printable ASCII"):
        CursorPaginator().update_state({"cursor": {"hasMore": True, "next": link}})


@pytest.mark.parametrize("link", ["//[::1/x", "http://127.0.0.1:99999/x", "https://[/x"])
def test_an_unparsable_link_is_a_pagination_error_not_a_crash(link):
    from extractors.errors import PaginationError

    with pytest.raises(PaginationError, match="not a valid URL"):
        HttpClient("http://127.0.0.1:8080").url_for(link)


# --- provider text: safe in errors ----------------------------------------

# One error body in every provider's shape, each message holding a NUL.
NUL_ERROR = json.dumps({
    "_status": {"messages": [{"message": "bad\u0000request"}]},      # Hedera
    "errorCode": "VALIDATION", "errorMessage": "bad\u0000request",   # Formance
    "statusCode": 4002, "statusMessage": "bad\u0000request",        # BitFront
    "code": "4000", "message": "bad\u0000request",                  # CoreLedger
}).encode()


@pytest.mark.parametrize("body", [NUL_ERROR, b"bad\x00request \xff\xfe"], ids=["json", "raw-bytes"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_nul_in_a_provider_error_is_recorded_and_not_retried(db, serve, provider, body):
    live = start(provider, serve, max_attempts=4)
    live.server.inject(Fault("status", times=100, response=Response(400, body=body)))
    with pytest.raises(ExtractError) as caught:
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert "\x00" not in str(caught.value)
    run = run_of(db)
    assert run["status"] == "failed"
    assert "400" in run["error"] or "4002" in run["error"], run["error"]
    assert "\x00" not in run["error"]
    # Each request once (Formance first asks the server's root whether it is a standalone
    # ledger: any answer but a ledger's /_info means no, and the run goes on to the next).
    paths = [(r.method, r.path) for r in live.server.requests]
    assert len(paths) == len(set(paths)) and len(paths) <= 2, f"a 400 was retried: {paths}"
    assert stored(db) == 0


def test_error_text_is_cut_once_and_safe():
    class Answer:  # just what error_text reads from a response
        content = ("x" * 1000 + "\x00").encode()
        encoding = "no-such-charset"
        reason = "Bad\x00Request"

    assert error_text(Answer()) == "x" * 300
    Answer.content = b"  \x00\xff  "
    assert error_text(Answer()) == "\ufffd\ufffd"
    Answer.content = b""
    assert error_text(Answer()) == "Bad\ufffdRequest"


# --- bodies: bounded bytes per response -------------------------------------

BODIES = {
    # 1 GiB of JSON whitespace, gzip-compressed to ~1 MB.
    "gzip bomb": Fault("pad", size=GIB, encoding="gzip"),
    "deflate bomb": Fault("pad", size=GIB, encoding="deflate"),
    # 200 MB, announced in Content-Length: refused before reading.
    "200 MB page": Fault("pad", size=200 * MIB),
    # 200 MB without a length: refused while streaming.
    "200 MB chunked page": Fault("pad", size=200 * MIB, chunked=True),
}


@pytest.mark.parametrize("body", list(BODIES))
def test_an_oversized_body_fails_the_run_at_the_cap_without_retrying(db, serve, body):
    live = start("hedera", serve, max_attempts=4)
    live.server.inject(BODIES[body])
    started = time.monotonic()
    with pytest.raises(ResponseTooLarge, match=f"max_response_bytes = {64 * MIB}"):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert time.monotonic() - started < 10
    run = run_of(db)
    assert run["status"] == "failed" and "max_response_bytes" in run["error"]
    assert run["requests"] == 1
    assert stored(db) == 0


def test_a_padded_or_compressed_page_within_the_cap_loads_as_usual(db, serve):
    live = start("hedera", serve, max_response_bytes=4 * MIB)
    live.server.inject(Fault("pad", size=3 * MIB, encoding="gzip", times=2))
    live.server.inject(Fault("pad", size=3 * MIB, chunked=True, times=2))
    summary = take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert summary["status"] == "published"
    assert stored(db) > 0


@pytest.mark.parametrize("body, says", [(b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                                         (b'{"a": "\xff\xfe"}', "not valid JSON"),
                                         (b'{"a": NaN, "a": 1}', "'a' appears twice")])
def test_what_held_before_still_holds(serve, body, says):
    server = serve(lambda request: Response(200, body))
    with pytest.raises(MalformedResponseError, match=says):
        HttpClient(server.url).get_json("/")


def test_the_cap_is_per_source(serve):
    server = serve(lambda request: json_response({"pad": "x" * 5000}))
    small = HttpClient(server.url, policy=RetryPolicy(max_response_bytes=4096))
    with pytest.raises(ResponseTooLarge, match="max_response_bytes = 4096"):
        small.get_json("/")
    assert HttpClient(server.url, policy=RetryPolicy(max_response_bytes=8192)).get_json("/")["pad"]


# --- a crawl's GETs skip Session.request (transport._plain_get): nothing else may change ----------

def test_a_plain_get_reaches_the_server_as_the_session_would_send_it(serve):
    server = serve(lambda request: json_response({"ok": 1}))
    client = HttpClient(server.url, headers={"X-Api-Key": "k3y-for-test"})
    client.get_json("/api/v1/a b", [("limit", 100), ("timestamp", "lte:1.2"), ("account.id", "gte:0.0.5")])
    client.get_json(f"{server.url}/api/v1/next?x=%2F&y=a b")
    ours = list(server.requests)
    session = requests.Session()
    session.trust_env = False
    session.headers.update(client.session.headers)
    session.get(server.url + "/api/v1/a b", params=[("limit", 100), ("timestamp", "lte:1.2"),
                                                     ("account.id", "gte:0.0.5")])
    session.get(f"{server.url}/api/v1/next?x=%2F&y=a b")
    theirs = list(server.requests)[2:]
    assert [(r.method, r.path, r.raw_query, r.headers) for r in ours] == \
        [(r.method, r.path, r.raw_query, r.headers) for r in theirs]


def test_a_cookie_a_provider_sets_is_sent_back_as_the_session_would(serve):
    server = serve(lambda request: Response(200, b"{}", headers={"Set-Cookie": "visit=1; Path=/"})
                   if request.path == "/first" else json_response({"cookie": request.header("cookie")}))
    client = HttpClient(server.url)
    client.get_json("/first")
    assert client.get_json("/second") == {"cookie": "visit=1"}


def test_a_redirect_is_refused_and_never_followed(serve):
    server = serve(lambda request: Response(302, b"x" * 100, headers={"Location": "/elsewhere"}))
    with pytest.raises(ProviderError, match="HTTP 302 redirect .* is not followed"):
        HttpClient(server.url).get_json("/")
    assert [r.path for r in server.requests] == ["/"]


def test_an_error_status_is_answered_once_per_attempt(serve):
    # A Response of an error status is false: it must not send the request again.
    server = serve(lambda request: Response(404, b'{"message": "no"}'))
    with pytest.raises(ProviderError, match="HTTP 404"):
        HttpClient(server.url).get_json("/missing")
    assert len(server.requests) == 1


# --- time: a deadline for the whole request ---------------------------------

def test_a_trickled_body_fails_at_the_request_deadline(db, serve):
    # One byte every 2 s: each read is well inside read_timeout = 5.
    live = start("hedera", serve, read_timeout=5, request_deadline=2, max_total_wait=3, max_attempts=6)
    live.server.inject(Fault("trickle", seconds=2, times=100))
    started = time.monotonic()
    with pytest.raises(ExtractError, match="request_deadline = 2s"):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    elapsed = time.monotonic() - started
    # Two attempts of 2 s: the third would pass max_total_wait = 3.
    assert 3.9 < elapsed < 8, elapsed
    run = run_of(db)
    assert run["status"] == "failed" and "request_deadline" in run["error"]
    assert run["requests"] == 2
    assert stored(db) == 0


def test_slow_headers_fail_at_the_deadline_too(serve):
    server = serve(lambda request: json_response({"ok": True}))
    server.inject(Fault("delay", seconds=4))
    client = HttpClient(server.url, policy=RetryPolicy(max_attempts=1, read_timeout=10, request_deadline=1))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="request_deadline = 1s"):
        client.get_json("/")
    assert time.monotonic() - started < 2
    assert client.get_json("/") == {"ok": True}  # the next request is not affected


def test_a_shorter_deadline_is_kept_while_a_longer_one_is_in_flight(serve):
    # The one watchdog thread sleeps towards the soonest deadline it knows
    # of; a request with a shorter deadline, made while a longer one is in
    # flight, must wake it, or the short request would wait for the long one.
    slow = serve(lambda request: json_response({"ok": True}))
    slow.inject(Fault("delay", seconds=6))
    long_client = HttpClient(slow.url, policy=RetryPolicy(max_attempts=1, read_timeout=30, request_deadline=20))
    in_flight = threading.Thread(target=long_client.get_json, args=("/",), daemon=True)
    in_flight.start()
    time.sleep(0.5)
    stuck = serve(lambda request: json_response({"ok": True}))
    stuck.inject(Fault("delay", seconds=10))
    short_client = HttpClient(stuck.url, policy=RetryPolicy(max_attempts=1, read_timeout=30, request_deadline=1))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        short_client.get_json("/")
    assert time.monotonic() - started < 3
    in_flight.join(timeout=15)
    assert not in_flight.is_alive()  # the long request was not cut: it ended with its answer


def test_a_deadline_hit_is_retried_and_the_snapshot_completes(db, serve):
    live = start("hedera", serve, read_timeout=5, request_deadline=1, max_attempts=3)
    live.server.inject(Fault("trickle", seconds=0.5, times=1))
    summary = take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert summary["status"] == "published"
    assert summary["retries"] == 1
    assert stored(db) > 0


# --- figures: each hostile input in a fresh process --------------------------

def _probe_cases() -> dict:
    return {
        "hedera 1e10000000": ("hedera", lambda: hedera_amount(b"1e10000000"), None, {}),
        "hedera 1e1000000": ("hedera", lambda: hedera_amount(b"1e1000000"), None, {}),
        "hedera 10,000-digit integer": ("hedera", lambda: hedera_amount(b"9" * 10_000), None, {}),
        "bitfront 1e999999999": ("bitfront", lambda: bitfront_amount(b"1e999999999"), None, {}),
        "gzip 1 MB -> 1 GiB": ("hedera", None, Fault("pad", size=GIB, encoding="gzip"), {}),
        "200 MB page": ("hedera", None, Fault("pad", size=200 * MIB, chunked=True), {}),
        "200 MB page, Content-Length": ("hedera", None, Fault("pad", size=200 * MIB), {}),
        "trickle 1 byte / 2 s": ("hedera", None, Fault("trickle", seconds=2, times=100),
                                 {"read_timeout": 5, "request_deadline": 2, "max_total_wait": 3}),
        "NUL in error text": ("hedera", None, Fault("status", times=100, response=Response(400, body=NUL_ERROR)),
                              {}),
        "duplicate keys": ("hedera", lambda: Rewriting(demo_app("hedera"), "/api/v1/balances",
                                                       rb'"balance":([0-9]+)', rb'"balance":5,"balance":\1'),
                           None, {}),
    }


def probe(case: str, database_url: str) -> dict:
    """Run one hostile input through a snapshot in this process; time and peak RSS."""
    import resource

    from loaders.db import connect

    provider, app, fault, overrides = _probe_cases()[case]
    conn = connect(database_url)
    servers: list[FakeServer] = []

    def serve(app):
        servers.append(FakeServer(app).start())
        return servers[-1]

    live = start(provider, serve, app=app() if app else None, **overrides)
    if fault is not None:
        live.server.inject(fault)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    try:
        status, error = take_snapshot(conn, live.source, now(), credentials=live.credentials)["status"], None
    except Exception as exc:  # the figure is what happened, whatever it was
        status, error = "raised", f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with conn.cursor() as cur:
        cur.execute("SELECT status FROM snapshot_runs")
        runs = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT count(*) FROM balance_history")
        rows = cur.fetchone()[0]
    conn.close()
    for server in servers:
        server.stop()
    return {"case": case, "seconds": round(elapsed, 2), "baseline_rss_mb": round(baseline / 1024),
            "peak_rss_mb": round(peak / 1024), "outcome": status, "error": (error or "")[:160],
            "runs": runs, "rows_stored": rows}


@pytest.mark.parametrize("case", ["hedera 1e10000000", "bitfront 1e999999999", "gzip 1 MB -> 1 GiB",
                                  "200 MB page"])
def test_peak_memory_of_a_hostile_run_stays_small(db, database_url, case):
    result = run_probe(case, database_url)
    assert result["runs"] == ["failed"] and result["rows_stored"] == 0, result
    assert result["seconds"] < 10, result
    # Before: 2.08 GB (1e999999999) and 3.23 GB (the gzip bomb). The cap is
    # 64 MiB; a body is held once as bytes and once decoded.
    assert result["peak_rss_mb"] - result["baseline_rss_mb"] < 250, result


def run_probe(case: str, database_url: str) -> dict:
    code = ("import json, sys; from tests.test_hostile_input import probe; "
            "print(json.dumps(probe(sys.argv[1], sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, case, database_url], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    # python -m tests.test_hostile_input DATABASE_URL: the figures for docs/RELIABILITY.md
    # (the database's tables are emptied before each case).
    from loaders.db import connect
    from tests.conftest import reset_database

    for name in _probe_cases():
        connection = connect(sys.argv[1])
        reset_database(connection)
        connection.close()
        print(json.dumps(run_probe(name, sys.argv[1])))
