"""Reading a provider's JSON: every number exact and bounded, every key once.

Numbers are measured before they are converted (:mod:`extractors.records`):
a decimal beyond the bounds becomes an :class:`~extractors.records.Oversized`
value, rejected as a record, never converted. An object with a key twice
makes the page malformed: JSON leaves open which value counts, and two
readers of one page could disagree.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from extractors.records import json_decimal, json_int
from extractors.text import safe_text


class DuplicateKeyError(ValueError):
    """An object in a JSON document has the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DuplicateKeyError(f"key {safe_text(twice, 80)!r} appears twice in one object")
    return document


# Python refuses to convert integers of more than this many digits (its
# int_max_str_digits, default 4300 since 3.11): below it, int() is fast.
_INT_DIGITS_GUARD = 4300


def parse_json(body: bytes | bytearray | str) -> Any:
    """Parse JSON keeping every number exact: ints as int, decimals as Decimal.

    A decimal beyond :data:`extractors.records.MAX_INTEGER_DIGITS` (or its
    fraction limit) becomes an :class:`extractors.records.Oversized`, never
    converted; a repeated key raises :class:`DuplicateKeyError`.

    Integers take json's own C conversion (a Python hook per integer would
    make a Hedera page parse about four times slower): Python itself refuses one
    of more than 4300 digits, and then the page is read again with the hook,
    so only that number's record is rejected. Amount readers refuse the
    integers between the bound and 4300 digits.
    """
    limit = sys.get_int_max_str_digits()
    guarded = 0 < limit <= _INT_DIGITS_GUARD
    try:
        return json.loads(body, parse_float=json_decimal, parse_int=None if guarded else json_int,
                          object_pairs_hook=_unique_keys)
    except ValueError as exc:
        if not guarded or "integer string conversion" not in str(exc):
            raise
    return json.loads(body, parse_float=json_decimal, parse_int=json_int, object_pairs_hook=_unique_keys)
