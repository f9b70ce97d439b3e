"""One snapshot of one source: begin a run, crawl into staging, publish.

The three steps are separate so Airflow can run them as tasks (and run
several crawls, one per shard, between one begin and one publish); the CLI
runs them back to back with :func:`take_snapshot`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from extractors.errors import HistoryUnavailable, NoSnapshotAvailable, SnapshotError, SnapshotInFuture
from extractors.records import PageKind, Rejection
from extractors.text import human_duration, one_line, safe_text
from extractors.provider import Throttle, close, stats
from loaders import publish as publishing
from loaders import rejections, runs, staging
from loaders.budget import RequestBudget
from loaders.leases import SNAPSHOT
from loaders.db import transaction
from loaders.rejections import RejectedRecordsError
from loaders.runs import RunStatus
from loaders.staging import StagingWriter
from pipeline import connections
from pipeline.config import SourceConfig, load_config, source_from_record, utc_time
from pipeline.progress import Progress

log = logging.getLogger(__name__)

# A provider without history can still serve a run that starts a little
# late (queueing, a retry); beyond this the run is a backfill and refused.
LIVE_GRACE = timedelta(minutes=30)


# A crawl's outcome when its rows wait in staging: not a run status (the
# run stays running until publish).
STAGED = "staged"


class SnapshotTooFar(SnapshotError):
    """The provider's snapshot is further from the time asked than the source allows."""


def check_snapshot_age(source: SourceConfig, scheduled_for: datetime, as_of: datetime) -> None:
    """Refuse a snapshot more than ``source.max_snapshot_age`` away from the time asked.

    Called before a snapshot time is recorded on a run (``runs.set_snapshot``).
    Hedera answers ``timestamp=lte:T`` with its latest snapshot at or before T
    however old it is: a mirror node missing recent history would pass a 1970
    snapshot off as today's. A provider's clock far ahead is refused alike.
    """
    limit = timedelta(seconds=source.max_snapshot_age)
    distance = scheduled_for - as_of
    if abs(distance) > limit:
        side = "before" if distance > timedelta(0) else "after"
        raise SnapshotTooFar(
            f"{source.name}: the provider's snapshot {as_of.isoformat()} is {human_duration(abs(distance))} {side} "
            f"the time asked ({scheduled_for.isoformat()}), more than max_snapshot_age ({human_duration(limit)}); "
            "refusing to store it"
        )


@dataclass(slots=True, frozen=True)
class CrawlResult:
    """What one crawl did: ``status`` is :data:`STAGED`, or the run's status if it ended the run."""

    run_id: int
    shard: int
    status: str
    pages: int
    rows: int
    rejected: int


def build_extractor(source: SourceConfig, credentials=None, conn=None):
    """The source's extractor; with ``conn``, its requests draw on the provider's budget."""
    budget = request_budget(conn, source) if conn is not None else None
    throttle = Throttle(budget.acquire, budget.close) if budget is not None else None
    return source.contract.open(source.settings, credentials, source.retry,
                                max_pages=source.max_pages, throttle=throttle)


def request_budget(conn, source: SourceConfig) -> RequestBudget | None:
    """The budget shared by every crawl of this provider, if it has a rate limit.

    A source's ``rate_limit`` (requests per second) overrides the provider's
    documented default; a provider may name one budget per service its
    sources reach (``Provider.budget``).
    """
    if source.rate_limit is not None:
        rate, burst = source.rate_limit, max(1.0, source.rate_limit)
    elif source.contract.rate_limit is not None:
        rate, burst = source.contract.rate_limit
    else:
        return None
    budget = source.contract.budget_name(source.settings)
    return RequestBudget(budget=budget, rate=rate, burst=burst, like=conn)


def close_extractor(extractor) -> None:
    close(extractor)


