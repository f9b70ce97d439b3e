"""The ``[checks.<name>]`` tables of the config file, parsed and validated.

Three kinds of check::

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

Tolerances are decimals written as strings (never TOML floats: they are
money); durations are ``90s``, ``15m``, ``1h``, ``2d`` or sums like ``1h30m``.
Every mistake is reported as ``checks.<name>.<key>: what is wrong``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Union

from pipeline.config import Config, ConfigError, SourceConfig, _coerce, named_table

CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


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


Check = Union[PairCheck, AggregateCheck, ContinuityCheck]

_KEYS: dict[str, set[str]] = {
    "pair": {"kind", "left", "right", "abs_tolerance", "rel_tolerance", "max_skew"},
    "aggregate": {"kind", "source", "assets", "abs_tolerance"},
    "continuity": {"kind", "source", "allow_negative", "max_staleness"},
}


def load_checks(config: Config, names: list[str] | None = None) -> dict[str, Check]:
    """The config's checks (all, or those named), validated against its sources."""
    checks = parse_checks(config.checks, config.sources)
    if names:
        unknown = [n for n in names if n not in checks]
        if unknown:
            known = ", ".join(sorted(checks)) or "none"
            raise ConfigError(f"no check named {unknown[0]!r} in {config.path} (configured: {known})")
        checks = {n: checks[n] for n in names}
    return checks


def parse_checks(tables: dict[str, Any], sources: dict[str, SourceConfig]) -> dict[str, Check]:
    return {name: parse_check(name, table, sources) for name, table in tables.items()}


def parse_check(name: str, table: Any, sources: dict[str, SourceConfig]) -> Check:
    where = f"checks.{name}"
    kind = named_table("checks", name, table, "kind", list(_KEYS))
    unknown = set(table) - _KEYS[kind]
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}.{key}: unknown key for a {kind} check (known: {', '.join(sorted(_KEYS[kind]))})")
    if kind == "pair":
        return PairCheck(
            name=name,
            left=_holding(table, "left", where, sources),
            right=_holding(table, "right", where, sources),
            max_skew=_duration(_required(table, "max_skew", where), f"{where}.max_skew"),
            abs_tolerance=_tolerance(table, "abs_tolerance", where),
            rel_tolerance=_tolerance(table, "rel_tolerance", where),
        )
    source = _source(table, "source", where, sources)
    if kind == "aggregate":
        assets = table.get("assets")
        if assets is not None:
            assets = tuple(_coerce(assets, list[str], f"{where}.assets"))
            if not assets:
                raise ConfigError(f"{where}.assets: empty list (leave the key out to check every asset)")
        return AggregateCheck(name=name, source=source.name, assets=assets,
                              abs_tolerance=_tolerance(table, "abs_tolerance", where))
    cron = cron_of(source.schedule)
    if "max_staleness" in table:
        max_staleness = _duration(table["max_staleness"], f"{where}.max_staleness")
    elif cron is None:
        raise ConfigError(f"{where}.max_staleness: required: source {source.name!r} has no recurring "
                          "schedule to derive it from")
    else:
        max_staleness = 2 * longest_interval(cron, source.start_date)
    return ContinuityCheck(name=name, source=source.name, max_staleness=max_staleness, cron=cron,
                           start_date=source.start_date,
                           allow_negative=_allow_negative(table.get("allow_negative", False), where))


def _required(table: dict, key: str, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}.{key}: missing")
    return table[key]


def _source(table: dict, key: str, where: str, sources: dict[str, SourceConfig]) -> SourceConfig:
    name = _coerce(_required(table, key, where), str, f"{where}.{key}")
    if name not in sources:
        known = ", ".join(sorted(sources)) or "none"
        raise ConfigError(f"{where}.{key}: unknown source {name!r} (configured: {known})")
    return sources[name]


def _holding(table: dict, key: str, where: str, sources: dict[str, SourceConfig]) -> Holding:
    spec = _coerce(_required(table, key, where), dict, f"{where}.{key}")
    where = f"{where}.{key}"
    unknown = set(spec) - {"source", "account", "asset"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: account, asset, source)")
    source = _source(spec, "source", where, sources)
    return Holding(source=source.name,
                   account=_coerce(_required(spec, "account", where), str, f"{where}.account"),
                   asset=_coerce(_required(spec, "asset", where), str, f"{where}.asset"))


def _tolerance(table: dict, key: str, where: str) -> Decimal:
    value = _coerce(table.get(key, "0"), Decimal, f"{where}.{key}")
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{where}.{key}: must be a finite decimal of at least 0, got {table[key]!r}")
    return value


def _allow_negative(value: Any, where: str) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        return tuple(_coerce(value, list[str], f"{where}.allow_negative"))
    raise ConfigError(f"{where}.allow_negative: expected true, false or a list of accounts, got {value!r}")


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"``, ``"1h30m"`` as a timedelta; ValueError otherwise."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h or 2d")
    return sum((timedelta(**{_UNITS[u]: int(n)}) for n, u in parts), timedelta())


def _duration(value: Any, where: str) -> timedelta:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a duration written as a string such as \"1h\", got {value!r}")
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if duration <= timedelta(0):
        raise ConfigError(f"{where}: must be longer than zero")
    return duration


def cron_of(schedule: str | None) -> str | None:
    """The cron expression a source's schedule fires on; None for no recurring schedule."""
    if schedule is None or schedule == "@once":
        return None
    return CRON_PRESETS.get(schedule, schedule)


def fire_times(cron: str, start: datetime, end: datetime) -> list[datetime]:
    """The times ``cron`` fires in ``[start, end]`` (UTC, as Airflow schedules them)."""
    from croniter import croniter

    times = []
    # Step back one second so a fire time equal to ``start`` is included.
    it = croniter(cron, start - timedelta(seconds=1))
    while (t := it.get_next(datetime)) <= end:
        times.append(t)
    return times


def longest_interval(cron: str, start: datetime) -> timedelta:
    """The longest wait between two fires over the first 200 from ``start``.

    200 fires cover a weekend even for business-hours-only schedules.
    """
    from croniter import croniter

    it = croniter(cron, start)
    times = [it.get_next(datetime) for _ in range(200)]
    return max(b - a for a, b in zip(times, times[1:]))
