"""BitFront exchange: ``GET /v1/account/balances`` of the API key's account.

What differs from the other providers:

* every request is signed (:class:`BitfrontAuth`): HMAC-SHA256 of
  nonce + timestamp + METHOD + path + query (without ``?``) + body with the
  API secret, sent with the key, a millisecond timestamp and a fresh 5-digit
  nonce; a retry is signed anew, since the server refuses a signature twice;
* failures arrive with HTTP 200: only ``statusCode == 1000`` is success,
  6004 (rate limit) and 5000-5002 (server side) are retried, the rest fatal;
* amounts are JSON doubles, kept exact as Decimal from the JSON text;
* there is no history: ``as_of`` is the response's ``responseTime`` (ms).

Account: the API reports no account identifier, only the balances of the
member that owns the API key. Each row's ``account`` is the source's
``account`` setting (default ``"main"``): a label that stays stable when the
key is rotated, and never the key itself, which is a credential.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import requests

from extractors.credentials import Credentials, require_credentials
from extractors.errors import MalformedResponseError, ProviderError
from extractors.http import HttpClient, error_text, http_error, http_retriable, parse_retry_after
from extractors.paginators import SinglePage
from extractors.provider import BaseExtractor, Provider, Throttle
from extractors.settings import ProviderSettings, Text, Url
from extractors.records import (
    BalanceRow,
    Page,
    RecordError,
    decimal_amount,
    integer_amount,
    require,
)
from extractors.redaction import redact_url
from extractors.text import safe_text

BALANCES_PATH = "/v1/account/balances"
SUCCESS = 1000
# Rate limit, internal error, internal timeout, socket timeout.
RETRIABLE_CODES = frozenset({6004, 5000, 5001, 5002})

# A coin code as the docs show them (BTC, USDT, XRP): ASCII letters and
# digits, whole string, so "BTC\n" or a full-width "ＢＴＣ" is no second BTC.
_CURRENCY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


class Settings(ProviderSettings):
    """The ``[sources.<name>]`` keys a BitFront source accepts."""

    base_url: Url = "https://openapi.bitfront.me"
    account: Text = "main"


def sign(secret: str, nonce: str, timestamp: str, method: str, path: str, query: str = "",
         body: str = "") -> str:
    """The lowercase hex ``X-API-SIGN`` of one request, as the docs define it."""
    message = f"{nonce}{timestamp}{method.upper()}{path}{query}{body}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _random_nonce() -> int:
    return 10_000 + secrets.randbelow(90_000)


class BitfrontAuth(requests.auth.AuthBase):
    """Signs each request with a fresh timestamp and nonce.

    The nonce must not repeat within one millisecond timestamp; nonces used
    in the current millisecond are remembered so two requests can never
    collide, whatever the random draw.
    """

    def __init__(self, api_key: str, secret: str, *, clock: Callable[[], int] = _now_ms,
                 nonce: Callable[[], int] = _random_nonce) -> None:
        self.api_key = api_key
        self._secret = secret
        self._clock = clock
        self._nonce = nonce
        self._used: tuple[int, set[int]] = (-1, set())

    def __repr__(self) -> str:
        return "BitfrontAuth(***)"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        timestamp, nonce = self._fresh()
        url = urlsplit(request.path_url)
        body = request.body.decode() if isinstance(request.body, bytes) else request.body or ""
        request.headers.update({
            "X-API-KEY": self.api_key,
            "X-API-TIMESTAMP": str(timestamp),
            "X-API-NONCE": str(nonce),
            "X-API-SIGN": sign(self._secret, str(nonce), str(timestamp), request.method or "GET",
                               url.path, url.query, body),
        })
        return request

    def _fresh(self) -> tuple[int, int]:
        timestamp = self._clock()
        last, used = self._used
        if timestamp != last:
            used = set()
            self._used = (timestamp, used)
        nonce = self._nonce()
        while nonce in used:
            nonce = self._nonce()
        used.add(nonce)
        return timestamp, nonce


def status_error(data: Any, response: requests.Response) -> ProviderError:
    """A ProviderError with BitFront's own ``statusCode`` and ``statusMessage``.

    Retriable if the code says so or, when a gateway answered with an HTTP
    error, if that status is: the code can only add to the status.
    """
    code = data.get("statusCode")
    message = safe_text(str(data.get("statusMessage") or "no statusMessage"), 300)
    shown = safe_text(str(code), 40)
    return ProviderError(
        f"BitFront statusCode {shown}: {message} (HTTP {response.status_code} from "
        f"{redact_url(response.url)})",
        status=response.status_code,
        code=shown,
        retriable=(isinstance(code, int) and code in RETRIABLE_CODES) or http_retriable(response.status_code),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def check_status(data: Any, response: requests.Response) -> None:
    """Raise unless the body says ``statusCode == 1000`` (the HTTP status says nothing)."""
    if not isinstance(data, dict) or "statusCode" not in data:
        raise MalformedResponseError("response has no statusCode", raw=data)
    code = data["statusCode"]
    if isinstance(code, bool) or not isinstance(code, int):
        raise MalformedResponseError(f"statusCode is {code!r}, expected an integer",
                                     raw=data)
    # statusMessage varies ("SUCCESS" in answers, "Success" in the table): only the code counts.
    if code != SUCCESS:
        raise status_error(data, response)


def bitfront_error(response: requests.Response) -> ProviderError:
    """An HTTP error (a gateway in front of the API), with BitFront's code if the body has one."""
    try:
        data = response.json()
        if isinstance(data, dict) and "statusCode" in data:
            return status_error(data, response)
    except ValueError:
        pass
    return http_error(response, error_text(response))