def begin(conn, source: SourceConfig, scheduled_for: datetime, *, dag_run_id: str | None = None,
          now: datetime | None = None, force: bool = False, hold: bool = False) -> int:
    """Open a run for the snapshot due at ``scheduled_for``.

    A provider that reports only the present cannot take an interval's
    snapshot twice: a rerun of an interval it already published is recorded
    as ``skipped`` (nothing fetched, nothing stored) unless ``force`` asks
    for a fresh snapshot. With ``hold`` the new run is held by this session
    from its first moment (see :func:`loaders.runs.hold`).
    """
    if scheduled_for.tzinfo is None:
        raise ValueError("scheduled_for must be timezone-aware")
    scheduled_for = utc_time(scheduled_for)  # a run of year 10000 could not be read back
    present_only = not source.contract.answers_for_past(source.settings)
    if not present_only:
        # A provider with history would read the future as it is being written.
        current = now or datetime.now(timezone.utc)
        if scheduled_for > current:
            raise SnapshotInFuture(f"{source.name}: the snapshot time {scheduled_for.isoformat()} is "
                                   f"{scheduled_for - current} in the future; nothing fetched")
    for run_id in runs.reap_abandoned(conn, source.name):
        log.warning("%s: run %d was abandoned by a process that stopped; its staging is dropped",
                    source.name, run_id)
    if present_only and not force:
        with transaction(conn) as cur:
            published = runs.published_run(cur, source.name, scheduled_for)
        if published is not None:
            reason = (f"{source.name}: the interval ending {scheduled_for.isoformat()} was already "
                      f"published by run {published}; {source.provider} reports only the present, "
                      "so a rerun would store a second snapshot of it. Nothing fetched "
                      f"('balances snapshot {source.name} --force' takes a fresh one)")
            log.info("%s", reason)
            return runs.record_skipped(conn, source.name, source.provider, scheduled_for, reason,
                                       dag_run_id=dag_run_id, config=source.record())
    if present_only:
        now = now or datetime.now(timezone.utc)
        if scheduled_for < now - LIVE_GRACE:
            raise HistoryUnavailable(
                f"{source.name}: {source.provider} only reports current balances; refusing to "
                f"store them as the snapshot for {scheduled_for.isoformat()} (a backfill or a late "
                "rerun of a past interval)"
            )
    return runs.start_run(conn, source.name, source.provider, scheduled_for,
                          dag_run_id=dag_run_id, shards=source.shards, hold=hold, config=source.record())


def run_source(conn, run_id: int, name: str) -> SourceConfig:
    """The configuration run ``run_id`` of source ``name`` was begun with.

    Every step after :func:`begin` takes its source from here, never from the
    sources file again: a file changed during a run (a deploy between two
    tasks) changes the next run only. A run begun before the configuration
    was kept (migration 0012) falls back to the file, saying so.
    """
    run = runs.get_run(conn, run_id)
    if run.source != name:
        raise LookupError(f"run {run_id} is a run of {run.source}, not of {name}")
    if run.config is None:
        log.warning("%s: run %d was begun before runs kept their configuration; using the sources file",
                    name, run_id)
        return load_config().source(name)
    return source_from_record(name, run.config)


def chooses_snapshot(source: SourceConfig) -> bool:
    """Whether the provider picks the run's snapshot before crawling (``chooses_snapshot``).

    Such an extractor has ``choose_snapshot(at) -> (as_of, as_of_raw) | None``
    and its ``pages`` accepts ``snapshot=``: every shard then reads the one
    snapshot recorded on the run.
    """
    return source.contract.chooses_snapshot


def chosen_snapshot(conn, source: SourceConfig, run: runs.Run, extractor) -> tuple[datetime, str] | None:
    """The run's snapshot: the one recorded, or chosen now and recorded; None if there is none."""
    if run.as_of_raw is not None:
        return run.as_of, run.as_of_raw
    chosen = extractor.choose_snapshot(run.scheduled_for)
    if chosen is None:
        return None
    check_snapshot_age(source, run.scheduled_for, chosen[0])
    recorded = runs.set_snapshot(conn, run.run_id, *chosen)
    if recorded != chosen[1]:
        # Another process chose first (a snapshot was written in between): keep its choice.
        run = runs.get_run(conn, run.run_id)
        return run.as_of, run.as_of_raw
    return chosen


