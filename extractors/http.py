"""The HTTP client every extractor shares: one session, timeouts, retries.

Retries happen here and nowhere else. A provider supplies two small hooks:
``error_for`` turns an error response into a :class:`ProviderError` carrying
the provider's own message, and ``check`` inspects a 200 body for providers
that report failures inside successful responses.

What one request may cost is bounded here too, whatever the provider does:
its body is streamed and refused once it passes ``max_response_bytes``, as
received or as decompressed (a 1 MB gzip body can expand to a gigabyte),
and the whole request, connect to last byte, must finish within
``request_deadline`` (a per-read timeout alone lets a body trickled one byte
per second run for days). Numbers are measured before they are converted
(:mod:`extractors.records`), and an object with a key twice makes the page
malformed: JSON leaves open which value counts, and two readers of one page
could disagree.
"""
from __future__ import annotations

import email.utils
import heapq
import itertools
import json
import logging
import math
import os
import random
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from extractors.errors import (
    DeadlineExceeded,
    ExtractError,
    MalformedResponseError,
    PaginationError,
    ProviderError,
    ResponseTooLarge,
    TransportError,
)
from extractors.paginators import Paginator
from extractors.records import json_decimal, json_int
from extractors.redaction import mask, redact_url, request_secrets, same_origin
from extractors.text import one_line, safe_text

log = logging.getLogger(__name__)

USER_AGENT = "balance-snapshots/0.1 (+https://example.invalid/balance-snapshots)"

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None


# A whole request, connect to last byte; 64 MiB at ~0.5 MB/s still fits.
DEFAULT_REQUEST_DEADLINE = 120.0
# A body as received and as decompressed: 64 MiB is ~400,000 Hedera
# accounts, hundreds of times the largest page any provider documents.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


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


