"""A fake CoreLedger TEOS API: ``GetAssetsBalances`` and ``Assets('{id}')``.

Behaves as the TEOS docs say, traps included: every call needs
``Authorization: Bearer <API key>``; the version is a path segment
(``/odata/v1.1/...``) and retired versions are gone; the balances call is
an OData function whose arrays of quoted literals sit in the path
(percent-encoded, ``'`` doubled inside a value) and whose answer is a bare
JSON array or the ``{"value": [...]}`` wrapper; ``Amount`` and
``SparkFactor`` are strings; errors are ``{"code": "<string>", "message",
"target", "details", "clTraceId"}``; more than 300 calls a minute get
``13000`` with ``X-Rate-Limit-*`` headers (the reset as an ISO 8601 UTC
time); a request target longer than the server accepts gets 414.
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable
from urllib.parse import unquote

from sandbox.live import MovingBook, minute_now
from sandbox.server import Request, Response, json_response

SANDBOX_API_KEY = "teos-sandbox-7f3c9a51d2e84b06"
VERSIONS = ("1.0", "1.1")
PER_MINUTE = 300


class ODataSyntaxError(ValueError):
    pass


def error(status: int, code: str | None, message: str, target: str = "",
          details: list[dict] | None = None, headers: dict[str, str] | None = None) -> Response:
    """TEOS's error body; ``code`` None where the docs give a status but no code."""
    body = {"code": code, "message": message, "target": target, "details": details or [],
            "clTraceId": str(uuid.uuid4())}
    if code is None:
        del body["code"]
    return json_response(body, status=status, headers=headers)


def parse_call(text: str) -> tuple[str, dict[str, list[str] | str]]:
    """``Name(key=['a','b'],other='c')`` (already percent-decoded) as name and arguments.

    A real tokenizer, not a split on commas: a literal may hold ``,``
    ``]`` ``)`` and doubled quotes.
    """
    name, paren, rest = text.partition("(")
    if not paren or not rest.endswith(")"):
        raise ODataSyntaxError(f"'{text}' is not a function call")
    body, pos, args = rest[:-1], 0, {}
    while pos < len(body):
        key = ""
        if body[pos] != "'":  # Assets('<id>'): a key without a name
            key, eq, _ = body[pos:].partition("=")
            if not eq or not key.strip():
                raise ODataSyntaxError(f"expected name=value at position {pos}")
            pos += len(key) + 1
        if body[pos:pos + 1] == "[":
            values, pos = [], pos + 1
            while body[pos:pos + 1] != "]":
                value, pos = _literal(body, pos)
                values.append(value)
                if body[pos:pos + 1] == ",":
                    pos += 1
                elif body[pos:pos + 1] != "]":
                    raise ODataSyntaxError(f"expected ',' or ']' at position {pos}")
            args[key.strip().lower()] = values
            pos += 1
        else:
            args[key.strip().lower()], pos = _literal(body, pos)
        if pos < len(body):
            if body[pos] != ",":
                raise ODataSyntaxError(f"expected ',' at position {pos}")
            pos += 1
    return name, args


def _literal(text: str, pos: int) -> tuple[str, int]:
    if text[pos:pos + 1] != "'":
        raise ODataSyntaxError(f"expected a quoted string at position {pos}")
    out, pos = [], pos + 1
    while True:
        end = text.find("'", pos)
        if end < 0:
            raise ODataSyntaxError("unterminated string literal")
        out.append(text[pos:end])
        if text[end + 1:end + 2] == "'":  # '' is one quote inside the literal
            out.append("'")
            pos = end + 2
        else:
            return "".join(out), end + 1


@dataclass
class Asset:
    id: str
    name: str
    unit: str
    spark_factor: str  # a string integer, as the API sends it

    def body(self) -> dict:
        return {"Id": self.id, "Author": "0xabe9e6c2b231ae427cd089b2b68be0a1dab565a1",
                "Name": self.name, "Description": self.name, "LanguageCode": "en",
                "JurisdictionCode": "CH", "UnitOfMeasureCode": self.unit, "CurrencyCode": None,
                "SparkFactor": self.spark_factor, "SparkFactorModifier": None,
                "AssetClassCode": "A017", "CustomDefinitionItems": [], "AssetLinkIds": [],
                "CreatedInBlockchainOn": "2024-05-18T15:23:12.5246259+02:00",
                "State": "CreatedInTeos"}


