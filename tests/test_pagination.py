"""Hostile pagination: links that loop, leave the origin, or never end.

Every case must be refused with a clear error, in bounded time, publishing
nothing, and without any credential reaching a host we were not configured
to talk to (a second server records every request it gets).
"""
from __future__ import annotations

import itertools
import json
import time

import pytest

from extractors.errors import PaginationError
from pipeline.snapshot import take_snapshot
from sandbox.apps import sandbox
from sandbox.server import json_response
from tests.conftest import fetch
from tests.sandboxes import now, start


class Relinking:
    """The sandbox, with each page's pagination token replaced by the next of ``tokens``.

    ``path`` is where the token lives (``links.next`` for Hedera,
    ``cursor.next`` for Formance, which also needs ``hasMore`` kept true).
    """

    def __init__(self, app, endpoint: str, path: tuple[str, str], tokens):
        self.app, self.endpoint, self.path, self.tokens = app, endpoint, path, iter(tokens)
        self.pages = 0

    def __call__(self, request):
        response = self.app(request)
        if not request.path.endswith(self.endpoint) or response.status != 200:
            return response
        if ("limit", "1") in request.query:
            return response  # Hedera's snapshot lookup before the crawl follows no link
        self.pages += 1
        body = json.loads(response.body)
        holder = body[self.path[0]]
        holder[self.path[1]] = next(self.tokens)
        if "hasMore" in holder:
            holder["hasMore"] = True
        return json_response(body, 200, response.headers)


HEDERA = ("/api/v1/balances", ("links", "next"))


def hedera_link(i: int) -> str:
    return f"/api/v1/balances?limit=5&account.id=lt:0.0.{100_000 - i}"


def _refused(db, live, match: str) -> PaginationError:
    started = time.monotonic()
    with pytest.raises(PaginationError, match=match) as caught:
        take_snapshot(db, live.source, now(), credentials=live.credentials)
    assert time.monotonic() - started < 10
    [(status, error)] = fetch(db, "SELECT status, error FROM snapshot_runs")
    assert status == "failed" and match.split()[0] in error
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
    return caught.value


@pytest.mark.parametrize("length", [1, 2, 3, 7, 50])
def test_hedera_link_cycle_of_any_length_is_refused(db, serve, length):
    ring = itertools.cycle([hedera_link(i) for i in range(length)])
    app = Relinking(sandbox("hedera").demo_app(), *HEDERA, ring)
    live = start("hedera", serve, app=app, limit=5)
    _refused(db, live, "pagination loop")
    # The loop is caught as soon as a link comes round again.
    assert app.pages == length + 1


def test_endless_fresh_links_stop_at_the_page_cap(db, serve):
    app = Relinking(sandbox("hedera").demo_app(), *HEDERA, (hedera_link(i) for i in itertools.count()))
    live = start("hedera", serve, app=app, limit=5, max_pages=40)
    _refused(db, live, "page cap")
    assert app.pages == 40


def _foreign_links(other_port: int, own_port: int) -> dict[str, str]:
    return {
        "another host": f"http://127.0.0.1:{other_port}/api/v1/balances?limit=5",
        "another scheme": f"https://127.0.0.1:{own_port}/api/v1/balances?limit=5",
        "scheme-relative": f"//127.0.0.1:{other_port}/api/v1/balances?limit=5",
        "credentials in the link": f"http://user:pw@127.0.0.1:{other_port}/api/v1/balances",
        "not http": f"ftp://127.0.0.1:{other_port}/api/v1/balances",
        "localhost alias": f"http://localhost:{own_port}/api/v1/balances?limit=5",
    }


@pytest.mark.parametrize("case", list(_foreign_links(1, 2)))
def test_a_link_off_the_configured_origin_is_refused_and_gets_no_credential(db, serve, monkeypatch, case):
    other = serve(sandbox("hedera").demo_app())
    links = []
    app = Relinking(sandbox("hedera").demo_app(), *HEDERA, iter(links))
    live = start("hedera", serve, app=app, limit=5)
    links.append(_foreign_links(other.port, live.server.port)[case])
    monkeypatch.setenv("AIRFLOW_CONN_HEDERA_KEYED", "http://:mirror-key-0123456789@mirror")
    from pipeline import connections
    live.credentials = connections.credentials("hedera_keyed")

    error = _refused(db, live, "leaves the configured origin")
    assert other.request_count == 0 and list(other.requests) == []
    # Only the snapshot lookup and the first page were read, from the configured origin.
    assert [r.path for r in live.server.requests].count("/api/v1/balances") == 2
    assert live.server.requests[0].header("x-api-key") == "mirror-key-0123456789"
    assert "mirror-key" not in str(error)


class CursorLoop:
    """The Formance sandbox, whose cursor after page ``length + 1`` leads back to page 2.

    The tokens are the fake's own, so each request is valid on its own:
    only the sequence loops.
    """

    def __init__(self, app, length: int):
        self.app, self.length, self.cursors, self.pages = app, length, [], 0

    def __call__(self, request):
        response = self.app(request)
        if not request.path.endswith("/demo/balances") or response.status != 200:
            return response
        self.pages += 1
        body = json.loads(response.body)
        cursor = body["cursor"]
        if cursor.get("next"):
            self.cursors.append(cursor["next"])
        if self.pages == self.length + 1:
            cursor["hasMore"], cursor["next"] = True, self.cursors[0]
        return json_response(body, 200, response.headers)


@pytest.mark.parametrize("length", [1, 2, 3, 5])
def test_formance_cursor_cycle_of_any_length_is_refused(db, serve, length):
    app = CursorLoop(sandbox("formance").demo_app(), length)
    live = start("formance", serve, app=app, page_size=1)
    _refused(db, live, "pagination loop")
    # Caught on the page that offers a cursor already followed: nothing is read twice.
    assert app.pages == length + 1
