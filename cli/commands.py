"""What each ``balances`` subcommand does (the parser is :mod:`cli.main`).

Each function takes the parsed arguments and returns the exit status, or
raises: :class:`~pipeline.config.ConfigError` for exit 2, any other error
the CLI knows for exit 1 (see :func:`cli.main.main`). Results go to
standard output, progress and warnings to standard error, every value
printed through :mod:`cli.terminal`.
"""
from __future__ import annotations

import sys
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from extractors.errors import ExtractError
from extractors.text import did_you_mean, human_duration, one_line
from loaders.db import DatabaseError, connect, describe_url
from pipeline import connections
from pipeline.config import Config, ConfigError, cron_of, load_config, schedule_times
from pipeline.progress import for_terminal
from cli.terminal import cell, print_table, write_csv


def database_url(args) -> str:
    """``--db-url``, else ``$BALANCES_DB_URL``, else the Connection ``balances_db``."""
    return args.db_url or connections.database_url()


def _connect(args, *, schema: str | None = "snapshot_runs"):
    """A connection to the balances database; with ``schema``, refuse one that was never migrated."""
    conn = connect(database_url(args))
    if schema is not None:
        try:
            require_schema(conn, schema)
        except BaseException:
            conn.close()
            raise
    return conn


def require_schema(conn, table: str = "snapshot_runs") -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        present = cur.fetchone()[0]
    conn.rollback()
    if not present:
        raise DatabaseError("the balances database has no tables yet: run 'balances migrate' first")


def warn_config_errors(config: Config, skip: str | None = None) -> None:
    """One warning line per source, check or [alerts] with a mistake (not the one being used)."""
    errors = dict(config.errors)
    if config.alerts_error:
        errors["[alerts]"] = config.alerts_error
    for name, error in errors.items():
        if name != skip:
            print(f"balances: warning: config error: {error}", file=sys.stderr)


# -- migrate ------------------------------------------------------------------

def migrate(args) -> int:
    from loaders.migrate import upgrade

    url = database_url(args)
    print(f"database {describe_url(url)} at revision {upgrade(url)}")
    return 0


# -- check ---------------------------------------------------------------------

def check(args) -> int:
    """Validate the whole file; with ``--connect``, one request per source and the database.

    Exit 2 when the file has a mistake anywhere, else 1 when something
    could not be reached, else 0.
    """
    from reconciliation.checks import usable_checks

    config = load_config(args.config)
    checks, check_errors = usable_checks(config)
    print(f"sources file {config.path}")
    mistakes = 0
    unreachable = 0
    for name in sorted({*config.sources, *config.errors}):
        if name in config.errors:
            mistakes += 1
            print(f"  error  {cell(config.errors[name])}")
            continue
        source = config.sources[name]
        line = f"  ok     source {name} ({source.provider}, schedule {source.schedule or 'none'})"
        if args.connect:
            reached, detail = _probe(source)
            unreachable += not reached
            line = f"  {'ok' if reached else 'FAILED':<6} source {name} ({source.provider}): {cell(detail, 300)}"
        print(line)
    for name in config.checks:
        if name in check_errors:
            mistakes += 1
            print(f"  error  {cell(check_errors[name])}")
        else:
            print(f"  ok     check {name} ({checks[name].kind})")
    if config.alerts_error:
        mistakes += 1
        print(f"  error  {cell(config.alerts_error)}")
    elif config.alerts is not None:
        alerts = config.alerts
        print(f"  ok     alerts through {', '.join(alerts.channels)}"
              + (f" (mail to {len(alerts.to)} recipient(s))" if alerts.to else "")
              + f", reminders {'every ' + human_duration(alerts.remind_every) if alerts.remind_every else 'never'}"
              + (f", flap_window {human_duration(alerts.flap_window)}" if alerts.flap_window else ""))
    if args.connect:
        reached, detail = _probe_database(args)
        unreachable += not reached
        print(f"  {'ok' if reached else 'FAILED':<6} database {cell(detail, 300)}")
    total = len(config.sources) + len(config.errors) + len(config.checks)
    print(f"{total} table(s): {mistakes} with a mistake" + (f", {unreachable} unreachable" if args.connect else ""))
    return 2 if mistakes else 1 if unreachable else 0