def plan_shards(conn, source: SourceConfig, run_id: int, *, credentials=None) -> list[dict]:
    """The shards of this run: one per ``source.shards``, each with its account range.

    Runs once per run, so a provider that chooses its snapshot does it here.
    When the provider holds no snapshot at or before the run's time, the run
    ends as ``no_snapshot`` and there is no shard to crawl.
    """
    single = [{"shard": 0, "account_range": None}]
    chooses = chooses_snapshot(source)
    if source.shards == 1 and not chooses:
        return single
    runs.resume(conn, run_id)
    run = runs.get_run(conn, run_id)
    secrets = credentials.secrets() if credentials else []
    extractor = None
    try:
        extractor = build_extractor(source, credentials, conn)
        snapshot = chosen_snapshot(conn, source, run, extractor) if chooses else None
        if chooses and snapshot is None:
            message = (f"{source.name}: the provider has no balance snapshot at or before "
                       f"{run.scheduled_for.isoformat()}")
            record_counts(conn, run_id, extractor, 0, [])
            runs.finish(conn, run_id, RunStatus.NO_SNAPSHOT, error=message)
            log.info("%s", message)
            return []
        if source.shards == 1:
            ranges = [None]
        else:
            ranges = [list(r) for r in extractor.shard_ranges(run.scheduled_for, source.shards, snapshot=snapshot)]
        record_counts(conn, run_id, extractor, 0, [])
    except BaseException as exc:
        _record_plan_failure(conn, run_id, exc, secrets, extractor)
        raise
    finally:
        if extractor is not None:
            close_extractor(extractor)
    return [{"shard": i, "account_range": r} for i, r in enumerate(ranges)]


def _record_plan_failure(conn, run_id: int, exc: BaseException, secrets: list[str], extractor) -> None:
    """Record why planning failed. Never raises: ``exc`` is what the caller must see."""
    error = connections.scrub(f"{type(exc).__name__}: {exc}", secrets)
    raw = getattr(exc, "raw", None)
    try:
        if raw:
            # The body we could not read is kept, as a crawl keeps it.
            with transaction(conn) as cur:
                rejections.add(cur, run_id, 0, [Rejection(raw=connections.scrub(raw, secrets),
                                                          reason=connections.scrub(str(exc), secrets),
                                                          code="malformed_response")])
        if extractor is not None:
            record_counts(conn, run_id, extractor, 0, [])
    except Exception as second:
        log.error("run %d failed (%s); could not record its details: %s", run_id, one_line(error[:500]),
                  safe_text(second, 500))
    runs.record_failure(conn, run_id, error)


def crawl(conn, source: SourceConfig, run_id: int, *, shard: int = 0,
          account_range: tuple[str, str] | None = None, credentials=None,
          progress: Progress | None = None) -> CrawlResult:
    """Read the snapshot from the provider and stage it; publish nothing.

    ``progress`` hears of every page staged (see :mod:`pipeline.progress`).
    """
    run = runs.get_run(conn, run_id)
    if run.status == RunStatus.SKIPPED:  # a rerun that has nothing to do (see begin)
        return CrawlResult(run_id, shard, RunStatus.SKIPPED, 0, 0, 0)
    runs.hold(conn, run_id, shard)
    try:
        return _crawl(conn, source, run, shard, account_range, credentials, progress or Progress())
    finally:
        if not conn.closed:
            runs.release(conn, run_id, shard)


