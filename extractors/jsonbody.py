"""Reading a provider's JSON: every number exact and bounded, every key once.

Numbers are measured before they are converted (:mod:`extractors.records`):
a decimal beyond the bounds becomes an :class:`~extractors.records.Oversized`
value, rejected as a record, never converted. An object with a key twice
makes the page malformed: JSON leaves open which value counts, and two
readers of one page could disagree.
"""
from __future__ import annotations

import json
import re
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

    Keys are checked without ``object_pairs_hook`` first (it makes json build
    a list of pairs per object: 2.5 times the decoding time of a Hedera
    page): the decoded objects' keys are counted and compared with the keys
    written in the text (:func:`_keys_written`). Equal, no object can have
    lost a key to a duplicate; otherwise, or when the text is not valid
    JSON, it is read again with the hook, which names the duplicate or gives
    the same error as ever.
    """
    limit = sys.get_int_max_str_digits()
    guarded = 0 < limit <= _INT_DIGITS_GUARD
    parse_int = None if guarded else json_int
    written = _keys_written(body)
    if written is not None:
        decoded = [0]

        def count_keys(document: dict) -> dict:
            decoded[0] += len(document)
            return document

        try:
            data = json.loads(body, parse_float=json_decimal, parse_int=parse_int, object_hook=count_keys)
        except (ValueError, RecursionError):
            pass  # read again below: the error is the careful reading's own
        else:
            if decoded[0] == written:
                return data
    try:
        return json.loads(body, parse_float=json_decimal, parse_int=parse_int, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        if not guarded or "integer string conversion" not in str(exc):
            raise
    return json.loads(body, parse_float=json_decimal, parse_int=json_int, object_pairs_hook=_unique_keys)


# What ends a key: its closing quote, JSON whitespace, the colon.
_KEY_END = re.compile(rb'"[ \t\n\r]*:')
_KEY_END_TEXT = re.compile(r'"[ \t\n\r]*:')
_WHITESPACE = (b" ", b"\t", b"\n", b"\r")


def _keys_written(body: bytes | bytearray | str) -> int | None:
    """An upper bound of the keys written in the JSON text ``body``; None for a text in UTF-16 or 32.

    Every key ends with a quote, optional whitespace and a colon, and no two
    keys share that quote: there are at least as many matches of
    :data:`_KEY_END` as keys (more when a string starts with a colon, or
    holds an escaped quote before one). Each object decoded has one key per
    distinct key written in it, so when the decoded objects hold as many keys
    in all as there are matches, no key was written twice in one object. In
    UTF-8 a quote and a colon are single bytes that no other character's
    bytes contain; in UTF-16 and 32 they are not, so those are always read
    with the hook.
    """
    if isinstance(body, str):
        return len(_KEY_END_TEXT.findall(body))
    if json.detect_encoding(body) != "utf-8":
        return None
    if any(space in body for space in _WHITESPACE):
        return len(_KEY_END.findall(body))
    return body.count(b'":')  # compact JSON: the same matches, counted without a regex
