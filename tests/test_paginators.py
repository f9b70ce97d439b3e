"""Paginators and retry decisions on plain values: no server, no database.

Each paginator is fed sample pages as dicts; what it decides (go on, stop,
refuse) and the next request it builds are checked against a table. The
real-server cases (loops through a live crawl, links off the origin) are in
``test_pagination.py``.
"""
from __future__ import annotations

import email.utils

import pytest
import requests

from extractors import http
from extractors.errors import MalformedResponseError, PaginationError
from extractors.http import RetryPolicy, http_error, parse_retry_after
from extractors.paginators import (
    DEFAULT_MAX_PAGES,
    CursorPaginator,
    NextLinkPaginator,
    PlannedPages,
    SinglePage,
    check_page_cap,
)


def hedera(*, max_pages: int = DEFAULT_MAX_PAGES) -> NextLinkPaginator:
    return NextLinkPaginator(next_path=("links", "next"), records_path=("balances",),
                             max_pages=max_pages)


def formance(*, max_pages: int = DEFAULT_MAX_PAGES) -> CursorPaginator:
    return CursorPaginator(cursor_path=("cursor", "next"), has_more_path=("cursor", "hasMore"),
                           cursor_param="cursor", max_pages=max_pages)


def flagless(*, max_pages: int = DEFAULT_MAX_PAGES) -> CursorPaginator:
    """A cursor API without a "more" flag (dlt's ``cursors.next`` / ``after`` example)."""
    return CursorPaginator(cursor_path=("cursors", "next"), has_more_path=None,
                           cursor_param="after", max_pages=max_pages)


def link_page(link, balances=({"account": "0.0.2", "balance": 5, "tokens": []},)):
    return {"timestamp": "1700000000.000000000", "balances": list(balances),
            "links": {"next": link}}


def cursor_page(token, has_more=True):
    cursor = {"pageSize": 2, "hasMore": has_more, "data": [{"address": "users:001"}]}
    if token is not None:
        cursor["next"] = token
    return {"cursor": cursor}


def flagless_page(token):
    return {"data": [{"id": 1}], "cursors": {"next": token}}


# Builds a paginator, and a page whose token is the given one.
KINDS = {
    "next link": (hedera, link_page),
    "cursor with hasMore": (formance, cursor_page),
    "cursor without flag": (flagless, flagless_page),
}


# -- what each paginator reads from a page -----------------------------------

@pytest.mark.parametrize("make, page, has_next, request_", [
    pytest.param(hedera, link_page("/api/v1/balances?limit=2&account.id=gt:0.0.2"), True,
                 ("/api/v1/balances?limit=2&account.id=gt:0.0.2", None), id="link-path"),
    pytest.param(hedera, link_page("http://node.example/api/v1/balances?x=1"), True,
                 ("http://node.example/api/v1/balances?x=1", None), id="link-absolute"),
    pytest.param(hedera, link_page(None), False, None, id="link-null"),
    pytest.param(hedera, link_page(""), False, None, id="link-empty"),
    pytest.param(hedera, link_page("/api/v1/balances?next", balances=[]), False, None,
                 id="empty-records-end-whatever-the-link"),
    pytest.param(lambda: NextLinkPaginator(), link_page("/x", balances=[]), True, ("/x", None),
                 id="no-records-path-follows-the-link"),
    pytest.param(lambda: NextLinkPaginator(next_path=("next",)), {"next": "/page/2"}, True,
                 ("/page/2", None), id="link-other-path"),
    pytest.param(formance, cursor_page("eyJvZmZzZXQiOjJ9"), True,
                 ("/v2/main/accounts", {"cursor": "eyJvZmZzZXQiOjJ9"}), id="cursor"),
    pytest.param(formance, cursor_page(None, has_more=False), False, None,
                 id="cursor-hasMore-false"),
    pytest.param(formance, cursor_page("eyJvZmZzZXQiOjR9", has_more=False), False, None,
                 id="cursor-hasMore-false-wins-over-next"),
    pytest.param(flagless, flagless_page("abc"), True, ("/v2/main/accounts", {"after": "abc"}),
                 id="flagless-cursor"),
    pytest.param(flagless, flagless_page(None), False, None, id="flagless-null"),
    pytest.param(flagless, flagless_page(""), False, None, id="flagless-empty"),
    pytest.param(lambda: CursorPaginator(cursor_path=("meta", "cursor"),
                                         has_more_path=("meta", "more"), cursor_param="page_token"),
                 {"meta": {"more": True, "cursor": "p2"}}, True,
                 ("/v2/main/accounts", {"page_token": "p2"}), id="cursor-other-paths"),
    pytest.param(SinglePage, {"responseData": []}, False, None, id="single-page"),
])
def test_update_state_and_next_request(make, page, has_next, request_):
    paginator = make()
    paginator.update_state(page)
    assert paginator.pages == 1
    assert paginator.has_next is has_next
    if has_next:
        # The previous query is dropped: a link carries its own, a cursor goes alone.
        previous = [("pageSize", 2), ("pit", "x")]
        assert paginator.next_request("/v2/main/accounts", previous) == request_
    else:
        assert paginator.token is None