def _crawl(conn, source: SourceConfig, run: runs.Run, shard: int, account_range,
           credentials, progress: Progress) -> CrawlResult:
    run_id = run.run_id
    runs.resume(conn, run_id)
    secrets = credentials.secrets() if credentials else []
    try:
        extractor = build_extractor(source, credentials, conn)
    except Exception as exc:  # e.g. a Connection without the fields the provider needs
        runs.record_failure(conn, run_id, connections.scrub(f"{type(exc).__name__}: {exc}", secrets))
        raise
    writer = StagingWriter(conn, run_id, shard)
    pages = 0
    recorded = False  # the snapshot time of this crawl is on the run
    # A run read by one crawl of the present takes the time of this crawl,
    # not of an earlier attempt whose rows were dropped (a task retry).
    reads_present = source.shards == 1 and not chooses_snapshot(source)
    warnings: list[str] = []
    try:
        if reads_present:
            runs.forget_snapshot(conn, run_id)
        kwargs = {"account_range": tuple(account_range)} if account_range else {}
        if chooses_snapshot(source):
            snapshot = chosen_snapshot(conn, source, run, extractor)
            if snapshot is None:  # a crawl started without plan_shards
                raise NoSnapshotAvailable(f"the provider has no balance snapshot at or before "
                                          f"{run.scheduled_for.isoformat()}")
            kwargs["snapshot"] = snapshot
        for page in extractor.pages(run.scheduled_for, **kwargs):
            if page.kind is PageKind.RESTART:
                # The provider's data moved under a live crawl: what is staged
                # is void, and the extractor reads the snapshot again.
                writer.abort()
                writer = StagingWriter(conn, run_id, shard)
                progress.restart(shard)
                warnings.extend(page.warnings)
                if reads_present:
                    runs.forget_snapshot(conn, run_id)
                    recorded = False
                continue
            if not recorded:
                recorded = True
                check_snapshot_age(source, run.scheduled_for, page.as_of)
                recorded = runs.set_snapshot(conn, run_id, page.as_of, page.as_of_raw)
                if recorded != page.as_of_raw:
                    raise SnapshotError(
                        f"shard {shard} read snapshot {page.as_of_raw}, another shard read {recorded}"
                    )
            if page.kind is PageKind.BALANCES:  # (a totals page's rows belong to no account)
                page.reject_bad_ids()
            writer.add(page.rows, page.rejected, page.kind)
            warnings.extend(page.warnings)
            pages += 1
            progress.page(shard, len(page.rows), len(page.rejected))
        writer.close()
        progress.shard_done(shard)
    except NoSnapshotAvailable as exc:
        writer.abort()
        record_counts(conn, run_id, extractor, pages, warnings)
        runs.finish(conn, run_id, RunStatus.NO_SNAPSHOT, error=str(exc))
        log.info("%s: %s", source.name, one_line(str(exc)))
        return CrawlResult(run_id, shard, RunStatus.NO_SNAPSHOT, pages, 0, 0)
    except BaseException as exc:
        _record_crawl_failure(conn, run_id, exc, secrets, writer, extractor, pages, warnings)
        raise
    finally:
        close_extractor(extractor)
    record_counts(conn, run_id, extractor, pages, warnings)
    for warning in warnings[:20]:
        log.warning("%s: %s", source.name, one_line(warning))
    try:
        rejections.check_threshold(run_id, source.name, writer.rejected, source.max_rejected)
    except RejectedRecordsError as exc:
        runs.record_failure(conn, run_id, str(exc))
        raise
    return CrawlResult(run_id, shard, STAGED, pages, writer.rows, writer.rejected)


def _record_crawl_failure(conn, run_id: int, exc: BaseException, secrets: list[str], writer,
                          extractor, pages: int, warnings: list[str]) -> None:
    """Record why the crawl failed. Never raises: ``exc`` is what the caller must see.

    Each step is tried on its own (staging dropped, the unreadable body
    kept, progress counted, the run marked failed with the real error); one
    that fails, say on a lost connection, is logged and the others still run.
    """
    error = connections.scrub(f"{type(exc).__name__}: {exc}", secrets)
    raw = getattr(exc, "raw", None)
    steps = [("drop the staged rows", writer.abort)]
    if raw:
        # The body we could not read is kept, like any rejected record.
        steps.append(("keep the unreadable body", lambda: writer.add(
            [], [Rejection(raw=connections.scrub(raw, secrets), reason=connections.scrub(str(exc), secrets),
                           code="malformed_response")])))
    steps.append(("count the progress", lambda: record_counts(conn, run_id, extractor, pages, warnings)))
    for what, step in steps:
        try:
            step()
        except Exception as second:
            log.error("run %d failed (%s); could not %s: %s", run_id, one_line(error[:500]), what,
                      one_line(safe_text(second, 500)))
            try:
                conn.rollback()
            except Exception:
                pass  # the connection is gone; record_failure says so
    runs.record_failure(conn, run_id, error)


