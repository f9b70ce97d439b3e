"""What the DAG tasks do, outside the DAG file so it stays thin.

Each function opens its own database connection from the Airflow
Connection ``balances_db`` and returns only ids and counts (XCom never
carries rows). Errors that a retry cannot fix become
``AirflowFailException`` so Airflow does not retry them, wherever they sit
in the chain of the exception that reached the task.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from extractors.errors import ExtractError
from extractors.text import safe_text
from loaders import runs
from loaders.db import connect
from loaders.publish import PublishError
from loaders.rejections import RejectedRecordsError
from loaders.runs import RunStatus
from pipeline import connections, movements, snapshot
from pipeline.progress import LineProgress
from pipeline.config import SourceConfig, load_config

log = logging.getLogger(__name__)


@contextmanager
def database() -> Iterator:
    conn = connect(connections.database_url(allow_env_url=False), application_name="balances-airflow")
    try:
        yield conn
    finally:
        conn.close()


def source_config(name: str) -> SourceConfig:
    return load_config().source(name)


def scheduled_time(context) -> datetime:
    """The snapshot time of a run: the end of its data interval.

    Manual runs in Airflow 3 may have no data interval; they snapshot at
    the moment they were asked to run.
    """
    return context.get("data_interval_end") or context["dag_run"].run_after


def not_retriable(exc: BaseException) -> BaseException | None:
    """The error a retry cannot fix that ``exc`` carries, or None.

    The chain is walked from the outside in (``raise ... from``, then the
    exception being handled when ``exc`` was raised) and the first error
    that knows whether it is retriable decides: a 400 from the provider
    stays fatal when something else was raised while handling it, or
    wrapped it.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ExtractError):
            return None if exc.retriable else exc
        if isinstance(exc, (RejectedRecordsError, PublishError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def fatal_errors_fail_fast() -> Iterator[None]:
    try:
        yield
    except (AirflowFailException, AirflowSkipException):
        raise
    except BaseException as exc:
        fatal = not_retriable(exc)
        if fatal is None:
            raise
        message = f"{type(fatal).__name__}: {fatal}" if fatal is not exc else str(fatal)
        raise AirflowFailException(safe_text(message)) from exc


def begin_run(source_name: str, context) -> int:
    source = source_config(source_name)
    with fatal_errors_fail_fast(), database() as conn:
        run_id = snapshot.begin(conn, source, scheduled_time(context),
                                dag_run_id=context["dag_run"].run_id)
        run = runs.get_run(conn, run_id)
        if run.status == RunStatus.SKIPPED:
            # Skipping skips the crawl and the publish too: no Asset event.
            raise AirflowSkipException(runs.summary(conn, run_id)["error"])
    return run_id


# The tasks after begin_run take their source from the run (snapshot.run_source),
# not from the sources file: a file deployed mid-run changes the next run only.


def plan_shards(source_name: str, run_id: int) -> list[dict]:
    with fatal_errors_fail_fast(), database() as conn:
        source = snapshot.run_source(conn, run_id, source_name)
        return snapshot.plan_shards(conn, source, run_id,
                                    credentials=connections.credentials(source.conn_id))


def crawl_snapshot(source_name: str, run_id: int, shard: int = 0,
                   account_range: list | None = None) -> dict:
    with fatal_errors_fail_fast(), database() as conn:
        source = snapshot.run_source(conn, run_id, source_name)
        progress = LineProgress.to_log(log)
        progress.begin(source.name, source.shards)
        result = snapshot.crawl(conn, source, run_id, shard=shard, account_range=account_range,
                                credentials=connections.credentials(source.conn_id), progress=progress)
    # Plain text in XCom, whatever type the status has here.
    return {"run_id": result.run_id, "shard": result.shard, "status": str(result.status),
            "pages": result.pages, "rows": result.rows, "rejected": result.rejected}


def publish_snapshot(source_name: str, run_id: int) -> dict:
    with fatal_errors_fail_fast(), database() as conn:
        result = snapshot.publish(conn, snapshot.run_source(conn, run_id, source_name), run_id)
    if result.status == RunStatus.NO_SNAPSHOT:
        # Skipped, not succeeded: no Asset event for a snapshot that is not there.
        raise AirflowSkipException(f"run {run_id}: the provider had no snapshot to publish")
    if result.status == RunStatus.SKIPPED:
        raise AirflowSkipException(f"run {run_id}: another run published this interval first")
    return {"run_id": run_id, "rows": result.rows_staged, "rows_inserted": result.rows_published,
            "rejected": result.rejected}


# Movements, after publish_snapshot: the windows the published snapshot bounds.


def plan_movements(source_name: str, run_id: int, context) -> list[dict]:
    """A movement run per window the snapshot bounds that no run holds yet, and its shards."""
    with fatal_errors_fail_fast(), database() as conn:
        source = snapshot.run_source(conn, run_id, source_name)
        run = runs.get_run(conn, run_id)
        if run.status != RunStatus.PUBLISHED:
            raise AirflowSkipException(f"run {run_id} is {run.status}: no snapshot bounds a window")
        windows = movements.windows_around(conn, source, run.as_of)
        return movements.plan(conn, source, windows, snapshot_run_id=run_id, dag_run_id=context["dag_run"].run_id,
                              credentials=connections.credentials(source.conn_id))


def crawl_movements(source_name: str, run_id: int, movement_run: int, shard: int = 0,
                    account_range: list | None = None) -> dict:
    with fatal_errors_fail_fast(), database() as conn:
        source = snapshot.run_source(conn, run_id, source_name)
        progress = LineProgress.to_log(log)
        progress.begin(f"{source.name} movements", source.shards)
        result = movements.crawl(conn, source, movement_run, shard=shard, account_range=account_range,
                                 credentials=connections.credentials(source.conn_id), progress=progress)
    return {"movement_run": result.movement_run, "shard": result.shard, "status": result.status,
            "pages": result.pages, "movements": result.movements, "rejected": result.rejected}


def publish_movements(source_name: str, run_id: int, crawled: list[dict]) -> dict:
    """Publish each window crawled, one transaction each; the legs stored per movement run."""
    stored: dict[str, int] = {}
    with fatal_errors_fail_fast(), database() as conn:
        source = snapshot.run_source(conn, run_id, source_name)
        for movement_run in sorted({c["movement_run"] for c in crawled}):
            result = movements.publish(conn, source, movement_run)
            stored[str(movement_run)] = result.movements
            log.info("%s: movement run %d %s, %d movement(s)%s", source.name, movement_run, result.status,
                     result.movements, f": {result.reason}" if result.reason else "")
    return stored
