"""OAuth2 client credentials (RFC 6749 §4.4) as a ``requests`` auth object.

The flow itself is Authlib's (``OAuth2Session``): the token request with
the client's id, secret and scopes in the form (``client_secret_post``),
the token answer and its OAuth errors, the token's expiry. What is added
here is what every request of a run gets (:func:`extractors.transport.send`: a
deadline and a size cap, no redirects, no proxies from the environment),
the counting of token requests among the run's, and the renewal on a 401:
a 401 from the API means the server no longer accepts the token (revoked, a
clock ahead of ours), so the token is fetched again and the request resent
once; a second 401 is returned as is, for the client to report as fatal.
Neither the client secret nor a token is ever written into a message.
"""
from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urljoin

import requests
from authlib.integrations.requests_client import OAuth2Session

from extractors.credentials import require_credentials
from extractors.errors import ExtractError, MalformedResponseError, ProviderError
from extractors.http import RequestStats, error_text, http_error
from extractors.transport import DEFAULT_REQUEST_DEADLINE, new_session, send
from extractors.redaction import redact_url
from extractors.text import safe_text

# A token is renewed this long before it expires, so a request never
# arrives with one that died on the way; at most a quarter of its lifetime,
# so short-lived tokens are still reused.
EXPIRY_MARGIN = 30.0
# A token answer is a few hundred bytes; anything near this is not one.
TOKEN_MAX_BYTES = 1024 * 1024


class _TokenEndpoint(OAuth2Session):
    """Authlib's client, sending its token requests as every request of a run is sent."""

    def __init__(self, *, deadline: float, timeout: tuple[float, float], stats: RequestStats,
                 **kwargs: Any) -> None:
        super().__init__(token_endpoint_auth_method="client_secret_post", **kwargs)
        self.deadline = deadline
        self.timeout = timeout
        self.stats = stats

    def request(self, method: str, url: str, withhold_token: bool = False, auth: Any = None,
                **kwargs: Any) -> requests.Response:
        # Only token requests come here: the API's go through the run's client.
        self.stats.requests += 1
        kwargs.update(timeout=self.timeout, allow_redirects=False)
        kwargs.setdefault("headers", {})["Accept"] = "application/json"
        # A session per fetch: tokens are fetched rarely and nothing is left open.
        with new_session() as session:
            return send(session, method, url, deadline=self.deadline, max_bytes=TOKEN_MAX_BYTES,
                        auth=auth, **kwargs)


class ClientCredentialsAuth(requests.auth.AuthBase):
    """Bearer tokens from a token endpoint, for every request of one client.

    ``granted`` holds the scopes the token endpoint said it granted (its
    ``scope`` answer), or None when it did not say. ``renew_on`` are the
    statuses by which the API refuses a token (401; a v1.x Formance ledger
    answers 403): such an answer renews the token and resends the request once.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str, *,
                 scopes: list[str] | None = None, timeout: tuple[float, float] = (5.0, 30.0),
                 deadline: float = DEFAULT_REQUEST_DEADLINE, renew_on: tuple[int, ...] = (401,)) -> None:
        self.token_url = token_url
        self.renew_on = renew_on
        self.client_id = client_id
        self._secret = client_secret
        self.scopes = list(scopes or [])
        # Token fetches and resends are requests to the provider too; the
        # client using this auth shares its counters here.
        self.stats = RequestStats()
        self.granted: list[str] | None = None
        self._client = _TokenEndpoint(
            client_id=client_id, client_secret=client_secret, scope=" ".join(self.scopes) or None,
            token_endpoint=token_url, grant_type="client_credentials", deadline=deadline,
            timeout=timeout, stats=self.stats)
        # Refused answers become this module's errors before Authlib reads them.
        self._client.register_compliance_hook("access_token_response", self._check_answer)
        self._lock = threading.Lock()

    @property
    def stats(self) -> RequestStats:
        return self._stats

    @stats.setter
    def stats(self, stats: RequestStats) -> None:
        self._stats = stats
        if hasattr(self, "_client"):
            self._client.stats = stats

    def __repr__(self) -> str:
        return f"ClientCredentialsAuth({redact_url(self.token_url)!r}, client_id={self.client_id!r})"

    @classmethod
    def from_credentials(cls, base_url: str, credentials: Any, *, default_token_url: str,
                         scopes: list[str] | None = None, default_scopes: list[str] | None = None,
                         **kwargs: Any) -> "ClientCredentialsAuth":
        """From an Airflow Connection: login = client id, password = secret.

        ``extra`` may hold ``token_url`` (a path is resolved against
        ``base_url`` as a URL reference, so ``/x`` starts at its origin) and
        ``scope`` (space-separated). The scopes asked for are ``scopes``
        when given, else the extra's ``scope``, else ``default_scopes``.
        """
        require_credentials(credentials, "an OAuth2 client", login="the client id",
                            password="the client secret")
        path = credentials.extra.get("token_url") or default_token_url
        token_url = urljoin(base_url.rstrip("/") + "/", path)
        if scopes is None:
            extra_scope = credentials.extra.get("scope")
            scopes = str(extra_scope).split() if extra_scope else default_scopes
        return cls(token_url, credentials.login, credentials.password, scopes=scopes, **kwargs)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        request.register_hook("response", self._retry_once_on_refusal)
        return request

    def token(self) -> str:
        """The current access token, fetched when there is none or it is about to expire."""
        with self._lock:
            token = self._client.token
            if not token or token.is_expired(leeway=self._client.leeway):
                self._fetch()
            return self._client.token["access_token"]

    def _retry_once_on_refusal(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code not in self.renew_on or getattr(response.request, "_token_renewed", False):
            return response
        with self._lock:
            # Only renew if nobody did since this request took its token.
            current = self._client.token["access_token"] if self._client.token else None
            if response.request.headers.get("Authorization") == f"Bearer {current}":
                self._fetch()
            token = self._client.token["access_token"]
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
        where = redact_url(self.token_url)
        try:
            token = self._client.fetch_token()
        except ExtractError:
            raise
        except Exception:
            # The body holds (or should hold) a token: never keep any of it.
            raise MalformedResponseError(f"token endpoint {where} answered 200 without a usable "
                                         "access_token/expires_in") from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            self._client.token = None
            raise MalformedResponseError(f"token endpoint {where} answered 200 without a usable "
                                         "access_token/expires_in")
        lifetime = token.get("expires_in")
        if isinstance(lifetime, (int, float)) and lifetime > 0:
            # Renewed at most a quarter of its lifetime early (Authlib's leeway).
            self._client.leeway = min(EXPIRY_MARGIN, lifetime / 4)
        granted = token.get("scope")
        self.granted = granted.split() if isinstance(granted, str) else None

    def _check_answer(self, response: requests.Response) -> requests.Response:
        if response.status_code != 200:
            raise self._token_error(response)
        return response

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
