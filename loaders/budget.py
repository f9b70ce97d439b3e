"""A request budget shared by every process that calls one provider.

A token bucket kept in one PostgreSQL row per budget: each request takes a
token in a single UPDATE, and a caller that finds the bucket empty sleeps
for the deficit. Shards, parallel sources and manual runs of one provider
all draw on the same row, so sharding never exceeds the provider's
documented rate. Airflow pools bound how many crawls run at once; this
bounds how fast they go together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from loaders.db import reconnect_like


@dataclass(slots=True)
class RequestBudget:
    budget: str
    rate: float  # tokens per second
    burst: float  # bucket size
    like: object  # a connection to the balances database to copy
    waited: float = 0.0
    _conn: object = None

    def acquire(self) -> None:
        """Take one token, sleeping first if the bucket is empty."""
        if self._conn is None:
            # Its own autocommit connection: the crawl's connection holds a
            # staging transaction, and a lock held there would serialise shards.
            self._conn = reconnect_like(self.like, application_name="balances-budget")
            self._conn.autocommit = True
        with self._conn.cursor() as cur:
            # Tokens may go negative: that is a reservation, and the caller
            # waits until the bucket would have refilled to zero.
            cur.execute(
                """
                INSERT INTO request_budgets AS b (budget, tokens, updated_at)
                VALUES (%(budget)s, %(burst)s - 1, clock_timestamp())
                ON CONFLICT (budget) DO UPDATE
                   SET tokens = least(%(burst)s,
                                      b.tokens + extract(epoch FROM clock_timestamp() - b.updated_at)
                                                 * %(rate)s) - 1,
                       updated_at = clock_timestamp()
                RETURNING tokens
                """,
                {"budget": self.budget, "burst": self.burst, "rate": self.rate},
            )
            tokens = float(cur.fetchone()[0])
        if tokens < 0:
            wait = -tokens / self.rate
            self.waited += wait
            time.sleep(wait)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
