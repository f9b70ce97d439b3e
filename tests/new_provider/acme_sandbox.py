"""A fake of the Acme custody API (``GET /v1/holdings``), for ``python -m sandbox acme`` and the demo."""
from __future__ import annotations

from datetime import datetime, timezone

from sandbox.live import MovingBook, minute_now
from sandbox.server import Request, Response, json_response


class AcmeCustody:
    def __init__(self, holdings: list[dict]) -> None:
        self.holdings = holdings

    def __call__(self, request: Request) -> Response:
        if request.path != "/v1/holdings":
            return json_response({"error": "not found"}, status=404)
        as_of = datetime.now(timezone.utc).replace(microsecond=0)
        return json_response({"as_of": as_of.strftime("%Y-%m-%dT%H:%M:%SZ"), "holdings": self.holdings})


def demo_app() -> AcmeCustody:
    return AcmeCustody([{"account": "vault-1", "asset": "USD", "amount": "1250.50"},
                        {"account": "vault-1", "asset": "EUR", "amount": "99.99"},
                        {"account": "vault-2", "asset": "USD", "amount": "0.01"}])


def demo_source(url: str) -> dict:
    return {"provider": "acme", "base_url": url}


DEMO_CONNECTION = None


class LiveAcme(MovingBook):
    def __init__(self, clock=minute_now):
        super().__init__(demo_app(), clock)

    def advance(self, minute: int, previous: int | None) -> None:
        self.app.holdings[0]["amount"] = f"{1250 + minute % 10}.50"


def live_app() -> LiveAcme:
    return LiveAcme()
