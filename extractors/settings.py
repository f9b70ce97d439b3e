"""What a key of the sources file may hold: the types a provider's settings are declared with.

A provider declares its own keys as a pydantic model next to its code::

    class Settings(ProviderSettings):
        base_url: Url
        limit: Annotated[Count, Between(1, 100)] = 100

The model does all the checking: TOML types are taken strictly (``true`` is
no integer, ``"10"`` no number), every number lies in a range, every
``*_url`` is http(s) with a host, and an unknown key is refused. A check
the types cannot say is a ``field_validator`` raising ``ValueError(message)``
on the key it is about; one that spans keys is a ``model_validator`` raising
:class:`KeyMistake` naming the key. Every message is one phrase;
``pipeline.config`` reads pydantic's error (where, what kind, the value) and
writes it as the one-line ``sources.<name>.<key>: ...`` a user sees.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
import unicodedata
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import core_schema

from extractors.redaction import redact_url


# A table of the file as a model: TOML types taken strictly, no key it does
# not declare, never changed once read.
STRICT_TABLE = ConfigDict(strict=True, frozen=True, extra="forbid")


class ProviderSettings(BaseModel):
    """The base of every provider's ``Settings``: strict, frozen, no key it does not declare.

    Defaults are validated too, so a check that spans keys (a
    ``field_validator`` reading ``info.data``) runs whichever keys were set.
    """

    model_config = ConfigDict(**STRICT_TABLE, validate_default=True)


class KeyMistake(ValueError):
    """A mistake a check across keys (a ``model_validator``) finds, about one key.

    pydantic places a model validator's error on the whole table; ``key``
    puts the message where the user has to look.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def number_text(value: float | int) -> str:
    """A bound or a value as a message shows it: 60, not 60.0."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**63 else repr(value)


class Check:
    """A check a field's value meets after its type's own: ``Annotated[Count, Between(1, 100)]``.

    A subclass says what is wrong in ``check``: a ValueError of one phrase,
    which the message builder puts after the key.
    """

    __slots__ = ()

    def check(self, value: Any) -> Any:
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))


@dataclasses.dataclass(frozen=True, slots=True)
class Range(Check):
    """Where a number may lie (``low_open`` excludes ``low``): ``Annotated[int, Range(1, 64)]``."""

    low: float
    high: float
    low_open: bool = False
    unit: str = ""

    def check(self, value: float | int) -> float | int:
        if self.low_open and value <= self.low or value < self.low or value > self.high:
            low = f"more than {number_text(self.low)}" if self.low_open else f"at least {number_text(self.low)}"
            raise ValueError(f"must be {low} and at most {number_text(self.high)}{self.unit}, "
                             f"got {number_text(value)}")
        return value


@dataclasses.dataclass(frozen=True, slots=True)
class Between(Check):
    """A provider's own limit inside a number's range (both ends included): what its API allows."""

    low: int | float
    high: int | float
    unit: str = ""
    grouped: bool = False  # 100,000 rather than 100000

    def check(self, value: float | int) -> float | int:
        if not self.low <= value <= self.high:
            high = f"{self.high:,}" if self.grouped else number_text(self.high)
            raise ValueError(f"must be between {number_text(self.low)} and {high}{self.unit}, "
                             f"got {number_text(value)}")
        return value


class OneOf(Check):
    """Text that is one of ``choices``: ``Annotated[Text, OneOf("path", "header")]``."""

    __slots__ = ("choices",)

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def check(self, value: str) -> str:
        if value not in self.choices:
            listed = (" or ".join(repr(c) for c in self.choices) if len(self.choices) == 2
                      else "one of " + ", ".join(self.choices))
            raise ValueError(f"must be {listed}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True, slots=True)
class Matching(Check):
    """Text the whole of which matches ``pattern``, else "'x' is not ``what``"."""

    pattern: re.Pattern
    what: str

    def check(self, value: str) -> str:
        if not self.pattern.fullmatch(value):
            raise ValueError(f"{value!r} is not {self.what}")
        return value


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError(f"{value!r} contains a control character")
    return value


def unblanked(value: Any) -> Any:
    """A value read from the sources file as its model is given it: text without surrounding blanks.

    Only the file reader trims (a value made in code is checked as it is);
    blank text is left for :data:`Text` to refuse as written.
    """
    if isinstance(value, str):
        return value.strip() or value
    if isinstance(value, list):
        return [unblanked(v) for v in value]
    if isinstance(value, dict):
        return {k: unblanked(v) for k, v in value.items()}
    return value


def _one_or_more(value: Any) -> Any:
    # A list of one may be written as its one value: account_ids = "0.0.98".
    return [value] if isinstance(value, str) else value


def _finite(value: float) -> float:
    # TOML has inf and nan; neither is a timeout, a delay or a rate. Said
    # here, before the range, whose message would read "got nan".
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _as_float(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{value} is out of range") from None
    return value


_URL_TEXT = re.compile(r"[!-~]{1,2000}")  # printable ASCII, no spaces


def check_url(url: str) -> str:
    """An http(s) URL with a host and no query or fragment, else ValueError.

    Anything else (``file:``, a bare path, a host-less ``http:///x``) would
    fail at run time at best, and read local files at worst.
    """
    if not _URL_TEXT.fullmatch(url):
        raise ValueError(f"{ascii(redact_url(url))} is not a URL (printable ASCII, no spaces)")
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{redact_url(url)!r} has an invalid port") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{redact_url(url)!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"{redact_url(url)!r} must not have a query or fragment")
    if "@" in parts.netloc:
        # The URL is kept with every run (snapshot_runs.config): no secret may ride in it.
        raise ValueError(f"{redact_url(url)!r} carries a user or password: put credentials in the"
                         " source's Connection (conn_id)")
    return url


def _time(value: Any) -> Any:
    if isinstance(value, date) and not isinstance(value, datetime):  # a TOML date: its midnight
        return datetime(value.year, value.month, value.day)
    return value


# Any time a run or the config names, once in UTC: from the epoch to the
# end of year 9999 (Python reads no later time back from PostgreSQL: a
# stored run in year 10000 broke every 'balances runs').
TIME_RANGE = (datetime(1970, 1, 1, tzinfo=timezone.utc), datetime.max.replace(tzinfo=timezone.utc))


def utc_time(value: datetime) -> datetime:
    """``value`` in UTC (a time without offset is taken as UTC); ValueError unless it lies in
    :data:`TIME_RANGE` once normalised (``9999-12-31T23:59:59-01:00`` is in year 10000)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    low, high = TIME_RANGE
    try:
        utc = value.astimezone(timezone.utc)
    except OverflowError:
        utc = None
    if utc is None or not low <= utc <= high:
        raise ValueError(f"{value.isoformat()} is outside {low:%Y-%m-%d} to {high:%Y-%m-%d} in UTC")
    return utc


# A decimal as written: plain ASCII, optional short exponent.
_DECIMAL_TEXT = re.compile(r"[-+]?([0-9]{1,40}(\.[0-9]{0,40})?|\.[0-9]{1,40})([eE][-+]?[0-9]{1,3})?")


def _decimal(value: Any) -> Decimal:
    # Money: only strings or integers, never TOML floats.
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value.strip()):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            pass
    raise ValueError(f"expected a decimal written as a string, got {value!r}")


