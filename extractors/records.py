"""What an extractor produces: balance rows, rejected records, pages."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

Amount = int | Decimal


@dataclass(slots=True, frozen=True)
class BalanceRow:
    """One holding: ``balance`` of ``asset`` on ``account``, exactly as reported.

    ``balance`` is in the provider's own unit (tinybars, Sparks, cents...);
    ``decimals`` or ``spark_factor`` say how to get whole units from it.
    """

    account: str
    asset: str
    balance: Amount
    decimals: int | None = None
    available_balance: Amount | None = None
    spark_factor: int | None = None


@dataclass(slots=True, frozen=True)
class Rejection:
    """A record that could not be parsed, kept with its raw text and the reason."""

    raw: str
    reason: str


@dataclass(slots=True)
class Page:
    """One provider page, parsed.

    ``as_of`` is the provider's snapshot time for this page and ``as_of_raw``
    its exact text (Hedera's has nanoseconds; timestamptz keeps microseconds).
    """

    as_of: datetime
    as_of_raw: str
    rows: list[BalanceRow] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kind: str = "balances"


class RecordError(ValueError):
    """A single record is malformed; the message is the quarantine reason."""


def to_json_text(value: Any) -> str:
    """JSON text of a decoded value, with Decimals written exactly."""
    return json.dumps(value, default=_exact, separators=(",", ":"), ensure_ascii=False)


def _exact(value: Any) -> Any:
    if isinstance(value, Decimal):
        # A float subclass would be rounded by json; RawJSON is 3.13+, so
        # write the Decimal as a string instead: the text stays exact.
        return str(value)
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
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and value == value.strip():
        amount = int(value)
    elif isinstance(value, Decimal) and value == value.to_integral_value() and value.is_finite():
        # 1e3 arrives as Decimal('1E+3'): an integer written with an exponent.
        amount = int(value)
    else:
        raise RecordError(f"{field_name} is {value!r}, expected an integer")
    if minimum is not None and amount < minimum:
        raise RecordError(f"{field_name} is {amount}, below the provider's minimum {minimum}")
    if maximum is not None and amount > maximum:
        raise RecordError(f"{field_name} is {amount}, above the provider's maximum {maximum}")
    return amount


def decimal_amount(value: Any, field_name: str) -> Decimal:
    """An exact decimal amount from a JSON number (already Decimal) or string."""
    if isinstance(value, bool):
        raise RecordError(f"{field_name} is a boolean, expected a number")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal) and value.is_finite():
        return value
    if isinstance(value, str):
        try:
            amount = Decimal(value)
        except ArithmeticError:
            raise RecordError(f"{field_name} is {value!r}, expected a number") from None
        if amount.is_finite():
            return amount
    raise RecordError(f"{field_name} is {value!r}, expected a number")