def test_a_crawl_follows_each_token_in_turn():
    paginator = formance()
    requests_made = []
    for page in [cursor_page("c1"), cursor_page("c2"), cursor_page(None, has_more=False)]:
        paginator.update_state(page)
        if paginator.has_next:
            requests_made.append(paginator.next_request("/accounts", {"pageSize": 2}))
    assert requests_made == [("/accounts", {"cursor": "c1"}), ("/accounts", {"cursor": "c2"})]
    assert (paginator.pages, paginator.has_next) == (3, False)


def test_a_single_page_has_no_next_request():
    paginator = SinglePage()
    paginator.update_state({})
    with pytest.raises(AssertionError):
        paginator.next_request("/v1/account/balances", None)


# -- stop rules --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 2, 3, 7])
def test_a_cycle_of_any_length_is_refused(kind, length):
    make, page = KINDS[kind]
    paginator = make()
    tokens = [f"/api/v1/balances?account.id=gt:0.0.{i}" for i in range(length)]
    for token in tokens:
        paginator.update_state(page(token))
    with pytest.raises(PaginationError, match=f"pagination loop: page {length + 1} leads back"):
        paginator.update_state(page(tokens[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_seen_long_ago_is_still_a_loop(kind):
    make, page = KINDS[kind]
    paginator = make()
    for i in range(500):
        paginator.update_state(page(f"t{i}"))
    with pytest.raises(PaginationError, match="pagination loop"):
        paginator.update_state(page("t250"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_pages", [1, 2, 5])
def test_the_page_cap_refuses_more_pages_than_max_pages(kind, max_pages):
    make, page = KINDS[kind]
    paginator = make(max_pages=max_pages)
    for i in range(max_pages - 1):
        paginator.update_state(page(f"t{i}"))
    with pytest.raises(PaginationError, match=f"page cap reached: {max_pages} pages read"):
        paginator.update_state(page("one-more"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_pages", [1, 3])
def test_a_crawl_of_exactly_max_pages_is_allowed(kind, max_pages):
    make, page = KINDS[kind]
    last = (cursor_page(None, has_more=False) if kind == "cursor with hasMore" else page(None))
    paginator = make(max_pages=max_pages)
    for i in range(max_pages - 1):
        paginator.update_state(page(f"t{i}"))
    paginator.update_state(last)
    assert (paginator.pages, paginator.has_next) == (max_pages, False)


@pytest.mark.parametrize("read, max_pages, refused", [(0, 1, False), (2, 3, False), (3, 3, True),
                                                      (4, 3, True)])
def test_check_page_cap(read, max_pages, refused):
    if refused:
        with pytest.raises(PaginationError, match=f"page cap reached: {max_pages} pages read"):
            check_page_cap(read, max_pages)
    else:
        check_page_cap(read, max_pages)


# -- malformed pages ---------------------------------------------------------

MALFORMED = [
    # id, paginator, page, error
    ("link-missing-links", hedera, {"balances": [{}]}, "page has no links.next field"),
    ("link-missing-next", hedera, {"balances": [{}], "links": {}}, "page has no links.next field"),
    ("links-not-an-object", hedera, {"balances": [{}], "links": ["/x"]},
     "page has no links.next field"),
    ("link-int", hedera, {"balances": [{}], "links": {"next": 7}},
     "links.next is int, expected a string or null"),
    ("link-object", hedera, {"balances": [{}], "links": {"next": {"href": "/x"}}},
     "links.next is dict"),
    ("records-missing", hedera, {"links": {"next": None}}, "page has no balances list"),
    ("records-not-a-list", hedera, {"balances": {"0.0.2": 5}, "links": {"next": None}},
     "page has no balances list"),
    ("page-a-list", NextLinkPaginator, ["/x"], "page has no links.next field"),
    ("page-null", NextLinkPaginator, None, "page has no links.next field"),
    ("cursor-missing", formance, {}, "page has no cursor.hasMore"),
    ("cursor-not-an-object", formance, {"cursor": "abc"}, "page has no cursor.hasMore"),
    ("hasMore-missing", formance, {"cursor": {"next": "abc"}}, "page has no cursor.hasMore"),
    ("hasMore-a-string", formance, {"cursor": {"hasMore": "true", "next": "abc"}},
     "page has no cursor.hasMore"),
    ("hasMore-a-number", formance, {"cursor": {"hasMore": 1, "next": "abc"}},
     "page has no cursor.hasMore"),
    ("hasMore-without-next", formance, cursor_page(None),
     "cursor.hasMore is true but cursor.next is missing"),
    ("hasMore-with-empty-next", formance, cursor_page(""),
     "cursor.hasMore is true but cursor.next is missing"),
    ("hasMore-with-int-next", formance, cursor_page(42),
     "cursor.hasMore is true but cursor.next is missing"),
    ("formance-page-a-list", formance, [], "page has no cursor.hasMore"),
    ("flagless-missing", flagless, {"data": []}, "page has no cursors.next field"),
    ("flagless-list", flagless, flagless_page(["a"]),
     "cursors.next is list, expected a string or null"),
]


@pytest.mark.parametrize("make, page, match", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_a_malformed_page_is_refused(make, page, match):
    with pytest.raises(MalformedResponseError, match=match) as caught:
        make().update_state(page)
    assert caught.value.raw  # the page is kept for the run's error report


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("token", ["/x?a=\x00", "/x\nX-Injected: 1", "/x?id=\uff19", "\ud800",
                                   "a b\t"])
def test_a_token_that_is_not_printable_ascii_is_refused(kind, token):
    make, page = KINDS[kind]
    with pytest.raises(MalformedResponseError, match="not printable ASCII"):
        make().update_state(page(token))


# -- planned pages -----------------------------------------------------------

def test_planned_pages_walk_the_plan_in_order():
    paginator = PlannedPages(["/a", "/b", "/c"], max_pages=3)
    assert paginator.targets[0] == "/a"
    followed = []
    while True:
        paginator.update_state({"value": []})
        if not paginator.has_next:
            break
        followed.append(paginator.next_request("/ignored", {"q": 1}))
    assert followed == [("/b", None), ("/c", None)]
    assert paginator.pages == 3


@pytest.mark.parametrize("planned, max_pages, refused", [(1, 1, False), (3, 3, False), (4, 3, True),
                                                         (10, 1, True)])
def test_a_plan_over_the_page_cap_is_refused_before_any_request(planned, max_pages, refused):
    targets = [f"/batch/{i}" for i in range(planned)]
    if refused:
        with pytest.raises(PaginationError, match=f"page cap reached: the grid needs {planned} "
                                                  f"requests, more than max_pages = {max_pages}"):
            PlannedPages(targets, what="the grid", max_pages=max_pages)
    else:
        assert PlannedPages(targets, max_pages=max_pages).targets == targets


def test_a_plan_that_repeats_a_request_is_a_loop():
    paginator = PlannedPages(["/a", "/b", "/b"])
    paginator.update_state({})
    with pytest.raises(PaginationError, match="pagination loop"):
        paginator.update_state({})


# -- retry decisions (extractors/http.py) ------------------------------------

@pytest.mark.parametrize("attempt, retry_after, jitter, expected", [
    (1, None, 1.0, 0.5),        # base
    (1, None, 0.5, 0.25),       # full jitter in the upper half
    (2, None, 1.0, 1.0),        # doubles per attempt
    (4, None, 1.0, 4.0),
    (10, None, 1.0, 30.0),      # capped
    (10, None, 0.5, 15.0),
    (1, 0.0, 1.0, 0.5),         # Retry-After: 0 still waits the backoff
    (1, 7.0, 1.0, 7.0),         # a longer Retry-After wins
    (10, 45.0, 0.5, 45.0),
    (3, 1.0, 1.0, 2.0),         # a shorter one does not
])
def test_retry_delay(monkeypatch, attempt, retry_after, jitter, expected):
    monkeypatch.setattr(http.random, "uniform", lambda low, high: jitter)
    assert RetryPolicy().delay(attempt, retry_after) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", range(1, 12))
def test_retry_delay_stays_within_the_jitter_band(attempt):
    policy = RetryPolicy(backoff_base=0.5, backoff_cap=30.0)
    backoff = min(30.0, 0.5 * 2 ** (attempt - 1))
    for _ in range(50):
        assert backoff / 2 <= policy.delay(attempt, None) <= backoff


NOW = 1_700_000_000.0


@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("", None),
    ("   ", None),
    ("5", 5.0),
    (" 2.5 ", 2.5),
    ("0", 0.0),
    ("-3", 0.0),  # never a negative wait
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # a date in the past: now
    ("Tue, 14 Nov 2023 22:13:50", 30.0),  # no zone: read as UTC
    ("soon", None),
    ("Mon, 99 Foo 2023", None),
])
def test_parse_retry_after(header, expected):
    wait = parse_retry_after(header, now=NOW)
    assert wait == (None if expected is None else pytest.approx(expected))


def response(status: int, headers: dict[str, str] | None = None,
             url: str = "https://api.example/v1/balances?api_key=s3cret&limit=2",
             ) -> requests.Response:
    built = requests.Response()
    built.status_code = status
    built.url = url
    built.headers.update(headers or {})
    built._content = b""
    return built


@pytest.mark.parametrize("status, retriable", [
    (400, False), (401, False), (403, False), (404, False), (409, False), (422, False),
    (408, True), (429, True), (500, True), (502, True), (503, True), (504, True), (599, True),
])
def test_http_error_classifies_the_status_once(status, retriable):
    error = http_error(response(status), "the provider's words", code="E1")
    assert error.retriable is retriable
    assert (error.status, error.code) == (status, "E1")
    assert str(error).startswith(f"HTTP {status} from https://api.example/v1/balances?")
    assert "s3cret" not in str(error)  # the URL is redacted before it is raised
    assert "the provider's words" in str(error)


@pytest.mark.parametrize("headers, retry_after", [
    ({}, None),
    ({"Retry-After": "12"}, 12.0),
    ({"Retry-After": "nonsense"}, None),
])
def test_http_error_keeps_retry_after(headers, retry_after):
    assert http_error(response(429, headers), "slow down").retry_after == retry_after
