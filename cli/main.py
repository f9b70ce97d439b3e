"""The ``balances`` command: its options, its subcommands, its exit status.

    balances migrate                           apply the database migrations
    balances check [--connect]                 validate the sources file (and reach each source)
    balances sources                           the configured sources and their schedules
    balances snapshot SOURCE [--at T] [--force]    take one snapshot outside Airflow
    balances latest SOURCE [--account A] [--asset X] [--csv]   the latest exact balances
    balances runs [SOURCE] [--limit N] [--show RUN]   recent snapshot runs; one run's configuration
    balances pools [--slots N]                 the Airflow pools, for 'airflow pools import'
    balances reader create|drop NAME           a dashboard login in balances_reader, with limits
    balances partitions [--months N]           create monthly partitions ahead
    balances movements SOURCE [--from T --to T]   load the movements of windows not loaded yet
    balances reconcile [--from T --to T] [--check NAME] [--no-alerts]   run the [checks], send the [alerts]
    balances incidents [--open|--all] [--source S]        reconciliation incidents
    balances incidents ack ID --note TEXT [--by NAME]     acknowledge one (stops its reminders)
    balances report [--out DIR] [--from T --to T]         HTML + Markdown report with charts

The global options (``--config``, ``--db-url``, ``--quiet``, ``--verbose``)
work before or after the subcommand. Exit status: 0 success, 1 the run or
command failed (one line on stderr says why), 2 a usage or configuration
error. ``reconcile`` exits 0 when the checks ran, whatever breaks they found
(breaks are data). A source or check with a mistake stops only the commands
that use it; the others print one warning line per mistake and go on, as
the DAG files do. What each command does is in :mod:`cli.commands`.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from datetime import datetime

from extractors.errors import ExtractError
from extractors.text import one_line
from loaders.db import DatabaseError
from cli import commands
from pipeline.config import ConfigError
from reconciliation.incidents import MAX_NAME_CHARS, MAX_NOTE_CHARS

log = logging.getLogger("balances")
AIRFLOW_MASKER_LOGGER = "airflow.sdk._shared.secrets_masker.secrets_masker"

EXIT_CODES = """exit status: 0 done; 1 the run or command failed (one line on stderr says why);
2 a usage or configuration error (nothing was done)"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Airflow's masker warns, on standard output, of every short Connection
        # extra it will not mask ("true" of disable_ssl=true): noise to a user.
        # A filter, not a level: Airflow resets the levels when it sets up logging.
        logging.getLogger(AIRFLOW_MASKER_LOGGER).addFilter(lambda record: record.levelno >= logging.ERROR)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"balances: config error: {exc}", file=sys.stderr)
        return 2
    except (DatabaseError, ExtractError, RuntimeError, LookupError, ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `balances latest --csv | head`: the reader had enough
            sys.stdout = open(os.devnull, "w")
            return 0
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
    return one_line(" ".join(str(exc).split())) or type(exc).__name__


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after its name.

    On the subcommands they default to SUPPRESS, so a value given before the
    subcommand is not overwritten by the subcommand's default.
    """
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--config", metavar="PATH", default=default(None),
                        help="the sources file (default: $BALANCES_CONFIG)")
    parser.add_argument("--db-url", metavar="URL", default=default(None),
                        help="the balances database, postgresql://user:password@host:port/db (default: "
                             "$BALANCES_DB_URL, else the Airflow Connection balances_db)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="no progress lines: only results and errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log what happens, with tracebacks of unexpected errors")


def _count(low: int, high: int):
    """An argparse type: an integer in ``[low, high]``."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)
    return parse


def _size(text: str) -> str:
    """An argparse type: a PostgreSQL size such as ``500MB`` or ``1GB``."""
    if not re.fullmatch(r"[1-9][0-9]{0,6}(kB|MB|GB|TB)", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500MB or 1GB")
    return text
def _text(limit: int):
    """An argparse type: text of 1 to ``limit`` characters, not blank."""
    def parse(text: str) -> str:
        if not text.strip() or len(text.strip()) > limit:
            raise argparse.ArgumentTypeError(f"expected 1 to {limit} characters, not blank")
        return text.strip()
    return parse


def aware_time(text: str) -> datetime:
    """An argparse type: an ISO-8601 time (UTC without an offset), within 1970 to 9999 once in UTC."""
    from pipeline.config import utc_time

    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time") from None
    try:
        return utc_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balances",
        description="Load provider balance snapshots into PostgreSQL history, reconcile them, report.",
        epilog=EXIT_CODES,
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, func) -> argparse.ArgumentParser:
        p = commands_.add_parser(name, help=summary, description=summary, parents=[common], epilog=EXIT_CODES)
        p.set_defaults(func=func)
        return p

    command("migrate", "apply the database migrations (safe to repeat)", commands.migrate)

    p = command("check", "validate the sources file; with --connect, also reach the database and each source",
                commands.check)
    p.add_argument("--connect", action="store_true",
                   help="one request per source and one connection to the database; creates nothing")

    command("sources", "list the configured sources, their schedules and next runs", commands.sources)

    p = command("snapshot", "take one snapshot of SOURCE now (or --at a past time) and publish it",
                commands.snapshot)
    p.add_argument("source")
    p.add_argument("--at", type=aware_time, help="snapshot time, ISO-8601 (default: now)")
    p.add_argument("--force", action="store_true",
                   help="take a fresh snapshot even if a present-only provider's interval is already published")

    p = command("latest", "the exact balances of SOURCE's latest published snapshot", commands.latest)
    p.add_argument("source")
    p.add_argument("--account", help="only this account")
    p.add_argument("--asset", help="only this asset")
    p.add_argument("--csv", action="store_true", help="CSV on standard output instead of a table")

    p = command("runs", "list recent snapshot runs", commands.runs)
    p.add_argument("source", nargs="?", help="only the runs of this source")
    p.add_argument("--source", dest="source_option", metavar="SOURCE", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=_count(1, 10_000), default=20, help="how many (default 20)")
    p.add_argument("--show", type=_count(1, 999_999_999), metavar="RUN",
                   help="print run RUN with the source configuration it was begun with")

    p = command("pools", "the Airflow pools every provider's tasks run in, as JSON for 'airflow pools import'",
                commands.pools)
    p.add_argument("--slots", type=_count(1, 1_000), default=4,
                   help="tasks of one provider that may run at once (default 4)")

    p = command("reader", "create or drop a dashboard login (a member of balances_reader, with limits)",
                commands.reader)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="a new login; prints its generated password",
                                description="Create a login in balances_reader with a connection limit, "
                                            "statement_timeout, temp_file_limit and idle_in_transaction_session_"
                                            "timeout; print its generated password.")
    create.add_argument("name")
    create.add_argument("--connections", type=_count(1, 10_000), default=10,
                        help="sessions it may open at once (default 10)")
    create.add_argument("--statement-timeout", type=_count(1, 86_400), default=60, metavar="SECONDS",
                        help="longest query (default 60)")
    create.add_argument("--temp-file-limit", default="1GB", type=_size,
                        help="temporary files one session may write, e.g. 500MB (default 1GB)")
    create.add_argument("--idle-timeout", type=_count(1, 86_400), default=60, metavar="SECONDS",
                        help="longest idle open transaction (default 60)")
    create.add_argument("--reserve", type=_count(0, 10_000), default=20,
                        help="connections that must stay free for the pipeline (default 20)")
    create.add_argument("--replace", action="store_true", help="drop an existing reader login of that name first")
    drop = actions.add_parser("drop", parents=[common], help="drop a reader login")
    drop.add_argument("name")

    p = command("partitions", "create monthly balance_history partitions ahead", commands.partitions)
    p.add_argument("--months", type=_count(0, 120), default=3, help="months ahead of this one (default 3)")

    p = command("movements", "load the movements of SOURCE's windows (between consecutive published snapshots) "
                             "that are not loaded yet, for the roll-forward", commands.movements)
    p.add_argument("source")
    p.add_argument("--from", dest="window_from", type=aware_time,
                   help="only windows ending at or after this time, ISO-8601 (default: every one)")
    p.add_argument("--to", dest="window_to", type=aware_time,
                   help="only windows ending at or before this time, ISO-8601 (default: every one)")

    p = command("reconcile", "run the configured checks over a window (default: the last 3 days) and send "
                "the alerts due, as the DAG reconcile_balances does", commands.reconcile)
    _window_arguments(p)
    p.add_argument("--check", action="append", help="run only this check (repeatable)")
    p.add_argument("--no-alerts", action="store_true",
                   help="send no alerts, even with an [alerts] table (the next run sends what is due)")

    p = command("incidents", "list reconciliation incidents: consecutive breaks of one check and subject",
                commands.incidents)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--open", action="store_true", help="open and acknowledged incidents (the default)")
    shown.add_argument("--all", action="store_true", help="resolved incidents too")
    p.add_argument("--source", help="only incidents of checks that read this source")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    summary = "acknowledge incident ID: records who, when and why, and stops its reminders"
    ack = actions.add_parser("ack", help=summary, description=summary, parents=[common], epilog=EXIT_CODES)
    ack.add_argument("incident_id", metavar="ID", type=_count(1, 999_999_999), help="the incident's number")
    ack.add_argument("--note", required=True, type=_text(MAX_NOTE_CHARS), help="why (kept with the acknowledgement)")
    ack.add_argument("--by", type=_text(MAX_NAME_CHARS), help="who acknowledges (default: your login name)")

    p = command("report", "write the balances and breaks report (HTML, Markdown, a PNG per source)",
                commands.report)
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    _window_arguments(p)
    return parser


def _window_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="window_from", type=aware_time,
                   help="window start, ISO-8601 (default: --to minus 3 days)")
    p.add_argument("--to", dest="window_to", type=aware_time, help="window end, ISO-8601 (default: now)")


def run() -> None:
    """The ``balances`` command: :func:`main`, then exit with its status."""
    status = main()
    # The process ends here and nothing it made needs collecting: frozen,
    # the objects are skipped by the interpreter's last collection at exit
    # (about 45 of the 50 ms it takes after a snapshot; docs/BENCHMARKS.md, B8).
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
