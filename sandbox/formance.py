"""A fake Formance stack: the OAuth2 token endpoint and a ledger's balances.

Answers as the real server's code does (``formancehq/ledger``, tags
v1.10.16, v2.2.59, v2.3.0, v2.3.22, v2.4.12), the OpenAPI specs and the seed
document say. ``server`` picks the behaviours where releases differ:

``"v1.x"`` (v1.10.16), ``"v2.2"`` (v2.2.59), ``"v2.3"`` (v2.3.0 to v2.3.21
and v2.4.0 to v2.4.11) and ``"v2.4.12"`` (v2.3.22 and v2.4.12 on). The v2.x
servers answer the v1 routes through their compatibility layer
(``internal/api/v1``); a v1.x server has no v2 routes (404, gin's text body).

* ``POST /api/auth/oauth/token`` (client credentials, form-encoded) issues
  Bearer tokens that expire after ``token_lifetime`` seconds; a missing,
  unknown, expired or revoked token gets 401 from every ledger endpoint.
  With ``required_scope``, a token without it gets 403 and an empty body
  (v1.x ``pkg/api/routes/routes.go`` ``wrapWithScopes``: ``AbortWithStatus``).
* Under each of ``mounts`` (``/api/ledger`` is the stack gateway, ``""`` a
  standalone ledger): v1 ``/_info`` (the ledger list; v1.x
  ``pkg/api/controllers/config_controller.go``, v2.x
  ``internal/api/v1/controllers_config.go``, outside the auth group there),
  ``/{ledger}/balances`` and ``/{ledger}/aggregate/balances``; v2
  ``/v2/{ledger}`` (the ledger and its ``features``, 404 NOT_FOUND when
  absent: ``internal/api/v2/controllers_ledgers_read.go``),
  ``/v2/{ledger}/accounts?expand=volumes&pit=`` and
  ``/v2/{ledger}/aggregate/balances?pit=&useInsertionDate=`` with the filter
  in the body; other v2 routes of an absent ledger: 404 LEDGER_NOT_FOUND
  (``internal/api/common/middleware_resolver.go``).
* v1 routes create a ledger they do not know and answer 200 with empty data
  (v1.x ``pkg/ledger/resolver.go`` ``GetLedgerStore(ctx, name, true)``; v2.x
  ``internal/api/v1/middleware_auto_create_ledger.go``); ``created`` lists them.
* Cursor pages ``{"cursor": {"pageSize", "hasMore", "next"?, "previous"?,
  "data"}}``: ``next``/``previous`` are omitted, not null, when absent; the
  cursor is unpadded URL-safe base64 holding the whole query, and a request
  with ``cursor`` and any other parameter gets 400 VALIDATION. Page size:
  default 15, v1 max 1000, v2 cut to 100 without a word. Pages are offsets
  over live data, so a change between pages shifts them (``after_pages``).
  Order: v1.x ``account desc`` (``pkg/storage/sqlstorage/balances.go``),
  v2.x ascending by address (``internal/storage/ledger/store.go``
  ``defaultOrder: bunpaginate.OrderAsc``), also on the v1 routes.
* v1 ``address`` on v1.x (``pkg/storage/sqlstorage/balances.go``): a comma
  makes a list of exact addresses (``/balances`` only); otherwise each
  ``:``-segment is a regex anchored at both ends, an empty segment, ``*`` or
  ``.*`` a wildcard, the segment count must match unless the filter ends
  in ``.*`` (any depth); a one-character filter panics (500, empty body).
  ``/aggregate/balances`` compares word segments with ``==`` and other
  segments with an unanchored regex. v1.x lists only accounts that moved
  (the ``volumes`` table).
* v1 ``address`` on v2.x is ``query.Match`` (``internal/api/v1/controllers_accounts.go``):
  an address without an empty segment is exact, else segments are literal
  and empty ones wildcards (``internal/storage/ledger/utils.go``). v2.2: the
  segment count must match; v2.3: a trailing empty segment matches any depth
  and a trailing ``...`` exactly one level; v2.4.12: ``...`` any depth, a
  trailing ``:`` one level (e2d714224). v2.2's v1 routes drop the filter on
  cursor follow-ups (fixed in v2.3.0 by b708297d5:
  ``internal/api/v1/controllers_balances_list.go``).
* Movements carry an effective date (``at``) and an insertion date
  (``inserted``, default ``at``). v2 ``accounts`` at ``pit`` lists accounts
  first used by then and their ``volumes`` by insertion date; v2
  ``aggregate/balances`` at ``pit`` goes by effective date, needing
  ``MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES=SYNC``, or by insertion date
  with ``useInsertionDate=true``, needing ``MOVES_HISTORY=ON``; otherwise
  400 VALIDATION ``missing feature "..."``
  (``internal/storage/ledger/resource_aggregated_balances.go``,
  ``resource_accounts.go`` v2.2.59).
* Amounts are bare JSON integers of any size (negative for ``world``); v2
  writes them as strings when sent ``Formance-Bigint-As-String: true``.
  An account with no movements is ``{"addr": {}}`` (v2.x).
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
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

from sandbox.server import Request, Response, json_response

TOKEN_PATH = "/api/auth/oauth/token"
SERVERS = ("v1.x", "v2.2", "v2.3", "v2.4.12")
DEFAULT_PAGE_SIZE = 15
MAX_PAGE_SIZE = {"v1": 1000, "v2": 100}
PAGE_SIZE_PARAMS = ("pageSize", "page_size")
CURSOR_PARAMS = ("cursor", "pagination_token")
INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}  # RFC 6750, no body
MOVES_HISTORY = "MOVES_HISTORY"
EFFECTIVE_VOLUMES = "MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES"
# A new ledger's features (internal/storage/bucket/default_bucket.go, v2.2.59).
DEFAULT_FEATURES = {"ACCOUNT_METADATA_HISTORY": "SYNC", "HASH_LOGS": "SYNC", MOVES_HISTORY: "ON",
                    EFFECTIVE_VOLUMES: "SYNC", "TRANSACTION_METADATA_HISTORY": "SYNC",
                    "INDEX_ADDRESS_SEGMENTS": "ON", "INDEX_TRANSACTION_ACCOUNTS": "ON"}
_CURSOR_KEYS = {"offset", "pageSize", "address", "after", "pit", "volumes"}
_LEDGER_NAME = re.compile(r"[0-9a-zA-Z_-]{1,63}")  # internal/ledger.go ledgerNameFormat
_WORD = re.compile(r"[a-zA-Z_0-9]+")  # v1.x accountNameRegex (pkg/storage/sqlstorage/accounts.go)
GIN_404 = Response(status=404, body=b"404 page not found", content_type="text/plain")

_ROUTES = (
    ("v2", "ledger", re.compile(r"/v2/([^/]+)")),
    ("v2", "accounts", re.compile(r"/v2/([^/]+)/accounts")),
    ("v2", "aggregate", re.compile(r"/v2/([^/]+)/aggregate/balances")),
    ("v1", "info", re.compile(r"/(_info)")),
    ("v1", "balances", re.compile(r"/([^/]+)/balances")),
    ("v1", "aggregate", re.compile(r"/([^/]+)/aggregate/balances")),
)


class _Panic(Exception):
    """The real server crashes here: 500 with an empty body."""


@dataclass(slots=True, frozen=True)
class Move:
    """One side of a posting: ``amount`` in (positive) or out (negative) of ``account``.

    ``at`` is the effective date, ``inserted`` when the ledger recorded it
    (later than ``at`` for a backdated transaction).
    """

    at: datetime
    account: str
    asset: str
    amount: int
    inserted: datetime | None = None

    @property
    def inserted_at(self) -> datetime:
        return self.inserted or self.at


@dataclass
class Ledger:
    """Movements with their effective and insertion times, so any point in time can be read."""

    moves: list[Move] = field(default_factory=list)
    opened: dict[str, datetime] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FEATURES))

    def open(self, account: str, at: datetime) -> "Ledger":
        """An account that exists without movements (listed as ``{}``); ``at`` is its first usage."""
        if account not in self.opened or at < self.opened[account]:
            self.opened[account] = at
        return self

    def move(self, at: datetime, account: str, asset: str, amount: int, *,
             inserted: datetime | None = None) -> "Ledger":
        self.open(account, at)
        self.moves.append(Move(at, account, asset, amount, inserted))
        return self

    def transfer(self, at: datetime, source: str, destination: str, asset: str, amount: int, *,
                 inserted: datetime | None = None) -> "Ledger":
        return (self.move(at, source, asset, -amount, inserted=inserted)
                .move(at, destination, asset, amount, inserted=inserted))

    @classmethod
    def of(cls, at: datetime, balances: dict[str, dict[str, int]]) -> "Ledger":
        """A ledger whose accounts hold ``balances`` from ``at`` on."""
        ledger = cls()
        for account, assets in balances.items():
            ledger.open(account, at)
            for asset, amount in assets.items():
                ledger.move(at, account, asset, amount)
        return ledger

    def volumes(self, pit: datetime | None = None, *, by_insertion: bool = True
                ) -> dict[str, dict[str, list[int]]]:
        """``account -> asset -> [input, output]``: accounts first used by ``pit``, moves dated by then.

        Moves are dated by insertion (``post_commit_volumes``) or by
        effective date (``post_commit_effective_volumes``).
        """
        book: dict[str, dict[str, list[int]]] = {
            a: {} for a, opened in self.opened.items() if pit is None or opened <= pit}
        for move in self.moves:
            when = move.inserted_at if by_insertion else move.at
            if pit is not None and when > pit:
                continue
            volume = book.setdefault(move.account, {}).setdefault(move.asset, [0, 0])
            volume[0 if move.amount >= 0 else 1] += abs(move.amount)
        return book


class FormanceStack:
    """The fake's application. ``clients`` (id -> secret) None means no auth."""

    def __init__(self, ledgers: dict[str, Ledger], *, clients: dict[str, str] | None = None,
                 token_lifetime: int = 3600, mounts: Iterable[str] = ("/api/ledger", ""),
                 server: str = "v2.4.12", required_scope: str | None = None) -> None:
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}")
        self.ledgers = ledgers
        self.clients = clients
        self.token_lifetime = token_lifetime
        self.mounts = tuple(mounts)
        self.server = server
        self.required_scope = required_scope
        self.issued: list[str] = []  # every token handed out, for tests to look for
        self.scopes: list[str | None] = []
        self.refused = 0  # ledger requests answered 401
        self.created: list[str] = []  # ledgers the v1 routes created
        self.pages_served = 0  # balance/account pages answered
        self._changes: list[tuple[int, str, Callable[[Ledger], Any]]] = []
        self._tokens: dict[str, tuple[float, str]] = {}  # token -> (expiry (monotonic), scope)
        self._lock = threading.Lock()

    @property
    def tokens_issued(self) -> int:
        return len(self.issued)

    def revoke_tokens(self) -> None:
        """Forget every token issued, as a restarted auth server would."""
        with self._lock:
            self._tokens.clear()

    def after_pages(self, pages: int, change: Callable[[Ledger], Any], ledger: str = "main") -> None:
        """Apply ``change`` to ``ledger`` once ``pages`` more pages were served: activity mid-crawl."""
        with self._lock:
            self._changes.append((self.pages_served + pages, ledger, change))

    def __call__(self, request: Request) -> Response:
        if request.path == TOKEN_PATH:
            return self.token(request)
        for mount in self.mounts:
            if mount and not request.path.startswith(mount + "/"):
                continue
            rest = request.path[len(mount):]
            for api, endpoint, pattern in _ROUTES:
                match = pattern.fullmatch(rest)
                if not match:
                    continue
                if api == "v2" and self.server == "v1.x":
                    return GIN_404
                if request.method != "GET":
                    return error(405, "VALIDATION", "method not allowed")
                public = endpoint == "info" and self.server != "v1.x"
                if not public and not self._authorised(request):
                    with self._lock:
                        self.refused += 1
                    return Response(status=401, headers=INVALID_TOKEN)
                # Scopes guard the ledger's own routes, not the server's /_info.
                if endpoint != "info" and self.required_scope and not self._has_scope(request):
                    return Response(status=403, body=b"")
                return self._serve(api, endpoint, match[1], request)
        return GIN_404

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
            self._tokens[token] = (time.monotonic() + self.token_lifetime, form.get("scope") or "")
            self.issued.append(token)
            self.scopes.append(form.get("scope"))
        return json_response({"access_token": token, "token_type": "Bearer",
                              "expires_in": self.token_lifetime})

    def _token(self, request: Request) -> tuple[float, str] | None:
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            return self._tokens.get(token)

    def _authorised(self, request: Request) -> bool:
        if self.clients is None:
            return True
        found = self._token(request)
        return found is not None and time.monotonic() < found[0]

    def _has_scope(self, request: Request) -> bool:
        found = self._token(request)
        return found is not None and self.required_scope in found[1].split()

    # -- ledger -----------------------------------------------------------

    def _serve(self, api: str, endpoint: str, name: str, request: Request) -> Response:
        if endpoint == "info":
            return json_response({"data": {
                "server": "numary-ledger" if self.server == "v1.x" else "ledger", "version": self.server,
                "config": {"storage": {"driver": "postgres", "ledgers": sorted(self.ledgers)}}}})
        with self._lock:
            ledger = self.ledgers.get(name)
            if ledger is None and api == "v1":
                if not _LEDGER_NAME.fullmatch(name):
                    return error(400, "VALIDATION", f"invalid ledger name {name!r}")
                ledger = self.ledgers[name] = Ledger()
                self.created.append(name)
        if ledger is None:
            if endpoint == "ledger":
                return error(404, "NOT_FOUND", "ledger not found")
            return error(404, "LEDGER_NOT_FOUND", f"ledger {name} not found")
        if endpoint == "ledger":
            return json_response({"data": {"bucket": "_default", "metadata": {}, "features": ledger.features,
                                           "id": sorted(self.ledgers).index(name) + 1, "name": name,
                                           "addedAt": "2024-01-01T00:00:00Z"}})
        try:
            if api == "v1":
                response = self._serve_v1(endpoint, ledger, request)
            else:
                response = self._serve_v2(endpoint, ledger, request)
        except _Panic:
            return Response(status=500, body=b"")
        except ValueError as exc:
            return error(400, "VALIDATION", str(exc))
        if endpoint != "aggregate":
            self._page_served()
        return response

    def _page_served(self) -> None:
        with self._lock:
            self.pages_served += 1
            due = [c for c in self._changes if c[0] <= self.pages_served]
            self._changes = [c for c in self._changes if c[0] > self.pages_served]
            for _, name, change in due:
                change(self.ledgers[name])

    def _matches(self, pattern: str, address: str, *, aggregate: bool = False) -> bool:
        if self.server == "v1.x":
            return v1x_address_matches(pattern, address, aggregate=aggregate)
        return v2_address_matches(pattern, address, self.server)

    def _serve_v1(self, endpoint: str, ledger: Ledger, request: Request) -> Response:
        if endpoint == "aggregate":
            address = _last(request, "address")
            book = ledger.volumes()
            if address:
                book = {a: v for a, v in book.items() if self._matches(address, a, aggregate=True)}
            return _totals(book, as_strings=False)
        query = self._page_query("v1", request, None)
        book = ledger.volumes()
        if self.server == "v1.x":
            book = {a: v for a, v in book.items() if v}  # the volumes table: accounts that moved
        if query["address"]:
            book = {a: v for a, v in book.items() if self._matches(query["address"], a)}
        return self._page("v1", book, query, as_strings=False)

    def _serve_v2(self, endpoint: str, ledger: Ledger, request: Request) -> Response:
        filters = _body_filter(request)
        as_strings = (request.header("formance-bigint-as-string") or "").lower() == "true"
        if endpoint == "aggregate":
            pit = _pit(_last(request, "pit"))
            by_insertion = any(_flag(request, name) for name in ("useInsertionDate", "use_insertion_date"))
            if pit is not None:
                feature, value = (MOVES_HISTORY, "ON") if by_insertion else (EFFECTIVE_VOLUMES, "SYNC")
                if ledger.features.get(feature) != value:
                    raise ValueError(f'missing feature "{feature}"')
            at = datetime.fromisoformat(pit) if pit else None
            book = ledger.volumes(at, by_insertion=by_insertion)
            if filters:
                book = {a: v for a, v in book.items() if self._matches(filters, a)}
            return _totals(book, as_strings)
        query = self._page_query("v2", request, filters)
        if query["volumes"] and ledger.features.get(MOVES_HISTORY) != "ON":
            raise ValueError(f"feature {MOVES_HISTORY} must be 'ON' to use volumes")
        at = datetime.fromisoformat(query["pit"]) if query["pit"] else None
        book = ledger.volumes(at)
        # Listed: accounts first used by pit (accounts.first_usage <= pit).
        book = {a: v for a, v in book.items() if at is None or ledger.opened.get(a, at) <= at}
        if query["address"]:
            book = {a: v for a, v in book.items() if self._matches(query["address"], a)}
        return self._page("v2", book, query, as_strings)

    def _page_query(self, api: str, request: Request, filters: str | None) -> dict:
        cursor = next((v for k, v in request.query if k in CURSOR_PARAMS), None)
        if cursor is not None:
            if any(k not in CURSOR_PARAMS for k, _ in request.query):
                raise ValueError("no other query params can be set with 'cursor'")
            state = decode_cursor(cursor)
            if api == "v1" and self.server == "v2.2":
                # The filter is rebuilt from the request, which carries only the cursor.
                state["address"] = None
            return state
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

    def _page(self, api: str, book: dict, query: dict, as_strings: bool) -> Response:
        addresses = sorted(book, reverse=self.server == "v1.x")
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


