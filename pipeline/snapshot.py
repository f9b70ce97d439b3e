"""One snapshot of one source: begin a run, crawl into staging, publish.

The three steps are separate so Airflow can run them as tasks (and run
several crawls, one per shard, between one begin and one publish); the CLI
runs them back to back with :func:`take_snapshot`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from extractors.errors import HistoryUnavailable, NoSnapshotAvailable, SnapshotError
from extractors.records import Rejection
from extractors.registry import provider, stats_of
from loaders import publish as publishing
from loaders import runs
from loaders.budget import RequestBudget
from loaders.staging import StagingWriter
from pipeline import connections
from pipeline.config import SourceConfig

log = logging.getLogger(__name__)

# A provider without history can still serve a run that starts a little
# late (queueing, a retry); beyond this the run is a backfill and refused.
LIVE_GRACE = timedelta(minutes=30)


class RejectedRecordsError(RuntimeError):
    """More records were rejected than the source allows."""


@dataclass(slots=True, frozen=True)
class CrawlResult:
    run_id: int
    shard: int
    status: str
    pages: int
    rows: int
    rejected: int


def build_extractor(source: SourceConfig, credentials=None, conn=None):
    """The source's extractor; with ``conn``, its requests draw on the provider's budget."""
    extractor = provider(source.provider).build(source.settings, credentials, source.retry,
                                                max_pages=source.max_pages)
    budget = request_budget(conn, source) if conn is not None else None
    if budget is not None:
        extractor.client.throttle = budget.acquire
        extractor.budget = budget
    return extractor


def request_budget(conn, source: SourceConfig) -> RequestBudget | None:
    """The budget shared by every crawl of this provider, if it has a rate limit.

    A source's ``rate_limit`` (requests per second) overrides the provider's
    documented default.
    """
    if source.rate_limit is not None:
        rate, burst = source.rate_limit, max(1.0, source.rate_limit)
    elif provider(source.provider).rate_limit is not None:
        rate, burst = provider(source.provider).rate_limit
    else:
        return None
    return RequestBudget(budget=source.provider, rate=rate, burst=burst, like=conn)


def close_extractor(extractor) -> None:
    extractor.client.close()
    budget = getattr(extractor, "budget", None)
    if budget is not None:
        budget.close()


def begin(conn, source: SourceConfig, scheduled_for: datetime, *, dag_run_id: str | None = None,
          now: datetime | None = None) -> int:
    """Open a run for the snapshot due at ``scheduled_for``."""
    if scheduled_for.tzinfo is None:
        raise ValueError("scheduled_for must be timezone-aware")
    if not provider(source.provider).answers_for_past(source.settings):
        now = now or datetime.now(timezone.utc)
        if scheduled_for < now - LIVE_GRACE:
            raise HistoryUnavailable(
                f"{source.name}: {source.provider} only reports current balances; refusing to "
                f"store them as the snapshot for {scheduled_for.isoformat()} (a backfill or a late "
                "rerun of a past interval)"
            )
    for run_id in runs.reap_abandoned(conn, source.name):
        log.warning("%s: run %d was abandoned by a process that stopped; its staging is dropped",
                    source.name, run_id)
    return runs.start_run(conn, source.name, source.provider, scheduled_for,
                          dag_run_id=dag_run_id, shards=source.shards)


def plan_shards(conn, source: SourceConfig, run_id: int, *, credentials=None) -> list[dict]:
    """The shards of this run: one per ``source.shards``, each with its account range."""
    if source.shards == 1:
        return [{"shard": 0, "account_range": None}]
    run = runs.get_run(conn, run_id)
    extractor = build_extractor(source, credentials, conn)
    try:
        ranges = extractor.shard_ranges(run.scheduled_for, source.shards)
    finally:
        close_extractor(extractor)
    return [{"shard": i, "account_range": list(r)} for i, r in enumerate(ranges)]


def crawl(conn, source: SourceConfig, run_id: int, *, shard: int = 0,
          account_range: tuple[str, str] | None = None, credentials=None) -> CrawlResult:
    """Read the snapshot from the provider and stage it; publish nothing."""
    run = runs.get_run(conn, run_id)
    runs.hold(conn, run_id, shard)
    try:
        return _crawl(conn, source, run, shard, account_range, credentials)
    finally:
        if not conn.closed:
            runs.release(conn, run_id, shard)


def _crawl(conn, source: SourceConfig, run: runs.Run, shard: int, account_range,
           credentials) -> CrawlResult:
    run_id = run.run_id
    runs.resume(conn, run_id)
    secrets = credentials.secrets() if credentials else []
    try:
        extractor = build_extractor(source, credentials, conn)
    except Exception as exc:  # e.g. a Connection without the fields the provider needs
        runs.finish(conn, run_id, "failed", error=connections.scrub(f"{type(exc).__name__}: {exc}", secrets))
        raise
    writer = StagingWriter(conn, run_id, shard)
    pages = 0
    warnings: list[str] = []
    try:
        kwargs = {"account_range": tuple(account_range)} if account_range else {}
        for page in extractor.pages(run.scheduled_for, **kwargs):
            if pages == 0:
                recorded = runs.set_snapshot(conn, run_id, page.as_of, page.as_of_raw)
                if recorded != page.as_of_raw:
                    raise SnapshotError(
                        f"shard {shard} read snapshot {page.as_of_raw}, another shard read {recorded}"
                    )
            writer.add(page.rows, page.rejected, page.kind)
            warnings.extend(page.warnings)
            pages += 1
        writer.close()
    except NoSnapshotAvailable as exc:
        writer.abort()
        _progress(conn, run_id, extractor, pages, warnings)
        runs.finish(conn, run_id, "no_snapshot", error=str(exc))
        log.info("%s: %s", source.name, exc)
        return CrawlResult(run_id, shard, "no_snapshot", pages, 0, 0)
    except BaseException as exc:
        raw = getattr(exc, "raw", None)
        writer.abort()
        if raw:
            # The body we could not read is kept, like any rejected record.
            writer.add([], [Rejection(raw=connections.scrub(raw, secrets), reason=str(exc))])
        _progress(conn, run_id, extractor, pages, warnings)
        runs.finish(conn, run_id, "failed", error=connections.scrub(f"{type(exc).__name__}: {exc}", secrets))
        raise
    finally:
        close_extractor(extractor)
    _progress(conn, run_id, extractor, pages, warnings)
    for warning in warnings[:20]:
        log.warning("%s: %s", source.name, warning)
    if writer.rejected > source.max_rejected:
        message = (f"{writer.rejected} record(s) rejected, more than the {source.max_rejected} "
                   f"source {source.name} allows; nothing published (see rejected_records for run {run_id})")
        runs.finish(conn, run_id, "failed", error=message)
        raise RejectedRecordsError(message)
    return CrawlResult(run_id, shard, "staged", pages, writer.rows, writer.rejected)


def _progress(conn, run_id, extractor, pages, warnings) -> None:
    stats = stats_of(extractor)
    runs.add_progress(conn, run_id, pages=pages, requests=stats.requests, retries=stats.retries,
                      warnings=warnings)


def publish(conn, source: SourceConfig, run_id: int) -> publishing.PublishResult:
    """Make the staged snapshot visible, all of it at once."""
    return publishing.publish(conn, run_id, shards=source.shards, max_rejected=source.max_rejected)


def take_snapshot(conn, source: SourceConfig, at: datetime, *, credentials=None) -> dict:
    """begin + crawl + publish in one process (the CLI's ``snapshot`` command)."""
    run_id = begin(conn, source, at)
    runs.hold(conn, run_id)  # one process does it all: it holds the run throughout
    try:
        statuses = [
            crawl(conn, source, run_id, credentials=credentials, **shard).status
            for shard in plan_shards(conn, source, run_id, credentials=credentials)
        ]
        if "no_snapshot" not in statuses:
            publish(conn, source, run_id)
    finally:
        if not conn.closed:
            runs.release(conn, run_id)
    return runs.summary(conn, run_id)
