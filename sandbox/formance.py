"""A fake Formance stack: the gateway, the OAuth2 token endpoint and a ledger's balances.

Answers as the real server's code does (``formancehq/ledger``, tags
v1.10.16, v2.2.59, v2.3.0, v2.3.22, v2.4.12; the stack's gateway,
``formancehq/stack`` ``ee/gateway``; the auth server, ``formancehq/auth``),
the OpenAPI specs and the seed document say. ``server`` picks the behaviours
where releases differ: ``"v1.x"`` (v1.10.16, gin), ``"v2.2"`` (v2.2.59),
``"v2.3"`` (v2.3.0 to v2.3.21 and v2.4.0 to v2.4.11) and ``"v2.4.12"``
(v2.3.22 and v2.4.12 on); every v2.x is chi and serves the v1 routes
through its compatibility layer (``internal/api/v1``).

Layouts (``mounts``): ``"/api/ledger"`` is the stack gateway
(``ee/gateway/Caddyfile``: ``handle_path_route_with_auth "/api/ledger"``
strips the prefix; ``/api/*`` otherwise answers 502 "Bad Gateway", any other
path goes to the console, here a 404), ``""`` a standalone ledger.

* ``POST /api/auth/oauth/token`` (client credentials, form-encoded) grants
  only the requested scopes the client may have (``formancehq/auth``
  ``pkg/oidc/storage.go:ClientCredentialsTokenRequest``; ``client_scopes``,
  None: any), names them in ``scope``, and issues Bearer tokens that expire
  after ``token_lifetime`` seconds.
* Authentication where each server does it, with ``check_scopes`` the scope
  checks too. The gateway authenticates every request under
  ``/api/ledger`` and checks ``ledger:read``/``ledger:write``: 401 either
  way (``ee/gateway/pkg/plugins/auth.go:JWTAuth.Authenticate``). A v1.x
  ledger authenticates per ledger route only, so its ``/_info`` is public:
  no token 401, an invalid one 403, a missing route scope 403, all with an
  empty body (v1.10.16 ``libs/auth/middleware.go:Middleware``,
  ``pkg/api/routes/routes.go:wrapWithScopes``; scopes ``accounts:read``
  for balances, ``stats`` for statistics). A v2.x ledger answers 401 for a
  missing or invalid token and for a missing ``ledger:read``/``ledger:write``
  (go-libs ``auth/auth.go:jwtAuth.Authenticate``, v5
  ``pkg/authn/jwt/scopes.go:checkScopes``); its v1 ``/_info`` is public
  (``internal/api/v1/routes.go:NewRouter``), its v2 ``/_info`` is not.
* v1 routes: ``/_info`` (the server, its version and every ledger:
  v1.10.16 ``pkg/api/controllers/config_controller.go:GetInfo``, v2.x
  ``internal/api/v1/controllers_config.go:GetInfo``), ``/{ledger}/balances``,
  ``/{ledger}/aggregate/balances`` and ``/{ledger}/stats`` (the number of
  transactions and accounts: v1.10.16 ``pkg/ledger/stats.go:Stats``, v2.x
  ``internal/api/v1/controllers_stats.go:getStats``). They create a ledger
  they do not know and answer 200 with empty data; ``created`` lists every
  ledger created. On v1.x only a route that matches does (gin runs a
  group's middleware for its own routes: v1.10.16
  ``pkg/api/routes/routes.go:Engine``). On v2.x the chi mount
  ``/{ledger}/*`` authenticates and creates *before* routing, so any path
  under an unknown first segment creates it, and only then answers 404:
  ``GET /api/ledger/_info`` sent to a standalone v2.x server creates ledger
  ``api`` (``internal/api/router.go:NewRouter`` mounts ``/v2*`` and ``/*``;
  ``internal/api/v1/routes.go:NewRouter``;
  ``internal/api/v1/middleware_auto_create_ledger.go:autoCreateMiddleware``).
* v2 routes (v2.x only; a v1.x server answers gin's 404): ``/v2/{ledger}``
  (the ledger and its ``features``, 404 NOT_FOUND when absent:
  ``internal/api/v2/controllers_ledgers_read.go:readLedger``),
  ``/v2/{ledger}/accounts?expand=volumes&pit=``,
  ``/v2/{ledger}/volumes?endTime=&insertionDate=``
  (``internal/api/v2/controllers_volumes.go:readVolumes``) and
  ``/v2/{ledger}/aggregate/balances?pit=&useInsertionDate=``, the filter in
  the body; other v2 routes of an absent ledger: 404 LEDGER_NOT_FOUND
  (``internal/api/common/middleware_resolver.go:LedgerMiddleware``).
* Cursor pages ``{"cursor": {"pageSize", "hasMore", "next"?, "previous"?,
  "data"}}``: ``next``/``previous`` are omitted, not null, when absent; the
  cursor is unpadded URL-safe base64 holding the whole query. v1.x refuses
  a cursor sent with ``after``, ``address``, ``pageSize`` or ``page_size``
  (400 VALIDATION; v1.10.16 ``pkg/api/controllers/balance_controller.go:GetBalances``);
  v2.x reads the cursor and ignores the rest, except that a v2 ``pageSize``
  replaces the cursor's (go-libs ``bun/bunpaginate``
  ``Extract``; ``internal/api/v2/common.go:getOffsetPaginatedQuery``).
  Page size: default 15, v1 max 1000, v2 cut to 100 without a word. Pages
  are offsets over live data, so a change between pages shifts them
  (``after_pages``). Order: v1.x ``account desc``
  (``pkg/storage/sqlstorage/balances.go``), v2.x ascending by address
  (``internal/storage/ledger/store.go`` ``defaultOrder: bunpaginate.OrderAsc``),
  also on the v1 routes, except v2.2's legacy store (``legacy_store``:
  a ledger whose upgrade is not finished), which lists accounts in
  descending order (``internal/storage/ledger/legacy/adapters.go:DefaultStoreAdapter.Accounts``).
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
  and a trailing ``...`` exactly one level (56a00901c); v2.4.12: ``...`` any
  depth, a trailing ``:`` one level (f43a7078e in v2.4.12, fa96e6551 in
  v2.3.22, both backports of e2d714224 on main). v2.2's v1 routes drop the
  filter on cursor follow-ups (fixed in v2.3.0 by b708297d5:
  ``internal/api/v1/controllers_balances_list.go``). On v2.2 a filter with
  an empty segment needs ``INDEX_ADDRESS_SEGMENTS=ON``
  (``internal/storage/ledger/store.go:validateAddressFilter``): v2 answers
  400 VALIDATION, the v1 layer 500 "Internal error"
  (``internal/api/common/errors.go:HandleCommonErrors``).
* Movements carry an effective date (``at``) and an insertion date
  (``inserted``, default ``at``). v2 ``accounts`` at ``pit`` lists accounts
  whose first usage (the effective date of their first transaction) is by
  then, with their ``volumes`` by insertion date; ``volumes`` with
  ``endTime`` sums moves by effective date, or by insertion date with
  ``insertionDate=true``, one row per account and asset, ascending
  (``internal/storage/ledger/resource_volumes.go:buildDataset``); both need
  ``MOVES_HISTORY=ON``. v2 ``aggregate/balances`` at ``pit`` goes by
  effective date, needing ``MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES=SYNC``,
  or by insertion date with ``useInsertionDate=true``, needing
  ``MOVES_HISTORY=ON``; otherwise 400 VALIDATION ``missing feature "..."``
  (``internal/storage/ledger/resource_aggregated_balances.go``,
  ``resource_accounts.go`` v2.2.59).
* v1 ``/{ledger}/transactions`` (movements of the roll-forward): newest
  first, each with its ``txid``, ``timestamp`` (the effective date) and
  ``postings``; ``after`` keeps the ids up to it, inclusive on v1.x with
  the first dropped when it equals ``after`` and more follow (v1.10.16
  ``v1.10.16:pkg/storage/sqlstorage/transactions.go:GetTransactions``), exclusive on
  v2.x (``v2.4.12:internal/api/v1/controllers_transactions.go:buildGetTransactionsQuery``,
  ``query.Lt("id", after)``); pages are keyset pages on the id, so a
  transaction added meanwhile shifts nothing. v1.x numbers transactions one
  after the other from 0; a v2.x id comes from a sequence
  (``v2.4.12:internal/storage/ledger/transactions.go:InsertTransaction``,
  ``nextval``), which skips an id when a transaction fails after taking it:
  ``Ledger.skip_id``. A one-sided ``Ledger.move`` (a book opened from a
  balance) is listed as a posting from ``world`` (or to it, for a negative
  amount), whose side the book does not hold. v1.x checks the scope
  ``transactions:read`` for it.
* v2 ``volumes`` with ``startTime`` (and ``endTime``) sums the moves dated
  in ``[startTime, endTime]``, both ends inclusive
  (``v2.4.12:internal/storage/ledger/resource_volumes.go:BuildDataset``: ``>= OOT``,
  ``<= PIT``): a window's inflow and outflow per account and asset.
* Amounts are bare JSON integers of any size (negative for ``world``);
  v2.3.0 and later write them as strings when sent
  ``Formance-Bigint-As-String: true`` (``internal/api/v2/views.go``; v2.2
  ignores the header). An account with no movements is ``{"addr": {}}`` (v2.x).
* Every answer carries a ``Date`` header (Go's ``net/http`` sets it), from
  the fake's clock: the local one plus ``clock_skew`` seconds.
* Errors are ``{"errorCode", "errorMessage"}``.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

from sandbox.live import MINUTE, MovingBook, minute_now, treasury_move
from sandbox.server import Request, Response, json_response

TOKEN_PATH = "/api/auth/oauth/token"
GATEWAY = "/api/ledger"
SERVERS = ("v1.x", "v2.2", "v2.3", "v2.4.12")
DEFAULT_PAGE_SIZE = 15
MAX_PAGE_SIZE = {"v1": 1000, "v2": 100}
PAGE_SIZE_PARAMS = ("pageSize", "page_size")
CURSOR_PARAMS = ("cursor", "pagination_token")
# v1.10.16 GetBalances refuses a cursor sent with any of these, and only these.
V1X_NOT_WITH_CURSOR = ("after", "address", "pageSize", "page_size")
MOVES_HISTORY = "MOVES_HISTORY"
EFFECTIVE_VOLUMES = "MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES"
INDEX_ADDRESS_SEGMENTS = "INDEX_ADDRESS_SEGMENTS"
# A new ledger's features (pkg/features/features.go:DefaultFeatures). v2.2
# also has the two index features; v2.3.0 dropped them.
DEFAULT_FEATURES = {MOVES_HISTORY: "ON", EFFECTIVE_VOLUMES: "SYNC", "HASH_LOGS": "SYNC",
                    "ACCOUNT_METADATA_HISTORY": "SYNC", "TRANSACTION_METADATA_HISTORY": "SYNC"}
V2_2_FEATURES = {**DEFAULT_FEATURES, INDEX_ADDRESS_SEGMENTS: "ON", "INDEX_TRANSACTION_ACCOUNTS": "ON"}
# The scopes a v2.x ledger (and the gateway) check for a read: service "ledger".
READ_SCOPES = ("ledger:read", "ledger:write")
# v1.x's scope per route (pkg/api/routes/routes.go: ScopeAccountsRead, ScopesStatsRead).
V1X_SCOPES = {"balances": ("accounts:read",), "aggregate": ("accounts:read",), "stats": ("stats",),
              "transactions": ("transactions:read",)}
_CURSOR_KEYS = {"offset", "pageSize", "address", "after", "pit", "since", "volumes", "insertion"}
# A transactions cursor: the keyset (the last id read) and the page size.
_TX_CURSOR_KEYS = {"before", "pageSize"}
_LEDGER_NAME = re.compile(r"[0-9a-zA-Z_-]{1,63}")  # internal/ledger.go ledgerNameFormat
_WORD = re.compile(r"[a-zA-Z_0-9]+")  # v1.x accountNameRegex (pkg/storage/sqlstorage/accounts.go)


def gin_404() -> Response:
    return Response(status=404, body=b"404 page not found", content_type="text/plain")


def chi_404() -> Response:  # net/http's NotFound, as chi answers
    return Response(status=404, body=b"404 page not found\n", content_type="text/plain")


INTERNAL_ERROR = "Internal error. Consult logs/traces to have more details."

# Routes inside one ledger: (api, endpoint, pattern of the rest of the path).
_V1_ROUTES = (
    ("balances", re.compile(r"/balances")),
    ("transactions", re.compile(r"/transactions")),
    ("aggregate", re.compile(r"/aggregate/balances")),
    ("stats", re.compile(r"/stats")),
)
_V2_ROUTES = (
    ("ledger", re.compile(r"/?")),
    ("accounts", re.compile(r"/accounts/?")),
    ("volumes", re.compile(r"/volumes/?")),
    ("aggregate", re.compile(r"/aggregate/balances")),
)


class _Panic(Exception):
    """The real server crashes here: 500 with an empty body."""


class _Internal(Exception):
    """The v1 layer's answer to an error it does not classify: 500 "Internal error"."""


