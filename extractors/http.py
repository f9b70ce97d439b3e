"""The HTTP client every extractor shares: one session, retries, errors, masking.

Retries happen here and nowhere else. A provider supplies two small hooks:
``error_for`` turns an error response into a :class:`ProviderError` carrying
the provider's own message, and ``check`` inspects a 200 body for providers
that report failures inside successful responses.

What one request may cost (its deadline, its body's size) is bounded by
:mod:`extractors.transport`, and how its JSON is read (numbers exact and
bounded, keys once) by :mod:`extractors.jsonbody`; this module decides what
to do with the answer: retry, fail, or hand it to the provider.
"""
from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import timezone
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
from extractors.jsonbody import DuplicateKeyError, parse_json
from extractors.paginators import Paginator
from extractors.redaction import mask, redact_url, request_secrets, same_origin
from extractors.text import one_line, safe_text
from extractors.transport import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_REQUEST_DEADLINE, new_session, send, send_ahead

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
    request_deadline: float = DEFAULT_REQUEST_DEADLINE
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

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


class _MaskingFilter(logging.Filter):
    """Masks given secrets in every record of the logger it is added to."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(secret in text for secret in self.secrets):
            record.msg, record.args = mask(text, self.secrets), ()
        return True


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


ERROR_TEXT_LIMIT = 300


def error_text(response: requests.Response, limit: int = ERROR_TEXT_LIMIT) -> str:
    """The provider's words for an error: the start of its body, else its reason phrase.

    Only the first bytes are decoded (``response.text`` would guess the
    charset of the whole body), and the result is safe to raise and store.
    """
    head = (response.content or b"")[: limit * 4]
    try:
        text = head.decode(response.encoding or "utf-8", "replace").strip()
    except LookupError:  # a charset Python does not know
        text = head.decode("utf-8", "replace").strip()
    text = text or (response.reason or "").strip() or "no body"
    return safe_text(text, limit)


def default_error_for(response: requests.Response) -> ProviderError:
    """A ProviderError with the start of the body as the provider's message."""
    return http_error(response, error_text(response))


def http_retriable(status: int) -> bool:
    """The HTTP status alone says the provider may answer next time: 408, 429, 5xx."""
    return status == 429 or status == 408 or status >= 500


def http_error(response: requests.Response, message: str, code: str | None = None, *,
               retriable: bool = False, retry_after: float | None = None) -> ProviderError:
    """Classify an HTTP error once, when it is made.

    The status decides (:func:`http_retriable`); ``retriable`` adds what only
    the provider's own error code can tell (a rate-limit code on a 400, say),
    ``retry_after`` a wait the provider gives other than by ``Retry-After``.
    """
    status = response.status_code
    return ProviderError(
        f"HTTP {status} from {redact_url(response.url)}: {safe_text(message)}",
        status=status,
        code=None if code is None else safe_text(code, 100),
        retriable=retriable or http_retriable(status),
        retry_after=retry_after if retry_after is not None else parse_retry_after(response.headers.get("Retry-After")),
    )


