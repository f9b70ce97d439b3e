"""What an extractor produces: balance rows, movement rows, rejected records, pages.

Also the bounds on a single value. A provider controls the text of every
number, and the cost of turning that text into an exact amount is not the
cost of reading it: ``1e999999999`` is 11 characters, but as plain digits it
is a billion of them (``int()`` of it, or the staging table's ``format(x,
"f")``, runs for minutes and takes gigabytes). Every number is measured on
its text first, in time proportional to that text, and one bigger than
:data:`MAX_INTEGER_DIGITS` digits before the point or
:data:`MAX_FRACTION_DIGITS` after it is never converted: it becomes an
:class:`Oversized` value, which the amount readers reject as a record.
"""
from __future__ import annotations

import json
import re
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from operator import attrgetter
from typing import Any, Callable, Iterable, Iterator, TypeVar, get_args, get_type_hints

from extractors.text import safe_text

Amount = int | Decimal
T = TypeVar("T")

# balance_history's amounts are NUMERIC without precision: PostgreSQL takes
# up to 131072 digits before the point and 16383 after. 1000 each is far
# inside both, far above any real balance (a uint256 has 78 digits), inside
# Python's 4300-digit int/str conversion limit, and converts in microseconds.
MAX_INTEGER_DIGITS = 1000
MAX_FRACTION_DIGITS = 1000
# An exponent needs at most this many digits to place a number within the
# bounds above; a longer one is refused before int() reads it.
_MAX_EXPONENT_DIGITS = 6
# Longest text a bounded number can have (sign, point, exponent included),
# beyond it no other check is needed.
_MAX_NUMBER_TEXT = MAX_INTEGER_DIGITS + MAX_FRACTION_DIGITS + 16
# The smallest integer with more digits than the bound (compared, not printed).
_INTEGER_LIMIT = 10 ** MAX_INTEGER_DIGITS

# A JSON number, the only text an amount may have when sent as a string
# (Decimal() alone would also take "1_000", " 5", "Infinity" or full-width
# digits; int() takes "+5" and "٥").
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"-?[0-9]+")

# An id (account, asset) is stored under a btree index whose entries must fit
# a third of a page (2704 bytes; a 3,000-character address failed only at
# publish), is shown in terminals, reports and dashboards, and is compared
# byte by byte. 512 bytes of UTF-8 holds every id a provider documents (an
# EVM address is 42, a Hedera id at most 32) with room to spare.
MAX_ID_BYTES = 512
# No C0/C1 control (NUL, newline, ANSI escape), no lone surrogate, no
# Unicode line or paragraph separator, no bidirectional override: none
# belongs in an id, and each one changes what a reader of it sees.
_UNSAFE_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def id_problem(value: Any, what: str) -> str | None:
    """Why ``value`` cannot be stored as an account or asset id, or None when it can."""
    if not isinstance(value, str) or not value:
        return f"{what} is {shown(value)}, not a non-empty string"
    bad = _UNSAFE_ID.search(value)
    if bad:
        return (f"{what} {ascii(value[:80])} holds {ascii(bad.group())} at {bad.start()}: "
                "a control, separator or unpaired character")
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return f"{what} is {size} bytes of UTF-8, more than {MAX_ID_BYTES}: {ascii(value[:40])}..."
    return None


def _all_plain_ids(rows: list) -> bool:
    """Whether every account and asset of ``rows`` is a non-empty printable ASCII string of at most
    :data:`MAX_ID_BYTES`: ids :func:`id_problem` passes, checked a page at a time in C loops.

    Printable ASCII holds none of the characters ``id_problem`` refuses, and
    is one byte a character. False means only that some id needs the
    detailed check.
    """
    if not rows:
        return True
    accounts = list(map(_ACCOUNT_OF, rows))
    assets = list(map(_ASSET_OF, rows))
    if set(map(type, accounts)) != {str} or set(map(type, assets)) != {str}:
        return False
    lengths = set(map(len, accounts))
    lengths.update(map(len, assets))
    if min(lengths) == 0 or max(lengths) > MAX_ID_BYTES:
        return False
    text = "".join(accounts) + "".join(assets)
    return text.isascii() and text.isprintable()


_ACCOUNT_OF, _ASSET_OF = attrgetter("account"), attrgetter("asset")


