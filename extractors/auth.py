"""OAuth2 client credentials (RFC 6749 §4.4) as a ``requests`` auth object.

The access token is fetched once and reused until shortly before it
expires. A 401 from the API means the server no longer accepts it (revoked,
a clock ahead of ours): the token is fetched again and the request resent
once; a second 401 is returned as is, for the client to report as fatal.
Neither the client secret nor a token is ever written into a message.
"""
from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import urljoin

import requests

from extractors.credentials import require_credentials
from extractors.errors import MalformedResponseError, ProviderError
from extractors.http import (
    DEFAULT_REQUEST_DEADLINE,
    RequestStats,
    error_text,
    http_error,
    new_session,
    send,
)
from extractors.redaction import redact_url
from extractors.text import safe_text

# A token is renewed this long before it expires, so a request never
# arrives with one that died on the way; at most a quarter of its lifetime,
# so short-lived tokens are still reused.
EXPIRY_MARGIN = 30.0
# A token answer is a few hundred bytes; anything near this is not one.
TOKEN_MAX_BYTES = 1024 * 1024


class ClientCredentialsAuth(requests.auth.AuthBase):
    """Bearer tokens from a token endpoint, for every request of one client."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, *, scope: str | None = None,
                 timeout: tuple[float, float] = (5.0, 30.0),
                 deadline: float = DEFAULT_REQUEST_DEADLINE) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.timeout = timeout
        self.deadline = deadline
        # Token fetches and resends are requests to the provider too; the
        # client using this auth shares its counters here.
        self.stats = RequestStats()
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClientCredentialsAuth({redact_url(self.token_url)!r}, client_id={self.client_id!r})"

    @classmethod
    def from_credentials(cls, base_url: str, credentials: Any, *, default_token_url: str,
                         timeout: tuple[float, float] = (5.0, 30.0)) -> "ClientCredentialsAuth":
        """From an Airflow Connection: login = client id, password = secret.

        ``extra`` may hold ``token_url`` (a path is resolved against
        ``base_url`` as a URL reference, so ``/x`` starts at its origin)
        and ``scope``.
        """
        require_credentials(credentials, "an OAuth2 client", login="the client id",
                            password="the client secret")
        path = credentials.extra.get("token_url") or default_token_url
        token_url = urljoin(base_url.rstrip("/") + "/", path)
        return cls(token_url, credentials.login, credentials.password,
                   scope=credentials.extra.get("scope") or None, timeout=timeout)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        request.register_hook("response", self._retry_once_on_401)
        return request

    def token(self) -> str:
        """The current access token, fetched when there is none or it is about to expire."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._fetch()
            return self._token

    def _retry_once_on_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401 or getattr(response.request, "_token_renewed", False):
            return response
        with self._lock:
            # Only renew if nobody did since this request took its token.
            if response.request.headers.get("Authorization") == f"Bearer {self._token}":
                self._fetch()
            token = self._token
        # The refusal's body is not read: it could be any size, and a
        # connection closed unread is simply not reused.
        response.close()
        retry = response.request.copy()
        retry.headers["Authorization"] = f"Bearer {token}"
        retry._token_renewed = True  # type: ignore[attr-defined]
        self.stats.requests += 1
        renewed = response.connection.send(retry, **kwargs)
        renewed.history.append(response)
        renewed.request = retry
        return renewed

    def _fetch(self) -> None:
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self._secret}
        if self.scope:
            form["scope"] = self.scope
        where = redact_url(self.token_url)
        self.stats.requests += 1
        # A session per fetch: tokens are fetched rarely and nothing is left open.
        with new_session() as session:
            response = send(session, "POST", self.token_url, deadline=self.deadline,
                            max_bytes=TOKEN_MAX_BYTES, data=form, timeout=self.timeout,
                            allow_redirects=False, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise self._token_error(response)
        try:
            body = response.json()
            token, lifetime = body["access_token"], body.get("expires_in")
            if not isinstance(token, str) or not token:
                raise TypeError
            lifetime = None if lifetime is None else float(lifetime)
        except (ValueError, KeyError, TypeError):
            # The body holds (or should hold) a token: never keep any of it.
            raise MalformedResponseError(f"token endpoint {where} answered 200 without a usable "
                                         "access_token/expires_in") from None
        now = time.monotonic()
        self._token = token
        if lifetime is None:
            self._renew_at = float("inf")  # no expiry announced: renewed only on a 401
        else:
            self._renew_at = now + lifetime - min(EXPIRY_MARGIN, lifetime / 4)

    def _token_error(self, response: requests.Response) -> ProviderError:
        try:
            body = response.json()
            code = str(body.get("error") or "") or None
            text = " - ".join(str(body[k]) for k in ("error", "error_description") if body.get(k))
        except (ValueError, AttributeError):
            code, text = None, ""
        # Masked before it is cut: half a secret is still a leak.
        text = (text or error_text(response, limit=len(self._secret) + 1000)).replace(self._secret, "***")
        return http_error(response, f"token endpoint refused client {self.client_id!r}: "
                                    f"{safe_text(text, 300)}", code)