def v1x_address_matches(pattern: str, address: str, *, aggregate: bool = False) -> bool:
    """v1.x ``address`` (pkg/storage/sqlstorage/balances.go, v1.10.16), quirks included."""
    if not aggregate and len(pattern.split(",")) > 1:
        return address in pattern.split(",")  # GetBalances: several values are an IN list
    if len(pattern) < 2:
        raise _Panic  # AddressRegexp[len-2:] out of range
    wanted, parts = pattern.split(":"), address.split(":")
    if pattern[-2:] != ".*":
        if len(wanted) != len(parts):
            return False
    else:
        wanted[-1] = wanted[-1][:-2]
    try:
        for i, segment in enumerate(wanted):
            if segment in (".*", "*", ""):
                continue
            if i >= len(parts):
                return False
            if aggregate and _WORD.fullmatch(segment):
                ok = parts[i] == segment
            elif aggregate:
                ok = re.search(segment, parts[i]) is not None  # like_regex, unanchored
            else:
                ok = re.search("^" + segment + "$", parts[i]) is not None
            if not ok:
                return False
    except re.error:
        raise ValueError(f"invalid address filter {pattern!r}") from None
    return True


def v2_address_matches(pattern: str, address: str, server: str = "v2.4.12") -> bool:
    """v2.x ``address`` (internal/storage/ledger/utils.go ``filterAccountAddress``) as of ``server``."""
    wanted, parts = pattern.split(":"), address.split(":")
    dots = server != "v2.2"  # trailing '...' is partial from v2.3.0 (56a00901c)
    partial = "" in wanted or (dots and wanted[-1] == "...")
    if not partial:
        return address == pattern
    if server == "v2.3":
        counted = wanted[-1] != ""  # v2.3.0 to v2.3.21, v2.4.0 to v2.4.11
    elif server == "v2.4.12":
        counted = wanted[-1] != "..."  # e2d714224
    else:
        counted = True
    if counted and len(wanted) != len(parts):
        return False
    for i, segment in enumerate(wanted):
        if segment == "" or (dots and segment == "..."):
            continue
        if i >= len(parts) or parts[i] != segment:
            return False
    return True


