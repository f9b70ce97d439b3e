"""The balances report: per source, balances over time and the open breaks.

Writes ``report.html`` and ``report.md`` side by side with one PNG chart per
source (``balances_<source>.png``, linked from both). A chart shows, for the
source's largest assets in whole units at its latest snapshot in the window,
the largest accounts over the window. Charts are drawn from floats; the
break tables print the exact NUMERIC values.

Every file is written to a temporary file in the output directory and then
renamed over its name: a reader never sees half a report, and a symlink
planted at ``report.md`` is replaced, never written through.
"""
from __future__ import annotations

import html
import os
import re
import secrets
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Callable

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sqlalchemy import create_engine, pool, text  # noqa: E402

from extractors.text import one_line  # noqa: E402
from loaders.db import connect, sqlalchemy_url  # noqa: E402
from reconciliation.reconcile import open_breaks, whole_units  # noqa: E402

TOP_ASSETS = 4
TOP_ACCOUNTS = 5
MAX_BREAK_ROWS = 200
_BREAK_COLUMNS = ("check_name", "kind", "check_time", "subject_label", "left_value", "right_value",
                  "difference", "tolerance", "first_seen", "last_seen", "detail")

_SERIES = f"""
WITH latest AS (
    SELECT source, max(as_of) AS as_of FROM snapshot_runs
     WHERE status = 'published' AND as_of BETWEEN :from AND :to
     GROUP BY source
), sized AS (
    SELECT b.source, b.asset, b.account, abs({whole_units('b.balance', 'b')}) AS size
      FROM balance_history b JOIN latest USING (source, as_of)
), top_assets AS (
    SELECT source, asset FROM (
        SELECT source, asset, row_number() OVER (PARTITION BY source ORDER BY sum(size) DESC, asset) AS rank
          FROM sized GROUP BY source, asset) ranked
     WHERE rank <= :assets
), top_accounts AS (
    SELECT source, asset, account FROM (
        SELECT s.source, s.asset, s.account,
               row_number() OVER (PARTITION BY s.source, s.asset ORDER BY s.size DESC, s.account) AS rank
          FROM sized s JOIN top_assets USING (source, asset)) ranked
     WHERE rank <= :accounts
)
SELECT b.source, b.asset, b.account, b.as_of, {whole_units('b.balance', 'b')} AS balance
  FROM balance_history b JOIN top_accounts USING (source, asset, account)
 WHERE b.as_of BETWEEN :from AND :to
 ORDER BY b.source, b.asset, b.account, b.as_of
"""


class ReportError(RuntimeError):
    """The report cannot be written where it was asked to be."""