def parse_response_time(value: Any) -> tuple[datetime, str]:
    """``responseTime`` (ms since the epoch, UTC) as an aware datetime and its exact text."""
    try:
        millis = integer_amount(value, "responseTime", minimum=0)
    except RecordError as exc:
        raise MalformedResponseError(str(exc)) from None
    at = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=millis)
    return at, str(value)


def exact_amount(value: Any, field_name: str) -> Decimal:
    """A non-negative exact Decimal from a JSON number or a string holding one."""
    # Strings are held to the JSON number grammar there, and sizes bounded.
    amount = decimal_amount(value, field_name)
    if amount < 0:
        raise RecordError(f"{field_name} is {value}, a balance cannot be negative")
    return amount


class BitfrontExtractor(BaseExtractor):
    """Reads the account's balances: one request, one page."""


    def pages(self, at: datetime,
              account_range: tuple[str, str | None] | None = None) -> Iterator[Page]:
        """Yield the current balances; ``at`` is ignored (begin refuses past times)."""
        if account_range is not None:
            raise ValueError("BitFront sources cannot be sharded")
        data = next(self.client.paginate(BALANCES_PATH, None, SinglePage(max_pages=self.max_pages)))
        if data.get("timezone", "UTC") != "UTC":
            raise MalformedResponseError(f"timezone is {data['timezone']!r}, the API promises UTC",
                                         raw=data)
        as_of, as_of_raw = parse_response_time(data.get("responseTime"))
        balances = data.get("responseData")
        if not isinstance(balances, list):
            raise MalformedResponseError("response has no responseData list",
                                         raw=data)
        page = Page(as_of=as_of, as_of_raw=as_of_raw)
        seen: set[str] = set()
        for _, row in page.parse_each(balances, lambda record: self._parse(record, seen)):
            page.rows.append(row)
        yield page

    def probe(self) -> str:
        """The one request a snapshot makes, signed (``balances check --connect``); nothing stored."""
        page = next(self.pages(datetime.now(timezone.utc)))
        return f"{len(page.rows)} balances at {page.as_of_raw}"

    def _parse(self, record: Any, seen: set[str]) -> BalanceRow:
        currency = require(record, "currency")
        if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
            raise RecordError(f"currency {safe_text(repr(currency), 80)} is not a coin code")
        if currency in seen:
            raise RecordError(f"currency {currency} is listed twice")
        balance = exact_amount(require(record, "balance"), f"balance of {currency}")
        available = None
        if record.get("availableBalance") is not None:
            available = exact_amount(record["availableBalance"], f"availableBalance of {currency}")
            if available > balance:
                raise RecordError(f"availableBalance of {currency} ({available}) exceeds its "
                                  f"balance ({balance}): the unlocked part cannot exceed the total")
        seen.add(currency)
        return BalanceRow(self.settings.account, currency, balance, available_balance=available)


def build(settings: Settings, credentials: Credentials | None, policy, *,
          max_pages: int, throttle: Throttle | None = None) -> BitfrontExtractor:
    """A BitFront extractor; the Connection's login is the API key, its password the secret."""
    credentials = require_credentials(credentials, "a BitFront source",
                                      login="the API key", password="the API secret")
    client = HttpClient(settings.base_url, auth=BitfrontAuth(credentials.login, credentials.password), policy=policy, error_for=bitfront_error,
                        check=check_status, throttle=throttle)
    return BitfrontExtractor(settings, client, max_pages=max_pages)


PROVIDER = Provider(
    name="bitfront",
    settings=Settings,
    build=build,
    extractor=BitfrontExtractor,
    has_history=False,  # the API only reports the present balances
    # 3 requests per second and 60 per minute per key: 1/s sustained, bursts of 3.
    rate_limit=(1.0, 3),
)
