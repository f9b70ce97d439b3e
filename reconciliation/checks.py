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
like ``1h30m``, at most 366 days. Every mistake is reported on one line as
``checks.<name>.<key>: what is wrong``; a check that names a source with a
mistake has a mistake too.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Union

from extractors.settings import DecimalText, OneOrMore, Text
from pipeline.config import (  # noqa: F401  (parse_duration is used from here too)
    Config,
    ConfigError,
    SourceConfig,
    cron_of,
    duration_key,
    named_table,
    parse_duration,
    schedule_times,
    value_of,
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

_KEYS: dict[str, set[str]] = {
    "pair": {"kind", "left", "right", "abs_tolerance", "rel_tolerance", "max_skew"},
    "aggregate": {"kind", "source", "assets", "abs_tolerance"},
    "continuity": {"kind", "source", "allow_negative", "max_staleness"},
    "rollforward": {"kind", "source", "accounts", "assets", "tolerance"},
}


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
    where = f"checks.{name}"
    kind = named_table("checks", name, table, "kind", list(_KEYS))
    unknown = set(table) - _KEYS[kind]
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}.{key}: unknown key for a {kind} check (known: {', '.join(sorted(_KEYS[kind]))})")
    if kind == "pair":
        return PairCheck(
            name=name,
            left=_holding(table, "left", where, sources, broken_sources),
            right=_holding(table, "right", where, sources, broken_sources),
            max_skew=duration_key(_required(table, "max_skew", where), f"{where}.max_skew"),
            abs_tolerance=_tolerance(table, "abs_tolerance", where),
            rel_tolerance=_tolerance(table, "rel_tolerance", where),
        )
    source = _source(table, "source", where, sources, broken_sources)
    if kind == "aggregate":
        return AggregateCheck(name=name, source=source.name, assets=_names(table, "assets", where),
                              abs_tolerance=_tolerance(table, "abs_tolerance", where))
    if kind == "rollforward":
        return RollforwardCheck(name=name, source=source.name, provider=source.provider,
                                accounts=_names(table, "accounts", where), assets=_names(table, "assets", where),
                                tolerance=_tolerance(table, "tolerance", where),
                                available=source.contract.offers_movements(source.settings))
    cron = cron_of(source.schedule)
    if "max_staleness" in table:
        max_staleness = duration_key(table["max_staleness"], f"{where}.max_staleness")
    elif cron is None:
        raise ConfigError(f"{where}.max_staleness: required: source {source.name!r} has no recurring "
                          "schedule to derive it from")
    else:
        max_staleness = 2 * longest_interval(cron, source.start_date)
    return ContinuityCheck(name=name, source=source.name, max_staleness=max_staleness, cron=cron,
                           start_date=source.start_date,
                           allow_negative=_allow_negative(table.get("allow_negative", False), where))


def _names(table: dict, key: str, where: str) -> tuple[str, ...] | None:
    """An optional filter: a non-empty list of names, or None (everything)."""
    names = table.get(key)
    if names is None:
        return None
    names = tuple(value_of(OneOrMore[Text], names, f"{where}.{key}"))
    if not names:
        raise ConfigError(f"{where}.{key}: empty list (leave the key out to check every {key[:-1]})")
    return names


def _required(table: dict, key: str, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}.{key}: missing")
    return table[key]


def _source(table: dict, key: str, where: str, sources: dict[str, SourceConfig],
            broken_sources: dict[str, str] | None = None) -> SourceConfig:
    name = value_of(Text, _required(table, key, where), f"{where}.{key}")
    if broken_sources and name in broken_sources:
        raise ConfigError(f"{where}.{key}: source {name!r} has a mistake in its [sources.{name}] table")
    if name not in sources:
        known = ", ".join(sorted(sources)) or "none"
        raise ConfigError(f"{where}.{key}: unknown source {name!r} (configured: {known})")
    return sources[name]


def _holding(table: dict, key: str, where: str, sources: dict[str, SourceConfig],
             broken_sources: dict[str, str] | None = None) -> Holding:
    spec = value_of(dict, _required(table, key, where), f"{where}.{key}")
    where = f"{where}.{key}"
    unknown = set(spec) - {"source", "account", "asset"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: account, asset, source)")
    source = _source(spec, "source", where, sources, broken_sources)
    return Holding(source=source.name,
                   account=value_of(Text, _required(spec, "account", where), f"{where}.account"),
                   asset=value_of(Text, _required(spec, "asset", where), f"{where}.asset"))


def _tolerance(table: dict, key: str, where: str) -> Decimal:
    value = value_of(DecimalText, table.get(key, "0"), f"{where}.{key}")
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{where}.{key}: must be a finite decimal of at least 0, got {table[key]!r}")
    high = Decimal(1) if key == "rel_tolerance" else MAX_TOLERANCE
    if value > high or 0 < value < MIN_TOLERANCE:
        raise ConfigError(f"{where}.{key}: must be 0 or between {MIN_TOLERANCE} and {high}, got {table[key]!r}")
    return value


def _allow_negative(value: Any, where: str) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        return tuple(value_of(OneOrMore[Text], value, f"{where}.allow_negative"))
    raise ConfigError(f"{where}.allow_negative: expected true, false or a list of accounts, got {value!r}")


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
