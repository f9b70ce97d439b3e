"""Fault suite, every provider: transient faults, bad bodies, mutated input.

Each test first takes a clean snapshot from the provider's sandbox to know
what must land, then repeats it with the fault and checks that exactly the
same balances landed (or that the run failed cleanly, publishing nothing and
keeping what it could not read). Retries and bounded waits are the
extractor's and its client's: those run on the harness (``tests/harness.py``),
with no database; what a failed run records and publishes needs PostgreSQL.
"""
from __future__ import annotations

import dataclasses
import json
import time
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from extractors.errors import ExtractError
from pipeline.snapshot import RejectedRecordsError, take_snapshot
from sandbox.server import Fault, Response, json_response
from tests.conftest import fetch, reset_database
from tests.harness import crawl
from tests.sandboxes import PROVIDERS, Live, demo_app, now, start

# What our code may raise for bad input; anything else is a crash.
CLEAN_FAILURES = (ExtractError, RejectedRecordsError)


def landed(db, source: str) -> list[tuple]:
    return fetch(db, "SELECT account, asset, balance, available_balance, decimals, spark_factor"
                     " FROM balance_history WHERE source = %s ORDER BY account, asset", (source,))


def clean_run(db, live: Live) -> tuple[list[tuple], int]:
    """Take a snapshot with no faults; return what landed and how many requests it took."""
    live.server.clear()
    summary = take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert summary["status"] == "published", summary["error"]
    rows = landed(db, live.source.name)
    assert rows, f"the {live.provider} sandbox's demo data set landed nothing"
    requests = live.server.request_count
    reset_database(db)
    live.server.clear()
    return rows, requests


def only_failure(db) -> dict:
    [(status, error, rows)] = fetch(db, "SELECT status, error, rows_inserted FROM snapshot_runs")
    return {"status": status, "error": error, "rows_inserted": rows}


TRANSIENT = {
    "429 Retry-After 0": (Fault("status", times=2, response=Response(429, headers={"Retry-After": "0"})), 2),
    "429 Retry-After 1": (Fault("status", times=1, response=Response(429, headers={"Retry-After": "1"})), 1),
    "429 without Retry-After": (Fault("status", times=2, response=Response(429)), 2),
    "500 burst": (Fault("status", times=3, response=Response(500, body=b"oops", content_type="text/plain")), 3),
    "502 HTML page": (Fault("status", times=2, response=Response(
        502, body=b"<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html")), 2),
    "503 burst": (Fault("status", times=3, response=Response(503)), 3),
    "connection reset": (Fault("reset", times=2), 2),
    "read timeout": (Fault("delay", times=1, seconds=1.5), 1),
    # Content-Length says more than arrived: a dropped connection, not bad JSON.
    "body cut short": (Fault("truncate", times=2), 2),
    "slow responses": (Fault("delay", times=3, seconds=0.2), 0),
    # Not faults: bodies read in a way a page usually is not, that must load the same.
    "gzip-compressed bodies": (Fault("pad", times=3, size=4096, encoding="gzip"), 0),
    "deflate-compressed bodies": (Fault("pad", times=3, encoding="deflate"), 0),
    "chunked bodies": (Fault("pad", times=3, size=100, chunked=True), 0),
}


