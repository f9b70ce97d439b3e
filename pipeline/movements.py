"""The movements of a source's windows: plan, crawl into staging, publish.

A window is the span between two consecutive published snapshots of a
source (:class:`~extractors.records.Window`). After a snapshot is published
its adjoining windows are loaded: the one ending at it and, for a backfill
before a later snapshot, the one starting at it (which replaces the wider
window the backfill split). The steps are separate so Airflow runs them as
tasks of the source's DAG, after ``publish_snapshot``: :func:`plan` opens a
movement run per window not loaded yet and splits it into the source's
shards (the same ranges the snapshot's crawl has, computed at the window's
closing snapshot), :func:`crawl` streams one shard's movement legs into
staging, :func:`publish` stores a window whole (:mod:`loaders.movements`).
The CLI runs them back to back (:func:`load_windows`), for any windows, in
any order.

A provider without movements (``has_movements`` false) gets its windows
recorded as ``not_available`` by :func:`plan`: nothing is read, and the
roll-forward shows them without inflows, outflows or breaks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from extractors.records import Rejection, Window
from extractors.text import safe_text
from loaders import leases, rejections, runs
from loaders import movements as store
from loaders.rejections import RejectedRecordsError
from loaders.statuses import MovementStatus
from pipeline import connections
from pipeline.config import SourceConfig
from pipeline.progress import Progress
from pipeline.snapshot import build_extractor, close_extractor, record_counts

log = logging.getLogger(__name__)

STAGED = "staged"


def offers_movements(source: SourceConfig) -> bool:
    return source.contract.offers_movements(source.settings)


def not_available_reason(source: SourceConfig) -> str:
    return (f"{source.provider} offers no movement API: the roll-forward of {source.name} is not available "
            "(its balances are still checked by pair, aggregate and continuity checks)")


@dataclass(slots=True, frozen=True)
class CrawlResult:
    movement_run: int
    shard: int
    status: str
    pages: int
    movements: int
    rejected: int


def plan(conn, source: SourceConfig, windows: list[Window], *, snapshot_run_id: int | None = None,
         dag_run_id: str | None = None, credentials=None, hold: bool = False) -> list[dict]:
    """A movement run for each of ``windows`` not held yet, split into the source's shards.

    Returns ``{"movement_run", "shard", "account_range"}`` per shard to crawl;
    none for a provider without movements, whose windows are recorded
    ``not_available`` instead. With ``hold`` each new run is held by this
    session (a process that loads it whole).
    """
    for run_id in store.reap_abandoned(conn, source.name):
        log.warning("%s: movement run %d was abandoned by a process that stopped; its staging is dropped",
                    source.name, run_id)
    todo = [w for w in windows if store.held(conn, source.name, w) is None]
    if not todo:
        return []
    if not offers_movements(source):
        for window in todo:
            store.record_not_available(conn, source.name, source.provider, window, not_available_reason(source),
                                       snapshot_run_id=snapshot_run_id, dag_run_id=dag_run_id)
        return []
    planned = []
    for window in todo:
        store.drop_stale(conn, source.name, window)
        run_id = store.begin(conn, source.name, source.provider, window, shards=source.shards,
                             snapshot_run_id=snapshot_run_id, dag_run_id=dag_run_id, config=source.record(),
                             hold=hold)
        ranges = _shard_ranges(conn, source, run_id, window, credentials)
        planned += [{"movement_run": run_id, "shard": i, "account_range": r} for i, r in enumerate(ranges)]
    return planned


def _shard_ranges(conn, source: SourceConfig, run_id: int, window: Window, credentials) -> list:
    """The account ranges of the window's shards: the snapshot crawl's, at the window's closing snapshot."""
    if source.shards == 1:
        return [None]
    extractor = None
    try:
        extractor = build_extractor(source, credentials, conn)
        ranges = extractor.shard_ranges(window.end, source.shards, snapshot=(window.end, window.end_raw))
        record_counts(conn, run_id, extractor, 0, [], leases.MOVEMENTS)
    except BaseException as exc:
        runs.record_failure(conn, run_id, _error(exc, credentials), kind=leases.MOVEMENTS)
        raise
    finally:
        if extractor is not None:
            close_extractor(extractor)
    return [list(r) for r in ranges]


def crawl(conn, source: SourceConfig, movement_run: int, *, shard: int = 0, account_range=None,
          credentials=None, progress: Progress | None = None) -> CrawlResult:
    """Read one shard of a window's movements from the provider and stage them; publish nothing."""
    run = store.get(conn, movement_run)
    conn.rollback()
    if run.status != MovementStatus.RUNNING and run.status != MovementStatus.FAILED:
        return CrawlResult(movement_run, shard, str(run.status), 0, 0, 0)
    store.hold(conn, movement_run, shard)
    try:
        return _crawl(conn, source, run, shard, account_range, credentials, progress or Progress())
    finally:
        if not conn.closed:
            store.release(conn, movement_run, shard)