@dataclass(slots=True, frozen=True)
class Move:
    """One side of a posting: ``amount`` in (positive) or out (negative) of ``account``.

    ``at`` is the effective date, ``inserted`` when the ledger recorded it
    (later than ``at`` for a backdated transaction, earlier for one dated
    in the future).
    """

    at: datetime
    account: str
    asset: str
    amount: int
    inserted: datetime | None = None

    @property
    def inserted_at(self) -> datetime:
        return self.inserted or self.at


@dataclass(slots=True, frozen=True)
class Transaction:
    """A booked transaction as the v1 listing shows it: its id, effective date and postings
    ``(source, destination, asset, amount)``."""

    txid: int
    at: datetime
    postings: tuple[tuple[str, str, str, int], ...]


@dataclass
class Ledger:
    """Movements with their effective and insertion times, so any point in time can be read.

    ``transactions`` counts the transactions booked: every one adds one, as
    the ledger's own statistics count them; ``booked`` lists them with their
    ids (from 0, one after the other unless :meth:`skip_id`).
    """

    moves: list[Move] = field(default_factory=list)
    opened: dict[str, datetime] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FEATURES))
    transactions: int = 0
    booked: list[Transaction] = field(default_factory=list)
    next_id: int = 0

    def _book(self, at: datetime, postings: tuple[tuple[str, str, str, int], ...]) -> None:
        self.booked.append(Transaction(self.next_id, at, postings))
        self.next_id += 1
        self.transactions += 1

    def skip_id(self) -> "Ledger":
        """A transaction that took an id from the sequence and failed: v2.x's ids skip one."""
        self.next_id += 1
        return self

    def open(self, account: str, at: datetime) -> "Ledger":
        """An account that exists without movements (listed as ``{}``); ``at`` is its first usage."""
        if account not in self.opened or at < self.opened[account]:
            self.opened[account] = at
        return self

    def _post(self, at: datetime, account: str, asset: str, amount: int, inserted: datetime | None) -> None:
        self.open(account, at)
        self.moves.append(Move(at, account, asset, amount, inserted))

    def move(self, at: datetime, account: str, asset: str, amount: int, *,
             inserted: datetime | None = None) -> "Ledger":
        """A transaction of one posting side (a book opened from a balance)."""
        self._post(at, account, asset, amount, inserted)
        self._book(at, (("world", account, asset, amount),) if amount >= 0 else ((account, "world", asset, -amount),))
        return self

    def transfer(self, at: datetime, source: str, destination: str, asset: str, amount: int, *,
                 inserted: datetime | None = None) -> "Ledger":
        self._post(at, source, asset, -amount, inserted)
        self._post(at, destination, asset, amount, inserted)
        self._book(at, ((source, destination, asset, amount),))
        return self

    @classmethod
    def of(cls, at: datetime, balances: dict[str, dict[str, int]]) -> "Ledger":
        """A ledger whose accounts hold ``balances`` from ``at`` on."""
        ledger = cls()
        for account, assets in balances.items():
            ledger.open(account, at)
            for asset, amount in assets.items():
                ledger.move(at, account, asset, amount)
        return ledger

    def volumes(self, pit: datetime | None = None, *, by_insertion: bool = True,
                listed_by_first_use: bool = True, since: datetime | None = None) -> dict[str, dict[str, list[int]]]:
        """``account -> asset -> [input, output]``: moves dated by ``pit`` (and from ``since`` on).

        Moves are dated by insertion (``post_commit_volumes``) or by
        effective date (``post_commit_effective_volumes``). With
        ``listed_by_first_use`` every account first used by ``pit`` is there,
        moved or not (the accounts table); without, only accounts with a
        move counted (the moves table).
        """
        book: dict[str, dict[str, list[int]]] = {}
        if listed_by_first_use:
            book = {a: {} for a, opened in self.opened.items() if pit is None or opened <= pit}
        for move in self.moves:
            when = move.inserted_at if by_insertion else move.at
            if (pit is not None and when > pit) or (since is not None and when < since):
                continue
            volume = book.setdefault(move.account, {}).setdefault(move.asset, [0, 0])
            volume[0 if move.amount >= 0 else 1] += abs(move.amount)
        return book


