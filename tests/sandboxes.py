"""Every provider's sandbox as a live source, for the suites that cover them all.

A test asks for ``live(provider)`` and gets the sandbox's demo data served on
127.0.0.1, the source config that points at it, the sandbox credentials
(installed as an ``AIRFLOW_CONN_<ID>`` variable, as an operator would) and
the secrets that must never show up anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from extractors import registry
from extractors.credentials import Credentials
from pipeline import connections
from pipeline.config import SourceConfig, parse_source
from sandbox.apps import sandbox
from sandbox.server import FakeServer

# Every provider: one without a sandbox fails test_dags' registry test, not silently skipped.
PROVIDERS = registry.names()
# Headers that carry credentials or proofs of them.
SECRET_HEADERS = ("authorization", "x-api-key", "x-api-sign", "x-api-signature")


@dataclass
class Live:
    provider: str
    server: FakeServer
    source: SourceConfig
    keys: dict[str, Any]
    credentials: Credentials | None

    def secrets(self) -> set[str]:
        """The configured secrets plus every credential the fake was sent so far."""
        found = set(self.credentials.secrets()) if self.credentials else set()
        for request in list(self.server.requests):
            for name in SECRET_HEADERS:
                value = request.header(name)
                if value:
                    found.add(value)
                    found.add(value.split(" ", 1)[-1])  # the token without "Bearer "
        return {s for s in found if len(s) >= 6}


def now() -> datetime:
    return datetime.now(timezone.utc)


def source_keys(provider: str, url: str, **overrides) -> dict[str, Any]:
    """The sandbox's demo source keys, tuned for tests: fast backoff, no pacing."""
    keys = dict(sandbox(provider).demo_source(url))
    keys.update(backoff_base=0.01, rate_limit=1000, task_retries=0)
    keys.update(overrides)
    return keys


def install_connection(provider: str) -> Credentials | None:
    """Put the sandbox's Connection in the environment; return its credentials."""
    demo = sandbox(provider).DEMO_CONNECTION
    if demo is None:
        return None
    conn_id, uri = demo
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = uri
    return connections.credentials(conn_id)


def demo_app(provider: str):
    """The sandbox's demo app, without its own request-rate limit if it has one.

    With ``rate_limit`` lifted for speed the pipeline would trip a fake's
    limit (BitFront's 3 per second); a sandbox that enforces one keeps it in
    ``limits``, and pacing against it is tested in the provider's own file.
    """
    app = sandbox(provider).demo_app()
    if hasattr(app, "limits"):
        app.limits = ()
    return app


def start(provider: str, serve, *, app=None, name: str | None = None, **overrides) -> Live:
    server = serve(app if app is not None else demo_app(provider))
    keys = source_keys(provider, server.url, **overrides)
    credentials = install_connection(provider)
    source = parse_source(name or f"{provider}_live", dict(keys))
    return Live(provider, server, source, keys, credentials)
