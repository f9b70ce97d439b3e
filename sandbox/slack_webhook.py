"""A fake Slack incoming webhook, to receive the alerts of ``[alerts] slack_conn_id``.

Answers as Slack's incoming webhooks do (docs.slack.dev "Sending messages
using incoming webhooks", and the error strings of the changelog
"Improving error conditions for Incoming Webhooks", 2016-05-17): ``POST``
of a JSON message to the webhook's secret path; ``200 ok`` (text/html) for
a message with ``text`` or ``blocks``, ``400 invalid_payload`` for a body
that is not a JSON object, ``400 no_text`` for one with neither,
``404 no_service`` for a path it does not know (a revoked or mistyped
webhook) and ``410 channel_is_archived`` once :attr:`archived` is set.
Keeps every message it took, and the raw requests (through
:class:`~sandbox.server.FakeServer`), so a test can look for a leaked
secret in what was sent.
"""
from __future__ import annotations

import json
import secrets

from sandbox.server import Request, Response


def _text(status: int, body: str) -> Response:
    return Response(status=status, body=body.encode(), content_type="text/html")


class SlackWebhook:
    """One incoming webhook at ``/services/<team>/<bot>/<secret>``."""

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or secrets.token_urlsafe(18)
        self.path = f"/services/T0SANDBOX/B0SANDBOX/{self.secret}"
        self.messages: list[dict] = []
        self.archived = False

    def url(self, base: str) -> str:
        """The webhook URL a Slack app shows, at a server serving this fake."""
        return base + self.path

    def connection(self, base: str) -> str:
        """``AIRFLOW_CONN_<ID>`` of a ``slackwebhook`` Connection whose password is the whole URL."""
        return json.dumps({"conn_type": "slackwebhook", "password": self.url(base)})

    def __call__(self, request: Request) -> Response:
        if request.method != "POST" or request.path != self.path:
            return _text(404, "no_service")
        try:
            message = json.loads(request.body)
        except ValueError:
            return _text(400, "invalid_payload")
        if not isinstance(message, dict):
            return _text(400, "invalid_payload")
        if not message.get("text") and not message.get("blocks"):
            return _text(400, "no_text")
        if self.archived:
            return _text(410, "channel_is_archived")
        self.messages.append(message)
        return _text(200, "ok")
