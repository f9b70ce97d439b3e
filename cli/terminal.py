"""What the ``balances`` command prints: tables and values, safe for a terminal.

Ids, assets and errors come from providers. Printed as they are, an ANSI
escape in an account id would redraw the operator's terminal and a newline
would forge the next line of a table, so every value goes through
:func:`cell` (control characters escaped, see
:func:`extractors.text.one_line`) before it is printed.
"""
from __future__ import annotations

import csv
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Iterable, Sequence, TextIO

from extractors.text import human_duration, one_line

# Spreadsheet programs run a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any, limit: int | None = None) -> str:
    """One value as table text: exact numbers, ISO times, human durations, nothing unsafe."""
    if value is None:
        text = ""
    elif isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, timedelta):
        text = human_duration(value)
    elif isinstance(value, Decimal):
        text = format(value, "f")  # 0E-8 is 0.00000000: plain digits, as the database holds them
    else:
        text = one_line(str(value))
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return text


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Sequence[str] = (),
                limits: dict[str, int] | None = None, out: TextIO | None = None) -> int:
    """A plain aligned table; ``right`` names the columns aligned right (numbers). Rows printed."""
    out = out or sys.stdout
    limits = limits or {}
    texts = [[cell(v, limits.get(h)) for h, v in zip(headers, row)] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if h in right else v.ljust(w)
                         for h, v, w in zip(headers, values, widths)).rstrip()

    print(line(headers), file=out)
    for row in texts:
        print(line(row), file=out)
    return len(texts)


def write_csv(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, text_columns: Sequence[str] = (),
              out: TextIO | None = None) -> int:
    """CSV with exact values; a text cell a spreadsheet would run as a formula gets a leading ``'``.

    Only ``text_columns`` (ids, assets) are guarded: amounts stay numbers,
    negative ones included.
    """
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(headers)
    count = 0
    guarded = {i for i, h in enumerate(headers) if h in text_columns}
    for row in rows:
        values = []
        for i, value in enumerate(row):
            text = "" if value is None else (value.isoformat() if isinstance(value, datetime) else str(value))
            if i in guarded and text.startswith(_FORMULA_START):
                text = "'" + text
            values.append(text)
        writer.writerow(values)
        count += 1
    return count
