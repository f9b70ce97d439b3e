"""The sources file: one TOML document, ``[sources.<name>]`` tables.

Keys every source accepts are read here; every other key belongs to the
provider and is checked against the provider's settings dataclass. Any
mistake is reported as ``sources.<name>.<field>: what is wrong``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from extractors.http import RetryPolicy
from extractors.registry import PROVIDER_NAMES, provider as provider_named

CONFIG_ENV = "BALANCES_CONFIG"
SCHEDULE_PRESETS = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class ConfigError(ValueError):
    """The config file is wrong; the message names the source and the field."""


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    provider: str
    settings: Any
    schedule: str | None = "@hourly"
    conn_id: str | None = None
    start_date: datetime = datetime(2024, 1, 1, tzinfo=timezone.utc)
    catchup: bool = False
    max_rejected: int = 0
    max_pages: int = 100_000
    shards: int = 1
    task_retries: int = 3
    task_retry_delay: float = 60.0
    rate_limit: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def dag_id(self) -> str:
        return f"balances_{self.name}"


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    sources: dict[str, SourceConfig]
    checks: dict[str, Any] = field(default_factory=dict)

    def source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(f"no source named {name!r} in {self.path} (configured: {known})") from None


# Keys that every source accepts, with the type they must have.
_COMMON: dict[str, type] = {
    "provider": str,
    "schedule": str,
    "conn_id": str,
    "start_date": datetime,
    "catchup": bool,
    "max_rejected": int,
    "max_pages": int,
    "shards": int,
    "task_retries": int,
    "task_retry_delay": float,
    "rate_limit": float,
}
# Keys that tune retries, mapped onto RetryPolicy fields.
_RETRY: dict[str, str] = {
    "max_attempts": "max_attempts",
    "backoff_base": "backoff_base",
    "backoff_cap": "backoff_cap",
    "max_retry_after": "max_retry_after",
    "max_total_wait": "max_total_wait",
    "connect_timeout": "connect_timeout",
    "read_timeout": "read_timeout",
}


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    value = explicit or os.environ.get(CONFIG_ENV)
    if not value:
        raise ConfigError(f"no config file: pass --config PATH or set {CONFIG_ENV}")
    return Path(value)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the config file (``path``, else ``$BALANCES_CONFIG``)."""
    path = config_path(path)
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(document, path)


def parse_config(document: dict[str, Any], path: Path = Path("<config>")) -> Config:
    unknown = set(document) - {"sources", "checks"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level table(s) {', '.join(sorted(unknown))}")
    tables = document.get("sources", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: 'sources' must be a table of [sources.<name>] tables")
    sources = {name: parse_source(name, table) for name, table in tables.items()}
    checks = document.get("checks", {})
    if not isinstance(checks, dict):
        raise ConfigError(f"{path}: 'checks' must be a table of [checks.<name>] tables")
    return Config(path=path, sources=sources, checks=checks)


def named_table(section: str, name: str, table: Any, selector: str, known) -> str:
    """Check the shape of a ``[<section>.<name>]`` table; return its ``selector`` key.

    The selector (a source's ``provider``, a check's ``kind``) decides which
    other keys the table may have.
    """
    where = f"{section}.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: names in [{section}] are lowercase letters, digits and _"
                          " (they become Airflow ids)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    value = table.get(selector)
    if value is None:
        raise ConfigError(f"{where}.{selector}: missing (one of {', '.join(known)})")
    if value not in known:
        raise ConfigError(f"{where}.{selector}: unknown {selector} {value!r} (known: {', '.join(known)})")
    return value


def parse_source(name: str, table: Any) -> SourceConfig:
    where = f"sources.{name}"
    provider = named_table("sources", name, table, "provider", PROVIDER_NAMES)
    common: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in table.items():
        if key in _COMMON:
            common[key] = _coerce(value, _COMMON[key], f"{where}.{key}")
        elif key in _RETRY:
            retry[_RETRY[key]] = _coerce(value, int if key == "max_attempts" else float, f"{where}.{key}")
        else:
            rest[key] = value
    common.pop("provider")
    schedule = common.get("schedule", "@hourly")
    if schedule in ("", "none", "None"):
        common["schedule"] = None
    elif schedule not in SCHEDULE_PRESETS and not _valid_cron(schedule):
        raise ConfigError(f"{where}.schedule: {schedule!r} is neither a cron expression nor a preset such as @hourly")
    for key in ("max_rejected", "max_pages", "shards", "task_retries", "task_retry_delay"):
        minimum = 0 if key in ("max_rejected", "task_retries", "task_retry_delay") else 1
        if key in common and common[key] < minimum:
            raise ConfigError(f"{where}.{key}: must be at least {minimum}, got {common[key]}")
    module = provider_named(provider)
    if common.get("shards", 1) > 1 and not module.shardable:
        raise ConfigError(f"{where}.shards: {provider} sources cannot be sharded (one request answers all)")
    if common.get("rate_limit") is not None and common["rate_limit"] <= 0:
        raise ConfigError(f"{where}.rate_limit: requests per second must be positive")
    settings = build_settings(module.settings, rest, where)
    try:
        policy = RetryPolicy(**retry)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if policy.max_attempts < 1:
        raise ConfigError(f"{where}.max_attempts: must be at least 1")
    return SourceConfig(name=name, provider=provider, settings=settings, retry=policy, **common)


def build_settings(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a provider's settings dataclass from its TOML keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}.{key}: unknown key for this provider (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: missing (required for this provider)")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if len(exc.args) == 2:
            raise ConfigError(f"{where}.{exc.args[0]}: {exc.args[1]}") from None
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], where)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str) and value.strip():
            return value.strip()
    elif kind is Decimal:
        # Tolerances are money: only strings or integers, never TOML floats.
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                return Decimal(value)
            except InvalidOperation:
                pass
    elif kind is datetime:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if hasattr(value, "year"):  # a TOML date
            return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    elif kind is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
                Decimal: "a decimal written as a string", datetime: "a date or date-time",
                dict: "a table"}.get(kind, str(kind))
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def _valid_cron(expression: str) -> bool:
    from croniter import croniter

    return croniter.is_valid(expression)