# Text: not blank, no control character.
Text = Annotated[str, AfterValidator(_text)]
# An http(s) URL with a host: every key named url, *_url or *_urls holds these.
Url = Annotated[Text, AfterValidator(check_url)]
# Counts, sizes and seconds are never negative, and past 2**31 - 1 a number
# is a typo, not a setting: the range of any number without a narrower one.
DEFAULT_RANGE = Range(0, 2**31 - 1)
Count = Annotated[int, DEFAULT_RANGE]
# Any finite number; an integer is taken as its float.
Finite = Annotated[float, BeforeValidator(_as_float), AfterValidator(_finite)]
Number = Annotated[Finite, DEFAULT_RANGE]
# A date or date-time, in UTC; a date is its midnight.
Time = Annotated[datetime, BeforeValidator(_time), AfterValidator(utc_time)]
# Money as written in the file: a string (or an integer), never a float.
DecimalText = Annotated[Decimal, BeforeValidator(_decimal)]
T = typing.TypeVar("T")
# A list, or its one item written alone.
OneOrMore = Annotated[list[T], BeforeValidator(_one_or_more)]


def _declared(name: str, hint: Any) -> Any:
    """The checked type for a plain dataclass field: how a key of this name and type is read."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_declared(name, a) for a in typing.get_args(hint))]
    if origin is list:
        (item,) = typing.get_args(hint)
        return OneOrMore[_declared(name.removesuffix("s"), item)]
    if hint is str:
        return Url if name == "url" or name.endswith("_url") else Text
    return {int: Count, float: Number, datetime: Time, Decimal: DecimalText}.get(hint, hint)


@functools.cache
def settings_model(cls: type) -> type[BaseModel]:
    """The model that checks a provider's settings: ``cls`` itself, or one made from a plain dataclass.

    A dataclass's fields are read as their names and types say: strings as
    :data:`Text` (``url``, ``*_url`` and ``*_urls`` as :data:`Url`), numbers
    in :data:`DEFAULT_RANGE`.
    """
    if issubclass(cls, BaseModel):
        return cls
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ... if f.default is dataclasses.MISSING else f.default
        fields[f.name] = (_declared(f.name, hints[f.name]), default)
    return create_model(cls.__name__, __base__=ProviderSettings, **fields)
