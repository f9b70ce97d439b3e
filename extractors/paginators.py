"""Paginators: one protocol, the stop rules written once in the base class.

A paginator reads each page (``update_state``) and says how to ask for the
next one (``next_request``). A concrete paginator only says where the page
keeps the token that leads on (``next_token``) and how to send it back; it
is configured by paths, not subclassed per API::

    NextLinkPaginator(next_path=("links", "next"))
    CursorPaginator(cursor_path=("cursor", "next"), has_more_path=("cursor", "hasMore"),
                    cursor_param="cursor")

The base class holds every stop rule: a token seen before ends the crawl
with an error whatever the cycle length, so does one that is not printable
ASCII, and so does a provider still offering more after ``max_pages`` pages;
a null or empty token ends the crawl, and so, when ``records_path`` is
given, does a page with no records. No provider can keep a crawl running
forever. The origin of a link is pinned by the HTTP client, which joins it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Protocol, Sequence

from extractors.errors import MalformedResponseError, PaginationError
from extractors.text import safe_text

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None

DEFAULT_MAX_PAGES = 100_000


class Paginator(Protocol):
    has_next: bool
    pages: int

    def update_state(self, data: Any) -> None: ...

    def next_request(self, path: str, params: Params) -> tuple[str, Params]: ...


def check_page_cap(pages: int, max_pages: int) -> None:
    """The page cap: with ``pages`` read and more on offer, refuse past ``max_pages``."""
    if pages >= max_pages:
        raise PaginationError(
            f"page cap reached: {max_pages} pages read and the provider still "
            "offers more (raise max_pages if this source really is that large)"
        )


class BasePaginator:
    """Stop rules shared by every paginator.

    Args:
        max_pages: the most pages one crawl may read.
        records_path: where the page lists its records; when given, a page
            listing none is the last, whatever its token says (an API may
            end with an empty page that still links on).
    """

    def __init__(self, *, max_pages: int = DEFAULT_MAX_PAGES,
                 records_path: Sequence[str] | None = None) -> None:
        self.max_pages = max_pages
        self.records_path = None if records_path is None else tuple(records_path)
        self.has_next = True
        self.pages = 0
        self.token: str | None = None
        # Digests, not the tokens themselves: a million-account crawl keeps
        # ten thousand links, and their text would grow with the crawl.
        self._seen: set[bytes] = set()

    def update_state(self, data: Any) -> None:
        """Read one page: end the crawl, or keep the token that leads on."""
        if self.records_path is not None and not self.records(data):
            self.advance(None)
            return
        self.advance(self.next_token(data))

    def next_token(self, data: Any) -> str | None:
        """The token in ``data`` that leads to the next page; None or "" if it is the last."""
        raise NotImplementedError

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        """The path and query of the next request, from the previous ones and the token."""
        raise NotImplementedError

    def records(self, data: Any) -> list:
        """The page's records, at ``records_path``."""
        assert self.records_path is not None
        records = _get(data, self.records_path)
        if not isinstance(records, list):
            raise MalformedResponseError(f"page has no {_dotted(self.records_path)} list",
                                         raw=data)
        return records

    def advance(self, token: str | None) -> None:
        """Record the page just read and the token that leads to the next."""
        self.pages += 1
        if not token:
            self.has_next = False
            self.token = None
            return
        if not (token.isascii() and token.isprintable()):
            # Links and cursors are ASCII by every provider's spec; anything
            # else cannot be sent as a URL and would only crash the request.
            raise MalformedResponseError(
                f"page {self.pages} leads on with a link or cursor that is not printable ASCII: "
                f"{safe_text(ascii(token), 200)}"
            )
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        if digest in self._seen:
            raise PaginationError(
                f"pagination loop: page {self.pages} leads back to a page already read"
            )
        self._seen.add(digest)
        check_page_cap(self.pages, self.max_pages)
        self.token = token


