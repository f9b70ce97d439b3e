"""The ``[checks.<name>]`` tables of the config file, parsed and validated.

Four kinds of check::

    [checks.treasury_hbar]             # the same holding seen by two sources
    kind = "pair"
    left = { source = "formance_main", account = "treasury:hedera", asset = "HBAR/8" }
    right = { source = "hedera_mainnet", account = "0.0.1234", asset = "HBAR" }
    abs_tolerance = "0.000001"         # whole units; default "0"
    rel_tolerance = "0"                # fraction of max(|left|, |right|); default "0"
    max_skew = "1h"                    # required

    [checks.formance_totals]           # provider aggregate vs sum of its accounts
    kind = "aggregate"
    source = "formance_main"
    assets = ["USD/2"]                 # optional: every asset by default
    abs_tolerance = "0"                # whole units; default "0"

    [checks.formance_continuity]       # gaps, staleness, impossible balances
    kind = "continuity"
    source = "formance_main"
    allow_negative = ["world"]         # true, false (default) or accounts that may go negative
    max_staleness = "2h"               # default: twice the longest interval of the schedule

    [checks.hedera_rollforward]        # opening + inflows - outflows = closing, per window
    kind = "rollforward"
    source = "hedera_mainnet"
    accounts = ["0.0.1234"]            # optional: every account by default
    assets = ["HBAR"]                  # optional: every asset by default
    tolerance = "0"                    # whole units; default "0"

Tolerances are decimals written as strings (never TOML floats: they are
money), at most 10^30 (``rel_tolerance`` at most 1) and at least 10^-30
apart from zero; durations are ``90s``, ``15m``, ``1h``, ``2d`` or sums
like ``1h30m``, at most 366 days. Each kind's keys are a pydantic model
(:data:`KINDS`), strict and closed like the sources' (:mod:`pipeline.config`);
``kind`` picks the model. Every mistake is reported on one line as
``checks.<name>.<key>: what is wrong``; a check that names a source with a
mistake has a mistake too.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ValidationInfo, WrapValidator, field_validator
from pydantic_core import core_schema

from extractors.settings import STRICT_TABLE, DecimalText, OneOrMore, Text
from pipeline.config import (  # noqa: F401  (parse_duration is used from here too)
    Config,
    ConfigError,
    Duration,
    SourceConfig,
    checked,
    cron_of,
    named_table,
    parse_duration,
    schedule_times,
)

# Whole units; beyond these a tolerance is a typo, and NUMERIC columns
# store it exactly.
MAX_TOLERANCE = Decimal("1e30")
MIN_TOLERANCE = Decimal("1e-30")
# Scheduled runs one continuity check looks at per window. Schedules fire at
# most once a minute, so the 3-day window of the reconcile DAG has at most
# 4,321; a longer window of a tight schedule is refused, not turned into
# hundreds of thousands of gap breaks.
MAX_FIRE_TIMES = 50_000


@dataclass(frozen=True, slots=True)
class Holding:
    """One account's balance of one asset, as one source reports it."""

    source: str
    account: str
    asset: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "account": self.account, "asset": self.asset}


@dataclass(frozen=True, slots=True)
class PairCheck:
    name: str
    left: Holding
    right: Holding
    max_skew: timedelta
    abs_tolerance: Decimal = Decimal(0)
    rel_tolerance: Decimal = Decimal(0)
    kind: ClassVar[str] = "pair"

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.left.source, self.right.source)))


@dataclass(frozen=True, slots=True)
class AggregateCheck:
    name: str
    source: str
    assets: tuple[str, ...] | None = None
    abs_tolerance: Decimal = Decimal(0)
    kind: ClassVar[str] = "aggregate"

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,)


@dataclass(frozen=True, slots=True)
class ContinuityCheck:
    name: str
    source: str
    max_staleness: timedelta
    # Cron expression of the source's schedule; None when it has none (no gaps to find).
    cron: str | None
    start_date: datetime
    # True: any account may be negative; otherwise the accounts that may.
    allow_negative: bool | tuple[str, ...] = False
    kind: ClassVar[str] = "continuity"

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def may_be_negative(self, account: str) -> bool:
        if isinstance(self.allow_negative, bool):
            return self.allow_negative
        return account in self.allow_negative


@dataclass(frozen=True, slots=True)
class RollforwardCheck:
    """Every balance change of a window explained by the movements loaded for it.

    ``available`` is false for a source whose provider offers no movements:
    the check then finds nothing and says the roll-forward is not available.
    """

    name: str
    source: str
    provider: str
    accounts: tuple[str, ...] | None = None
    assets: tuple[str, ...] | None = None
    tolerance: Decimal = Decimal(0)
    available: bool = True
    kind: ClassVar[str] = "rollforward"

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,)