def record_counts(conn, run_id: int, extractor, pages: int, warnings: list[str], kind: str = SNAPSHOT) -> None:
    """Add a crawl's pages, requests, retries and warnings to its run (a snapshot's, or a window's)."""
    made = stats(extractor)
    runs.add_progress(conn, run_id, pages=pages, requests=made.requests, retries=made.retries,
                      warnings=warnings, kind=kind)


def publish(conn, source: SourceConfig, run_id: int, *, force: bool = False,
            credentials=None) -> publishing.PublishResult:
    """Make the staged snapshot visible, all of it at once.

    A present-only provider's run whose interval another run published
    meanwhile ends ``skipped`` (see :func:`begin`), unless ``force``. A
    provider that ``verifies_snapshot`` is asked first whether the snapshot
    still stands (see :func:`verify`).
    """
    if source.contract.verifies_snapshot:
        verify(conn, source, run_id, credentials=credentials)
    present_only = not source.contract.answers_for_past(source.settings)
    return publishing.publish(conn, run_id, max_rejected=source.max_rejected,
                              once_per_interval=present_only and not force)


def verify(conn, source: SourceConfig, run_id: int, *, credentials=None) -> None:
    """Ask the provider whether the run's staged snapshot still stands; raise if not.

    For a provider whose snapshot can be undone after it was read (a chain
    reorganising past the snapshot's block). Asked only of a run whose every
    shard staged; otherwise publishing refuses it anyway. A snapshot that no
    longer stands fails the run with its staged rows dropped: nothing is
    published. ``credentials`` default to the source's Connection.
    """
    run = runs.get_run(conn, run_id)
    with transaction(conn) as cur:
        staged = staging.staged_counts(cur, run_id)
    if (run.status not in (RunStatus.RUNNING, RunStatus.FAILED) or run.as_of_raw is None
            or any(shard not in staged for shard in range(source.shards))):
        return
    if credentials is None:
        credentials = connections.credentials(source.conn_id)
    secrets = credentials.secrets() if credentials else []
    extractor = None
    try:
        extractor = build_extractor(source, credentials, conn)
        extractor.verify_snapshot((run.as_of, run.as_of_raw))
        record_counts(conn, run_id, extractor, 0, [])
    except BaseException as exc:
        if isinstance(exc, SnapshotError):
            try:  # the staged rows describe a snapshot that is gone
                with transaction(conn) as cur:
                    staging.drop_run(cur, run_id)
            except Exception as second:
                log.error("run %d: could not drop its staging: %s", run_id, safe_text(second, 500))
        # Recorded as a failed plan is: the unreadable body kept, the requests counted.
        _record_plan_failure(conn, run_id, exc, secrets, extractor)
        raise
    finally:
        if extractor is not None:
            close_extractor(extractor)


def take_snapshot(conn, source: SourceConfig, at: datetime, *, credentials=None,
                  force: bool = False, progress: Progress | None = None) -> dict:
    """begin + crawl + publish in one process (the CLI's ``snapshot`` command).

    ``force`` takes a fresh snapshot even when a present-only provider's
    interval is already published (see :func:`begin`); ``progress`` hears
    of every page of every shard.
    """
    # One process does it all: it holds the run throughout, from the moment
    # it exists, so a concurrent begin never reaps it.
    run_id = begin(conn, source, at, force=force, hold=True)
    if runs.get_run(conn, run_id).status == RunStatus.SKIPPED:
        return runs.summary(conn, run_id)
    try:
        source = run_source(conn, run_id, source.name)  # as every task does: what the run was begun with
        shards = plan_shards(conn, source, run_id, credentials=credentials)
        if progress is not None:
            progress.begin(source.name, len(shards))
        statuses = [
            crawl(conn, source, run_id, credentials=credentials, progress=progress, **shard).status
            for shard in shards
        ]
        # No shard at all: the run was closed as no_snapshot while planning.
        if statuses and RunStatus.NO_SNAPSHOT not in statuses:
            publish(conn, source, run_id, force=force, credentials=credentials)
    finally:
        if not conn.closed:
            runs.release(conn, run_id)
    return runs.summary(conn, run_id)