def _column(sql_type: str, default: Any = MISSING) -> Any:
    """A :class:`BalanceRow` field that is a column of ``balance_history``, of ``sql_type`` there."""
    return field(default=default, metadata={"sql_type": sql_type})


@dataclass(slots=True, frozen=True)
class BalanceRow:
    """One holding: ``balance`` of ``asset`` on ``account``, exactly as reported.

    ``balance`` is in the provider's own unit (tinybars, Sparks, cents...);
    ``decimals`` or ``spark_factor`` say how to get whole units from it.

    Each field is a column of ``balance_history`` and of the staging tables
    (see :data:`ROW_COLUMNS`): a new amount is a field here plus the
    migration adding its column.
    """

    # Ids in "C", as in balance_history (migration 0006): sorted in staging,
    # they arrive in the order of its primary key.
    account: str = _column('text COLLATE "C"')
    asset: str = _column('text COLLATE "C"')
    balance: Amount = _column("numeric")
    decimals: int | None = _column("smallint", None)
    available_balance: Amount | None = _column("numeric", None)
    spark_factor: int | None = _column("numeric", None)


@dataclass(slots=True, frozen=True)
class Column:
    """A column a :class:`BalanceRow` brings to ``balance_history``.

    ``kind`` is how its values are written: ``text``, ``integer`` (an int),
    ``amount`` (an int or a Decimal, compared when a snapshot is loaded
    twice) or ``time`` (an aware datetime). ``nullable`` follows the field's type (``| None``).
    """

    name: str
    sql_type: str
    kind: str
    nullable: bool


_KINDS = {frozenset({str}): "text", frozenset({int}): "integer", frozenset({int, Decimal}): "amount",
          frozenset({datetime}): "time"}


def _columns(cls: type) -> tuple[Column, ...]:
    hints = get_type_hints(cls)
    columns = []
    for f in fields(cls):
        types = set(get_args(hints[f.name])) or {hints[f.name]}
        nullable = type(None) in types
        kind = _KINDS.get(frozenset(types - {type(None)}))
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a column is str, int, Amount or datetime, "
                            "optionally | None")
        columns.append(Column(f.name, f.metadata["sql_type"], kind, nullable))
    return tuple(columns)


def _quick_init(cls: type) -> type:
    """``cls`` (a frozen dataclass with slots) with an ``__init__`` that fills each slot through its descriptor.

    The one dataclasses writes goes through ``object.__setattr__`` by name for
    every field: 1.2 us a row, as much as reading the record it comes from.
    Setting each slot's descriptor directly does the same (the instance
    stays frozen: only ``__init__`` writes) in half the time. Same
    parameters, defaults and annotations.
    """
    params, body, names = [], [], {}
    for f in fields(cls):
        if f.default_factory is not MISSING or not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain fields, with or without a default")
        names[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default is MISSING:
            params.append(f.name)
        else:
            names[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"        _set_{f.name}(self, {f.name})")
    source = (f"def make({', '.join(names)}):\n"
              f"    def __init__(self, {', '.join(params)}) -> None:\n" + "\n".join(body) + "\n"
              "    return __init__\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<__init__ of {cls.__name__}>", "exec"), namespace)
    init = namespace["make"](**names)
    init.__qualname__ = f"{cls.__name__}.__init__"
    init.__annotations__ = {**cls.__init__.__annotations__}
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init
    return cls


_quick_init(BalanceRow)


# The columns of a history row, in BalanceRow's field order: staging's DDL,
# its COPY encoder and publish's INSERT are built from these.
ROW_COLUMNS: tuple[Column, ...] = _columns(BalanceRow)
# The columns that say how ``balance`` becomes whole units, in the order the
# database's ``balance_whole_units(amount, ...)`` takes them (migration 0004):
# a power of ten, else a provider's own divisor. The checks read amounts through them.
UNIT_COLUMNS: tuple[str, ...] = ("decimals", "spark_factor")


# What a movement leg is, in the pipeline's own words (balance_movements.kind).
MOVEMENT_KINDS = frozenset({
    "transfer",    # between two accounts
    "fee",         # paid for a transaction (to a node, a fee account, or burnt)
    "reward",      # staking rewards, a block's priority fees to its producer
    "mint",        # created: from nowhere (an ERC-20 mint, a ledger's world account)
    "burn",        # destroyed: to nowhere
    "withdrawal",  # a consensus-layer withdrawal credited without a transaction (EVM)
})


