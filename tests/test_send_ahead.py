"""A crawl sends the next page's GET before it hands over the page it has (transport.send_ahead).

What may change is only when a request is written. Each page must still
be asked for once and read as its own answer, under the same retries,
deadline and errors; anything that is not a plain GET on an idle
connection, or that a throttle paces, is sent in its turn as before.
"""
from __future__ import annotations

import ssl
import threading
import time

import pytest

from extractors.errors import ProviderError
from extractors.http import HttpClient, RetryPolicy
from extractors.paginators import NextLinkPaginator
from sandbox.server import FakeServer, Fault, Response, json_response

PAGES = 5


def pages_app(request):
    """``/p?n=K`` lists one record and links to page K+1, up to PAGES; ``/other`` answers apart."""
    if request.path == "/other":
        return json_response({"other": True})
    n = int(request.params("n")[0])
    return json_response({"n": n, "rows": [n], "links": {"next": f"/p?n={n + 1}" if n < PAGES else None}})


def crawl(client: HttpClient, *, each=lambda data: None) -> list[int]:
    seen = []
    for data in client.paginate("/p", [("n", 1)], NextLinkPaginator(records_path=("rows",))):
        seen.append(data["n"])
        each(data)
    return seen


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def asked(server) -> list[str]:
    return [r.raw_query for r in server.requests if r.path == "/p"]


def test_the_next_page_is_asked_for_while_the_caller_holds_this_one_and_each_page_once(serve):
    server = serve(pages_app)
    client = HttpClient(server.url)
    # While the caller still holds page n, the server has already been asked for page n + 1.
    early = []
    seen = crawl(client, each=lambda data: early.append(wait_for(lambda: len(asked(server)) > data["n"], 2)
                                                        or data["n"] == PAGES))
    assert seen == list(range(1, PAGES + 1))
    assert all(early), early
    assert asked(server) == [f"n={n}" for n in range(1, PAGES + 1)]  # none twice, none after the last
    assert client.stats.requests == PAGES


def test_without_sending_ahead_the_next_page_waits_for_the_caller(serve):
    # The same crawl under a throttle: a request leaves only when its token is taken.
    server = serve(pages_app)
    client = HttpClient(server.url, throttle=lambda: None)
    held = []
    crawl(client, each=lambda data: held.append(not wait_for(lambda: len(asked(server)) > data["n"], 0.2)))
    assert all(held), held
    assert asked(server) == [f"n={n}" for n in range(1, PAGES + 1)]


@pytest.mark.parametrize("how", ["headers", "auth"])
def test_a_request_with_its_own_headers_or_auth_is_not_sent_ahead(serve, how):
    server = serve(pages_app)
    client = HttpClient(server.url, auth=("user", "pass")) if how == "auth" else HttpClient(server.url)
    paginator = NextLinkPaginator(records_path=("rows",))
    headers = {"X-Page": "1"} if how == "headers" else None
    for data in client.paginate("/p", [("n", 1)], paginator, headers=headers):
        assert not wait_for(lambda: len(asked(server)) > data["n"], 0.2)
    assert asked(server) == [f"n={n}" for n in range(1, PAGES + 1)]


def test_another_request_meanwhile_gets_its_own_answer_and_the_page_sent_ahead_is_still_read(serve):
    # A crawl looks up something (a token's decimals) between two pages.
    server = serve(pages_app)
    client = HttpClient(server.url)
    others = []
    seen = crawl(client, each=lambda data: others.append(client.get_json("/other")))
    assert seen == list(range(1, PAGES + 1))
    assert others == [{"other": True}] * PAGES
    assert asked(server) == [f"n={n}" for n in range(1, PAGES + 1)]


def test_a_crawl_stopped_early_leaves_the_session_usable(serve):
    server = serve(pages_app)
    client = HttpClient(server.url)
    bodies = client.paginate("/p", [("n", 1)], NextLinkPaginator(records_path=("rows",)))
    assert next(bodies)["n"] == 1
    bodies.close()  # page 2 was asked for and will never be read
    assert client.get_json("/other") == {"other": True}
    assert crawl(client) == list(range(1, PAGES + 1))
    assert asked(server) == ["n=1", "n=2"] + [f"n={n}" for n in range(1, PAGES + 1)]


def test_an_error_answer_to_a_page_sent_ahead_is_retried_as_any_other(serve):
    server = serve(pages_app)
    server.inject(Fault("status", path="/p", after=2, response=Response(503, b'{"message": "busy"}')))
    client = HttpClient(server.url, policy=RetryPolicy(max_attempts=3, backoff_base=0.01))
    assert crawl(client) == list(range(1, PAGES + 1))
    assert asked(server) == ["n=1", "n=2", "n=3", "n=3", "n=4", "n=5"]
    assert client.stats.retries == 1 and client.stats.requests == PAGES + 1


def test_a_connection_dropped_under_a_page_sent_ahead_is_retried_as_any_other(serve):
    server = serve(pages_app)
    server.inject(Fault("reset", path="/p", after=3))
    client = HttpClient(server.url, policy=RetryPolicy(max_attempts=3, backoff_base=0.01))
    assert crawl(client) == list(range(1, PAGES + 1))
    assert client.stats.retries == 1
    assert asked(server).count("n=4") == 2


def test_an_error_that_is_not_retried_fails_the_crawl_after_the_page_before_it(serve):
    server = serve(pages_app)
    server.inject(Fault("status", path="/p", after=1, times=10, response=Response(404, b'{"message": "gone"}')))
    client = HttpClient(server.url)
    seen = []
    with pytest.raises(ProviderError, match="HTTP 404"):
        crawl(client, each=lambda data: seen.append(data["n"]))
    assert seen == [1]
    assert asked(server) == ["n=1", "n=2"]


def test_a_page_sent_ahead_that_trickles_fails_at_the_request_deadline(serve):
    server = serve(pages_app)
    server.inject(Fault("trickle", path="/p", after=1, seconds=1, times=10))
    client = HttpClient(server.url, policy=RetryPolicy(max_attempts=1, read_timeout=10, request_deadline=1.5))
    started = threading.Event()
    with pytest.raises(Exception, match="request_deadline = 1.5s"):
        crawl(client, each=lambda data: started.set())
    assert started.is_set()


def test_over_tls_each_next_page_is_sent_ahead_and_read_as_its_own(tmp_path):
    from tests.test_alerts import self_signed

    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = FakeServer(pages_app)
    server._httpd.socket = context.wrap_socket(server._httpd.socket, server_side=True)
    server.start()
    try:
        client = HttpClient(f"https://127.0.0.1:{server.port}")
        client.session.verify = str(cert)
        early = []
        seen = crawl(client, each=lambda data: early.append(
            wait_for(lambda: len(asked(server)) > data["n"], 2) or data["n"] == PAGES))
        assert seen == list(range(1, PAGES + 1))
        assert all(early), early
        assert asked(server) == [f"n={n}" for n in range(1, PAGES + 1)]
    finally:
        server.stop()
