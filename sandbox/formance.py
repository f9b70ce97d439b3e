"""A fake Formance stack: the OAuth2 token endpoint and a ledger's balances.

Answers as the ledger's OpenAPI specs (v1 and v2) and the seed document say:

* ``POST /api/auth/oauth/token`` (client credentials, form-encoded) issues
  Bearer tokens that expire after ``token_lifetime`` seconds; a missing,
  unknown, expired or revoked token gets 401 from every ledger endpoint.
* v1 ``/{ledger}/balances`` and ``/{ledger}/aggregate/balances``, served
  under each of ``mounts`` (``/api/ledger`` is the stack gateway, ``""`` a
  standalone ledger); v2 ``/v2/{ledger}/accounts?expand=volumes&pit=`` and
  ``/v2/{ledger}/aggregate/balances?pit=`` with the filter in the body.
* Cursor pages ``{"cursor": {"pageSize", "hasMore", "next"?, "previous"?,
  "data"}}``: ``next``/``previous`` are omitted, not null, when absent; the
  cursor is unpadded URL-safe base64 holding the whole query, and a request
  with ``cursor`` and any other parameter gets 400 VALIDATION. Page size:
  default 15, v1 max 1000, v2 cut to 100 without a word.
* v1 ``address`` is a regex per ``:``-segment; v2's is not (an empty segment
  is a wildcard, a trailing ``...`` matches any depth).
* Amounts are bare JSON integers of any size (negative for ``world``); v2
  writes them as strings when sent ``Formance-Bigint-As-String: true``.
  An account with no movements is ``{"addr": {}}``.
* Errors are ``{"errorCode", "errorMessage"}``.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable
from urllib.parse import parse_qsl

from sandbox.server import Request, Response, json_response

TOKEN_PATH = "/api/auth/oauth/token"
DEFAULT_PAGE_SIZE = 15
MAX_PAGE_SIZE = {"v1": 1000, "v2": 100}
PAGE_SIZE_PARAMS = ("pageSize", "page_size")
CURSOR_PARAMS = ("cursor", "pagination_token")
INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}  # RFC 6750, no body
_CURSOR_KEYS = {"offset", "pageSize", "address", "after", "pit", "volumes"}

_ROUTES = (
    ("v2", "accounts", re.compile(r"^/v2/([^/]+)/accounts$")),
    ("v2", "aggregate", re.compile(r"^/v2/([^/]+)/aggregate/balances$")),
    ("v1", "balances", re.compile(r"^/([^/]+)/balances$")),
    ("v1", "aggregate", re.compile(r"^/([^/]+)/aggregate/balances$")),
)


@dataclass(slots=True, frozen=True)
class Move:
    """One side of a posting: ``amount`` in (positive) or out (negative) of ``account``."""

    at: datetime
    account: str
    asset: str
    amount: int


@dataclass
class Ledger:
    """Movements with their effective times, so any point in time can be read."""

    moves: list[Move] = field(default_factory=list)
    opened: dict[str, datetime] = field(default_factory=dict)

    def open(self, account: str, at: datetime) -> "Ledger":
        """An account that exists without movements (listed as ``{}``)."""
        if account not in self.opened or at < self.opened[account]:
            self.opened[account] = at
        return self

    def move(self, at: datetime, account: str, asset: str, amount: int) -> "Ledger":
        self.open(account, at)
        self.moves.append(Move(at, account, asset, amount))
        return self

    def transfer(self, at: datetime, source: str, destination: str, asset: str, amount: int) -> "Ledger":
        return self.move(at, source, asset, -amount).move(at, destination, asset, amount)

    @classmethod
    def of(cls, at: datetime, balances: dict[str, dict[str, int]]) -> "Ledger":
        """A ledger whose accounts hold ``balances`` from ``at`` on."""
        ledger = cls()
        for account, assets in balances.items():
            ledger.open(account, at)
            for asset, amount in assets.items():
                ledger.move(at, account, asset, amount)
        return ledger

    def volumes(self, pit: datetime | None = None) -> dict[str, dict[str, list[int]]]:
        """``account -> asset -> [input, output]`` of the accounts that existed at ``pit``."""
        book: dict[str, dict[str, list[int]]] = {
            a: {} for a, opened in self.opened.items() if pit is None or opened <= pit}
        for move in self.moves:
            if pit is not None and move.at > pit:
                continue
            volume = book[move.account].setdefault(move.asset, [0, 0])
            volume[0 if move.amount >= 0 else 1] += abs(move.amount)
        return book


class FormanceStack:
    """The fake's application. ``clients`` (id -> secret) None means no auth."""

    def __init__(self, ledgers: dict[str, Ledger], *, clients: dict[str, str] | None = None,
                 token_lifetime: int = 3600, mounts: Iterable[str] = ("/api/ledger", "")) -> None:
        self.ledgers = ledgers
        self.clients = clients
        self.token_lifetime = token_lifetime
        self.mounts = tuple(mounts)
        self.issued: list[str] = []  # every token handed out, for tests to look for
        self.scopes: list[str | None] = []
        self.refused = 0  # ledger requests answered 401
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._lock = threading.Lock()

    @property
    def tokens_issued(self) -> int:
        return len(self.issued)

    def revoke_tokens(self) -> None:
        """Forget every token issued, as a restarted auth server would."""
        with self._lock:
            self._tokens.clear()

    def __call__(self, request: Request) -> Response:
        if request.path == TOKEN_PATH:
            return self.token(request)
        for mount in self.mounts:
            if mount and not request.path.startswith(mount + "/"):
                continue
            rest = request.path[len(mount):]
            for api, endpoint, pattern in _ROUTES:
                match = pattern.match(rest)
                if match:
                    if request.method != "GET":
                        return error(405, "VALIDATION", "method not allowed")
                    if not self._authorised(request):
                        with self._lock:
                            self.refused += 1
                        return Response(status=401, headers=INVALID_TOKEN)
                    return self._serve(api, endpoint, match[1], request)
        return error(404, "NOT_FOUND", f"no route for {request.path}")

    # -- OAuth2 -----------------------------------------------------------

    def token(self, request: Request) -> Response:
        if request.method != "POST":
            return oauth_error(405, "invalid_request", "use POST")
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        if form.get("grant_type") != "client_credentials":
            return oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if self.clients is None or client_id not in self.clients or self.clients[client_id] != secret:
            return oauth_error(401, "invalid_client", "client authentication failed")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime
            self.issued.append(token)
            self.scopes.append(form.get("scope"))
        return json_response({"access_token": token, "token_type": "Bearer",
                              "expires_in": self.token_lifetime})

    def _authorised(self, request: Request) -> bool:
        if self.clients is None:
            return True
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        with self._lock:
            expiry = self._tokens.get(token)
        return scheme.lower() == "bearer" and expiry is not None and time.monotonic() < expiry

    # -- ledger -----------------------------------------------------------

    def _serve(self, api: str, endpoint: str, name: str, request: Request) -> Response:
        try:
            filters = _body_filter(request) if api == "v2" else None
            if endpoint == "aggregate":
                query = {"address": _last(request, "address") if api == "v1" else filters,
                         "pit": _pit(_last(request, "pit")) if api == "v2" else None}
            else:
                query = self._page_query(api, request, filters)
            ledger = self.ledgers.get(name)
            if ledger is None:
                code = "LEDGER_NOT_FOUND" if api == "v2" else "NOT_FOUND"
                return error(404, code, f"ledger {name} not found")
            book = self._select(api, ledger, query["address"], query["pit"])
        except ValueError as exc:
            return error(400, "VALIDATION", str(exc))
        as_strings = api == "v2" and (request.header("formance-bigint-as-string") or "").lower() == "true"
        if endpoint == "aggregate":
            totals: dict[str, int] = {}
            for assets in book.values():
                for asset, (inp, out) in assets.items():
                    totals[asset] = totals.get(asset, 0) + inp - out
            return json_response({"data": {a: _amount(v, as_strings) for a, v in totals.items()}})
        return self._page(api, book, query, as_strings)

    def _page_query(self, api: str, request: Request, filters: str | None) -> dict:
        cursor = next((v for k, v in request.query if k in CURSOR_PARAMS), None)
        if cursor is not None:
            if any(k not in CURSOR_PARAMS for k, _ in request.query):
                raise ValueError("no other query params can be set with 'cursor'")
            return decode_cursor(cursor)
        size_text = next((v for k, v in reversed(request.query) if k in PAGE_SIZE_PARAMS), None)
        try:
            size = DEFAULT_PAGE_SIZE if size_text is None else int(size_text)
            if size < 1:
                raise ValueError
        except ValueError:
            raise ValueError("invalid 'pageSize' query param") from None
        return {
            "offset": 0,
            "pageSize": min(size, MAX_PAGE_SIZE[api]),
            "address": _last(request, "address") if api == "v1" else filters,
            "after": _last(request, "after") if api == "v1" else None,
            "pit": _pit(_last(request, "pit")) if api == "v2" else None,
            "volumes": "volumes" in ",".join(request.params("expand")).split(","),
        }

    @staticmethod
    def _select(api: str, ledger: Ledger, address: str | None, pit: str | None) -> dict:
        at = datetime.fromisoformat(pit) if pit else None
        matches = v1_address_matches if api == "v1" else v2_address_matches
        return {a: v for a, v in ledger.volumes(at).items() if not address or matches(address, a)}

    @staticmethod
    def _page(api: str, book: dict, query: dict, as_strings: bool) -> Response:
        addresses = sorted(book, reverse=True)  # "sorted by address in descending order"
        if query.get("after"):
            addresses = [a for a in addresses if a < query["after"]]
        offset, size = query["offset"], query["pageSize"]
        chosen = addresses[offset:offset + size]
        if api == "v1":
            data = [{a: {asset: inp - out for asset, (inp, out) in book[a].items()}} for a in chosen]
        else:
            data = []
            for a in chosen:
                account: dict[str, Any] = {"address": a, "metadata": {}}
                if query["volumes"]:
                    account["volumes"] = {
                        asset: {"input": _amount(inp, as_strings), "output": _amount(out, as_strings),
                                "balance": _amount(inp - out, as_strings)}
                        for asset, (inp, out) in book[a].items()}
                data.append(account)
        has_more = offset + size < len(addresses)
        cursor: dict[str, Any] = {"pageSize": size, "hasMore": has_more}
        if offset > 0:
            cursor["previous"] = encode_cursor({**query, "offset": max(0, offset - size)})
        if has_more:
            cursor["next"] = encode_cursor({**query, "offset": offset + size})
        cursor["data"] = data
        body: dict[str, Any] = {"cursor": cursor}
        if api == "v2":
            body = {"resource": "accounts", **body}
        return json_response(body)


