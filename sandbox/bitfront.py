"""A fake BitFront OpenAPI: ``GET /v1/account/balances`` behind request signing.

Behaves as BitFront's docs say, traps included: every answer is HTTP 200
and the outcome is in ``statusCode`` (1000 only on success, with
``statusMessage`` "SUCCESS" although the code table says "Success"); each
request must carry ``X-API-KEY``, ``X-API-TIMESTAMP``, ``X-API-NONCE`` and
an ``X-API-SIGN`` made with the sandbox secret (4001 missing header, 6001
unknown key, 4013 unreadable timestamp, 6005 a timestamp more than 1 s
behind or 5 s ahead of the server, 4018 a nonce that is not 5 digits, 4003
wrong signature, 4005 a nonce or signature used before); 3 requests per
second and 60 per minute, then 6004. Amounts are bare JSON doubles written
as given (``1000107794.9999858``, ``1E-8``). ``fail_next`` makes the next
signed requests answer a chosen code (6004, 5001...).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import deque
from decimal import Decimal
from typing import Any, Callable

from sandbox.live import MovingBook, minute_now
from sandbox.server import Request, Response, json_response

SANDBOX_KEY = "SBXbitfrontKEY01"
SANDBOX_SECRET = "sandboxBitfrontSecret0123456789Z"
BALANCES_PATH = "/v1/account/balances"
PAST_TOLERANCE_MS = 1_000  # "more than 1 seconds earlier than the server timestamp"
FUTURE_TOLERANCE_MS = 5_000  # "the time difference must be less than 5 seconds"
LIMITS = ((1_000, 3), (60_000, 60))  # (window ms, requests) per API key

MESSAGES = {  # the statusCode table of the docs; success answers say SUCCESS, not Success
    1000: "SUCCESS",
    1202: "Member not found",
    3113: "Currency pair system is in maintenance",
    3203: "Unit price cannot be lower than the minimum value",
    3204: "Unit price is out of scale",
    3211: "Amount is too low",
    3212: "Amount is too high to order",
    3213: "AMOUNT has out of scale",
    3221: "Volume is too low",
    3222: "Volume is too high to order",
    3301: "Not enough balance for an order",
    3302: "Not enough remained amount for a request",
    3311: "Active order count exceed",
    3321: "Original request not found",
    3401: "Internal core system error",
    4000: "Bad request",
    4001: "X-API-Key, X-API-SIGN, or X-API-TIMESTAMP is missing",
    4002: "Invalid parameter value",
    4003: "Invalid signature",
    4005: "Duplicate signature usage detected",
    4006: "Invalid ‘orderSide’ parameter",
    4007: "Invalid ‘quantity’ parameter (should be greater than 0)",
    4008: "Invalid ‘price’ parameter (should be greater than 0)",
    4009: "Invalid ‘coinPair’",
    4010: "Invalid ‘market’",
    4011: "Invalid ‘currency’",
    4012: "Mandatory parameter not passed",
    4013: "Invalid timestamp",
    4014: "Invalid transfer type",
    4015: "Invalid page number",
    4016: "Invalid page size",
    4017: "Unsupported request method",
    4018: "Invalid X-API-NONCE",
    4101: "Account not found",
    5000: "Internal server side error",
    5001: "Internal timeout error",
    5002: "Socket timeout exception",
    6000: "Unauthorized request",
    6001: "Unregistered API KEY",
    6002: "Invalid API KEY",
    6003: "Unauthorized IP",
    6004: "API RPS limit exceeded",
    6005: "Invalid request timestamp",
}
_NONCE = re.compile(r"[1-9][0-9]{4}")
_MILLIS = re.compile(r"[0-9]{1,15}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BitfrontExchange:
    """The fake's application.

    ``wallet`` is the ``responseData`` list, sent as given (tests may put
    awkward or broken records in it); ``clock`` is the server's time in ms.
    """

    def __init__(self, wallet: list[dict[str, Any]], *, api_key: str = SANDBOX_KEY,
                 secret: str = SANDBOX_SECRET, clock: Callable[[], int] = _now_ms,
                 limits: tuple[tuple[int, int], ...] = LIMITS) -> None:
        self.wallet = wallet
        self.limits = limits
        self.api_key = api_key
        self.secret = secret
        self.clock = clock
        self._forced: deque[int] = deque()
        self._accepted: deque[int] = deque()
        # (timestamp, nonce) pairs and ("sign", signature) -> when first seen
        self._used: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def fail_next(self, code: int, times: int = 1) -> None:
        """Answer ``code`` to the next ``times`` correctly signed requests."""
        with self._lock:
            self._forced.extend([code] * times)

    def __call__(self, request: Request) -> Response:
        with self._lock:
            now = self.clock()
            code = self._authenticate(request, now)
            if code is None and request.method != "GET":
                code = 4017
            if code is None and request.path != BALANCES_PATH:
                code = 4000
            if code is None and self._forced:
                code = self._forced.popleft()
            if code is None:
                code = self._rate_limited(now)
            if code is not None:
                return envelope(now, code)
            return envelope(now, 1000, self.wallet)

    def _authenticate(self, request: Request, now: int) -> int | None:
        key, timestamp = request.header("X-API-KEY"), request.header("X-API-TIMESTAMP")
        nonce, signature = request.header("X-API-NONCE"), request.header("X-API-SIGN")
        if not (key and timestamp and nonce and signature):
            return 4001
        if key != self.api_key:
            return 6001
        if not _MILLIS.fullmatch(timestamp):
            return 4013
        if not -PAST_TOLERANCE_MS <= int(timestamp) - now < FUTURE_TOLERANCE_MS:
            return 6005
        if not _NONCE.fullmatch(nonce):
            return 4018
        message = f"{nonce}{timestamp}{request.method}{request.path}{request.raw_query}"
        message += request.body.decode("utf-8", "replace")
        expected = hmac.new(self.secret.encode(), message.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return 4003
        self._forget_before(now - PAST_TOLERANCE_MS - FUTURE_TOLERANCE_MS)
        if (timestamp, nonce) in self._used or ("sign", signature) in self._used:
            return 4005
        self._used[(timestamp, nonce)] = self._used[("sign", signature)] = now
        return None

    def _forget_before(self, cutoff: int) -> None:
        # A timestamp this old is refused anyway, so its nonces need no memory.
        for used, seen in list(self._used.items()):
            if seen < cutoff:
                del self._used[used]

    def _rate_limited(self, now: int) -> int | None:
        if not self.limits:
            return None
        longest = max(window for window, _ in self.limits)
        while self._accepted and self._accepted[0] <= now - longest:
            self._accepted.popleft()
        for window, limit in self.limits:
            if sum(1 for t in self._accepted if t > now - window) >= limit:
                return 6004
        self._accepted.append(now)
        return None


def envelope(now: int, code: int, data: Any = None) -> Response:
    """BitFront's response object; always HTTP 200, whatever the outcome."""
    body: dict[str, Any] = {"timezone": "UTC", "responseTime": now, "statusCode": code,
                            "statusMessage": MESSAGES.get(code, "Bad request")}
    if data is not None:
        body["responseData"] = data
    return json_response(body)


