"""The ``balances`` command.

    balances migrate                      apply the migrations
    balances snapshot SOURCE [--at TIME] [--force]
                                          take one snapshot outside Airflow
    balances runs [SOURCE] [--show RUN]   list recent runs; --show: the configuration RUN ran with
    balances partitions [--months N]      create monthly partitions ahead
    balances demo [--serve]               the README's end-to-end demo (--serve: live, until Ctrl-C)
    balances reconcile [--from --to]      run the [checks] (default: the last 3 days)
    balances report [--out DIR]           HTML + Markdown report with charts (last 3 days)

``reconcile`` exits 0 when the checks ran, whatever breaks they found
(breaks are data, kept in reconciliation_breaks), and 1 when it could not run.

Exit status 0 on success, 1 when a run or command fails, 2 for a usage or
configuration error; failures print one line saying why. A source or check
with a mistake stops only the commands that use it; the others print one
warning line per mistake and go on, as the DAG files do.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from extractors.errors import ExtractError
from loaders.db import DatabaseError
from pipeline.config import ConfigError

log = logging.getLogger("balances")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"balances: config error: {exc}", file=sys.stderr)
        return 2
    except (DatabaseError, ExtractError, RuntimeError, LookupError, ValueError, OSError) as exc:
        print(f"balances: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("balances: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a bare traceback for an operator; -v keeps it
        if args.verbose:
            log.exception("unexpected error")
        print(f"balances: unexpected {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    from pipeline.config import one_line

    text = one_line(" ".join(str(exc).split()))
    return text or type(exc).__name__


def _warn_config_errors(errors: dict[str, str], skip: str | None = None) -> None:
    for name, error in errors.items():
        if name != skip:
            print(f"balances: warning: config error: {error}", file=sys.stderr)


def _count(low: int, high: int):
    """An argparse type: an integer in ``[low, high]``."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balances",
        description="Load provider balance snapshots into PostgreSQL history, reconcile them, report.",
    )
    parser.add_argument("--config", help="sources file (default: $BALANCES_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=cmd_migrate)

    p = commands.add_parser("snapshot", help="take one snapshot of SOURCE now (or --at)")
    p.add_argument("source")
    p.add_argument("--at", type=_aware_time, help="snapshot time, ISO-8601 (default: now)")
    p.add_argument("--force", action="store_true",
                   help="take a fresh snapshot even if a present-only provider's interval is already published")
    p.set_defaults(func=cmd_snapshot)

    p = commands.add_parser("runs", help="list recent snapshot runs (--show RUN: the configuration it ran with)")
    p.add_argument("source", nargs="?", help="only this source's runs")
    p.add_argument("--source", dest="source_option", metavar="SOURCE", help="the same, as an option")
    p.add_argument("--limit", type=_count(1, 10_000), default=20)
    p.add_argument("--show", type=_count(1, 999_999_999), metavar="RUN",
                   help="print the source configuration run RUN was begun with")
    p.set_defaults(func=cmd_runs)

    p = commands.add_parser("partitions", help="create balance_history partitions ahead")
    p.add_argument("--months", type=_count(0, 120), default=3, help="months ahead of this one (default 3)")
    p.set_defaults(func=cmd_partitions)

    p = commands.add_parser("demo", help="run every configured sandbox source through Airflow")
    p.add_argument("--db-url", help="use this database instead of a private cluster")
    p.add_argument("--serve", action="store_true",
                   help="then keep the real Airflow services (and Superset) running over moving sandboxes"
                        " until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("reconcile", help="run the configured checks over a window (default: last 3 days)")
    _window_arguments(p)
    p.add_argument("--check", action="append", help="run only this check (repeatable)")
    p.set_defaults(func=cmd_reconcile)

    p = commands.add_parser("report", help="write the balances and breaks report (HTML, Markdown, PNG)")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    _window_arguments(p)
    p.set_defaults(func=cmd_report)
    return parser


def _aware_time(text: str) -> datetime:
    """An ISO-8601 time (UTC without an offset), within 1970 to 9999 once in UTC; exit 2 otherwise."""
    from pipeline.config import utc_time

    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time") from None
    try:
        return utc_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _connect():
    from loaders.db import connect
    from pipeline.connections import database_url

    return connect(database_url())


def cmd_migrate(args) -> int:
    from loaders.migrate import upgrade
    from pipeline.connections import database_url

    revision = upgrade(database_url())
    print(f"database at revision {revision}")
    return 0


def cmd_snapshot(args) -> int:
    from loaders.runs import RunStatus
    from pipeline import connections
    from pipeline.config import load_config
    from pipeline.snapshot import take_snapshot

    config = load_config(args.config)
    source = config.source(args.source)
    _warn_config_errors(config.errors, skip=args.source)
    at = args.at or datetime.now(timezone.utc)
    creds = connections.credentials(source.conn_id)
    conn = _connect()
    try:
        _require_schema(conn)
        summary = take_snapshot(conn, source, at, credentials=creds, force=args.force)
    finally:
        conn.close()
    print_summary(summary)
    # A skipped rerun did what was asked: the interval's snapshot is there.
    done = (RunStatus.PUBLISHED, RunStatus.NO_SNAPSHOT, RunStatus.SKIPPED)
    return 0 if summary["status"] in done else 1


def _require_schema(conn, table: str = "snapshot_runs") -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        if not cur.fetchone()[0]:
            raise DatabaseError("the balances database has no tables yet: run 'balances migrate' first")


def print_summary(summary: dict) -> None:
    keys = ("run_id", "source", "status", "as_of_raw", "as_of", "scheduled_for", "pages", "requests",
            "retries", "rows", "rows_inserted", "rejected", "error")
    for key in keys:
        value = summary.get(key)
        if value is not None:
            print(f"{key:>14}: {value}")
    for warning in (summary.get("warnings") or [])[:5]:
        print(f"{'warning':>14}: {warning}")


def cmd_runs(args) -> int:
    if args.source and args.source_option and args.source != args.source_option:
        raise ConfigError(f"two sources given: {args.source!r} and --source {args.source_option!r}")
    args.source = args.source or args.source_option
    if args.show is not None:
        return show_run(args.show, args.source)
    conn = _connect()
    try:
        _require_schema(conn)
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT run_id, source, status, scheduled_for, as_of, pages, rows, rows_inserted,
                       rejected, coalesce(error, '')
                  FROM snapshot_runs
                 WHERE %(source)s::text IS NULL OR source = %(source)s
                 ORDER BY run_id DESC LIMIT %(limit)s
                """,
                {"source": args.source, "limit": args.limit},
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    print(f"{'run':>5} {'source':<18} {'status':<12} {'scheduled_for':<26} {'rows':>9} {'new':>9} {'rej':>4}  error")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:<18} {r[2]:<12} {r[3].isoformat():<26} {r[6]:>9} {r[7]:>9} {r[8]:>4}  {r[9][:60]}")
    return 0


def show_run(run_id: int, source: str | None) -> int:
    """A run and the configuration of its source as the run was begun (``snapshot_runs.config``)."""
    from loaders.runs import get_run
    from pipeline.config import table_from_record, toml_table

    conn = _connect()
    try:
        _require_schema(conn)
        run = get_run(conn, run_id)
    finally:
        conn.close()
    if source is not None and run.source != source:
        raise LookupError(f"run {run_id} is a run of {run.source}, not of {source}")
    print(f"# run {run.run_id} of {run.source}: {run.status}, scheduled for {run.scheduled_for.isoformat()}")
    if run.config is None:
        print("# begun before runs kept their configuration (migration 0012): not recorded")
        return 0
    print("# the configuration it was begun with, which every task of the run used:")
    print("\n".join(toml_table("sources", run.source, table_from_record(run.config))))
    return 0


def cmd_partitions(args) -> int:
    from loaders.partitions import ensure_ahead

    conn = _connect()
    try:
        names = ensure_ahead(conn, args.months)
    finally:
        conn.close()
    print("partitions present: " + ", ".join(names))
    return 0


def cmd_demo(args) -> int:
    from devtools.demo import run_demo

    if args.serve:
        from devtools.serve import run_serve

        return run_serve(db_url=args.db_url)
    return run_demo(db_url=args.db_url)


def _window_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="window_from", type=_aware_time,
                   help="window start, ISO-8601 (default: --to minus 3 days)")
    p.add_argument("--to", dest="window_to", type=_aware_time, help="window end, ISO-8601 (default: now)")


def _window(args) -> tuple[datetime, datetime]:
    from reconciliation.reconcile import default_window

    window_to = args.window_to or datetime.now(timezone.utc)
    window_from, window_to = default_window(window_to)
    return args.window_from or window_from, window_to


def cmd_reconcile(args) -> int:
    from reconciliation.checks import load_checks
    from pipeline.config import load_config
    from reconciliation.reconcile import open_breaks, reconcile

    config = load_config(args.config)
    checks = load_checks(config, args.check)
    _warn_config_errors({**config.errors, "[alerts]": config.alerts_error} if config.alerts_error
                        else config.errors)
    if not checks:
        raise ConfigError("no [checks.<name>] tables in the config file")
    window_from, window_to = _window(args)
    conn = _connect()
    try:
        _require_schema(conn, "reconciliation_breaks_detail")
        result = reconcile(conn, checks, window_from, window_to)
        breaks = open_breaks(conn, checks=list(checks), window=(window_from, window_to), limit=20)
    finally:
        conn.close()
    print(f"reconciliation run {result.run_id}: {window_from.isoformat()} to {window_to.isoformat()}, "
          f"{result.checks_run} check(s): {result.breaks_open} open, {result.breaks_new} new, "
          f"{result.breaks_resolved} resolved")
    for b in breaks:
        values = " ".join(f"{k}={b[k]}" for k in ("left_value", "right_value", "difference", "tolerance")
                          if b[k] is not None)
        print(f"  {b['check_name']} {b['kind']} at {b['check_time'].isoformat()} {values} {b['detail']}")
    return 0


def cmd_report(args) -> int:
    from pipeline.connections import database_url
    from reconciliation.report import output_directory, write_report

    out = output_directory(Path(args.out))  # before any work: a wrong --out fails at once
    window_from, window_to = _window(args)
    conn = _connect()
    try:
        _require_schema(conn, "reconciliation_breaks_detail")
    finally:
        conn.close()
    for path in write_report(database_url(), out, window_from, window_to):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