def error(status: int, code: str, message: str) -> Response:
    return json_response({"errorCode": code, "errorMessage": message}, status=status)


def oauth_error(status: int, code: str, description: str) -> Response:
    return json_response({"error": code, "error_description": description}, status=status)


def encode_cursor(state: dict) -> str:
    text = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict:
    try:
        state = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(state, dict) or set(state) != _CURSOR_KEYS:
            raise ValueError
        return state
    except (ValueError, binascii.Error):
        raise ValueError("invalid 'cursor' query param") from None


def v1_address_matches(pattern: str, address: str) -> bool:
    """v1: as many segments as the pattern, each a regex anchored at both ends."""
    wanted, parts = pattern.split(":"), address.split(":")
    if len(wanted) != len(parts):
        return False
    try:
        return all(re.fullmatch(w, p) for w, p in zip(wanted, parts))
    except re.error:
        raise ValueError(f"invalid address filter {pattern!r}") from None


def v2_address_matches(pattern: str, address: str) -> bool:
    """v2: literal segments, empty ones match anything, a trailing ``...`` any depth."""
    wanted, parts = pattern.split(":"), address.split(":")
    if wanted[-1] == "...":
        wanted = wanted[:-1]
        if len(parts) < len(wanted):
            return False
        parts = parts[:len(wanted)]
    elif len(wanted) != len(parts):
        return False
    return all(w == "" or w == p for w, p in zip(wanted, parts))


