"""One bounded request: a deadline for the whole of it, a cap on its body, its failure named.

A per-read timeout alone lets a body trickled one byte per second run for
days, and a 1 MB gzip body can expand to a gigabyte. So the body is
streamed and refused once it passes ``max_response_bytes``, as received or
as decompressed, and the whole request, connect to last byte, must finish
within ``request_deadline``: one watchdog thread shuts the socket down at
the deadline. A request that does not complete says why (DNS, refused,
TLS, timeout). Retrying is not decided here: :mod:`extractors.http` does it.
"""
from __future__ import annotations

import heapq
import http.client
import itertools
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.cookies import extract_cookies_to_jar
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.url import _encode_target

from extractors.errors import (DeadlineExceeded, ExtractError, MalformedResponseError, ResponseTooLarge,
                               TransportError)
from extractors.redaction import redact_url
from extractors.text import safe_text

# A whole request, connect to last byte; 64 MiB at ~0.5 MB/s still fits.
DEFAULT_REQUEST_DEADLINE = 120.0
# A body as received and as decompressed: 64 MiB is ~400,000 Hedera
# accounts, hundreds of times the largest page any provider documents.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


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


@dataclass(slots=True)
class _Ahead:
    """A GET written ahead of its turn (:func:`send_ahead`), on a connection held out of its pool."""

    key: tuple  # what the request was: send() reads it only for the very same one
    prepared: requests.PreparedRequest
    pool: HTTPConnectionPool
    conn: HTTPConnection

    def drop(self) -> None:
        """Not wanted after all (the crawl stopped): its answer is never read, so its connection goes."""
        self.conn.close()
        self.pool._put_conn(self.conn)