Check = Union[PairCheck, AggregateCheck, ContinuityCheck, RollforwardCheck]

# -- the keys of each kind of check, as the file writes them ----------------------


def _configured(name: str, info: ValidationInfo) -> str:
    # The sources the check may name come with the table (checked(..., context=)).
    broken, sources = info.context["broken_sources"], info.context["sources"]
    if name in broken:
        raise ValueError(f"source {name!r} has a mistake in its [sources.{name}] table")
    if name not in sources:
        raise ValueError(f"unknown source {name!r} (configured: {', '.join(sorted(sources)) or 'none'})")
    return name


def _within(high: Decimal) -> WrapValidator:
    """A tolerance from 0 to ``high``; a non-zero one no closer to 0 than MIN_TOLERANCE."""
    def check(value: Any, decimal: Any) -> Decimal:
        tolerance = decimal(value)
        if not tolerance.is_finite() or tolerance < 0:
            raise ValueError(f"must be a finite decimal of at least 0, got {value!r}")
        if tolerance > high or 0 < tolerance < MIN_TOLERANCE:
            raise ValueError(f"must be 0 or between {MIN_TOLERANCE} and {high}, got {value!r}")
        return tolerance
    return WrapValidator(check)


class _Negatives:
    """``allow_negative``: true, false, or the accounts that may go negative."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        # Not a union: pydantic would name its members in an item's location
        # (allow_negative.list[...][1]); a list is read as a list, anything else refused.
        return core_schema.no_info_wrap_validator_function(self.read, handler.generate_schema(list[Text]))

    @staticmethod
    def read(value: Any, accounts: Any) -> bool | tuple[str, ...]:
        if isinstance(value, bool):
            return value
        if isinstance(value, list):
            return tuple(accounts(value))
        raise ValueError(f"expected true, false or a list of accounts, got {value!r}")


# A source of the config, without a mistake.
SourceName = Annotated[Text, AfterValidator(_configured)]
# Whole units.
Tolerance = Annotated[DecimalText, _within(MAX_TOLERANCE)]
# A fraction of the larger side.
Fraction = Annotated[DecimalText, _within(Decimal(1))]


class HoldingKeys(BaseModel):
    """One side of a pair check: ``{ source = ..., account = ..., asset = ... }``."""

    model_config = STRICT_TABLE

    source: SourceName
    account: Text
    asset: Text


class _CheckKeys(BaseModel):
    model_config = STRICT_TABLE

    @field_validator("accounts", "assets", check_fields=False)
    @classmethod
    def _a_filter_names_something(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        # An empty filter would check nothing: more likely a mistake than meant.
        if names == []:
            raise ValueError(f"empty list (leave the key out to check every {info.field_name[:-1]})")
        return names

    def check(self, name: str, sources: dict[str, SourceConfig]) -> Check:
        """The check these keys describe, named ``name``, on ``sources`` (those the keys were read with)."""
        raise NotImplementedError


class PairKeys(_CheckKeys):
    kind: Literal["pair"]
    left: HoldingKeys
    right: HoldingKeys
    max_skew: Duration
    abs_tolerance: Tolerance = Decimal(0)
    rel_tolerance: Fraction = Decimal(0)

    def check(self, name: str, sources: dict[str, SourceConfig]) -> PairCheck:
        return PairCheck(name=name, left=Holding(**self.left.model_dump()), right=Holding(**self.right.model_dump()),
                         max_skew=self.max_skew, abs_tolerance=self.abs_tolerance,
                         rel_tolerance=self.rel_tolerance)


class AggregateKeys(_CheckKeys):
    kind: Literal["aggregate"]
    source: SourceName
    assets: OneOrMore[Text] | None = None
    abs_tolerance: Tolerance = Decimal(0)

    def check(self, name: str, sources: dict[str, SourceConfig]) -> AggregateCheck:
        return AggregateCheck(name=name, source=self.source, assets=_tuple(self.assets),
                              abs_tolerance=self.abs_tolerance)


class ContinuityKeys(_CheckKeys):
    kind: Literal["continuity"]
    source: SourceName
    max_staleness: Duration | None = None
    allow_negative: Annotated[bool | tuple[str, ...], _Negatives()] = False

    def check(self, name: str, sources: dict[str, SourceConfig]) -> ContinuityCheck:
        source = sources[self.source]
        cron = cron_of(source.schedule)
        max_staleness = self.max_staleness
        if max_staleness is None and cron is None:
            raise ConfigError(f"checks.{name}.max_staleness: required: source {source.name!r} has no recurring "
                              "schedule to derive it from")
        if max_staleness is None:
            max_staleness = 2 * longest_interval(cron, source.start_date)
        return ContinuityCheck(name=name, source=source.name, max_staleness=max_staleness, cron=cron,
                               start_date=source.start_date, allow_negative=self.allow_negative)


class RollforwardKeys(_CheckKeys):
    kind: Literal["rollforward"]
    source: SourceName
    accounts: OneOrMore[Text] | None = None
    assets: OneOrMore[Text] | None = None
    tolerance: Tolerance = Decimal(0)

    def check(self, name: str, sources: dict[str, SourceConfig]) -> RollforwardCheck:
        source = sources[self.source]
        return RollforwardCheck(name=name, source=source.name, provider=source.provider,
                                accounts=_tuple(self.accounts), assets=_tuple(self.assets), tolerance=self.tolerance,
                                available=source.contract.offers_movements(source.settings))


# The keys of each kind of check: ``kind`` picks the model a table is read with.
KINDS: dict[str, type[_CheckKeys]] = {
    "pair": PairKeys,
    "aggregate": AggregateKeys,
    "continuity": ContinuityKeys,
    "rollforward": RollforwardKeys,
}


def _tuple(names: list[str] | None) -> tuple[str, ...] | None:
    return None if names is None else tuple(names)


def load_checks(config: Config, names: list[str] | None = None) -> dict[str, Check]:
    """The config's checks (all, or those named), validated against its sources.

    Raises the first mistake among the checks asked for.
    """
    checks, errors = usable_checks(config)
    wanted = names or list(config.checks)
    for name in wanted:
        if name in errors:
            raise ConfigError(errors[name])
        if name not in checks:
            known = ", ".join(sorted(config.checks)) or "none"
            raise ConfigError(f"no check named {name!r} in {config.path} (configured: {known})")
    return {n: checks[n] for n in wanted}


def usable_checks(config: Config) -> tuple[dict[str, Check], dict[str, str]]:
    """The checks without mistakes, and the one-line error of each other one.

    The reconcile DAG runs the first and reports the second, so one wrong
    check (or a check of a wrong source) does not stop the others.
    """
    checks: dict[str, Check] = {}
    errors: dict[str, str] = {}
    for name, table in config.checks.items():
        try:
            checks[name] = parse_check(name, table, config.sources, config.errors)
        except ConfigError as exc:
            errors[name] = str(exc)
    return checks, errors


def parse_checks(tables: dict[str, Any], sources: dict[str, SourceConfig]) -> dict[str, Check]:
    return {name: parse_check(name, table, sources) for name, table in tables.items()}


def parse_check(name: str, table: Any, sources: dict[str, SourceConfig],
                broken_sources: dict[str, str] | None = None) -> Check:
    """One ``[checks.<name>]`` table as its check; ConfigError on the first mistake."""
    kind = named_table("checks", name, table, "kind", list(KINDS))
    keys = checked(KINDS[kind], table, f"checks.{name}", unknown=f"unknown key for a {kind} check",
                   context={"sources": sources, "broken_sources": broken_sources or {}})
    return keys.check(name, sources)


def fire_times(cron: str, start: datetime, end: datetime) -> list[datetime]:
    """The times ``cron`` fires in ``[start, end]`` (UTC, as Airflow schedules them).

    ValueError when that is more than MAX_FIRE_TIMES: the window is too long
    for the schedule.
    """
    from croniter import croniter

    times = []
    # Step back one second so a fire time equal to ``start`` is included.
    it = croniter(cron, start - timedelta(seconds=1), max_years_between_matches=1)
    while (t := it.get_next(datetime)) <= end:
        if len(times) == MAX_FIRE_TIMES:
            raise ValueError(f"more than {MAX_FIRE_TIMES} runs of {cron!r} from {start.isoformat()} to "
                             f"{end.isoformat()}: check a shorter window")
        times.append(t)
    return times


def longest_interval(cron: str, start: datetime) -> timedelta:
    """The longest wait between two fires over the first 200 from ``start``.

    200 fires cover a weekend even for business-hours-only schedules.
    """
    times = schedule_times(cron, start, 200)
    return max(b - a for a, b in zip(times, times[1:]))