@dataclass
class HttpClient:
    """A ``requests.Session`` bound to one provider origin.

    Every URL it fetches must be on ``base_url``'s origin, so a credential
    attached by ``auth`` or ``headers`` can never travel to another host.
    Redirects are not followed for the same reason.

    Credentials sent in headers or a form body are found and masked by
    themselves; ``secrets`` names any other value that must never be shown
    (a key an ``auth`` puts in the URL path, say): it is masked from every
    error, and from urllib3's debug log of request lines.
    """

    base_url: str
    auth: requests.auth.AuthBase | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    error_for: Callable[[requests.Response], ProviderError] = default_error_for
    check: Callable[[Any, requests.Response], None] | None = None
    throttle: Callable[[], None] | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    secrets: Sequence[str] = field(default_factory=tuple, repr=False)
    # The config key base_url came from, named when the host cannot be reached.
    url_key: str = "base_url"

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session = new_session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json"
        self.session.headers.update(self.headers)
        # Seconds spent in requests that did not complete; they count
        # against max_total_wait like the sleeps between attempts.
        self.lost = 0.0
        self.secrets = [s for s in self.secrets if s and len(s) >= 4]
        self._log_filter = None
        if self.secrets:
            self._log_filter = _MaskingFilter(self.secrets)
            logging.getLogger("urllib3.connectionpool").addFilter(self._log_filter)

    def close(self) -> None:
        self.session.close()
        if self._log_filter is not None:
            logging.getLogger("urllib3.connectionpool").removeFilter(self._log_filter)
            self._log_filter = None

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
            raise PaginationError(f"cannot follow link {safe_text(ascii(path_or_url), 300)}: "
                                  "not a path or URL")
        try:
            same = same_origin(path_or_url, self.base_url)
        except ValueError:  # an unparsable host or port: "http://[::1", "http://h:99999"
            raise PaginationError(f"cannot follow link {safe_text(ascii(path_or_url), 300)}: "
                                  "not a valid URL") from None
        if not same:
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
        return self.request_json("GET", path_or_url, params, headers=headers, json_body=json_body)

    def post_json(self, path_or_url: str, json_body: Any, *, headers: Mapping[str, str] | None = None) -> Any:
        """POST a JSON body (a read, such as a JSON-RPC call) for a JSON document, retried like a GET."""
        return self.request_json("POST", path_or_url, None, headers=headers, json_body=json_body)

    def request_json(self, method: str, path_or_url: str, params: Params = None, *,
                     headers: Mapping[str, str] | None = None, json_body: Any = None) -> Any:
        """One read, retried as the policy says: every request of a provider goes through here."""
        url = self.url_for(path_or_url)
        policy = self.policy
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                return self._attempt(method, url, params, headers, json_body)
            except (ProviderError, TransportError) as exc:
                if isinstance(exc, TransportError):
                    self.lost += time.monotonic() - started
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
                if self.stats.waited + self.lost + wait > policy.max_total_wait:
                    raise ProviderError(
                        f"{exc} (gave up: retries would wait more than "
                        f"{policy.max_total_wait:g}s in total, counting requests that did not complete)"
                    ) from exc
                self.stats.retries += 1
                self.stats.waited += wait
                log.warning(
                    "retry %d/%d in %.2fs: %s", attempt, policy.max_attempts - 1, wait, one_line(str(exc))
                )
                time.sleep(wait)

    def _attempt(self, method: str, url: str, params: Params, headers, json_body) -> Any:
        if self.throttle is not None:
            self.throttle()
        self.stats.requests += 1
        policy = self.policy
        try:
            response = send(
                self.session, method, url,
                deadline=policy.request_deadline,
                max_bytes=policy.max_response_bytes,
                url_key=self.url_key,
                params=params,
                headers=headers,
                json=json_body,
                auth=self.auth,
                timeout=(policy.connect_timeout, policy.read_timeout),
                allow_redirects=False,
            )
        except ExtractError as exc:  # a transport error may quote the URL the auth changed
            raise masked(exc, self.secrets)
        if log.isEnabledFor(logging.DEBUG):  # redacting the URL costs as much as the log line
            log.debug("%s %s -> %d", method, redact_url(response.url), response.status_code)
        secrets = request_secrets(response.request)
        if self.secrets:
            secrets += self.secrets
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
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            ctype = safe_text(response.headers.get("Content-Type", "no content type"), 100)
            what = ("is ambiguous JSON" if isinstance(exc, DuplicateKeyError) else "is not valid JSON")
            why = (f": {exc}" if isinstance(exc, DuplicateKeyError)
                   else ": nested too deeply" if isinstance(exc, RecursionError) else "")
            raise MalformedResponseError(
                f"response from {redact_url(response.url)} {what} "
                f"({ctype}, {len(body)} bytes){why}",
                raw=safe_text(mask(body[:8000].decode("utf-8", "replace"), secrets), 2000),
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
        """Yield each page's decoded body, following ``paginator`` to the end.

        The next page's request is known once a page is decoded, so it is
        sent before the page is yielded (:meth:`_send_ahead`): the server
        answers it while the caller works on this one. A stop rule that
        refuses the next page still fails after the caller has had this one.
        """
        target, query = path, params
        data = self.get_json(target, query, headers=headers, json_body=json_body)
        while True:
            refused = None
            try:
                paginator.update_state(data)
                if paginator.has_next:
                    target, query = paginator.next_request(target, query)
                    self._send_ahead(target, query, headers, json_body)
            except Exception as exc:  # noqa: BLE001 -- raised below, once the page is used
                refused = exc
            yield data
            if refused is not None:
                raise refused
            if not paginator.has_next:
                return
            data = self.get_json(target, query, headers=headers, json_body=json_body)

    def _send_ahead(self, path_or_url: str, params: Params, headers, json_body) -> None:
        """Put the next page's GET on the wire now, as :meth:`_attempt` will ask for it (transport.send_ahead).

        Not under a throttle, whose token is taken when the request is made;
        the transport itself keeps back any request with auth, headers or a
        body of its own.
        """
        if self.throttle is not None:
            return
        try:
            url = self.url_for(path_or_url)
        except ExtractError:
            return  # get_json raises it, in its turn
        policy = self.policy
        send_ahead(self.session, "GET", url, params=params, headers=headers, json=json_body, auth=self.auth,
                   timeout=(policy.connect_timeout, policy.read_timeout), allow_redirects=False)