class FormanceStack:
    """The fake's application. ``clients`` (id -> secret) None means no auth."""

    def __init__(self, ledgers: dict[str, Ledger], *, clients: dict[str, str] | None = None,
                 token_lifetime: float = 3600, mounts: Iterable[str] = (GATEWAY,),
                 server: str = "v2.4.12", check_scopes: bool = False,
                 client_scopes: Iterable[str] | None = None, clock_skew: float = 0.0,
                 legacy_store: bool = False) -> None:
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}")
        if legacy_store and server != "v2.2":
            raise ValueError("only v2.2 has a legacy store")
        self.ledgers = ledgers
        self.clients = clients
        self.token_lifetime = token_lifetime
        self.mounts = tuple(mounts)
        self.server = server
        self.check_scopes = check_scopes
        self.client_scopes = None if client_scopes is None else set(client_scopes)
        self.clock_skew = clock_skew
        self.legacy_store = legacy_store
        if server == "v2.2":
            for ledger in ledgers.values():
                for feature, value in V2_2_FEATURES.items():
                    ledger.features.setdefault(feature, value)
        self.issued: list[str] = []  # every token handed out, for tests to look for
        self.scopes: list[str | None] = []  # the scope each token request asked for
        self.refused = 0  # ledger requests refused for their token (401 or 403)
        self.created: list[str] = []  # ledgers the v1 routes created
        self.pages_served = 0  # balance/account/volume pages answered
        self.served_at: list[tuple[str, float]] = []  # (path, the fake's clock) of each ledger read
        self._changes: list[tuple[int, str, Callable[[Ledger], Any]]] = []
        self._tokens: dict[str, tuple[float, set[str]]] = {}  # token -> (expiry (monotonic), scopes)
        self._lock = threading.Lock()

    @property
    def tokens_issued(self) -> int:
        return len(self.issued)

    def clock(self) -> float:
        """The fake server's clock (seconds since the epoch)."""
        return time.time() + self.clock_skew

    def revoke_tokens(self) -> None:
        """Forget every token issued, as a restarted auth server would."""
        with self._lock:
            self._tokens.clear()

    def after_pages(self, pages: int, change: Callable[[Ledger], Any], ledger: str = "main") -> None:
        """Apply ``change`` to ``ledger`` once ``pages`` more pages were served: activity mid-crawl."""
        with self._lock:
            self._changes.append((self.pages_served + pages, ledger, change))

    def new_ledger(self) -> Ledger:
        features = V2_2_FEATURES if self.server == "v2.2" else DEFAULT_FEATURES
        return Ledger(features=dict(features))

    def __call__(self, request: Request) -> Response:
        response = self.token(request) if request.path == TOKEN_PATH else self._route(request)
        response.headers["Date"] = email.utils.formatdate(self.clock(), usegmt=True)
        return response

    def _route(self, request: Request) -> Response:
        path = request.path
        for mount in self.mounts:
            if mount == "":
                return self._ledger_server(path, request)
            if path == mount or path.startswith(mount + "/"):
                # The gateway: every request authenticated, the scope checked (401 either way).
                if self.clients is not None:
                    found = self._valid_token(request)
                    if found is None or (self.check_scopes and not found & set(READ_SCOPES)):
                        return self._refuse(401)
                return self._ledger_server(path[len(mount):] or "/", request, gateway=True)
        if GATEWAY in self.mounts and path.startswith("/api/"):
            return Response(status=502, body=b"Bad Gateway", content_type="text/plain")
        return Response(status=404, body=b"", content_type="text/plain")  # the console has nothing

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
        asked = form.get("scope")
        # Only what was asked and the client may have is granted; the rest is dropped silently.
        granted = [s for s in (asked or "").split() if self.client_scopes is None or s in self.client_scopes]
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (time.monotonic() + self.token_lifetime, set(granted))
            self.issued.append(token)
            self.scopes.append(asked)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.token_lifetime}
        if granted:
            answer["scope"] = " ".join(granted)
        return json_response(answer)

    def _valid_token(self, request: Request) -> set[str] | None:
        """The scopes of the request's token, or None when it has no valid one."""
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            found = self._tokens.get(token)
        if found is None or time.monotonic() >= found[0]:
            return None
        return found[1]

    def _refuse(self, status: int) -> Response:
        with self._lock:
            self.refused += 1
        if status == 401:
            return Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return Response(status=status, body=b"")

    def _ledger_auth(self, request: Request, scopes: tuple[str, ...]) -> Response | None:
        """The ledger's own check of a request's token: None when it passes."""
        if self.clients is None:
            return None
        if self.server == "v1.x":
            if not request.header("authorization"):
                return self._refuse(401)
            found = self._valid_token(request)
            if found is None:
                return self._refuse(403)  # libs/auth/middleware.go: m.Check failed
            if self.check_scopes and not found & set(scopes):
                return self._refuse(403)  # wrapWithScopes: AbortWithStatus(403)
            return None
        found = self._valid_token(request)
        if found is None or (self.check_scopes and not found & set(READ_SCOPES)):
            return self._refuse(401)
        return None

    # -- ledger -----------------------------------------------------------

    def _ledger_server(self, path: str, request: Request, *, gateway: bool = False) -> Response:
        if request.method != "GET":
            return error(405, "VALIDATION", "method not allowed")
        if path == "/_info":
            return self._info()
        if self.server == "v1.x":
            return self._gin(path, request)
        if path == "/v2" or path.startswith("/v2"):
            return self._chi_v2(path[len("/v2"):], request)
        return self._chi_v1(path, request)

    def _info(self) -> Response:
        return json_response({"data": {
            "server": "numary-ledger" if self.server == "v1.x" else "ledger",
            "version": {"v1.x": "v1.10.16", "v2.2": "v2.2.59", "v2.3": "v2.3.0"}.get(self.server, "v2.4.12"),
            "config": {"storage": {"driver": "postgres", "ledgers": sorted(self.ledgers)}}}})

    def _gin(self, path: str, request: Request) -> Response:
        """v1.x: only a matching route runs the per-ledger middleware (auth, then the resolver)."""
        name, rest = _split_ledger(path)
        endpoint = _match(_V1_ROUTES, rest) if name else None
        if endpoint is None:
            return gin_404()
        refused = self._ledger_auth(request, V1X_SCOPES[endpoint])
        if refused is not None:
            return refused
        ledger = self._create_if_absent(name)
        if isinstance(ledger, Response):
            return ledger
        return self._answer("v1", endpoint, ledger, request)

    def _chi_v1(self, path: str, request: Request) -> Response:
        """v2.x's v1 router: ``/{ledger}/*`` authenticates and creates its ledger before routing."""
        name, rest = _split_ledger(path)
        if not name:
            return chi_404()
        refused = self._ledger_auth(request, ())
        if refused is not None:
            return refused
        ledger = self._create_if_absent(name)
        if isinstance(ledger, Response):
            return ledger
        endpoint = _match(_V1_ROUTES, rest)
        if endpoint is None:
            return chi_404()
        return self._answer("v1", endpoint, ledger, request)

    def _chi_v2(self, path: str, request: Request) -> Response:
        refused = self._ledger_auth(request, ())
        if refused is not None:
            return refused
        if path in ("/_info", "/_info/"):
            return json_response({"data": {"server": "ledger", "version": self._info_version()}})
        name, rest = _split_ledger(path)
        endpoint = _match(_V2_ROUTES, rest) if name else None
        if endpoint is None:
            return chi_404()
        with self._lock:
            ledger = self.ledgers.get(name)
        if ledger is None:
            if endpoint == "ledger":
                return error(404, "NOT_FOUND", "ledger not found")
            return error(404, "LEDGER_NOT_FOUND", f"ledger {name} not found")
        if endpoint == "ledger":
            return json_response({"data": {"bucket": "_default", "metadata": {}, "features": ledger.features,
                                           "id": sorted(self.ledgers).index(name) + 1, "name": name,
                                           "addedAt": "2024-01-01T00:00:00Z"}})
        return self._answer("v2", endpoint, ledger, request)

    def _info_version(self) -> str:
        return json.loads(self._info().body)["data"]["version"]

    def _create_if_absent(self, name: str) -> Ledger | Response:
        with self._lock:
            ledger = self.ledgers.get(name)
            if ledger is None:
                if not _LEDGER_NAME.fullmatch(name):
                    return error(400, "VALIDATION", f"invalid ledger name {name!r}")
                ledger = self.ledgers[name] = self.new_ledger()
                self.created.append(name)
        return ledger

    def _answer(self, api: str, endpoint: str, ledger: Ledger, request: Request) -> Response:
        with self._lock:
            self.served_at.append((request.path, self.clock()))
        try:
            if api == "v1":
                response = self._serve_v1(endpoint, ledger, request)
            else:
                response = self._serve_v2(endpoint, ledger, request)
        except _Panic:
            return Response(status=500, body=b"")
        except _Internal:
            return error(500, "INTERNAL", INTERNAL_ERROR)
        except ValueError as exc:
            return error(400, "VALIDATION", str(exc))
        if endpoint in ("balances", "accounts", "volumes"):
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

    def _check_filter(self, ledger: Ledger, pattern: str | None, api: str) -> None:
        """v2.2: a filter with an empty segment needs the segments index."""
        if (self.server == "v2.2" and pattern and "" in pattern.split(":")
                and ledger.features.get(INDEX_ADDRESS_SEGMENTS) != "ON"):
            if api == "v1":
                raise _Internal  # HandleCommonErrors: not a validation error to the v1 layer
            raise ValueError(f"feature {INDEX_ADDRESS_SEGMENTS} must be 'ON' to use segments address")

    def _serve_v1(self, endpoint: str, ledger: Ledger, request: Request) -> Response:
        if endpoint == "transactions":
            return self._transactions(ledger, request)
        if endpoint == "stats":
            return json_response({"data": {"transactions": ledger.transactions,
                                           "accounts": len(ledger.opened)}})
        if endpoint == "aggregate":
            address = _last(request, "address")
            self._check_filter(ledger, address, "v1")
            book = ledger.volumes()
            if address:
                book = {a: v for a, v in book.items() if self._matches(address, a, aggregate=True)}
            return _totals(book, as_strings=False)
        query = self._page_query("v1", request, None)
        self._check_filter(ledger, query["address"], "v1")
        book = ledger.volumes()
        if self.server == "v1.x":
            book = {a: v for a, v in book.items() if v}  # the volumes table: accounts that moved
        if query["address"]:
            book = {a: v for a, v in book.items() if self._matches(query["address"], a)}
        return self._page("v1", book, query, as_strings=False)

    def _serve_v2(self, endpoint: str, ledger: Ledger, request: Request) -> Response:
        filters = _body_filter(request)
        self._check_filter(ledger, filters, "v2")
        as_strings = (self.server != "v2.2"
                      and (request.header("formance-bigint-as-string") or "").lower() == "true")
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
        at = datetime.fromisoformat(query["pit"]) if query["pit"] else None
        if endpoint == "volumes":
            if at is not None and ledger.features.get(MOVES_HISTORY) != "ON":
                raise ValueError(f'missing feature "{MOVES_HISTORY}"')
            since = datetime.fromisoformat(query["since"]) if query["since"] else None
            book = ledger.volumes(at, by_insertion=query["insertion"], listed_by_first_use=False, since=since)
        else:
            if query["volumes"] and ledger.features.get(MOVES_HISTORY) != "ON":
                raise ValueError(f"feature {MOVES_HISTORY} must be 'ON' to use volumes")
            book = ledger.volumes(at)
            # Listed: accounts first used by pit (accounts.first_usage <= pit), a
            # transaction's effective date, although the volumes count insertions.
            book = {a: v for a, v in book.items() if at is None or ledger.opened.get(a, at) <= at}
        if query["address"]:
            book = {a: v for a, v in book.items() if self._matches(query["address"], a)}
        if endpoint == "volumes":
            return self._volume_page(book, query, as_strings)
        return self._page("v2", book, query, as_strings)

    def _transactions(self, ledger: Ledger, request: Request) -> Response:
        """The v1 listing, newest first, in keyset pages (see the module docstring)."""
        cursor = next((v for k, v in request.query if k in CURSOR_PARAMS), None)
        size_text = next((v for k, v in reversed(request.query) if k in PAGE_SIZE_PARAMS), None)
        if cursor is not None:
            if self.server == "v1.x" and any(k in V1X_NOT_WITH_CURSOR for k, _ in request.query):
                raise ValueError("no other query params can be set with 'cursor'")
            state = decode_cursor(cursor, _TX_CURSOR_KEYS)
            before, size = state["before"], state["pageSize"]
        else:
            size = _page_size(size_text, "v1")
            after = _last(request, "after")
            if after is not None and not re.fullmatch(r"[0-9]{1,19}", after):
                raise ValueError("invalid 'after' query param")
            # v1.x: id <= after, the equal one dropped below; v2.x: id < after. after=0 is no filter on v1.x.
            before = None if after is None or (self.server == "v1.x" and after == "0") else \
                int(after) + (1 if self.server == "v1.x" else 0)
        listed = sorted((t for t in ledger.booked if before is None or t.txid < before), key=lambda t: -t.txid)
        if self.server == "v1.x" and cursor is None and before is not None and len(listed) > 1 \
                and listed[0].txid == before - 1:
            listed = listed[1:]
        chosen = listed[:size]
        body: dict[str, Any] = {"pageSize": size, "hasMore": len(listed) > size}
        if len(listed) > size:
            body["next"] = encode_cursor({"before": chosen[-1].txid, "pageSize": size})
        body["data"] = [self._transaction(t) for t in chosen]
        return json_response({"cursor": body})

    def _transaction(self, tx: Transaction) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "txid": tx.txid,
            "postings": [{"source": s, "destination": d, "amount": a, "asset": x} for s, d, x, a in tx.postings],
            "reference": "", "metadata": {},
            "timestamp": tx.at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        if self.server != "v1.x":
            answer["reverted"] = False
        return answer

    def _page_query(self, api: str, request: Request, filters: str | None) -> dict:
        cursor = next((v for k, v in request.query if k in CURSOR_PARAMS), None)
        size_text = next((v for k, v in reversed(request.query) if k in PAGE_SIZE_PARAMS), None)
        if cursor is not None:
            if self.server == "v1.x" and any(k in V1X_NOT_WITH_CURSOR for k, _ in request.query):
                raise ValueError("no other query params can be set with 'cursor'")
            state = decode_cursor(cursor)
            if api == "v1" and self.server == "v2.2":
                # The filter is rebuilt from the request, which carries only the cursor.
                state["address"] = None
            if api == "v2" and size_text is not None:
                state["pageSize"] = _page_size(size_text, api)
            return state
        return {
            "offset": 0,
            "pageSize": _page_size(size_text, api),
            "address": _last(request, "address") if api == "v1" else filters,
            "after": _last(request, "after") if api == "v1" else None,
            "pit": _pit(_last(request, "pit") or _last(request, "endTime")) if api == "v2" else None,
            "since": _pit(_last(request, "startTime")) if api == "v2" else None,
            "volumes": "volumes" in ",".join(request.params("expand")).split(","),
            "insertion": _flag(request, "insertionDate"),
        }

    def _ordered(self, book: dict, query: dict) -> list[str]:
        descending = self.server == "v1.x" or self.legacy_store
        addresses = sorted(book, reverse=descending)
        if query.get("after"):
            addresses = [a for a in addresses if a < query["after"]]
        return addresses

    def _cursor(self, query: dict, total: int, data: list) -> dict[str, Any]:
        offset, size = query["offset"], query["pageSize"]
        has_more = offset + size < total
        cursor: dict[str, Any] = {"pageSize": size, "hasMore": has_more}
        if offset > 0:
            cursor["previous"] = encode_cursor({**query, "offset": max(0, offset - size)})
        if has_more:
            cursor["next"] = encode_cursor({**query, "offset": offset + size})
        cursor["data"] = data
        return cursor

    def _page(self, api: str, book: dict, query: dict, as_strings: bool) -> Response:
        addresses = self._ordered(book, query)
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
        body: dict[str, Any] = {"cursor": self._cursor(query, len(addresses), data)}
        if api == "v2":
            body = {"resource": "accounts", **body}
        return json_response(body)

    def _volume_page(self, book: dict, query: dict, as_strings: bool) -> Response:
        rows = [(a, asset, inp, out) for a in sorted(book) for asset, (inp, out) in sorted(book[a].items())]
        offset, size = query["offset"], query["pageSize"]
        data = [{"account": a, "asset": asset, "input": _amount(inp, as_strings),
                 "output": _amount(out, as_strings), "balance": _amount(inp - out, as_strings)}
                for a, asset, inp, out in rows[offset:offset + size]]
        return json_response({"cursor": self._cursor(query, len(rows), data)})


