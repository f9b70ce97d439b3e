"""The Superset dashboard "Balances": its export, and the bundle to import.

    python dashboards/build.py export                 # rewrite dashboards/export/ from the spec below
    python dashboards/build.py bundle --db-url URL --out balances.zip
    python dashboards/build.py import --db-url URL    # bundle + `superset import-dashboards` (scripts/superset)

``dashboards/export/`` is a Superset v1 export (what ``superset
import-dashboards`` reads, zipped): one database, one dataset per view, the
charts and the dashboard. Its database URI has no password; ``bundle``
writes the URI of the login the dashboard reads with (a member of
``balances_reader``) into the zip, after checking over that login that
every view the charts read exists: a database without them is one line
naming what is missing, before Superset is touched.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

HERE = Path(__file__).resolve().parent
EXPORT = HERE / "export"
ROOT = "balances_dashboard"
DATABASE_NAME = "balances"
PLACEHOLDER_URI = "postgresql://balances_dashboard:XXXXXXXXXX@localhost:5432/balances"
NS = uuid.UUID("6f1d2c1e-5b7a-4a39-9f8e-2d5e1c0b7a11")  # stable uuids: re-imports overwrite


def uid(name: str) -> str:
    return str(uuid.uuid5(NS, name))


# view -> (time column or None, [(column, type, is_dttm)])
VIEWS: dict[str, tuple[str | None, list[tuple[str, str, bool]]]] = {
    "balance_history_units": ("as_of", [
        ("source", "TEXT", False), ("provider", "TEXT", False), ("account", "TEXT", False),
        ("asset", "TEXT", False), ("as_of", "TIMESTAMP WITH TIME ZONE", True),
        ("balance_units", "NUMERIC", False), ("balance_text", "TEXT", False)]),
    "balance_latest": ("as_of", [
        ("source", "TEXT", False), ("account", "TEXT", False), ("asset", "TEXT", False),
        ("as_of", "TIMESTAMP WITH TIME ZONE", True), ("balance_units", "NUMERIC", False),
        ("balance_text", "TEXT", False), ("available_text", "TEXT", False), ("decimals", "SMALLINT", False)]),
    "source_freshness": ("last_published_as_of", [
        ("source", "TEXT", False), ("provider", "TEXT", False),
        ("last_published_as_of", "TIMESTAMP WITH TIME ZONE", True), ("age_seconds", "NUMERIC", False),
        ("last_run_status", "TEXT", False), ("failed_runs_24h", "BIGINT", False)]),
    "pipeline_runs": ("scheduled_for", [
        ("source", "TEXT", False), ("status", "TEXT", False), ("scheduled_for", "TIMESTAMP WITH TIME ZONE", True),
        ("duration_seconds", "NUMERIC", False), ("rows", "BIGINT", False), ("rejected", "INTEGER", False)]),
    "reconciliation_incidents_daily": ("day", [
        ("day", "DATE", True), ("check_name", "TEXT", False), ("kind", "TEXT", False),
        ("opened", "BIGINT", False), ("still_open", "BIGINT", False)]),
    "reconciliation_incidents": ("opened_at", [
        ("incident_id", "BIGINT", False), ("status", "TEXT", False), ("check_name", "TEXT", False),
        ("kind", "TEXT", False), ("subject_label", "TEXT", False),
        ("opened_at", "TIMESTAMP WITH TIME ZONE", True), ("last_seen", "TIMESTAMP WITH TIME ZONE", False),
        ("resolved_at", "TIMESTAMP WITH TIME ZONE", False), ("breaks", "BIGINT", False),
        ("worst_difference_text", "TEXT", False), ("acknowledged_by", "TEXT", False), ("detail", "TEXT", False)]),
    "balance_rollforward": ("period_end", [
        ("source", "TEXT", False), ("account", "TEXT", False), ("asset", "TEXT", False),
        ("period_start", "TIMESTAMP WITH TIME ZONE", False), ("period_end", "TIMESTAMP WITH TIME ZONE", True),
        ("opening_text", "TEXT", False), ("inflow_text", "TEXT", False), ("outflow_text", "TEXT", False),
        ("closing_text", "TEXT", False), ("unexplained_text", "TEXT", False), ("unexplained_units", "NUMERIC", False),
        ("status", "TEXT", False), ("note", "TEXT", False)]),
}

# The demo's pair check (devtools/demo.py, treasury_hbar): its two sides.
PAIR_SIDES = ("(source = 'formance_sandbox' AND account = 'treasury:hedera' AND asset = 'HBAR/8')"
              " OR (source = 'hedera_sandbox' AND account = '0.0.1234' AND asset = 'HBAR')")


def sql_metric(label: str, sql: str) -> dict:
    return {"expressionType": "SQL", "sqlExpression": sql, "label": label, "hasCustomLabel": True,
            "optionName": "metric_" + label.lower().replace(" ", "_")}


def sql_filter(sql: str) -> dict:
    return {"expressionType": "SQL", "clause": "WHERE", "sqlExpression": sql,
            "filterOptionName": "filter_" + uid(sql)[:8]}


def step_chart(title: str, groupby: list[str], filters: list[dict]) -> dict:
    return {
        "viz_type": "echarts_timeseries_step", "x_axis": "as_of", "time_grain_sqla": None,
        "metrics": [sql_metric("whole units", "MAX(balance_units)")], "groupby": groupby,
        "adhoc_filters": filters, "row_limit": 10000, "seriesType": "end", "show_legend": True,
        "legendOrientation": "top", "rich_tooltip": True, "y_axis_format": ",.12~r",
        "x_axis_time_format": "smart_date", "truncateYAxis": True, "y_axis_bounds": [None, None],
    }


def table_chart(columns: list[str], order_by: str | list[tuple[str, bool]], filters: list[dict] | None = None, *,
                ascending: bool = False) -> dict:
    # Cells are text, never HTML: ids and details come from providers, and
    # Superset renders a cell's HTML unless told not to (a link or an image
    # in an account id would become live in the dashboard).
    orders = [(order_by, ascending)] if isinstance(order_by, str) else order_by
    return {"viz_type": "table", "query_mode": "raw", "all_columns": columns, "adhoc_filters": filters or [],
            "order_by_cols": [f'["{column}", {str(up).lower()}]' for column, up in orders], "row_limit": 1000,
            "server_pagination": False,
            "table_timestamp_format": "%Y-%m-%d %H:%M:%S", "include_search": True, "allow_render_html": False}


# (key, title, view, params, width, height)
CHARTS = [
    ("balance", "Balance of a holding over time (whole units)", "balance_history_units",
     step_chart("", ["source", "account", "asset"], []), 12, 60),
    ("latest", "Latest balances (exact)", "balance_latest",
     table_chart(["source", "account", "asset", "balance_text", "available_text", "as_of"], "balance_units"),
     12, 50),
    ("freshness", "Source freshness", "source_freshness",
     table_chart(["source", "age_seconds", "last_run_status", "failed_runs_24h", "last_published_as_of"],
                 "source", ascending=True), 6, 40),
    ("incidents_daily", "Incidents opened per day, by check", "reconciliation_incidents_daily",
     {"viz_type": "echarts_timeseries_bar", "x_axis": "day", "time_grain_sqla": "P1D",
      "metrics": [sql_metric("opened", "SUM(opened)")], "groupby": ["check_name"], "adhoc_filters": [],
      "row_limit": 10000, "show_legend": True, "stack": "Stack", "x_axis_time_format": "%Y-%m-%d"}, 6, 40),
    ("runs", "Snapshot runs: rows per run and source, by status", "pipeline_runs",
     {"viz_type": "echarts_timeseries_bar", "x_axis": "scheduled_for", "time_grain_sqla": "PT1M",
      "metrics": [sql_metric("rows", "SUM(rows)")], "groupby": ["source", "status"], "adhoc_filters": [],
      "row_limit": 10000, "show_legend": True, "stack": "Stack", "x_axis_time_format": "smart_date"}, 12, 40),
    # One row per incident, not per break: a problem that lasts is one row
    # with its first and last check time and how many breaks it has had.
    ("incidents", "Incidents: open, acknowledged, resolved in the last day", "reconciliation_incidents",
     table_chart(["status", "check_name", "kind", "subject_label", "opened_at", "last_seen", "breaks",
                  "worst_difference_text", "resolved_at", "acknowledged_by", "detail"], "opened_at",
                 [sql_filter("status <> 'resolved' OR resolved_at >= now() - interval '1 day'")]), 12, 50),
    ("rollforward", "Roll-forward statement: opening + inflow - outflow = closing (exact)", "balance_rollforward",
     # The holdings that moved or that movements do not explain: the least explained first, then the newest.
     table_chart(["source", "account", "asset", "period_start", "period_end", "opening_text", "inflow_text",
                  "outflow_text", "closing_text", "unexplained_text", "status", "note"],
                 [("unexplained_units", False), ("period_end", False), ("account", True), ("asset", True)],
                 [sql_filter("inflow <> 0 OR outflow <> 0 OR status <> 'explained'")]), 12, 50),
    ("unexplained", "Unexplained balance changes over time (whole units, per source and asset)",
     "balance_rollforward",
     {"viz_type": "echarts_timeseries_bar", "x_axis": "period_end", "time_grain_sqla": "PT1M",
      "metrics": [sql_metric("unexplained", "SUM(unexplained_units)")], "groupby": ["source", "asset"],
      "adhoc_filters": [sql_filter("status IN ('explained', 'unexplained')")], "row_limit": 10000,
      "show_legend": True, "stack": "Stack", "x_axis_time_format": "smart_date", "y_axis_format": ",.12~r"}, 12, 40),
    ("pair", "Pair check treasury_hbar: both sides over time", "balance_history_units",
     # Resampled per minute, forward filled: both sides at every minute, each
     # holding its last snapshot (the sides' snapshot times differ).
     {**step_chart("", ["source"], [sql_filter(PAIR_SIDES)]), "resample_rule": "1T", "resample_method": "ffill"},
     12, 50),
]
ROWS = [["balance"], ["latest"], ["freshness", "incidents_daily"], ["runs"], ["incidents"], ["rollforward"],
        ["unexplained"], ["pair"]]
# native filter -> (charts it applies to, default value). Account and asset pick the
# holding the balance chart draws (all of them at once would share one scale).
FILTERS = {"source": (["balance", "latest", "freshness", "runs", "rollforward", "unexplained", "pair"], None),
           "account": (["balance"], ["0.0.101"]),
           "asset": (["balance"], None)}


def export_files() -> dict[str, dict]:
    """Path in the bundle -> YAML document."""
    db_uuid = uid("database")
    files: dict[str, dict] = {
        "metadata.yaml": {"version": "1.0.0", "type": "Dashboard", "timestamp": "2026-11-30T00:00:00+00:00"},
        f"databases/{DATABASE_NAME}.yaml": {
            "database_name": DATABASE_NAME, "sqlalchemy_uri": PLACEHOLDER_URI, "cache_timeout": None,
            "expose_in_sqllab": True, "allow_run_async": False, "allow_ctas": False, "allow_cvas": False,
            "allow_dml": False, "allow_file_upload": False, "extra": {"allows_virtual_table_explore": True},
            "uuid": db_uuid, "version": "1.0.0"},
    }
    for view, (dttm, columns) in VIEWS.items():
        files[f"datasets/{DATABASE_NAME}/{view}.yaml"] = {
            "table_name": view, "main_dttm_col": dttm, "description": f"the view {view} (docs/SCHEMA.md)",
            "default_endpoint": None, "offset": 0, "cache_timeout": None, "schema": "public", "sql": None,
            "params": None, "template_params": None, "filter_select_enabled": True,
            "fetch_values_predicate": None, "extra": None, "uuid": uid(f"dataset:{view}"),
            "metrics": [{"metric_name": "count", "verbose_name": "COUNT(*)", "metric_type": "count",
                         "expression": "COUNT(*)", "description": None, "d3format": None, "extra": None,
                         "warning_text": None}],
            "columns": [{"column_name": name, "verbose_name": None, "is_dttm": is_dttm, "is_active": True,
                         "type": kind, "groupby": True, "filterable": True, "expression": None,
                         "description": None, "python_date_format": None, "extra": None}
                        for name, kind, is_dttm in columns],
            "version": "1.0.0", "database_uuid": db_uuid}
    ids = {key: i + 1 for i, (key, *_) in enumerate(CHARTS)}
    position: dict[str, dict] = {
        "DASHBOARD_VERSION_KEY": "v2",
        "ROOT_ID": {"id": "ROOT_ID", "type": "ROOT", "children": ["GRID_ID"]},
        "GRID_ID": {"id": "GRID_ID", "type": "GRID", "parents": ["ROOT_ID"],
                    "children": [f"ROW-{i}" for i in range(len(ROWS))]},
        "HEADER_ID": {"id": "HEADER_ID", "type": "HEADER", "meta": {"text": "Balances"}},
    }
    layout = {key: (w, h) for key, _, _, _, w, h in CHARTS}
    for i, row in enumerate(ROWS):
        position[f"ROW-{i}"] = {"id": f"ROW-{i}", "type": "ROW", "parents": ["ROOT_ID", "GRID_ID"],
                                "children": [f"CHART-{k}" for k in row],
                                "meta": {"background": "BACKGROUND_TRANSPARENT"}}
    for key, title, view, params, width, height in CHARTS:
        chart_uuid = uid(f"chart:{key}")
        files[f"charts/{key}.yaml"] = {
            "slice_name": title, "description": None, "certified_by": None, "certification_details": None,
            "viz_type": params["viz_type"], "params": {**params, "datasource": f"{ids[key]}__table"},
            "query_context": None, "cache_timeout": None, "uuid": chart_uuid, "version": "1.0.0",
            "dataset_uuid": uid(f"dataset:{view}")}
        row = next(i for i, r in enumerate(ROWS) if key in r)
        position[f"CHART-{key}"] = {
            "id": f"CHART-{key}", "type": "CHART", "children": [],
            "parents": ["ROOT_ID", "GRID_ID", f"ROW-{row}"],
            "meta": {"chartId": ids[key], "uuid": chart_uuid, "sliceName": title, "width": layout[key][0],
                     "height": layout[key][1]}}
    native_filters = []
    for column, (charts, default) in FILTERS.items():
        mask = {"extraFormData": {}, "filterState": {}, "ownState": {}}
        if default:
            mask = {"extraFormData": {"filters": [{"col": column, "op": "IN", "val": list(default)}]},
                    "filterState": {"value": list(default)}, "ownState": {}}
        native_filters.append({
            "id": f"NATIVE_FILTER-{column}", "name": column, "filterType": "filter_select", "type": "NATIVE_FILTER",
            "targets": [{"column": {"name": column}, "datasetUuid": uid("dataset:balance_latest")}],
            "controlValues": {"multiSelect": True, "enableEmptyFilter": False, "defaultToFirstItem": False,
                              "inverseSelection": False, "searchAllOptions": False},
            "defaultDataMask": mask,
            "cascadeParentIds": [], "description": "",
            "scope": {"rootPath": ["ROOT_ID"], "excluded": [ids[k] for k in ids if k not in charts]}})
    files[f"dashboards/{ROOT}.yaml"] = {
        "dashboard_title": "Balances", "description": None, "css": "", "slug": "balances",
        "uuid": uid("dashboard"), "position": position, "published": True, "version": "1.0.0",
        "certified_by": None, "certification_details": None,
        "metadata": {"native_filter_configuration": native_filters, "refresh_frequency": 60,
                     "color_scheme": "supersetColors", "cross_filters_enabled": False,
                     "expanded_slices": {}, "timed_refresh_immune_slices": [], "default_filters": "{}",
                     "shared_label_colors": [], "label_colors": {}}}
    return files


def write_export(directory: Path = EXPORT) -> list[Path]:
    written = []
    for name, document in export_files().items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=True, allow_unicode=True))
        written.append(path)
    return written


class DashboardError(RuntimeError):
    """The dashboard cannot be imported; one line says why."""


def check_views(db_url: str) -> None:
    """Every view the charts read exists and this login may read it."""
    import psycopg2

    try:
        conn = psycopg2.connect(db_url, connect_timeout=10)
    except psycopg2.Error as exc:
        raise DashboardError(f"cannot connect to the dashboard's database: {' '.join(str(exc).split())}") from None
    try:
        with conn.cursor() as cur:
            for view, (_, columns) in VIEWS.items():
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{view}",))
                if not cur.fetchone()[0]:
                    raise DashboardError(f"the database {urlsplit(db_url).path.lstrip('/')!r} has no view "
                                         f"{view}: run 'balances migrate' on it first")
                cur.execute("SELECT has_table_privilege(current_user, %s, 'SELECT')", (f"public.{view}",))
                if not cur.fetchone()[0]:
                    raise DashboardError(f"the login {urlsplit(db_url).username!r} may not read the view {view}: "
                                         "GRANT balances_reader TO it")
    finally:
        conn.close()


def bundle(db_url: str, out: Path) -> Path:
    """The export zipped for ``superset import-dashboards``, connecting with ``db_url``."""
    check_views(db_url)
    uri = db_url.replace("postgres://", "postgresql://", 1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(p for p in EXPORT.rglob("*.yaml")):
            name = path.relative_to(EXPORT).as_posix()
            text = path.read_text()
            if name.startswith("databases/"):
                document = yaml.safe_load(text)
                document["sqlalchemy_uri"] = uri
                text = yaml.safe_dump(document, sort_keys=True)
            archive.writestr(f"{ROOT}/{name}", text)
    out.write_bytes(buffer.getvalue())
    out.chmod(0o600)  # it holds the login's password
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dashboards/build.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("export", help="rewrite dashboards/export/ from the spec")
    for name in ("bundle", "import"):
        p = commands.add_parser(name)
        p.add_argument("--db-url", default=os.environ.get("BALANCES_DASHBOARD_DB_URL"),
                       help="the login Superset reads with, a member of balances_reader")
        p.add_argument("--out", type=Path, default=Path("balances_dashboard.zip"))
        if name == "import":
            p.add_argument("--user", default="admin", help="Superset user who owns the dashboard")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            for path in write_export():
                print(path.relative_to(HERE.parent))
            return 0
        if not args.db_url:
            raise DashboardError("no database: pass --db-url or set BALANCES_DASHBOARD_DB_URL")
        out = bundle(args.db_url, args.out)
        if args.command == "bundle":
            print(out)
            return 0
        result = subprocess.run([str(HERE.parent / "scripts" / "superset"), "import-dashboards", "-p", str(out),
                                 "-u", args.user], capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            raise DashboardError(f"superset import-dashboards failed: {lines[-1] if lines else 'no output'}")
        print("dashboard 'Balances' imported (slug: balances)")
        return 0
    except DashboardError as exc:
        print(f"dashboards: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