@dataclass
class TeosApi:
    """The fake's application; its fields may be changed between requests.

    ``balances`` maps (address, asset id) to Sparks; an address it does not
    list holds zero, as any address on the chain does. Lookups ignore case
    (hex), answers use the stored spelling. ``shape`` is ``"array"`` or
    ``"value"``; ``drop`` lists pairs left out of answers (a misbehaving
    server); ``max_url_length`` bounds the request target.
    """

    assets: dict[str, Asset]
    balances: dict[tuple[str, str], int]
    api_key: str = SANDBOX_API_KEY
    shape: str = "array"
    drop: set[tuple[str, str]] = field(default_factory=set)
    max_url_length: int = 4096
    per_minute: int = PER_MINUTE
    hits: Counter = field(default_factory=Counter)
    _throttle: list = field(default_factory=list)
    _recent: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def rate_limit(self, times: int, *, status: int = 429, code: str | None = "13000",
                   reset_in: float = 1.0) -> None:
        """Answer the next ``times`` requests as over quota, resetting ``reset_in`` s later.

        ``code=None`` sends a 429 without a TEOS body, as a gateway in front would.
        """
        with self._lock:
            self._throttle.append([times, status, code, reset_in])

    def __call__(self, request: Request) -> Response:
        target = request.path + ("?" + request.raw_query if request.raw_query else "")
        if len(target) > self.max_url_length:
            # What a web server in front answers before the API sees the request.
            return Response(status=414, body=b"", content_type="text/html")
        try:
            path = unquote(request.path, errors="strict")
        except UnicodeDecodeError:
            return error(400, "12001", "There were OData validation errors", request.path)
        with self._lock:
            self.hits[path] += 1
        auth = request.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            return error(401, "11001", "UserId was not found in provided authentication data", path)
        limited, remaining = self._limited(path)
        if limited is not None:
            return limited
        response = self._route(request, path)
        response.headers.update({"X-Rate-Limit-Limit": "1m", "X-Rate-Limit-Remaining": str(remaining),
                                 "X-Rate-Limit-Reset": _reset_header(60.0)})
        return response

    def _route(self, request: Request, path: str) -> Response:
        if request.method != "GET":
            return error(405, None, "Method not allowed", path)
        prefix, _, version_and_rest = path.partition("/odata/v")
        version, _, resource = version_and_rest.partition("/")
        if prefix or version not in VERSIONS:
            # Retired versions are switched off: their paths no longer exist.
            return error(404, None, f"No API version in '{path}' is available", path)
        try:
            name, args = parse_call(resource) if "(" in resource else (resource, {})
        except ODataSyntaxError as exc:
            return error(400, "12001", "There were OData validation errors", path,
                         [{"code": "12001", "message": str(exc)}])
        if name.lower() == "balances/getassetsbalances":
            return self._balances(args, path)
        if name.lower() == "assets" and isinstance(args.get(""), str):
            return self._asset(args[""], path)
        return error(404, None, f"Resource '{resource}' not found", path)

    def _limited(self, path: str) -> tuple[Response | None, int]:
        """The over-quota answer, if this request gets one, and the calls left this minute."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0] > 60:
                self._recent.popleft()
            if self._throttle:
                rule = self._throttle[0]
                rule[0] -= 1
                if rule[0] == 0:
                    self._throttle.pop(0)
                _, status, code, reset_in = rule
            elif len(self._recent) >= self.per_minute:
                status, code, reset_in = 429, "13000", 60 - (now - self._recent[0])
            else:
                self._recent.append(now)
                return None, self.per_minute - len(self._recent)
        headers = {"X-Rate-Limit-Limit": "1m", "X-Rate-Limit-Remaining": "0",
                   "X-Rate-Limit-Reset": _reset_header(reset_in)}
        if code is None:
            return Response(status=status, body=b"Too Many Requests", headers=headers,
                            content_type="text/plain"), 0
        return error(status, code, "Too many requests received.", path,
                     [{"code": code, "message": f"Quota exceeded. Maximum allowed: {self.per_minute} per 1m."}],
                     headers), 0

    def _asset(self, asset_id: str, path: str) -> Response:
        asset = self._find_asset(asset_id)
        if asset is None:
            return error(404, None, f"Asset with unique Id '{asset_id}' does not exist", path)
        return json_response(asset.body())

    def _find_asset(self, asset_id: str) -> Asset | None:
        for known_id, asset in self.assets.items():
            if known_id.lower() == asset_id.lower():
                return asset
        return None

    def _balances(self, args: dict, path: str) -> Response:
        addresses, asset_ids = args.get("addresses"), args.get("uniqueassetids")
        if not isinstance(addresses, list) or not isinstance(asset_ids, list) or set(args) != {
                "addresses", "uniqueassetids"}:
            return error(400, "12001", "There were OData validation errors", path,
                         [{"code": "12001", "message": "addresses and uniqueAssetIds are required arrays"}])
        known = {(a.lower(), s.lower()): (a, s, amount) for (a, s), amount in self.balances.items()}
        dropped = {(a.lower(), s.lower()) for a, s in self.drop}
        items = []
        for address in addresses:
            for asset_id in asset_ids:
                asset = self._find_asset(asset_id)
                if asset is None:
                    return error(400, "21000", "One or more preconditions failed", path,
                                 [{"code": "1001", "message": f"Asset with uinque Id '{asset_id}' does not exist"}])
                key = (address.lower(), asset_id.lower())
                if key in dropped:
                    continue
                spelled_address, _, amount = known.get(key, (address, None, 0))
                items.append({"Address": spelled_address, "UniqueAssetId": asset.id, "Amount": str(amount)})
        if self.shape == "value":
            return json_response({"@odata.context": "$metadata#Collection(Teos.Api.Model.Balance)",
                                  "value": items})
        return json_response(items)


def _reset_header(seconds: float) -> str:
    reset = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    # .NET's "o" format, as the docs parse it: seven fractional digits.
    return reset.strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def _evm_address(seed: str) -> str:
    return "0x" + hashlib.sha256(seed.encode()).hexdigest()[:40]


DEMO_ASSETS = (
    Asset("0x5db616f7e9aaa6fce9b0001", "Gold", "kg", "1000000"),
    Asset("0x7bc575105b40df19721a0001", "Swiss franc token", "pcs", "100"),
    # Sparks are millilitres and the unit a 750 ml bottle: not a power of ten.
    Asset("0x0fc6e610b23b09fae00e10001", "Wine, bottled", "btl", "750"),
)
DEMO_ADDRESSES = tuple(_evm_address(f"teos-demo-{i}") for i in range(4))


def demo_app() -> TeosApi:
    gold, franc, wine = (a.id for a in DEMO_ASSETS)
    balances = {}
    for i, address in enumerate(DEMO_ADDRESSES):
        balances[(address, gold)] = 25_000 * (i + 1) + i
        balances[(address, franc)] = 1_200_00 * (i + 3)
        balances[(address, wine)] = 750 * 12 * (i + 1) + 375 * (i % 2)
    # A treasury holding far above 2**64 Sparks: exact only if never a float.
    balances[(DEMO_ADDRESSES[0], franc)] = 98_765_432_109_876_543_210_987
    return TeosApi(assets={a.id: a for a in DEMO_ASSETS}, balances=balances, shape="value")


def demo_source(url: str) -> dict:
    return {"provider": "coreledger", "base_url": url, "addresses": list(DEMO_ADDRESSES),
            "unique_asset_ids": [a.id for a in DEMO_ASSETS], "conn_id": "coreledger_sandbox",
            "schedule": "*/15 * * * *"}


DEMO_CONNECTION = ("coreledger_sandbox", f"http://:{SANDBOX_API_KEY}@teosapi.sandbox")


# --- live: the demo data moving by the minute, for ``scripts/demo --serve`` ---------------------


class LiveCoreLedger(MovingBook):
    """The demo TEOS book with every GOLD holding moving by the minute."""

    def __init__(self, clock: Callable[[], int] = minute_now):
        super().__init__(demo_app(), clock)
        self.base = dict(self.app.balances)
        self.gold = DEMO_ASSETS[0].id

    def advance(self, minute: int, previous: int | None) -> None:
        for (address, asset), amount in self.base.items():
            if asset == self.gold:
                self.app.balances[(address, asset)] = amount + (minute % 30) * 125


def live_app() -> LiveCoreLedger:
    """The moving demo book that ``scripts/demo --serve`` and the live tests serve."""
    return LiveCoreLedger()