@dataclass(slots=True, frozen=True)
class MovementRow:
    """One leg of a movement: ``amount`` (signed: in is positive) of ``asset`` on ``account``.

    In the units of the balance rows (tinybars, wei, minor units), exactly as
    reported. ``movement_id`` is the provider's transaction id and the leg's
    index, unique within the source; ``movement_time_raw`` the provider's
    exact time text (Hedera's nanoseconds, an EVM block and log index).
    Each field is a column of ``balance_movements`` and of its staging
    tables (:data:`MOVEMENT_COLUMNS`).
    """

    account: str = _column('text COLLATE "C"')
    asset: str = _column('text COLLATE "C"')
    movement_time: datetime = _column("timestamptz")
    movement_time_raw: str = _column("text")
    movement_id: str = _column('text COLLATE "C"')
    amount: Amount = _column("numeric")
    kind: str = _column("text")
    decimals: int | None = _column("smallint", None)
    counterparty: str | None = _column("text", None)


_quick_init(MovementRow)
MOVEMENT_COLUMNS: tuple[Column, ...] = _columns(MovementRow)


@dataclass(slots=True, frozen=True)
class Window:
    """The span between two consecutive published snapshots of a source: ``(start, end]``.

    Each end is the snapshot's time and its exact raw text (``as_of``,
    ``as_of_raw``): a Hedera consensus timestamp, an EVM block's number and
    hash, a Formance ``pit`` or v1 read. A window holds the movements after
    the first snapshot, up to and including the second.
    """

    start: datetime
    start_raw: str
    end: datetime
    end_raw: str

    def __str__(self) -> str:
        return f"({self.start_raw}, {self.end_raw}]"


# Why a record was rejected, in our own words: dashboards count rejections by
# code (view rejection_reasons), never by the reason text, which quotes the provider.
REASON_CODES = frozenset({
    "malformed_record",     # a record the parser could not read (the default)
    "amount_out_of_range",  # a number beyond what is stored exactly
    "missing",              # a holding asked for that the snapshot does not hold
    "invalid_id",           # an account or asset id that cannot be stored or shown safely
    "token_call_failed",    # an ERC-20 call that reverted or answered nonsense
    "malformed_response",   # a whole response body that could not be read
})


@dataclass(slots=True, frozen=True)
class Rejection:
    """A record that could not be parsed, kept with its raw text, the reason and its code.

    Both texts are made storable here (no NUL, no lone surrogate), whichever
    provider built them: a rejection that cannot be written would lose the
    run's real error. ``code`` is one of :data:`REASON_CODES`.
    """

    raw: str
    reason: str
    code: str = "malformed_record"

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", safe_text(self.raw))
        object.__setattr__(self, "reason", safe_text(self.reason, 2000))
        if self.code not in REASON_CODES:
            raise ValueError(f"unknown rejection code {self.code!r}")


class _Records:
    """What every page does with its records: rows from the good ones, the others rejected."""

    __slots__ = ()

    def parse_each(self, records: Iterable[Any], parse: Callable[[Any], T]) -> Iterator[tuple[Any, T]]:
        """``(record, parse(record))`` for each record that parses.

        A record whose ``parse`` raises :class:`RecordError` is rejected alone
        (kept with its exact text and the reason) and the rest of the page
        goes on: the one loop every provider walks its records with.
        """
        for record in records:
            try:
                parsed = parse(record)
            except RecordError as exc:
                self.reject(record, exc)
                continue
            yield record, parsed

    def reject_bad_ids(self) -> None:
        """Move every row whose account or asset cannot be stored safely to the rejected records.

        Called once per page by the run, whatever the provider: an id with a
        NUL, a control character or too many bytes is a rejected record
        (``invalid_id``, counted against ``max_rejected``), never a failed run.
        """
        if _all_plain_ids(self.rows):
            return
        bad = [(row, problem) for row in self.rows
               if (problem := id_problem(row.account, "account") or id_problem(row.asset, "asset"))]
        if bad:
            rejected = {id(row) for row, _ in bad}
            self.rows = [row for row in self.rows if id(row) not in rejected]
            for row, problem in bad:
                self.reject({"account": row.account, "asset": row.asset, "balance": row.balance}, problem,
                            code="invalid_id")

    def reject(self, record: Any, reason: object, code: str | None = None) -> None:
        """Keep a record that cannot be loaded: its exact JSON text and why.

        The code is ``code``, else the reason's own (a :class:`RecordError`'s).
        """
        code = code or getattr(reason, "code", None) or "malformed_record"
        self.rejected.append(Rejection(raw=to_json_text(record), reason=str(reason), code=code))