@pytest.mark.parametrize("fault_name", list(TRANSIENT))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_transient_fault_mid_crawl_is_retried_and_the_snapshot_completes(serve, provider, fault_name):
    """On the harness (no database): the crawl with the fault yields exactly the rows of a clean one."""
    live = start(provider, serve, read_timeout=0.5, max_attempts=5)
    clean = crawl(live)
    assert clean.rows, f"the {provider} sandbox's demo data set yields no row"
    requests = live.server.request_count
    live.server.clear()
    fault, retries = TRANSIENT[fault_name]
    # Mid-crawl: let half of the run's requests through first.
    live.server.inject(dataclasses.replace(fault, after=requests // 2))
    started = time.monotonic()
    faulted = crawl(live)
    elapsed = time.monotonic() - started
    assert faulted.rows == clean.rows and faulted.rejected == clean.rejected
    assert faulted.retries == retries
    assert faulted.requests == clean.requests + retries == requests + retries
    assert elapsed < 10, f"{fault_name} took {elapsed:.1f}s"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_fault_that_does_not_clear_fails_after_the_bounded_attempts(db, serve, provider):
    live = start(provider, serve, max_attempts=3)
    live.server.inject(Fault("status", times=10_000, response=Response(503)))
    with pytest.raises(ExtractError, match="503"):
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    run = only_failure(db)
    assert run["status"] == "failed" and "503" in run["error"]
    assert fetch(db, "SELECT retries FROM snapshot_runs") == [(2,)]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_total_wait_is_bounded_even_when_the_provider_keeps_asking_to_wait(serve, provider):
    live = start(provider, serve, max_attempts=50, max_total_wait=1.5)
    live.server.inject(Fault("status", times=10_000, response=Response(429, headers={"Retry-After": "1"})))
    started = time.monotonic()
    with pytest.raises(ExtractError):
        crawl(live)
    assert time.monotonic() - started < 5


BAD_BODIES = {
    "HTML error page with 200": Fault("status", response=Response(
        200, body=b"<!DOCTYPE html><html><body>Service maintenance</body></html>", content_type="text/html")),
    "invalid JSON": Fault("status", response=Response(200, body=b'{"balances": [1, 2,')),
    "unexpected content type": Fault("status", response=Response(
        200, body=b"<balances/>", content_type="application/xml")),
    "empty body": Fault("status", response=Response(200, body=b"")),
}


@pytest.mark.parametrize("body", list(BAD_BODIES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_unreadable_body_fails_the_run_and_keeps_the_raw_text(db, serve, provider, body):
    live = start(provider, serve)
    _, requests = clean_run(db, live)
    fault = BAD_BODIES[body]
    live.server.inject(Fault(fault.kind, response=fault.response, after=requests // 2))
    with pytest.raises(ExtractError) as caught:
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert str(caught.value)
    run = only_failure(db)
    assert run["status"] == "failed" and run["error"]
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
    if fault.response is not None and fault.response.body:
        raws = [raw for (raw,) in fetch(db, "SELECT raw FROM rejected_records")]
        assert fault.response.body.decode() in raws


# --- property-based: one value of one response replaced, removed or added ---

ODD_VALUES = ["", "abc", "12abc", -5, 2**70, -(2**70), Decimal("1E+2"), Decimal("1.5"),
              Decimal("1e-8"), True, [1], {"unexpected": 1}]


def _leaves(value, path=()):
    """Every (path, value) in a decoded JSON document."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, path + (index,))


def _mutate(document, path, operation, odd):
    if not path:
        return odd if operation == "replace" else document
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if operation == "replace":
        parent[last] = odd
    elif operation == "remove" and isinstance(parent, dict):
        del parent[last]
    elif operation == "add" and isinstance(parent, dict):
        parent["x_extra_field"] = odd
    return document


class Mutating:
    """The sandbox, with one value of the ``target``-th JSON response mutated."""

    def __init__(self, app, target: int, pick: int, operation: str, odd):
        self.app, self.target, self.pick, self.operation, self.odd = app, target, pick, operation, odd
        self.seen = 0
        self.mutated: tuple | None = None

    def __call__(self, request):
        response = self.app(request)
        index, self.seen = self.seen, self.seen + 1
        if index != self.target or response.status != 200:
            return response
        document = json.loads(response.body, parse_float=Decimal)
        paths = [path for path, _ in _leaves(document)]
        path = paths[self.pick % len(paths)]
        self.mutated = (path, self.operation, self.odd)
        return json_response(_mutate(document, path, self.operation, self.odd), 200, response.headers)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_mutated_responses_fail_cleanly_or_load_everything(db, serve, provider):
    app = demo_app(provider)
    live = start(provider, serve, app=app)
    expected, requests = clean_run(db, live)
    mutating = Mutating(app, 0, 0, "replace", None)
    live.server.app = mutating

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(target=st.integers(0, max(0, requests - 1)), pick=st.integers(0, 10_000),
           operation=st.sampled_from(["replace", "remove", "add"]), odd=st.sampled_from(ODD_VALUES))
    def check(target, pick, operation, odd):
        reset_database(db)
        mutating.target, mutating.pick, mutating.operation, mutating.odd = target, pick, operation, odd
        mutating.seen, mutating.mutated = 0, None
        try:
            summary = take_snapshot(db, live.source, now(), credentials=live.credentials)
        except CLEAN_FAILURES as exc:
            assert str(exc), mutating.mutated
            run = only_failure(db)
            assert run["status"] == "failed" and run["error"], mutating.mutated
            assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)], mutating.mutated
            for raw, reason in fetch(db, "SELECT raw, reason FROM rejected_records"):
                assert raw and reason, mutating.mutated
            return
        # It loaded: then every holding is there, exactly once; an added field
        # changes nothing and a replaced value either was not a balance or
        # landed as sent.
        assert summary["status"] == "published", mutating.mutated
        rows = landed(db, live.source.name)
        keys = [(account, asset) for account, asset, *_ in rows]
        assert len(keys) == len(set(keys)), mutating.mutated
        if operation == "add":
            assert rows == expected, mutating.mutated
        elif operation == "replace":
            assert len(rows) == len(expected), mutating.mutated

    check()