class _Session(requests.Session):
    """A ``requests.Session`` that may hold one request sent ahead (:func:`send_ahead`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ahead: _Ahead | None = None
        self.pools: dict[tuple, HTTPConnectionPool] = {}  # by origin, for send_ahead

    def drop_ahead(self) -> None:
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.drop()

    def close(self) -> None:
        self.drop_ahead()
        self.pools.clear()
        super().close()


def new_session() -> requests.Session:
    """A session whose requests :func:`send` can bound, ignoring the environment."""
    session = _Session()
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


# What a session holds by default (Session.__init__), and what new_session() sets.
_PLAIN_HOOKS = {"response": []}


def _plain_request(session: requests.Session, method: str, url: str, params: Any = None, headers: Any = None,
                   json: Any = None, auth: Any = None, **kwargs: Any) -> requests.PreparedRequest | None:
    """The request ``session.request`` would send for a GET that brings nothing of its own; None otherwise.

    Every page of a crawl is such a request, and ``Session.request`` spends
    about as long merging settings there are none of (cookies, hooks,
    proxies, the environment, the request's own headers and auth; requests
    2.34 checks several of them against runtime protocols) as the adapter,
    urllib3 and ``http.client`` spend sending it. This prepares it as it
    would: the method, the URL with its params, the session's headers
    validated, credentials in the URL. Any other request, or a session with
    settings of its own beyond headers, takes ``session.request``.
    """
    if (method != "GET" or headers is not None or json is not None or auth is not None or session.auth is not None
            or session.trust_env or session.params or session.proxies or session.cookies
            or session.hooks != _PLAIN_HOOKS or None in session.headers.values()
            or kwargs.keys() - {"timeout", "allow_redirects"} or kwargs.get("allow_redirects", True)):
        return None
    prepared = requests.PreparedRequest()
    prepared.prepare_method(method)
    prepared.prepare_url(url, params)
    prepared.prepare_headers(session.headers)
    prepared.prepare_body({}, None, None)
    prepared.prepare_auth(None, url)
    prepared.prepare_hooks({})
    return prepared


def _plain_get(session: requests.Session, method: str, url: str, **kwargs: Any) -> requests.Response | None:
    """``session.request(method, url, stream=True, ...)`` for a plain GET (:func:`_plain_request`); None otherwise.

    The prepared request goes to the same adapter, which sends it and builds
    the response, raising the same exceptions. Cookies a response sets are
    kept on the session as ``Session.send`` keeps them. Redirects are never
    followed here, so a redirect's body is read within ``max_bytes`` like
    any other (``Session.send`` read it whole, to prepare the request it
    would have followed with).
    """
    prepared = _plain_request(session, method, url, **kwargs)
    if prepared is None:
        return None
    adapter = session.get_adapter(prepared.url)
    response = adapter.send(prepared, stream=True, timeout=kwargs.get("timeout"), verify=session.verify,
                            cert=session.cert, proxies={})
    return _kept_cookies(session, prepared, response)


def _kept_cookies(session: requests.Session, prepared: requests.PreparedRequest,
                  response: requests.Response) -> requests.Response:
    """``response``, its cookies (if it sets any) kept on the session as ``Session.send`` keeps them."""
    if "Set-Cookie" in response.headers or "Set-Cookie2" in response.headers:
        extract_cookies_to_jar(session.cookies, prepared, response.raw)
    return response


def _ahead_key(method: str, url: str, kwargs: dict) -> tuple:
    params = kwargs.get("params")
    return (method, url, tuple(params) if isinstance(params, list) else params, kwargs.get("timeout"),
            kwargs.get("headers"), kwargs.get("json"), kwargs.get("auth"), kwargs.get("allow_redirects"))


def send_ahead(session: requests.Session, method: str, url: str, **kwargs: Any) -> bool:
    """Write a plain GET now, on the session's idle keep-alive connection; :func:`send` reads its answer later.

    A crawl knows the next page's link as soon as a page is decoded, and
    then spends as long turning the page into rows as the server spends
    answering the next request: sent here, the two overlap, with no thread.
    :func:`send`, called afterwards with the very same request, does not
    write it again: it reads the answer from that connection under its own
    deadline, body cap and error mapping, as the adapter would have.
    Other requests meanwhile (a crawl looking up a token while it reads a
    page) take other connections from the pool.

    Only a plain GET (:func:`_plain_request`) on a session from
    :func:`new_session` whose connection to the origin is open and idle is
    sent ahead; anything else, or any failure here, returns False and
    leaves the request to :func:`send`, which sends it as usual. One
    request at most is ahead; one not wanted after all (the crawl stopped)
    is never read, and its connection is closed.
    """
    if not isinstance(session, _Session):
        return False
    session.drop_ahead()
    try:
        prepared = _plain_request(session, method, url, **kwargs)
        if prepared is None:
            return False
        parts = urlsplit(prepared.url)
        origin = (parts.scheme, parts.netloc, session.verify, session.cert)
        pool = session.pools.get(origin)
        if pool is None or pool.pool is None:  # (None once the pool manager closed it)
            adapter = session.get_adapter(prepared.url)
            pool = adapter.get_connection_with_tls_context(prepared, session.verify, proxies={}, cert=session.cert)
            if not isinstance(pool, (_WatchedHTTPPool, _WatchedHTTPSPool)):
                return False
            session.pools[origin] = pool
        path = _encode_target(prepared.path_url)
        conn = pool._get_conn()
    except Exception:  # the request goes out through send(), which names what is wrong with it
        return False
    try:
        if conn.sock is None or not conn.is_connected:
            pool._put_conn(conn)
            return False  # connecting is send()'s, with its timeouts and messages
        conn.request(method, path, body=None, headers=prepared.headers, chunked=False, preload_content=False,
                      decode_content=False, enforce_content_length=True)
    except Exception:
        conn.close()  # whatever was written, send() starts afresh on a new connection
        pool._put_conn(conn)
        return False
    session.ahead = _Ahead(_ahead_key(method, url, kwargs), prepared, pool, conn)
    return True


def _read_ahead(session: requests.Session, method: str, url: str, kwargs: dict) -> requests.Response | None:
    """The answer to the request :func:`send_ahead` wrote, if this is that request; None otherwise.

    Read as urllib3 and the adapter read any answer (the connection goes
    back to its pool once the body is read), and failing as they fail: a
    timeout as ``requests.ReadTimeout``, a dropped connection as
    ``requests.ConnectionError``.
    """
    ahead = getattr(session, "ahead", None)
    if ahead is None or ahead.key != _ahead_key(method, url, kwargs):
        return None
    session.ahead = None
    conn, pool = ahead.conn, ahead.pool
    timeout = kwargs.get("timeout")
    read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout
    try:
        _attach(conn)
        conn.timeout = read_timeout
        raw = conn.getresponse()
    except BaseException as exc:
        ahead.drop()
        if isinstance(exc, TimeoutError):
            raise requests.ReadTimeout(urllib3.exceptions.ReadTimeoutError(
                pool, ahead.prepared.path_url, f"Read timed out. (read timeout={read_timeout})")) from None
        if isinstance(exc, (OSError, http.client.HTTPException)):
            raise requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", exc)) from None
        raise
    raw._connection, raw._pool = conn, pool  # back to the pool once read, as urllib3 does
    response = session.get_adapter(ahead.prepared.url).build_response(ahead.prepared, raw)
    return _kept_cookies(session, ahead.prepared, response)


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
            response = _read_ahead(session, method, url, kwargs)
            if response is None:  # (not "or": a Response of an error status is false)
                response = _plain_get(session, method, url, **kwargs)
            if response is None:
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