class PageKind(StrEnum):
    """What a :class:`Page` holds. The run treats each kind the same way whichever provider yields it."""

    # The snapshot's holdings: rows of balance_history.
    BALANCES = "balances"
    # The provider's own total of each asset over all its accounts (rows whose
    # account is ""): kept in aggregate_balances, where the aggregate check
    # compares them with the sum of the accounts.
    TOTALS = "totals"
    # The provider's data moved under the crawl: what this crawl staged is
    # void, and the extractor reads the snapshot again (rows: none).
    RESTART = "restart"


@dataclass(slots=True)
class Page(_Records):
    """One provider page, parsed.

    ``as_of`` is the provider's snapshot time for this page and ``as_of_raw``
    its exact text (Hedera's has nanoseconds; timestamptz keeps microseconds).
    ``kind`` says what it holds (:class:`PageKind`).
    """

    as_of: datetime
    as_of_raw: str
    rows: list[BalanceRow] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kind: PageKind = PageKind.BALANCES

    def __post_init__(self) -> None:
        if not isinstance(self.kind, PageKind):
            self.kind = PageKind(self.kind)  # a kind outside the contract fails here, in the extractor


@dataclass(slots=True)
class MovementPage(_Records):
    """One page of a window's movements, parsed.

    ``unexplainable`` names the assets whose movements the provider cannot
    read in this window, and why (an EVM node without traces cannot explain
    native balances): the roll-forward reports them, never a guess.
    """

    rows: list[MovementRow] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unexplainable: dict[str, str] = field(default_factory=dict)


class RecordError(ValueError):
    """A single record is malformed; the message is the quarantine reason, ``code`` its kind."""

    def __init__(self, message: str, code: str = "malformed_record") -> None:
        super().__init__(message)
        self.code = code


class Oversized:
    """A JSON number too big to convert, kept as its text with the reason.

    ``parse_json`` puts one in place of such a number; reading it as an
    amount raises the :class:`RecordError`, so the record is rejected while
    the rest of the page loads.
    """

    __slots__ = ("text", "reason")

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason

    def __repr__(self) -> str:
        shown = self.text if len(self.text) <= 40 else f"{self.text[:20]}...{self.text[-8:]}"
        return f"{shown} ({self.reason})"


def number_size_problem(text: str) -> str | None:
    """Why the JSON number ``text`` is beyond the bounds, or None if it is within.

    Only string operations on ``text`` (and ``int()`` of an exponent of at
    most six digits): linear in its length, whatever value it denotes.
    """
    if len(text) > _MAX_NUMBER_TEXT:
        return (f"{len(text)} characters long: more than {MAX_INTEGER_DIGITS} digits before the decimal "
                f"point or {MAX_FRACTION_DIGITS} after it")
    mantissa, _, exponent = text.lower().partition("e")
    exponent_digits = len(exponent.lstrip("+-").lstrip("0"))
    if exponent_digits > _MAX_EXPONENT_DIGITS:
        return (f"its exponent has {exponent_digits} digits: more than "
                f"{MAX_INTEGER_DIGITS} digits before the decimal point or {MAX_FRACTION_DIGITS} after it")
    whole, _, fraction = mantissa.lstrip("-").partition(".")
    shift = int(exponent or 0) - len(fraction)  # value = int(whole + fraction) * 10**shift
    significant = len((whole + fraction).lstrip("0"))
    before, after = max(1, significant + shift), max(0, -shift)
    if before > MAX_INTEGER_DIGITS:
        return f"{before} digits before the decimal point, more than the {MAX_INTEGER_DIGITS} stored"
    if after > MAX_FRACTION_DIGITS:
        return f"{after} digits after the decimal point, more than the {MAX_FRACTION_DIGITS} stored"
    return None


def json_int(text: str) -> int | Oversized:
    """``parse_int`` hook: an int, unless the text is too long to convert."""
    problem = number_size_problem(text)
    return int(text) if problem is None else Oversized(text, problem)