def holding(currency: str, balance: str, available: str | None = None) -> dict[str, Any]:
    """One ``responseData`` record with its amounts written exactly as given."""
    return {"currency": currency, "balance": Decimal(balance),
            "availableBalance": Decimal(balance if available is None else available)}


def demo_wallet() -> list[dict[str, Any]]:
    return [
        holding("BTC", "12.35615", "10.72614"),
        holding("ETH", "1000107794.9999858"),
        holding("USDT", "1000000000", "999998671.673"),
        holding("HBAR", "250000.12345678", "200000"),
        holding("XRP", "1000003043.7", "1000002063.7"),
        holding("BCH", "1e-8"),
        holding("LTC", "0"),
    ]


def demo_app() -> BitfrontExchange:
    return BitfrontExchange(demo_wallet())


def demo_source(url: str) -> dict:
    return {"provider": "bitfront", "base_url": url, "conn_id": "bitfront_sandbox",
            "schedule": "*/15 * * * *"}


DEMO_CONNECTION = ("bitfront_sandbox",
                   f"bitfront://{SANDBOX_KEY}:{SANDBOX_SECRET}@openapi.bitfront.me")


# --- live: the demo data moving by the minute, for ``scripts/demo --serve`` ---------------------


class LiveBitfront(MovingBook):
    """The demo wallet with BTC and USDT drifting every minute."""

    def __init__(self, clock: Callable[[], int] = minute_now):
        super().__init__(demo_app(), clock)

    def advance(self, minute: int, previous: int | None) -> None:
        wallet = self.app.wallet
        step = minute % 20
        btc = Decimal("12.35615") + Decimal(step) / 100
        usdt = Decimal("1000000000") - Decimal(step * 1234) / 1000
        for i, record in enumerate(wallet):
            if record["currency"] == "BTC":
                wallet[i] = holding("BTC", str(btc), str(btc - 1))
            elif record["currency"] == "USDT":
                wallet[i] = holding("USDT", str(usdt), str(usdt - 1000))


def live_app() -> LiveBitfront:
    """The moving demo wallet that ``scripts/demo --serve`` and the live tests serve."""
    return LiveBitfront()