class NextLinkPaginator(BasePaginator):
    """Follows the link found at ``next_path`` in each page; null or empty ends.

    The link is used exactly as sent; the HTTP client joins it onto the
    configured base URL and refuses any other origin. A sample page (Hedera
    mirror node, ``GET /api/v1/balances``)::

        {"timestamp": "1700000000.000000000",
         "balances": [{"account": "0.0.2", "balance": 5, "tokens": []}],
         "links": {"next": "/api/v1/balances?limit=1&account.id=gt:0.0.2"}}

    Args:
        next_path: the keys leading to the link, from the top of the page.
        **kwargs: as for :class:`BasePaginator`.
    """

    def __init__(self, next_path: Sequence[str] = ("links", "next"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.next_path = tuple(next_path)

    def next_token(self, data: Any) -> str | None:
        return _token(data, self.next_path)

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        assert self.token is not None
        return self.token, None


class CursorPaginator(BasePaginator):
    """Sends back the cursor found at ``cursor_path`` as the ``cursor_param`` query parameter.

    With ``has_more_path``, that flag decides: false ends the crawl
    whatever the cursor says, true needs a cursor. Without it, a null or
    empty cursor ends. Follow-up requests carry only the cursor, on the
    same path: Formance rejects any other query parameter next to it. A
    sample page (Formance ledger v2, ``GET /v2/{ledger}/accounts``)::

        {"cursor": {"pageSize": 2, "hasMore": true, "next": "eyJvZmZzZXQiOjJ9",
                    "data": [{"address": "users:001", "metadata": {}},
                             {"address": "users:002", "metadata": {}}]}}

    Args:
        cursor_path: the keys leading to the cursor, from the top of the page.
        has_more_path: the keys leading to a true/false "more pages" flag,
            or None if the API has none.
        cursor_param: the query parameter that carries the cursor back.
        **kwargs: as for :class:`BasePaginator`.
    """

    def __init__(self, cursor_path: Sequence[str] = ("cursor", "next"),
                 has_more_path: Sequence[str] | None = ("cursor", "hasMore"),
                 cursor_param: str = "cursor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cursor_path = tuple(cursor_path)
        self.has_more_path = None if has_more_path is None else tuple(has_more_path)
        self.cursor_param = cursor_param

    def next_token(self, data: Any) -> str | None:
        if self.has_more_path is None:
            return _token(data, self.cursor_path)
        has_more = _get(data, self.has_more_path)
        if not isinstance(has_more, bool):
            raise MalformedResponseError(f"page has no {_dotted(self.has_more_path)}",
                                         raw=data)
        if not has_more:
            return None
        token = _get(data, self.cursor_path)
        if not isinstance(token, str) or not token:
            raise MalformedResponseError(
                f"{_dotted(self.has_more_path)} is true but {_dotted(self.cursor_path)} is missing",
                raw=data,
            )
        return token

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        assert self.token is not None
        return path, {self.cursor_param: self.token}


class SinglePage(BasePaginator):
    """For endpoints that answer everything at once (BitFront's balances)."""

    def next_token(self, data: Any) -> str | None:
        return None

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        raise AssertionError("a single-page endpoint has no next page")


class PlannedPages(BasePaginator):
    """For APIs without paging whose requests are all known before the first.

    The first request is ``targets[0]``; each page leads to the next target,
    whatever it says. The plan is held to the page cap before any request
    is made (CoreLedger's grid of addresses × assets).

    Args:
        targets: the path (or same-origin URL) of every request, in order.
        what: how the cap error names the plan.
        **kwargs: as for :class:`BasePaginator`.
    """

    def __init__(self, targets: Sequence[str], *, what: str = "the plan", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.targets = list(targets)
        if len(self.targets) > self.max_pages:
            raise PaginationError(f"page cap reached: {what} needs {len(self.targets)} requests, "
                                  f"more than max_pages = {self.max_pages}")

    def next_token(self, data: Any) -> str | None:
        return self.targets[self.pages + 1] if self.pages + 1 < len(self.targets) else None

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        assert self.token is not None
        return self.token, None


_MISSING = object()


def _get(data: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in ``data``, or ``_MISSING``."""
    node = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _token(data: Any, path: tuple[str, ...]) -> str | None:
    """A link or cursor that must be present: a string, or null for the last page."""
    token = _get(data, path)
    if token is _MISSING:
        raise MalformedResponseError(f"page has no {_dotted(path)} field", raw=data)
    if token is not None and not isinstance(token, str):
        raise MalformedResponseError(
            f"{_dotted(path)} is {type(token).__name__}, expected a string or null",
            raw=data,
        )
    return token


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)