def _crawl(conn, source: SourceConfig, run: store.MovementRun, shard: int, account_range, credentials,
           progress: Progress) -> CrawlResult:
    run_id = run.run_id
    runs.resume(conn, run_id, kind=leases.MOVEMENTS)
    try:
        extractor = build_extractor(source, credentials, conn)
    except Exception as exc:
        runs.record_failure(conn, run_id, _error(exc, credentials), kind=leases.MOVEMENTS)
        raise
    writer = store.MovementWriter(conn, run_id, shard)
    pages = 0
    warnings: list[str] = []
    unexplainable: dict[str, str] = {}
    try:
        kwargs = {"account_range": tuple(account_range)} if account_range else {}
        for page in extractor.movements(run.window, **kwargs):
            writer.add(page.rows, page.rejected)
            warnings.extend(page.warnings)
            unexplainable.update(page.unexplainable)
            pages += 1
            progress.page(shard, len(page.rows), len(page.rejected))
        writer.close()
        store.add_unexplainable(conn, run_id, unexplainable)
        progress.shard_done(shard)
    except BaseException as exc:
        _record_crawl_failure(conn, run_id, shard, exc, credentials, writer, extractor, pages, warnings)
        raise
    finally:
        close_extractor(extractor)
    record_counts(conn, run_id, extractor, pages, warnings, leases.MOVEMENTS)
    try:
        rejections.check_threshold(run_id, source.name, writer.rejected, source.max_rejected, rejections.MOVEMENTS)
    except RejectedRecordsError as exc:
        runs.record_failure(conn, run_id, str(exc), kind=leases.MOVEMENTS)
        raise
    return CrawlResult(run_id, shard, STAGED, pages, writer.rows, writer.rejected)


def _record_crawl_failure(conn, run_id: int, shard: int, exc: BaseException, credentials, writer, extractor,
                          pages: int, warnings: list[str]) -> None:
    """Record why the crawl failed; never raises (``exc`` is what the caller must see)."""
    secrets = credentials.secrets() if credentials else []
    raw = getattr(exc, "raw", None)
    steps = [("drop the staged movements", writer.abort)]
    if raw:  # the body we could not read is kept, like any rejected record
        steps.append(("keep the unreadable body", lambda: writer.add([], [Rejection(
            raw=connections.scrub(raw, secrets), reason=connections.scrub(str(exc), secrets),
            code="malformed_response")])))
    steps.append(("count the progress", lambda: record_counts(conn, run_id, extractor, pages, warnings, leases.MOVEMENTS)))
    for what, step in steps:
        try:
            step()
        except Exception as second:
            log.error("movement run %d failed; could not %s: %s", run_id, what, safe_text(second, 500))
            try:
                conn.rollback()
            except Exception:
                pass
    runs.record_failure(conn, run_id, _error(exc, credentials), kind=leases.MOVEMENTS)


def _error(exc: BaseException, credentials) -> str:
    return connections.scrub(f"{type(exc).__name__}: {exc}", credentials.secrets() if credentials else [])


def publish(conn, source: SourceConfig, movement_run: int) -> store.PublishedWindow:
    """Store the window's movements, all at once (see :mod:`loaders.movements`)."""
    return store.publish(conn, movement_run, max_rejected=source.max_rejected)


def load_windows(conn, source: SourceConfig, windows: list[Window], *, credentials=None,
                 progress: Progress | None = None) -> list[dict]:
    """plan + crawl + publish of ``windows``, in the order given, in one process; each run's summary.

    A window already loaded is left alone (nothing is read), so a rerun
    adds nothing. A window that fails is recorded failed and the error
    raised after the others were tried.
    """
    summaries: list[dict] = []
    failure: BaseException | None = None
    for window in windows:
        planned = plan(conn, source, [window], credentials=credentials, hold=True)
        if not planned:
            continue
        run_id = planned[0]["movement_run"]
        try:
            if progress is not None:
                progress.begin(f"{source.name} movements {window}", len(planned))
            for shard in planned:
                crawl(conn, source, run_id, shard=shard["shard"], account_range=shard["account_range"],
                      credentials=credentials, progress=progress)
            publish(conn, source, run_id)
        except Exception as exc:
            log.error("%s: window %s failed: %s", source.name, window, safe_text(exc, 500))
            failure = failure or exc
        finally:
            if not conn.closed:
                store.release(conn, run_id)
        summaries.append(store.summary(conn, run_id))
    if failure is not None:
        raise failure
    return summaries


def windows_around(conn, source: SourceConfig, as_of: datetime) -> list[Window]:
    """The windows the snapshot at ``as_of`` bounds (see :func:`loaders.movements.adjoining`)."""
    return store.adjoining(conn, source.name, as_of)


def missing_windows(conn, source: SourceConfig, start: datetime | None = None,
                    end: datetime | None = None) -> list[Window]:
    """The windows of ``source`` ending in [start, end] that no run holds yet."""
    return [w for w in store.windows(conn, source.name, start=start, end=end)
            if store.held(conn, source.name, w) is None]