def _totals(book: dict, as_strings: bool) -> Response:
    totals: dict[str, int] = {}
    for assets in book.values():
        for asset, (inp, out) in assets.items():
            totals[asset] = totals.get(asset, 0) + inp - out
    return json_response({"data": {a: _amount(v, as_strings) for a, v in totals.items()}})


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


def _flag(request: Request, name: str) -> bool:
    return (_last(request, name) or "").lower() in ("1", "true", "yes")


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
# The EVM sandbox's treasury wallet (sandbox/evm.py TREASURY_WEI), booked in wei: above 2**64.
TREASURY_ETH_FIRST, TREASURY_ETH = 1_200 * 10**18, 1_234_567_890_123_456_789_012


def demo_ledger(now: datetime) -> Ledger:
    """A small book: Hedera and EVM treasuries, fiat users, a coin holder, an idle and an overdrawn account."""
    ledger = Ledger()
    start, later, recent = now - timedelta(days=3), now - timedelta(days=1), now - timedelta(hours=2)
    ledger.transfer(start, "world", "treasury:hedera", "HBAR/8", TREASURY_HBAR)
    ledger.transfer(start, "world", "treasury:evm", "ETH/18", TREASURY_ETH_FIRST)
    ledger.transfer(later, "world", "treasury:evm", "ETH/18", TREASURY_ETH - TREASURY_ETH_FIRST)
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