def _split_ledger(path: str) -> tuple[str, str]:
    """``/{ledger}/rest`` -> (ledger, ``/rest``)."""
    name, _, rest = path.lstrip("/").partition("/")
    return name, "/" + rest if rest else ""


def _match(routes, rest: str) -> str | None:
    return next((endpoint for endpoint, pattern in routes if pattern.fullmatch(rest)), None)


def _page_size(text: str | None, api: str) -> int:
    try:
        size = DEFAULT_PAGE_SIZE if text is None else int(text)
        if size < 1:
            raise ValueError
    except ValueError:
        raise ValueError("invalid 'pageSize' query param") from None
    return min(size, MAX_PAGE_SIZE[api])


def error(status: int, code: str, message: str) -> Response:
    return json_response({"errorCode": code, "errorMessage": message}, status=status)


def oauth_error(status: int, code: str, description: str) -> Response:
    return json_response({"error": code, "error_description": description}, status=status)


def encode_cursor(state: dict) -> str:
    text = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def decode_cursor(cursor: str, keys: set[str] = _CURSOR_KEYS) -> dict:
    try:
        state = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(state, dict) or set(state) != keys:
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


# --- live: the demo data moving by the minute, for ``scripts/demo --serve`` ---------------------


class LiveFormance(MovingBook):
    """The demo ledger, plus a treasury move every third minute and users paying each other.

    The overdrawn ``users:005`` pays its debt back after ``repay_after``
    minutes: the continuity check's negative-balance breaks stop there.
    """

    def __init__(self, *, repay_after: int = 10, clock: Callable[[], int] = minute_now):
        super().__init__(demo_app(), clock)
        self.ledger = self.app.ledgers[DEMO_LEDGER]
        self.started = clock()
        self.repay_after = repay_after
        self._repaid = False
        self._held = 0  # treasury_move already booked

    def advance(self, minute: int, previous: int | None) -> None:
        start = minute if previous is None else previous + 1
        for m in range(start, minute + 1):
            at = datetime.fromtimestamp(m * MINUTE - 1, timezone.utc)
            delta, self._held = treasury_move(m) - self._held, treasury_move(m)
            if delta > 0:
                self.ledger.transfer(at, "world", "treasury:hedera", "HBAR/8", delta)
            elif delta < 0:
                self.ledger.transfer(at, "treasury:hedera", "world", "HBAR/8", -delta)
            self.ledger.transfer(at, "users:001", "users:002", "USD/2", 100 + m % 50)
            self.ledger.transfer(at, "users:002", "users:001", "USD/2", 100 + (m * 7) % 50)
            if not self._repaid and m - self.started >= self.repay_after:
                self.ledger.transfer(at, "world", "users:005", "USD/2", 1_500)
                self._repaid = True


def live_app() -> LiveFormance:
    """The moving demo ledger that ``scripts/demo --serve`` and the live tests serve."""
    return LiveFormance()