def output_directory(out_dir: Path) -> Path:
    """``out_dir``, created if missing; ReportError when something else is in the way."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a dangling symlink, or a file on the way
        raise ReportError(f"--out {out_dir}: a file or a broken symlink is in the way") from None
    except NotADirectoryError:
        raise ReportError(f"--out {out_dir}: a parent is not a directory") from None
    return out_dir


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a new temporary file beside it, then rename it over ``path``.

    The temporary name is random and opened with O_EXCL | O_NOFOLLOW, so
    nothing planted in the directory is followed; the rename replaces
    whatever ``path`` was (a symlink included) instead of writing into it.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_dir() and not path.is_symlink():
            raise ReportError(f"{path}: is a directory, cannot replace it with the report")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_report(url: str, out_dir: Path, window_from: datetime, window_to: datetime) -> list[Path]:
    """Write the report for ``[window_from, window_to]``; the paths written, HTML first."""
    out_dir = output_directory(out_dir)
    series = read_series(url, window_from, window_to)
    conn = connect(url, application_name="balances-report")
    try:
        breaks = {b["break_id"]: b for b in open_breaks(conn)}
    finally:
        conn.close()
    sources = sorted(set(series["source"]) | {s for b in breaks.values() for s in b["sources"]})
    charts: dict[str, Path] = {}
    for source in sources:
        rows = series[series["source"] == source]
        if not rows.empty:
            charts[source] = draw_chart(source, rows, (window_from, window_to),
                                        out_dir / f"balances_{_file_safe(source)}.png")
    sections = [(s, charts.get(s), [b for b in breaks.values() if s in b["sources"]]) for s in sources]
    title = f"Balances {window_from:%Y-%m-%d %H:%M} to {window_to:%Y-%m-%d %H:%M} UTC"
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    page, markdown = render_html(title, len(breaks), sections), render_markdown(title, len(breaks), sections)
    write_atomically(html_path, lambda fh: fh.write(page.encode("utf-8")))
    write_atomically(md_path, lambda fh: fh.write(markdown.encode("utf-8")))
    return [html_path, md_path, *charts.values()]


def read_series(url: str, window_from: datetime, window_to: datetime) -> pd.DataFrame:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return pd.read_sql(text(_SERIES), conn, params={"from": window_from, "to": window_to,
                                                            "assets": TOP_ASSETS, "accounts": TOP_ACCOUNTS})
    finally:
        engine.dispose()


def draw_chart(source: str, rows: pd.DataFrame, window: tuple[datetime, datetime], path: Path) -> Path:
    # Labels are provider text: never parsed as mathtext ("$\\notacommand$" would stop the
    # report), and shown with control characters escaped.
    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_chart(source, rows, window, path)


def _draw_chart(source: str, rows: pd.DataFrame, window: tuple[datetime, datetime], path: Path) -> Path:
    assets = list(dict.fromkeys(rows["asset"]))
    fig, axes = plt.subplots(len(assets), 1, figsize=(9, 3 * len(assets)), squeeze=False, sharex=True)
    for ax, asset in zip(axes[:, 0], assets):
        for account, points in rows[rows["asset"] == asset].groupby("account", sort=False):
            ax.plot(pd.to_datetime(points["as_of"], utc=True), points["balance"].astype(float),
                    marker="o", markersize=3, label=one_line(account))
        ax.set_title(one_line(f"{source}: {asset}"), fontsize=10)
        ax.set_ylabel("whole units")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    # From a little before the first snapshot to the window's end, so a young
    # source is not a dot at the right edge and a stale one shows its silence
    # (matplotlib alone would widen a one-point series to years).
    first = pd.to_datetime(rows["as_of"], utc=True).min().to_pydatetime()
    start = max(window[0], first - max((window[1] - first) / 10, timedelta(minutes=15)))
    axes[0, 0].set_xlim(start, window[1])
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=90))
    finally:
        plt.close(fig)
    return path


def render_html(title: str, total: int, sections: list[tuple[str, Path | None, list[dict]]]) -> str:
    def e(text: str) -> str:  # provider text as inert HTML: markup escaped, control characters shown escaped
        return html.escape(one_line(text))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}td.n{text-align:right}</style>",
             f"</head><body><h1>{e(title)}</h1><p>{total} open break(s).</p>"]
    for source, chart, breaks in sections:
        parts.append(f"<h2>{e(source)}</h2>")
        parts.append(f"<img src='{e(chart.name)}' alt='balances of {e(source)}'>" if chart
                     else "<p>No snapshots in the window.</p>")
        parts.append(f"<h3>Open breaks ({len(breaks)})</h3>")
        if breaks:
            parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in _BREAK_COLUMNS) + "</tr>")
            for b in breaks[:MAX_BREAK_ROWS]:
                cells = "".join(f"<td class='n'>{e(_text(b[c]))}</td>" if isinstance(b[c], Decimal)
                                else f"<td>{e(_text(b[c]))}</td>" for c in _BREAK_COLUMNS)
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table>" + _more(breaks))
    parts.append("</body></html>")
    return "\n".join(parts)


# Every ASCII punctuation character CommonMark gives a meaning to (emphasis,
# links, images, headings, tables, raw HTML, entities): each is written
# escaped, so text from a provider shows as itself and never as markup.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&:$\"'=])")


def markdown_text(value: Any) -> str:
    """``value`` as inert Markdown: control characters and newlines shown escaped, punctuation escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", one_line(_text(value)))


def render_markdown(title: str, total: int, sections: list[tuple[str, Path | None, list[dict]]]) -> str:
    m = markdown_text
    lines = [f"# {m(title)}", "", f"{total} open break(s).", ""]
    for source, chart, breaks in sections:
        lines += [f"## {m(source)}", "", f"![balances of {m(source)}]({chart.name})" if chart
                  else "No snapshots in the window.", "", f"### Open breaks ({len(breaks)})", ""]
        if breaks:
            lines.append("| " + " | ".join(m(c) for c in _BREAK_COLUMNS) + " |")
            lines.append("|" + "---|" * len(_BREAK_COLUMNS))
            for b in breaks[:MAX_BREAK_ROWS]:
                lines.append("| " + " | ".join(m(b[c]) for c in _BREAK_COLUMNS) + " |")
            lines += [_more(breaks), ""]
    return "\n".join(lines) + "\n"


def _more(breaks: list[dict]) -> str:
    return f"\n{len(breaks) - MAX_BREAK_ROWS} more not shown.\n" if len(breaks) > MAX_BREAK_ROWS else ""


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")  # never 5E-8
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
