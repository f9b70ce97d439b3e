"""The HTTP client every extractor shares: one session, timeouts, retries.

Retries happen here and nowhere else. A provider supplies two small hooks:
``error_for`` turns an error response into a :class:`ProviderError` carrying
the provider's own message, and ``check`` inspects a 200 body for providers
that report failures inside successful responses.
"""
from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import timezone
from decimal import Decimal
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import requests

from extractors.errors import (
    ExtractError,
    MalformedResponseError,
    PaginationError,
    ProviderError,
    TransportError,
)
from extractors.paginators import Paginator
from extractors.redaction import mask, redact_url, request_secrets, same_origin

log = logging.getLogger(__name__)

USER_AGENT = "balance-snapshots/0.1 (+https://example.invalid/balance-snapshots)"

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None


@dataclass(slots=True)
class RetryPolicy:
    """How hard to try before a run fails.

    ``backoff_base`` doubles per attempt up to ``backoff_cap``, with full
    jitter in the upper half so parallel shards do not retry in lockstep.
    A ``Retry-After`` longer than the backoff wins; one longer than
    ``max_retry_after`` fails the run rather than parking a worker for hours.
    """

    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    max_retry_after: float = 120.0
    max_total_wait: float = 300.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        backoff *= random.uniform(0.5, 1.0)
        # Retry-After: 0 means "now", but retrying instantly would burn every
        # attempt inside one rate-limit window; the backoff is the floor.
        return max(backoff, retry_after or 0.0)


@dataclass(slots=True)
class RequestStats:
    """Counters that end up in ``snapshot_runs``."""

    requests: int = 0
    retries: int = 0
    waited: float = 0.0


def masked(exc: ExtractError, secrets: list[str]) -> ExtractError:
    """``exc`` with every secret in its message (and kept raw body) masked."""
    if secrets:
        exc.args = tuple(mask(a, secrets) if isinstance(a, str) else a for a in exc.args)
        if isinstance(getattr(exc, "raw", None), str):
            exc.raw = mask(exc.raw, secrets)
    return exc


def parse_json(body: bytes | str) -> Any:
    """Parse JSON keeping every number exact: ints as int, decimals as Decimal."""
    return json.loads(body, parse_float=Decimal)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def default_error_for(response: requests.Response) -> ProviderError:
    """A ProviderError with the start of the body as the provider's message."""
    text = response.text[:300].strip() or response.reason or "no body"
    return http_error(response, text)


