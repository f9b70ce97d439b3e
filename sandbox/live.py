"""Moving sandboxes for ``scripts/demo --serve``: books that change every minute.

The demo's sandboxes hold still, which is what their tests want; a live
dashboard needs balances that change from run to run and a break that
appears and resolves. Each sandbox module's ``live_app()`` wraps its demo
fake in a :class:`MovingBook` that, before answering a request, brings the
book up to the current minute. What a book holds follows from the minute
alone, so every run of a minute sees the same balances. This module holds
what the books share: the clock, the story below, and the source keys the
live stack schedules.

The story the books tell: the Hedera treasury (0.0.1234) and the Formance
ledger's ``treasury:hedera`` move together every third minute. The ledger
books a move at once; the mirror node (answering slowly, a second per page)
is usually crawled after it, so for a moment the newest ledger snapshot
meets the previous mirror snapshot: the pair check opens a mismatch, and
resolves it when the mirror's snapshot of the same minute lands.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from sandbox.server import Request, Response

MINUTE = 60
HISTORY_MINUTES = 24 * 60  # snapshots the live mirror keeps answering for
TREASURY_STEP = 250 * 10**8  # 250 HBAR in tinybars


def minute_now() -> int:
    """The current minute, as minutes since the epoch."""
    return int(time.time()) // MINUTE


def treasury_move(minute: int) -> int:
    """What the treasury holds above its base at ``minute``: changes every third minute."""
    return (minute // 3) % 7 * TREASURY_STEP


class MovingBook:
    """Calls ``advance(minute)`` before each request; one request at a time."""

    def __init__(self, app: Callable[[Request], Response], clock: Callable[[], int] = minute_now):
        self.app = app
        self.clock = clock
        self._lock = threading.Lock()
        self._minute: int | None = None

    def __call__(self, request: Request) -> Response:
        with self._lock:
            minute = self.clock()
            if minute != self._minute:
                self.advance(minute, self._minute)
                self._minute = minute
            return self.app(request)

    def advance(self, minute: int, previous: int | None) -> None:
        raise NotImplementedError


def live_app(name: str) -> MovingBook:
    """The moving data set of a provider's sandbox: its module's ``live_app()``."""
    from sandbox import apps

    return apps.sandbox(name).live_app()


def live_source(name: str, url: str, *, schedule: str = "* * * * *", shards: int = 3) -> dict:
    """The live stack's ``[sources.<name>]`` keys: the sandbox's demo source, scheduled every minute.

    A shardable provider is crawled in ``shards`` shards, so the dashboard
    shows shards overlapping; a sandbox's ``LIVE_KEYS`` (when it has them)
    are its own adjustments for the live stack.
    """
    from extractors import registry
    from sandbox import apps

    module = apps.sandbox(name)
    keys = module.demo_source(url)
    keys["schedule"] = schedule
    keys["task_retries"] = 1
    keys["task_retry_delay"] = 5
    if registry.provider(name).shardable:
        keys["shards"] = shards
    keys.update(getattr(module, "LIVE_KEYS", {}))
    return keys


def start_of_minute(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(second=0, microsecond=0) - timedelta(minutes=1)