def _body_filter(request: Request) -> str | None:
    if not request.body.strip():
        return None
    try:
        body = json.loads(request.body)
    except ValueError:
        raise ValueError("invalid request body") from None
    if body in ({}, None):
        return None
    match = body.get("$match") if isinstance(body, dict) and set(body) == {"$match"} else None
    if not isinstance(match, dict) or set(match) != {"address"} or not isinstance(match["address"], str):
        raise ValueError("this ledger filters only on {\"$match\": {\"address\": ...}}")
    return match["address"]


def _last(request: Request, name: str) -> str | None:
    values = request.params(name)
    return values[-1] if values else None


def _pit(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("invalid 'pit' query param") from None
    if at.tzinfo is None:
        raise ValueError("invalid 'pit' query param")
    return at.isoformat()


def _amount(value: int, as_string: bool) -> int | str:
    return str(value) if as_string else value


# -- demo ---------------------------------------------------------------------

DEMO_LEDGER = "demo"
DEMO_CLIENT_ID = "balances-sandbox"
DEMO_CLIENT_SECRET = "sandbox-client-secret-4f1c9a"
TREASURY_HBAR = 12_345_678_900_000_000  # 123,456,789 HBAR in tinybars: above 2**53


def demo_ledger(now: datetime) -> Ledger:
    """A small book: a Hedera treasury, fiat users, a coin holder, an idle and an overdrawn account."""
    ledger = Ledger()
    start, later, recent = now - timedelta(days=3), now - timedelta(days=1), now - timedelta(hours=2)
    ledger.transfer(start, "world", "treasury:hedera", "HBAR/8", TREASURY_HBAR)
    ledger.transfer(start, "world", "users:001", "USD/2", 125_000)
    ledger.transfer(start, "world", "users:002", "EUR/2", 98_050)
    ledger.transfer(start, "world", "users:003", "COIN", 42)
    ledger.open("users:004", start)
    ledger.transfer(later, "users:001", "merchants:acme", "USD/2", 2_599)
    ledger.transfer(later, "users:005", "merchants:acme", "USD/2", 1_500)  # an allowed overdraft
    ledger.transfer(recent, "users:001", "users:002", "USD/2", 1_000)
    return ledger


def demo_app() -> FormanceStack:
    return FormanceStack({DEMO_LEDGER: demo_ledger(datetime.now(timezone.utc))},
                         clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET})


def demo_source(url: str) -> dict:
    return {"provider": "formance", "base_url": url, "ledger": DEMO_LEDGER, "api": "v1",
            "conn_id": DEMO_CONNECTION[0], "schedule": "*/15 * * * *", "page_size": 100}


DEMO_CONNECTION = ("formance_sandbox", f"http://{DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET}@formance-sandbox")