def _probe(source) -> tuple[bool, str]:
    """Reach one source as its runs would (its Connection, its URL), storing nothing."""
    from pipeline.snapshot import build_extractor, close_extractor

    started = time.monotonic()
    extractor = None
    try:
        extractor = build_extractor(source, connections.credentials(source.conn_id))
        answer = extractor.probe()
    except Exception as exc:  # whatever it is, it is this source's answer; the others still run
        return False, f"{type(exc).__name__}: {one_line(' '.join(str(exc).split()))}"
    finally:
        if extractor is not None:
            close_extractor(extractor)
    return True, f"{answer} ({human_duration(time.monotonic() - started)})"


def _probe_database(args) -> tuple[bool, str]:
    from loaders.migrate import current_revision, head_revision

    try:
        url = database_url(args)
        connect(url).close()
        revision = current_revision(url)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {one_line(' '.join(str(exc).split()))}"
    head = head_revision()
    if revision == head:
        state = f"at revision {revision} (up to date)"
    elif revision is None:
        state = "empty: run 'balances migrate'"
    else:
        state = f"at revision {revision}, code expects {head}: run 'balances migrate'"
    return revision == head, f"{describe_url(url)} {state}"


# -- sources -------------------------------------------------------------------

def sources(args) -> int:
    config = load_config(args.config)
    now = datetime.now(timezone.utc)
    rows = []
    for name, source in sorted(config.sources.items()):
        cron = cron_of(source.schedule)
        next_run = schedule_times(cron, max(now, source.start_date), 1)[0] if cron else None
        history = "yes" if source.contract.answers_for_past(source.settings) else "present only"
        rows.append((name, source.provider, source.schedule or "none", next_run, source.shards, history,
                     source.conn_id or "", source.dag_id))
    print_table(("source", "provider", "schedule", "next_run", "shards", "history", "conn_id", "dag_id"),
                rows, right=("shards",))
    warn_config_errors(config)
    return 0


# -- snapshot ------------------------------------------------------------------

def snapshot(args) -> int:
    from loaders.runs import RunStatus
    from pipeline.snapshot import take_snapshot

    config = load_config(args.config)
    source = config.source(args.source)
    warn_config_errors(config, skip=args.source)
    at = args.at or datetime.now(timezone.utc)
    creds = connections.credentials(source.conn_id)
    progress = for_terminal(args.quiet)
    with closing(_connect(args)) as conn:
        try:
            summary = take_snapshot(conn, source, at, credentials=creds, force=args.force, progress=progress)
        except ExtractError as exc:  # the run recorded it; the line says which source
            raise ExtractError(f"sources.{source.name}: {exc}") from exc
        finally:
            progress.close()
    print_summary(summary)
    # A skipped rerun did what was asked: the interval's snapshot is there.
    done = (RunStatus.PUBLISHED, RunStatus.NO_SNAPSHOT, RunStatus.SKIPPED)
    return 0 if summary["status"] in done else 1


SUMMARY_KEYS = ("run_id", "source", "status", "as_of_raw", "as_of", "scheduled_for", "took", "pages",
                "requests", "retries", "rows", "rows_inserted", "rejected", "error")


def print_summary(summary: dict) -> None:
    summary = dict(summary)
    if summary.get("started_at") and summary.get("finished_at"):
        summary["took"] = summary["finished_at"] - summary["started_at"]
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        if value is not None:
            print(f"{key:>14}: {cell(value)}")
    for warning in (summary.get("warnings") or [])[:5]:
        print(f"{'warning':>14}: {cell(warning)}")


def known_source(conn, config: Config | None, name: str) -> None:
    """Refuse a source neither configured nor ever run (a typo would list nothing, silently)."""
    configured = set(config.sources) | set(config.errors) if config is not None else set()
    if name in configured:
        return
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT source FROM snapshot_runs")
        stored = {r[0] for r in cur.fetchall()}
    conn.rollback()
    if name not in stored:
        known = sorted(configured | stored)
        raise ConfigError(f"no source named {name!r}{did_you_mean(name, known)} "
                          f"(known: {', '.join(known) or 'none'})")