def http_error(response: requests.Response, message: str, code: str | None = None) -> ProviderError:
    """Classify an HTTP error once: 429 and 5xx are retriable, other 4xx fatal."""
    status = response.status_code
    retriable = status == 429 or status == 408 or status >= 500
    return ProviderError(
        f"HTTP {status} from {redact_url(response.url)}: {message}",
        status=status,
        code=code,
        retriable=retriable,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


@dataclass
class HttpClient:
    """A ``requests.Session`` bound to one provider origin.

    Every URL it fetches must be on ``base_url``'s origin, so a credential
    attached by ``auth`` or ``headers`` can never travel to another host.
    Redirects are not followed for the same reason.
    """

    base_url: str
    auth: requests.auth.AuthBase | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    error_for: Callable[[requests.Response], ProviderError] = default_error_for
    check: Callable[[Any, requests.Response], None] | None = None
    throttle: Callable[[], None] | None = None
    stats: RequestStats = field(default_factory=RequestStats)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json"
        self.session.headers.update(self.headers)
        # Proxies or credentials from the environment must not leak in.
        self.session.trust_env = False

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url_for(self, path_or_url: str) -> str:
        """Join a path (relative links are joined as-is, never re-encoded)."""
        if path_or_url.startswith("//"):
            # A network-path reference names a host: it is a URL, not a path.
            path_or_url = urlsplit(self.base_url).scheme + ":" + path_or_url
        elif path_or_url.startswith("/"):
            return self.base_url + path_or_url
        if "://" not in path_or_url:
            raise PaginationError(f"cannot follow link {path_or_url!r}: not a path or URL")
        if not same_origin(path_or_url, self.base_url):
            raise PaginationError(
                f"refusing to follow {redact_url(path_or_url)}: it leaves the configured "
                f"origin {redact_url(self.base_url)}"
            )
        return path_or_url

    def get_json(
        self,
        path_or_url: str,
        params: Params = None,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> Any:
        """GET a JSON document, retrying what the policy says is retriable."""
        url = self.url_for(path_or_url)
        policy = self.policy
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(url, params, headers, json_body)
            except (ProviderError, TransportError) as exc:
                if not exc.retriable:
                    raise
                if attempt >= policy.max_attempts:
                    raise
                if exc.retry_after is not None and exc.retry_after > policy.max_retry_after:
                    raise ProviderError(
                        f"{exc} (asked to wait {exc.retry_after:.0f}s, more than the "
                        f"{policy.max_retry_after:.0f}s this source allows)",
                        status=getattr(exc, "status", None),
                        code=getattr(exc, "code", None),
                    ) from exc
                wait = policy.delay(attempt, exc.retry_after)
                if self.stats.waited + wait > policy.max_total_wait:
                    raise ProviderError(
                        f"{exc} (gave up: retries would wait more than "
                        f"{policy.max_total_wait:.0f}s in total)"
                    ) from exc
                self.stats.retries += 1
                self.stats.waited += wait
                log.warning(
                    "retry %d/%d in %.2fs: %s", attempt, policy.max_attempts - 1, wait, exc
                )
                time.sleep(wait)

    def _attempt(self, url: str, params: Params, headers, json_body) -> Any:
        if self.throttle is not None:
            self.throttle()
        self.stats.requests += 1
        try:
            response = self.session.get(
                url,
                params=params,
                headers=headers,
                json=json_body,
                auth=self.auth,
                timeout=(self.policy.connect_timeout, self.policy.read_timeout),
                allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransportError(f"{type(exc).__name__} for {redact_url(url)}") from None
        except requests.exceptions.ChunkedEncodingError:
            raise TransportError(f"connection dropped mid-body for {redact_url(url)}") from None
        log.debug("GET %s -> %d", redact_url(response.url), response.status_code)
        secrets = request_secrets(response.request)
        try:
            return self._read(response, secrets)
        except ExtractError as exc:
            raise masked(exc, secrets)

    def _read(self, response: requests.Response, secrets: list[str]) -> Any:
        if response.status_code >= 400:
            if secrets:
                # Masked before any hook reads (and truncates) the body: half a key is still a leak.
                response._content = mask(response.content.decode("utf-8", "replace"), secrets).encode()
            raise self.error_for(response)
        if 300 <= response.status_code < 400:
            raise ProviderError(
                f"HTTP {response.status_code} redirect from {redact_url(response.url)} "
                "is not followed (a credential could leave the configured origin)",
                status=response.status_code,
            )
        data = self._decode(response, secrets)
        if self.check is not None:
            self.check(data, response)
        return data

    @staticmethod
    def _decode(response: requests.Response, secrets: list[str]) -> Any:
        body = response.content
        try:
            return parse_json(body)
        except (ValueError, UnicodeDecodeError):
            ctype = response.headers.get("Content-Type", "no content type")
            raise MalformedResponseError(
                f"response from {redact_url(response.url)} is not valid JSON "
                f"({ctype}, {len(body)} bytes)",
                raw=mask(body.decode("utf-8", "replace"), secrets)[:2000],
            ) from None

    def paginate(
        self,
        path: str,
        params: Params,
        paginator: Paginator,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> Iterator[Any]:
        """Yield each page's decoded body, following ``paginator`` to the end."""
        target, query = path, params
        while True:
            data = self.get_json(target, query, headers=headers, json_body=json_body)
            yield data
            paginator.update_state(data)
            if not paginator.has_next:
                return
            target, query = paginator.next_request(target, query)