def json_decimal(text: str) -> Decimal | Oversized:
    """``parse_float`` hook: an exact Decimal, unless it is beyond the bounds."""
    problem = number_size_problem(text)
    return Decimal(text) if problem is None else Oversized(text, problem)


_UNENCODABLE = re.compile(r"[\ud800-\udfff]")


def to_json_text(value: Any) -> str:
    """JSON text of a decoded value, with Decimals written exactly."""
    text = json.dumps(value, default=_exact, separators=(",", ":"), ensure_ascii=False)
    if _UNENCODABLE.search(text):
        # A lone surrogate (decoded from "\ud800") has no UTF-8 form; escaped,
        # the text is still the exact JSON and can be stored.
        text = json.dumps(value, default=_exact, separators=(",", ":"))
    return text


def _exact(value: Any) -> Any:
    if isinstance(value, Decimal):
        # A float subclass would be rounded by json; RawJSON is 3.13+, so
        # write the Decimal as a string instead: the text stays exact.
        return str(value)
    if isinstance(value, Oversized):
        return value.text
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def require(record: Any, key: str) -> Any:
    """``record[key]``, or a RecordError naming the missing field."""
    if not isinstance(record, dict):
        raise RecordError(f"record is {type(record).__name__}, expected an object")
    if key not in record:
        raise RecordError(f"missing field {key!r}")
    return record[key]


def integer_amount(value: Any, field_name: str, *, minimum: int | None = None,
                   maximum: int | None = None) -> int:
    """An exact integer amount from a JSON number or a string of digits."""
    if isinstance(value, bool):
        raise RecordError(f"{field_name} is a boolean, expected an integer")
    if isinstance(value, Oversized):
        raise RecordError(f"{field_name} is {value!r}", "amount_out_of_range")
    if isinstance(value, int):
        amount = _bounded_int(value, field_name)
    elif isinstance(value, str) and _INTEGER.fullmatch(value):
        problem = number_size_problem(value)
        if problem is not None:
            raise RecordError(f"{field_name} is {Oversized(value, problem)!r}", "amount_out_of_range")
        amount = int(value)
    elif isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        # 1e3 arrives as Decimal('1E+3'): an integer written with an exponent.
        # str() of a Decimal is scientific when long, so measuring it is cheap.
        problem = number_size_problem(str(value))
        if problem is not None:
            raise RecordError(f"{field_name} is {Oversized(str(value), problem)!r}", "amount_out_of_range")
        amount = int(value)
    else:
        raise RecordError(f"{field_name} is {shown(value)}, expected an integer")
    if minimum is not None and amount < minimum:
        raise RecordError(f"{field_name} is {amount}, below the provider's minimum {minimum}")
    if maximum is not None and amount > maximum:
        raise RecordError(f"{field_name} is {amount}, above the provider's maximum {maximum}")
    return amount


def decimal_amount(value: Any, field_name: str) -> Decimal:
    """An exact decimal amount from a JSON number (already Decimal) or string."""
    if isinstance(value, bool):
        raise RecordError(f"{field_name} is a boolean, expected a number")
    if isinstance(value, Oversized):
        raise RecordError(f"{field_name} is {value!r}", "amount_out_of_range")
    if isinstance(value, int):
        return Decimal(_bounded_int(value, field_name))
    if isinstance(value, Decimal) and value.is_finite():
        problem = number_size_problem(str(value))
        if problem is not None:
            raise RecordError(f"{field_name} is {Oversized(str(value), problem)!r}", "amount_out_of_range")
        return value
    if isinstance(value, str) and _JSON_NUMBER.fullmatch(value):
        problem = number_size_problem(value)
        if problem is not None:
            raise RecordError(f"{field_name} is {Oversized(value, problem)!r}", "amount_out_of_range")
        return Decimal(value)
    raise RecordError(f"{field_name} is {shown(value)}, expected a number")


def _bounded_int(value: int, field_name: str) -> int:
    """``value``, unless it has more digits than balance_history is meant to hold."""
    if -_INTEGER_LIMIT < value < _INTEGER_LIMIT:
        return value
    # json converted it, so it has at most 4300 digits: str() is cheap.
    text = str(value)
    raise RecordError(f"{field_name} is {Oversized(text, number_size_problem(text) or 'too large')!r}")


def shown(value: Any) -> str:
    """``repr`` of a value for a reason, cut short: a provider string can be megabytes."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