class DuplicateKeyError(ValueError):
    """An object in a JSON document has the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DuplicateKeyError(f"key {safe_text(twice, 80)!r} appears twice in one object")
    return document


# Python refuses to convert integers of more than this many digits (its
# int_max_str_digits, default 4300 since 3.11): below it, int() is fast.
_INT_DIGITS_GUARD = 4300


def parse_json(body: bytes | bytearray | str) -> Any:
    """Parse JSON keeping every number exact: ints as int, decimals as Decimal.

    A decimal beyond :data:`extractors.records.MAX_INTEGER_DIGITS` (or its
    fraction limit) becomes an :class:`extractors.records.Oversized`, never
    converted; a repeated key raises :class:`DuplicateKeyError`.

    Integers take json's own C conversion (a Python hook per integer would
    make a Hedera page parse about four times slower): Python itself refuses one
    of more than 4300 digits, and then the page is read again with the hook,
    so only that number's record is rejected. Amount readers refuse the
    integers between the bound and 4300 digits.
    """
    limit = sys.get_int_max_str_digits()
    guarded = 0 < limit <= _INT_DIGITS_GUARD
    try:
        return json.loads(body, parse_float=json_decimal, parse_int=None if guarded else json_int,
                          object_pairs_hook=_unique_keys)
    except ValueError as exc:
        if not guarded or "integer string conversion" not in str(exc):
            raise
    return json.loads(body, parse_float=json_decimal, parse_int=json_int, object_pairs_hook=_unique_keys)


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


# --- bounded requests: a deadline for the whole request, a cap on the body ---

_READ_CHUNK = 64 * 1024
_CURRENT = threading.local()  # the Deadline of the request this thread is making


class Deadline:
    """Cuts the connection of one request when its time is up.

    The watchdog shuts the socket down at the deadline, which wakes a read
    blocked in connect, headers or body alike; a per-read timeout cannot,
    since a trickling server keeps every single read short.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.done = False
        self._conn: HTTPConnection | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "Deadline":
        self._outer = getattr(_CURRENT, "deadline", None)
        _CURRENT.deadline = self
        _WATCHDOG.watch(time.monotonic() + self.seconds, self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done = True  # the watchdog drops it without touching the connection
        _CURRENT.deadline = self._outer

    def attach(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            if self.expired:
                raise TimeoutError("request deadline passed")

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Watchdog:
    """One thread that expires every request deadline of the process.

    A timer thread per request would cost a thread start per request (about
    a millisecond on a busy machine, as much as parsing the page). Requests
    end in the order they start, so finished deadlines are dropped from the
    front of the heap as new ones arrive and it stays a few entries long.
    The thread is woken only for a deadline sooner than the one it sleeps
    towards: waking it for every request would hand it the GIL once per
    page, which cost as much as the request itself.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._waking_at = math.inf  # when the thread wakes by itself

    def watch(self, when: float, deadline: Deadline) -> None:
        with self._cond:
            while self._heap and self._heap[0][2].done:
                heapq.heappop(self._heap)
            heapq.heappush(self._heap, (when, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="request-deadlines", daemon=True)
                self._thread.start()
            elif when < self._waking_at:
                self._cond.notify()  # sooner than what the thread sleeps towards

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._waking_at = math.inf
                    self._cond.wait()
                    continue
                when, _, deadline = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._waking_at = when
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            deadline.expire()


_WATCHDOG = _Watchdog()


def _new_watchdog_after_fork() -> None:
    # A forked child (Airflow's task runner) has no watchdog thread, and
    # the parent's lock may have been held at the fork.
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_new_watchdog_after_fork)


def _attach(conn: HTTPConnection) -> None:
    deadline = getattr(_CURRENT, "deadline", None)
    if deadline is not None:
        deadline.attach(conn)


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """An adapter whose connections report to the current :class:`Deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool,
                                                   "https": _WatchedHTTPSPool}


def new_session() -> requests.Session:
    """A session whose requests :func:`send` can bound, ignoring the environment."""
    session = requests.Session()
    # Proxies or netrc credentials from the environment must not leak in.
    session.trust_env = False
    adapter = _WatchedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


_DIGITS = re.compile(r"[0-9]{1,19}")


def read_body(response: requests.Response, max_bytes: int, deadline: Deadline | None = None) -> bytes:
    """The whole body of a streamed response, refused as soon as it passes ``max_bytes``.

    Counted twice, as received and as decompressed; urllib3 decompresses at
    most one chunk ahead, so a gzip bomb is stopped after ``max_bytes`` plus
    one chunk, not after it has expanded. The body is then kept on the
    response (``.content``, ``.json()`` work as usual).
    """
    declared = (response.headers.get("Content-Length") or "").strip()
    if _DIGITS.fullmatch(declared) and int(declared) > max_bytes:
        response.close()
        raise ResponseTooLarge(f"response from {redact_url(response.url)} announces {int(declared)} bytes, more than "
                               f"max_response_bytes = {max_bytes}")
    body = bytearray()
    raw = response.raw
    try:
        for chunk in raw.stream(_READ_CHUNK, decode_content=True):
            body += chunk
            if len(body) > max_bytes or raw.tell() > max_bytes:
                encoded = (response.headers.get("Content-Encoding") or "identity").strip() != "identity"
                how = "once decompressed" if encoded and raw.tell() <= max_bytes else "as received"
                raise ResponseTooLarge(f"response from {redact_url(response.url)} is larger than max_response_bytes = "
                                       f"{max_bytes} ({how}); refused without reading the rest")
            if deadline is not None and deadline.expired:
                raise TimeoutError
    except ResponseTooLarge:
        response.close()
        raise
    except urllib3.exceptions.DecodeError:
        response.close()
        raise MalformedResponseError(f"response from {redact_url(response.url)} does not decompress as its "
                                     f"Content-Encoding says") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        response.close()
        if deadline is not None and deadline.expired:
            raise _deadline_error(deadline, redact_url(response.url)) from None
        if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            raise TransportError(f"ReadTimeout for {redact_url(response.url)}") from None
        raise TransportError(f"connection dropped mid-body for {redact_url(response.url)}") from None
    response._content = bytes(body)
    response._content_consumed = True
    return response._content


def _deadline_error(deadline: Deadline, where: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"request to {where} did not complete within request_deadline = "
                            f"{deadline.seconds:g}s")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: requests and urllib3 nest the socket's error in args and reasons."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue  # None, or a reason given as text (ssl.SSLError.reason)
        seen.add(id(current))
        yield current
        todo += [getattr(current, "reason", None), current.__cause__, current.__context__,
                 *(a for a in current.args if isinstance(a, BaseException))]


def connection_failure(exc: BaseException, url: str, url_key: str = "base_url") -> TransportError:
    """What stopped a request before an answer, named: DNS, refused, TLS, timeout.

    A name that does not resolve or a certificate that does not verify will
    not pass by itself: not retriable, so the run fails at once instead of
    retrying for minutes. Only a temporary resolver failure (``EAI_AGAIN``)
    is retried. The message names the config key the URL came from.
    """
    parts = urlsplit(url)
    where = f"{url_key} {redact_url(f'{parts.scheme}://{parts.netloc}')}"
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, socket.gaierror) or type(cause).__name__ == "NameResolutionError":
            temporary = any(isinstance(c, socket.gaierror) and c.errno == socket.EAI_AGAIN for c in causes)
            return TransportError(f"cannot resolve host {parts.hostname!r} (DNS{', temporary' if temporary else ''}"
                                  f"): check {where}", retriable=temporary)
    for cause in causes:
        if isinstance(cause, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
            detail = next((str(c) for c in causes if type(c).__module__ == "ssl"), "handshake failed")
            return TransportError(f"TLS error talking to {where}: {safe_text(detail, 300)}", retriable=False)
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return TransportError(f"connection refused by {where} (nothing listens on port "
                                  f"{parts.port or (443 if parts.scheme == 'https' else 80)})")
    if any(isinstance(c, requests.exceptions.ConnectTimeout) for c in causes):
        return TransportError(f"timed out connecting to {where} (connect_timeout)")
    if any(isinstance(c, (requests.Timeout, urllib3.exceptions.ReadTimeoutError)) for c in causes):
        return TransportError(f"timed out waiting for {where} to answer (read_timeout)")
    if any(isinstance(c, (ConnectionResetError, BrokenPipeError)) for c in causes):
        return TransportError(f"connection reset by {where}")
    return TransportError(f"{type(exc).__name__} talking to {where}")


def send(session: requests.Session, method: str, url: str, *, deadline: float, max_bytes: int,
         url_key: str = "base_url", **kwargs: Any) -> requests.Response:
    """One request, connect to last byte within ``deadline`` seconds, body within ``max_bytes``.

    Raises :class:`TransportError` when the request does not complete
    (:func:`connection_failure` says why, naming the config key ``url_key``),
    :class:`DeadlineExceeded` when its time is up and
    :class:`ResponseTooLarge` when the body passes the cap.
    """
    with Deadline(deadline) as watch:
        try:
            response = session.request(method, url, stream=True, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if watch.expired:
                raise _deadline_error(watch, redact_url(url)) from None
            raise connection_failure(exc, url, url_key) from None
        except requests.exceptions.ChunkedEncodingError:
            if watch.expired:
                raise _deadline_error(watch, redact_url(url)) from None
            raise TransportError(f"connection dropped mid-body for {redact_url(url)}") from None
        except requests.RequestException as exc:
            # What retrying cannot fix: a URL or header requests refuses to send.
            raise ExtractError(f"cannot send the request to {redact_url(url)}: {type(exc).__name__}") from None
        read_body(response, max_bytes, watch)
    return response


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
        """Yield each page's decoded body, following ``paginator`` to the end."""
        target, query = path, params
        while True:
            data = self.get_json(target, query, headers=headers, json_body=json_body)
            yield data
            paginator.update_state(data)
            if not paginator.has_next:
                return
            target, query = paginator.next_request(target, query)