def _optional_config(args) -> Config | None:
    """The sources file when one is given or set: commands that read only the database run without."""
    try:
        return load_config(args.config)
    except ConfigError:
        if args.config:
            raise
        return None


# -- latest --------------------------------------------------------------------

LATEST_COLUMNS = ("account", "asset", "balance", "decimals", "balance_units", "available_balance", "as_of",
                  "run_id")


def latest(args) -> int:
    """The holdings of the source's latest published snapshot, exact (view ``balance_latest``)."""
    config = _optional_config(args)
    with closing(_connect(args, schema="balance_latest")) as conn:
        known_source(conn, config, args.source)
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT account, asset, balance, decimals, balance_units, available_balance, as_of, run_id
                  FROM balance_latest
                 WHERE source = %(source)s
                   AND (%(account)s::text IS NULL OR account = %(account)s)
                   AND (%(asset)s::text IS NULL OR asset = %(asset)s)
                 ORDER BY account, asset
                """,
                {"source": args.source, "account": args.account, "asset": args.asset},
            )
            rows = cur.fetchall()
        conn.rollback()
    if not rows:
        wanted = " ".join(f"{k} {v!r}" for k, v in (("account", args.account), ("asset", args.asset)) if v)
        raise LookupError(f"{args.source}: no published snapshot holds {wanted}" if wanted
                          else f"{args.source}: no published snapshot yet")
    if args.csv:
        write_csv(("source", *LATEST_COLUMNS), [(args.source, *r) for r in rows], text_columns=("account", "asset"))
    else:
        shown = [(r[0], r[1], r[2], r[4], r[6]) for r in rows]
        print_table(("account", "asset", "balance", "units", "as_of"), shown, right=("balance", "units"),
                    limits={"account": 80, "asset": 60})
    return 0


# -- runs ----------------------------------------------------------------------

def runs(args) -> int:
    if args.source and args.source_option and args.source != args.source_option:
        raise ConfigError(f"two sources given: {args.source!r} and --source {args.source_option!r}")
    source = args.source or args.source_option
    if args.show is not None:
        return show_run(args, args.show, source)
    config = _optional_config(args)
    with closing(_connect(args)) as conn:
        if source is not None:
            known_source(conn, config, source)
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT run_id, source, status, scheduled_for, as_of, finished_at - started_at,
                       rows, rows_inserted, rejected, error
                  FROM snapshot_runs
                 WHERE %(source)s::text IS NULL OR source = %(source)s
                 ORDER BY run_id DESC LIMIT %(limit)s
                """,
                {"source": source, "limit": args.limit},
            )
            rows = cur.fetchall()
        conn.rollback()
    print_table(("run", "source", "status", "scheduled_for", "as_of", "took", "rows", "rows_inserted", "rejected",
                 "error"), rows, right=("run", "rows", "rows_inserted", "rejected"), limits={"error": 70})
    return 0


def show_run(args, run_id: int, source: str | None) -> int:
    """A run and the configuration of its source as the run was begun (``snapshot_runs.config``)."""
    from loaders.runs import get_run
    from pipeline.config import table_from_record, toml_table

    with closing(_connect(args)) as conn:
        run = get_run(conn, run_id)
    if source is not None and run.source != source:
        raise LookupError(f"run {run_id} is a run of {run.source}, not of {source}")
    print(f"# run {run.run_id} of {run.source}: {run.status}, scheduled for {run.scheduled_for.isoformat()}")
    if run.config is None:
        print("# begun before runs kept their configuration (migration 0012): not recorded")
        return 0
    print("# the configuration it was begun with, which every task of the run used:")
    print("\n".join(toml_table("sources", run.source, table_from_record(run.config))))
    return 0


# -- reader ----------------------------------------------------------------------

