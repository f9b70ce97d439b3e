"""Text that came from outside, made safe to raise, log and store.

A provider controls the bytes of its error messages and records. PostgreSQL
cannot store NUL in ``text`` or ``jsonb``, and a lone surrogate (what
``json`` decodes from ``"\\ud800"``) cannot be encoded as UTF-8 at all: either
one inside an error message would make recording the failure itself fail,
and the real error would be lost. Every string that reaches the database
from a provider goes through :func:`safe_text` first.
"""
from __future__ import annotations

import difflib
import re
import unicodedata
from datetime import timedelta
from typing import Iterable

# NUL, C0/C1 controls other than tab/newline/carriage return, and lone
# surrogates: none of them carries meaning in an error message or an id.
_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def safe_text(text: str, limit: int | None = None) -> str:
    """``text`` with unstorable characters replaced by U+FFFD, cut to ``limit`` characters."""
    if not isinstance(text, str):
        text = str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit]
    return _UNSAFE.sub("\ufffd", text)


def one_line(text: str) -> str:
    """``text`` with control, format and line-separator characters escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    For whatever reaches a terminal, a log line or a one-line error: a
    provider's id or a key read from a file can hold an ANSI escape that
    would redraw the screen, or a newline that would forge the next line.
    """
    return "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else ascii(c)[1:-1]
                   for c in text)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_UNITS = (("d", 86_400), ("h", 3_600), ("min", 60), ("s", 1))


def human_duration(value: timedelta | float) -> str:
    """A duration as people write it: ``1125 d 2 h``, ``2 h 59 min``, ``4 min 2 s``, ``1.5 s``, ``40 ms``.

    The largest unit and the next one when it is not zero, rounded down:
    ``1125 days, 2:59:59.876544`` is ``1125 d 2 h``.
    """
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 1:
        return f"{sign}{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{sign}{seconds:.2g} s"
    counts = []
    rest = int(seconds)
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        counts.append((count, unit))
    first = next(i for i, (count, _) in enumerate(counts) if count)
    shown = [counts[first]] + [c for c in counts[first + 1:first + 2] if c[0]]
    return sign + " ".join(f"{count} {unit}" for count, unit in shown)
