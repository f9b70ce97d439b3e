"""Paginators: one protocol, the stop rules written once in the base class.

A paginator reads each page (``update_state``) and says how to ask for the
next one (``next_request``). The base class refuses a token seen before,
whatever the cycle length, and enforces a page cap, so no provider can keep
a crawl running forever.
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


class BasePaginator:
    """Stop rules shared by every paginator."""

    def __init__(self, max_pages: int = DEFAULT_MAX_PAGES) -> None:
        self.max_pages = max_pages
        self.has_next = True
        self.pages = 0
        self.token: str | None = None
        # Digests, not the tokens themselves: a million-account crawl keeps
        # ten thousand links, and their text would grow with the crawl.
        self._seen: set[bytes] = set()

    def advance(self, token: str | None) -> None:
        """Record the page just read and the token that leads to the next."""
        self.pages += 1
        if token is None:
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
        if self.pages >= self.max_pages:
            raise PaginationError(
                f"page cap reached: {self.max_pages} pages read and the provider still "
                "offers more (raise max_pages if this source really is that large)"
            )
        self.token = token


class NextLinkPaginator(BasePaginator):
    """Follows a ``links.next`` style link found at ``path`` in each page.

    The link is used exactly as sent; the HTTP client joins it onto the
    configured base URL and refuses any other origin.
    """

    def __init__(self, path: Sequence[str] = ("links", "next"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = tuple(path)

    def update_state(self, data: Any) -> None:
        node = data
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                raise MalformedResponseError(
                    f"page has no {'.'.join(self.path)} field", raw=_snippet(data)
                )
            node = node[key]
        if node is not None and not isinstance(node, str):
            raise MalformedResponseError(
                f"{'.'.join(self.path)} is {type(node).__name__}, expected a string or null",
                raw=_snippet(data),
            )
        self.advance(node or None)

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        assert self.token is not None
        return self.token, None


class CursorPaginator(BasePaginator):
    """Formance-style ``cursor`` object: stop on ``hasMore``, follow ``next``.

    Follow-up requests carry only the cursor: the API rejects any other
    query parameter next to it.
    """

    def __init__(self, cursor_param: str = "cursor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cursor_param = cursor_param

    def update_state(self, data: Any) -> None:
        cursor = data.get("cursor") if isinstance(data, dict) else None
        if not isinstance(cursor, dict) or not isinstance(cursor.get("hasMore"), bool):
            raise MalformedResponseError("page has no cursor.hasMore", raw=_snippet(data))
        if not cursor["hasMore"]:
            self.advance(None)
            return
        token = cursor.get("next")
        if not isinstance(token, str) or not token:
            raise MalformedResponseError(
                "cursor.hasMore is true but cursor.next is missing", raw=_snippet(data)
            )
        self.advance(token)

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        assert self.token is not None
        return path, {self.cursor_param: self.token}


class SinglePage(BasePaginator):
    """For endpoints that answer everything at once."""

    def update_state(self, data: Any) -> None:
        self.advance(None)

    def next_request(self, path: str, params: Params) -> tuple[str, Params]:
        raise AssertionError("a single-page endpoint has no next page")


def _snippet(data: Any, limit: int = 2000) -> str:
    from extractors.records import to_json_text

    return to_json_text(data)[:limit]
