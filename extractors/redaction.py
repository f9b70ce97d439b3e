"""Redaction of URLs before they reach a log line or an error message."""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from extractors.text import safe_text

_SENSITIVE = re.compile(r"(key|token|secret|sign|signature|password|auth|credential)", re.I)


def redact_url(url: str) -> str:
    """Mask user info and the values of query parameters that look secret.

    The query is rewritten textually, not decoded and re-encoded, so the
    redacted URL shows exactly what was sent apart from the masked values.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    if parts.query:
        pairs = []
        for pair in parts.query.split("&"):
            name, sep, value = pair.partition("=")
            pairs.append(f"{name}=***" if sep and _SENSITIVE.search(name) else pair)
        query = "&".join(pairs)
    else:
        query = parts.query
    # URLs partly come from providers (next links): safe to raise and store.
    return safe_text(urlunsplit((parts.scheme, netloc, parts.path, query, "")))


def same_origin(a: str, b: str) -> bool:
    """True when both URLs have the same scheme, host and port."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme.lower(), pa.hostname, _port(pa)) == (pb.scheme.lower(), pb.hostname, _port(pb))


def _port(parts) -> int | None:
    if parts.port is not None:
        return parts.port
    return {"http": 80, "https": 443}.get(parts.scheme.lower())


def request_secrets(request) -> list[str]:
    """The credential values a sent request carried: sensitive headers and form fields.

    A provider that echoes the request back in its error message (some
    gateways do) must not get our key, token or signature into an error.
    """
    found: list[str] = []
    for name, value in (request.headers or {}).items():
        if _SENSITIVE.search(name) and value:
            found += [value, value.split(" ", 1)[-1]]  # also the token without "Bearer "
    body = request.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and "=" in body:
        found += [value for name, value in parse_qsl(body) if _SENSITIVE.search(name) and value]
    return [secret for secret in found if len(secret) >= 4]


def mask(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
