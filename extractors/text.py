"""Text that came from outside, made safe to raise, log and store.

A provider controls the bytes of its error messages and records. PostgreSQL
cannot store NUL in ``text`` or ``jsonb``, and a lone surrogate (what
``json`` decodes from ``"\\ud800"``) cannot be encoded as UTF-8 at all: either
one inside an error message would make recording the failure itself fail,
and the real error would be lost. Every string that reaches the database
from a provider goes through :func:`safe_text` first.
"""
from __future__ import annotations

import re

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