def reader(args) -> int:
    from urllib.parse import urlsplit

    from loaders.readers import ReaderLimits, create_reader, drop_reader

    with closing(_connect(args, schema="balance_history_units")) as conn:
        if args.action == "drop":
            drop_reader(conn, args.name)
            print(f"dropped the reader login {args.name}")
            return 0
        limits = ReaderLimits(connections=args.connections, statement_timeout=args.statement_timeout,
                              temp_file_limit=args.temp_file_limit, idle_in_transaction_timeout=args.idle_timeout)
        password = create_reader(conn, args.name, limits, reserve=args.reserve, replace=args.replace)
    parts = urlsplit(database_url(args))
    print(f"created the reader login {args.name} (member of balances_reader): connection limit "
          f"{limits.connections}, " + ", ".join(f"{k} {v}" for k, v in limits.settings().items()))
    print(f"password: {password}")
    print(f"url: postgresql://{args.name}:{password}@{parts.hostname}:{parts.port or 5432}{parts.path}")
    return 0


# -- pools ---------------------------------------------------------------------

def pools(args) -> int:
    """One pool per provider of the registry (``balances_<provider>``), as ``airflow pools import`` reads.

    Every task of a source runs in its provider's pool; a task whose pool is
    missing waits forever. Derived from the registry, so a new provider
    brings its pool with it.
    """
    import json

    from pipeline.config import pools_document

    print(json.dumps(pools_document(args.slots), indent=2))
    return 0


# -- partitions ----------------------------------------------------------------

def partitions(args) -> int:
    from loaders.partitions import ensure_ahead

    with closing(_connect(args, schema=None)) as conn:
        names = ensure_ahead(conn, args.months)
    print("partitions present: " + ", ".join(names))
    return 0


# -- movements -------------------------------------------------------------------


def movements(args) -> int:
    """Load every window of the source not loaded yet (backfills: any windows, any order); a line each.

    Exit 1 when a window failed (the others are still loaded); 0 when there was nothing to do.
    """
    from loaders.movements import latest_run, summary
    from pipeline import movements as loading

    config = load_config(args.config)
    source = config.source(args.source)
    warn_config_errors(config, skip=args.source)
    progress = for_terminal(args.quiet)
    failures = 0
    with closing(_connect(args, schema="movement_runs")) as conn:
        windows = loading.missing_windows(conn, source, args.window_from, args.window_to)
        if not windows:
            print(f"{source.name}: no window to load (every window between its published snapshots is)")
        try:
            for window in windows:
                try:
                    loading.load_windows(conn, source, [window], credentials=connections.credentials(source.conn_id),
                                         progress=progress)
                except (ExtractError, RuntimeError, LookupError, ValueError):  # recorded on its run
                    failures += 1
                run = summary(conn, latest_run(conn, source.name, window))
                extra = "".join(f"; {asset}: {why}" for asset, why in run["unexplainable"].items())
                print(f"window {window}: {run['status']}, {run['movements']} movement(s), {run['requests']} "
                      f"request(s){cell(extra, 300)}" + (f": {cell(run['error'], 300)}" if run["error"] else ""))
        finally:
            progress.close()
    return 1 if failures else 0


# -- reconcile and report ------------------------------------------------------

def _window(args) -> tuple[datetime, datetime]:
    from reconciliation.reconcile import default_window

    window_to = args.window_to or datetime.now(timezone.utc)
    window_from, window_to = default_window(window_to)
    return args.window_from or window_from, window_to


