"""A small threaded HTTP server for the fakes, with fault injection.

Each fake is a function from :class:`Request` to :class:`Response`. The
server records every request (headers included, so tests can check that no
credential reached a host it should not) and can be told to misbehave:
answer with a status, reset the connection, stall, cut a body short, trickle
it, or send it padded to any size and compressed, without holding it in
memory (a gzip bomb is a few lines).
"""
from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable"}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    raw_query: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes = b""

    def params(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(slots=True)
class Fault:
    """Misbehaviour for the next ``times`` requests whose path starts with ``path``.

    ``kind`` is ``status`` (answer with ``response``), ``reset`` (close the
    connection without answering), ``delay`` (stall ``seconds`` then answer
    normally), ``truncate`` (send half of the real body and hang up),
    ``trickle`` (send the headers, then the body one byte every ``seconds``)
    or ``pad`` (the real body with ``size`` bytes of JSON whitespace after
    its first byte, generated while sending: still the same JSON).

    ``encoding`` (``gzip`` or ``deflate``) compresses a ``pad`` body on the
    fly, sent chunked; ``chunked`` sends an uncompressed one without a
    Content-Length, so only reading it tells its size.
    """

    kind: str
    times: int = 1
    path: str = "/"
    response: Response | None = None
    seconds: float = 0.0
    after: int = 0  # let this many matching requests through first
    size: int = 0
    encoding: str = ""
    chunked: bool = False


_NUMBER = re.compile(r'"@@num:([^"@]+)@@"')


def dumps(value: Any) -> bytes:
    """JSON with Decimals written as bare numbers, exactly as providers send them."""
    text = json.dumps(value, default=_number_token, separators=(",", ":"))
    return _NUMBER.sub(r"\1", text).encode()


def _number_token(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"@@num:{value}@@"
    raise TypeError(type(value).__name__)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status=status, body=dumps(value), headers=dict(headers or {}))


_PAD_PART = b" " * (1024 * 1024)


def _padded(body: bytes, size: int):
    """``body`` with ``size`` spaces after its first byte, in parts of at most 1 MiB."""
    yield body[:1]
    while size > 0:
        yield _PAD_PART[:size]
        size -= len(_PAD_PART)
    yield body[1:]


class FakeServer:
    """Serves ``app`` on 127.0.0.1 in background threads."""

    def __init__(self, app: Callable[[Request], Response], *, port: int = 0, keep_requests: int = 10_000):
        self.app = app
        self.faults: deque[Fault] = deque()
        self.requests: deque[Request] = deque(maxlen=keep_requests)
        self.request_count = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"fake:{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.request_count = 0

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if path.startswith(fault.path) and fault.times > 0:
                    if fault.after > 0:
                        fault.after -= 1
                        return None
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Without this every keep-alive response waits ~40 ms for a
                # delayed ACK, and benchmarks would measure the fake.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(
                    method=self.command,
                    path=parts.path,
                    raw_query=parts.query,
                    query=parse_qsl(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                with server._lock:
                    server.requests.append(request)
                    server.request_count += 1
                fault = server._take_fault(parts.path)
                if fault is not None and fault.kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                if fault is not None and fault.kind == "status":
                    response = fault.response or Response(status=500)
                else:
                    try:
                        response = server.app(request)
                    except Exception as exc:  # a bug in a fake must show, not hang the client
                        response = json_response({"error": f"fake crashed: {exc!r}"}, status=500)
                if fault is not None and fault.kind == "trickle":
                    self._trickle(response, fault.seconds)
                elif fault is not None and fault.kind == "pad":
                    self._pad(response, fault)
                else:
                    self._write(response, truncate=fault is not None and fault.kind == "truncate")

            def _write(self, response: Response, truncate: bool = False) -> None:
                reason = REASONS.get(response.status, "Status")
                head = [f"HTTP/1.1 {response.status} {reason}",
                        f"Content-Type: {response.content_type}",
                        f"Content-Length: {len(response.body)}"]
                head += [f"{k}: {v}" for k, v in response.headers.items()]
                body = response.body[: len(response.body) // 2] if truncate else response.body
                # Headers and body in one send.
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                if truncate:
                    self.close_connection = True

            def _head(self, response: Response, extra: list[str]) -> None:
                reason = REASONS.get(response.status, "Status")
                head = [f"HTTP/1.1 {response.status} {reason}",
                        f"Content-Type: {response.content_type}"] + extra
                head += [f"{k}: {v}" for k, v in response.headers.items()]
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
                self.wfile.flush()

            def _trickle(self, response: Response, seconds: float) -> None:
                self.close_connection = True
                self._head(response, [f"Content-Length: {len(response.body)}"])
                try:
                    for i in range(len(response.body)):
                        self.wfile.write(response.body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(seconds)
                except OSError:  # the client gave up: what the fault is for
                    pass

            def _pad(self, response: Response, fault: Fault) -> None:
                # Closed after the answer, and said so: a client that reused the
                # connection would race the close and see a reset no server sent.
                self.close_connection = True
                body = response.body
                parts = _padded(body, fault.size)
                try:
                    if fault.encoding:
                        wbits = {"gzip": 31, "deflate": 15}[fault.encoding]
                        packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
                        self._head(response, [f"Content-Encoding: {fault.encoding}",
                                              "Transfer-Encoding: chunked", "Connection: close"])
                        for part in parts:
                            self._chunk(packer.compress(part))
                        self._chunk(packer.flush())
                        self._last_chunk()
                    elif fault.chunked:
                        self._head(response, ["Transfer-Encoding: chunked", "Connection: close"])
                        for part in parts:
                            self._chunk(part)
                        self._last_chunk()
                    else:
                        self._head(response, [f"Content-Length: {len(body) + fault.size}", "Connection: close"])
                        for part in parts:
                            self.wfile.write(part)
                    self.wfile.flush()
                except OSError:  # the client refused the rest: what the fault is for
                    pass

            def _chunk(self, data: bytes) -> None:
                # An empty chunk would end the body: only the last one may be.
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            def _last_chunk(self) -> None:
                self.wfile.write(b"0\r\n\r\n")

        return Handler