def reconcile(args) -> int:
    """The checks over the window, then, with ``[alerts]``, the alerts due: what the DAG's two tasks do."""
    from reconciliation import alerts
    from reconciliation.checks import load_checks
    from reconciliation.incidents import list_incidents
    from reconciliation.reconcile import open_breaks, reconcile as run_checks

    config = load_config(args.config)
    checks = load_checks(config, args.check)
    warn_config_errors(config)
    if not checks:
        raise ConfigError("no [checks.<name>] tables in the config file")
    window_from, window_to = _window(args)
    progress = for_terminal(args.quiet)
    with closing(_connect(args, schema="reconciliation_incidents")) as conn:
        try:
            result = run_checks(conn, checks, window_from, window_to, progress=progress,
                                flap_window=alerts.flap_window(config))
        finally:
            progress.close()
        breaks = open_breaks(conn, checks=list(checks), window=(window_from, window_to), limit=20)
        unresolved = [i for i in list_incidents(conn) if i["check_name"] in checks]
        print(f"reconciliation run {result.run_id}: {window_from.isoformat()} to {window_to.isoformat()}, "
              f"{result.checks_run} check(s): {result.breaks_open} open, {result.breaks_new} new, "
              f"{result.breaks_resolved} resolved")
        for name, note in result.notes.items():
            print(f"  {name}: {cell(note, 300)}")
        for b in breaks:
            values = " ".join(f"{k}={cell(b[k])}" for k in ("left_value", "right_value", "difference",
                                                             "tolerance") if b[k] is not None)
            print(f"  {b['check_name']} {b['kind']} {cell(b['subject_label'], 200)} at "
                  f"{b['check_time'].isoformat()} {values}: {cell(b['detail'], 300)}")
        print(f"incidents: {len(unresolved)} unresolved ('balances incidents' lists them)")
        if config.alerts is None:
            return 0
        if args.no_alerts:
            print("alerts: none sent (--no-alerts); the next run sends what is due")
            return 0
        sent = alerts.notify_incidents(conn, config)
    print(f"alerts: {sent.opened} opened, {sent.reminder} reminder(s), {sent.resolved} resolved"
          + (f", sent through {', '.join(sent.channels)}" if sent.channels else ": nothing due"))
    return 0


# -- incidents -------------------------------------------------------------------

INCIDENT_HEADERS = ("incident", "status", "check", "kind", "subject", "opened_at", "last_seen", "resolved_at",
                    "breaks", "worst_difference", "acknowledged_by")


def _incident_row(i: dict) -> tuple:
    return (i["incident_id"], i["status"], i["check_name"], i["kind"], i["subject_label"], i["opened_at"],
            i["last_seen"], i["resolved_at"], i["breaks"], i["worst_difference"], i["acknowledged_by"])


def incidents(args) -> int:
    """The unresolved incidents (``--all``: every one), newest first; ``incidents ack`` acknowledges one."""
    from reconciliation.incidents import list_incidents

    if args.action == "ack":
        return acknowledge(args)
    config = _optional_config(args)
    with closing(_connect(args, schema="reconciliation_incidents")) as conn:
        if args.source is not None:
            known_source(conn, config, args.source)
        rows = list_incidents(conn, unresolved=not args.all, source=args.source)
    print_table(INCIDENT_HEADERS, [_incident_row(i) for i in rows], right=("incident", "breaks", "worst_difference"),
                limits={"subject": 80, "acknowledged_by": 40})
    return 0


def acknowledge(args) -> int:
    """Append who, when and why to an open incident: its reminders stop, its resolution is still sent."""
    import getpass

    from reconciliation.incidents import acknowledge as append_acknowledgement

    by = args.by
    if by is None:
        try:
            by = getpass.getuser()
        except (OSError, KeyError):
            raise ConfigError("--by: no login name found to record: say who acknowledges") from None
    with closing(_connect(args, schema="reconciliation_incidents")) as conn:
        incident = append_acknowledgement(conn, args.incident_id, args.note, by)
    print(f"incident {incident['incident_id']} acknowledged by {cell(incident['acknowledged_by'])} at "
          f"{incident['acknowledged_at'].isoformat()}: {cell(incident['acknowledgement_note'], 300)}")
    print_table(INCIDENT_HEADERS, [_incident_row(incident)], right=("incident", "breaks", "worst_difference"),
                limits={"subject": 80, "acknowledged_by": 40})
    return 0


def report(args) -> int:
    from reconciliation.report import output_directory, write_report

    out = output_directory(Path(args.out))  # before any work: a wrong --out fails at once
    window_from, window_to = _window(args)
    with closing(_connect(args, schema="reconciliation_breaks_detail")):
        pass
    for path in write_report(database_url(args), out, window_from, window_to):
        print(path)
    return 0
