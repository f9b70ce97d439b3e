"""The sources file: one TOML document, ``[sources.<name>]`` tables, ``[alerts]``.

Keys every source accepts are the :class:`SourceKeys` model here; every
other key belongs to the provider and is checked by the provider's
``Settings`` model (:mod:`extractors.settings`); ``[alerts]`` is the
:class:`AlertsConfig` model (and each ``[checks.<name>]`` a model of
:mod:`reconciliation.checks`). All are pydantic models, strict and closed;
their first mistake is reported on one line as
``sources.<name>.<field>: what is wrong`` (:func:`config_error`), never as
pydantic's own text. Every number is finite and inside a documented range,
every ``*_url`` is http(s) with a host, a schedule fires at most once a
minute and at least once a year. A source with a mistake does not stop the
others: :func:`load_config` keeps it out of ``sources`` and keeps its error
in ``errors``, so the CLI and the DAG files accept exactly the same sources.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, BeforeValidator, ValidationError, model_validator

from extractors.http import RetryPolicy
from extractors.settings import (  # noqa: F401  (utc_time is used from here too)
    Finite,
    KeyMistake,
    STRICT_TABLE,
    Range,
    Text,
    Time,
    settings_model,
    unblanked,
    utc_time,
)
from extractors.text import did_you_mean, one_line
from extractors import registry
from extractors.provider import Provider

CONFIG_ENV = "BALANCES_CONFIG"
SCHEDULE_PRESETS = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}
# Names become Airflow ids and SQL values: ASCII only, matched in full
# (``$`` would accept a trailing newline, ``\d`` any Unicode digit).
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
# Five cron fields, ASCII: minute hour day-of-month month day-of-week.
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#-]{1,64}")
# A config file is a few kilobytes; refusing a huge one keeps a wrong path
# (a log, /dev/zero) from filling memory.
MAX_CONFIG_BYTES = 1 << 20
# Sharding splits one crawl over parallel Airflow tasks; beyond this the
# request budget and the pool are the limit, not the number of shards.
MAX_SHARDS = 64
# A schedule fires at most once a minute (five-field crons only: no
# seconds) and at least once a year (a Feb-31 cron never fires).
MAX_SCHEDULE_INTERVAL = timedelta(days=366)
# Fires looked at to measure a schedule (200 cover a weekend even for
# business-hours-only schedules).
_SCHEDULE_SAMPLE = 200
# The shortest interval of each preset, as measuring its cron over that
# sample finds it from any start (tests/test_config_and_cli.py compares):
# a preset, the default among them, needs no cron arithmetic, which costs
# each command that reads the file about 45 ms (croniter's import runs a
# subprocess).
PRESET_INTERVALS = {
    "@hourly": timedelta(hours=1),
    "@daily": timedelta(days=1),
    "@weekly": timedelta(days=7),
    "@monthly": timedelta(days=28),
    "@quarterly": timedelta(days=90),
    "@yearly": timedelta(days=365),
}
# Default task timeout: the schedule's shortest interval, kept within these.
MIN_DEFAULT_TASK_TIMEOUT = timedelta(minutes=10)
MAX_DEFAULT_TASK_TIMEOUT = timedelta(hours=6)
DEFAULT_SCHEDULE = "@hourly"
DEFAULT_START_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
START_DATE_RANGE = (datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2200, 1, 1, tzinfo=timezone.utc))


def pool_name(provider: str) -> str:
    """The Airflow pool every task of a provider's sources runs in: one request budget."""
    return f"balances_{provider}"


def pools_document(slots: int = 4) -> dict[str, dict]:
    """Every provider's pool, as ``airflow pools import`` reads them (``balances pools``).

    From the registry: a new provider brings its pool with it.
    """
    return {pool_name(name): {"slots": slots, "description": f"{name} request budget", "include_deferred": False}
            for name in registry.names()}


class ConfigError(ValueError):
    """The config file is wrong; the message names the source and the field.

    The message is always one line: a key or value read from the file may
    hold a newline or another control character, shown escaped instead.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    provider: str
    settings: Any
    schedule: str | None = DEFAULT_SCHEDULE
    conn_id: str | None = None
    start_date: datetime = DEFAULT_START_DATE
    catchup: bool = False
    max_rejected: int = 0
    max_pages: int = 100_000
    shards: int = 1
    task_retries: int = 3
    task_retry_delay: float = 60.0
    # Seconds one Airflow task may run (its execution_timeout); parse_source
    # derives it from the schedule when the file does not set it.
    task_timeout: float = MAX_DEFAULT_TASK_TIMEOUT.total_seconds()
    rate_limit: float | None = None
    # Seconds a provider's snapshot may lie from the time asked (either way)
    # before the run refuses it: pipeline.snapshot.check_snapshot_age.
    max_snapshot_age: float = 86_400.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # The provider's declaration (``PROVIDER`` of extractors/<provider>.py),
    # resolved once by parse_source: the run asks it, never the registry again.
    contract: Provider | None = field(default=None, compare=False, repr=False)

    @property
    def dag_id(self) -> str:
        return f"balances_{self.name}"

    @property
    def pool(self) -> str:
        return pool_name(self.provider)

    @property
    def execution_timeout(self) -> timedelta:
        return timedelta(seconds=self.task_timeout)

    def table(self) -> dict[str, Any]:
        """Every key of the source as resolved (defaults filled in), as its ``[sources.<name>]`` table
        would write it: :func:`parse_source` reads it back to an equal SourceConfig.

        Credentials are never part of it: a source names its Connection (``conn_id``), and a URL
        carrying a user or password is refused (:func:`extractors.settings.check_url`).
        """
        values = {"provider": self.provider}
        values |= {key: getattr(self, key) for key in SourceKeys.model_fields if key not in RETRY_KEYS}
        if values["schedule"] is None:
            values["schedule"] = "none"
        values |= {key: getattr(self.retry, key) for key in RETRY_KEYS}
        values |= settings_values(self.settings)
        # TOML has no null: a key left unset is one whose default is None.
        return {key: value for key, value in values.items() if value is not None}

    def record(self) -> dict[str, Any]:
        """:meth:`table` as JSON values (times as ISO-8601 text): what a run keeps of its source."""
        return {key: value.isoformat() if isinstance(value, datetime) else value
                for key, value in self.table().items()}


def source_from_record(name: str, record: dict[str, Any]) -> SourceConfig:
    """The SourceConfig a run kept (:meth:`SourceConfig.record`), through the same validation as the file."""
    return parse_source(name, table_from_record(record))


def table_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """A kept :meth:`SourceConfig.record` as its TOML table again (times as datetimes)."""
    table = dict(record)
    if isinstance(table.get("start_date"), str):
        table["start_date"] = datetime.fromisoformat(table["start_date"])
    return table


def toml_table(section: str, name: str, keys: dict[str, Any]) -> list[str]:
    """The lines of a ``[<section>.<name>]`` table holding ``keys``."""
    return [f"[{section}.{name}]"] + [f"{key} = {toml_value(value)}" for key, value in keys.items()]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()  # a TOML date or date-time, not a string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    sources: dict[str, SourceConfig]
    checks: dict[str, Any] = field(default_factory=dict)
    # Sources whose table has a mistake, by name, with the one-line error:
    # kept apart so one wrong source does not take the others down with it.
    errors: dict[str, str] = field(default_factory=dict)
    alerts: AlertsConfig | None = None  # the [alerts] table
    # The [alerts] table's mistake, when load_config went on without it:
    # the snapshot DAGs do not need it, the reconcile DAG file reports it.
    alerts_error: str | None = None

    def source(self, name: str) -> SourceConfig:
        if name in self.errors:
            raise ConfigError(self.errors[name])
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(f"no source named {name!r} in {self.path}{did_you_mean(name, self.sources)}"
                              f" (configured: {known})") from None


_SECONDS = " (seconds)"


def _seconds(low: float, high: float, *, low_open: bool = False) -> Any:
    return Annotated[Finite, Range(low, high, low_open=low_open, unit=_SECONDS)]


class SourceKeys(BaseModel):
    """The keys every source accepts, whatever its provider, each with its range.

    A key left out stays unset (:attr:`model_fields_set`): the default is
    :class:`SourceConfig`'s (``task_timeout``'s follows the schedule), or
    :class:`~extractors.http.RetryPolicy`'s for the keys of :data:`RETRY_KEYS`.
    """

    model_config = STRICT_TABLE

    provider: Text
    schedule: Text | None = None
    conn_id: Text | None = None
    start_date: Time | None = None
    catchup: bool | None = None
    max_rejected: Annotated[int, Range(0, 1_000_000_000)] | None = None
    max_pages: Annotated[int, Range(1, 10_000_000)] | None = None
    shards: Annotated[int, Range(1, MAX_SHARDS)] | None = None
    task_retries: Annotated[int, Range(0, 100)] | None = None
    task_retry_delay: _seconds(0, 86_400) | None = None
    task_timeout: _seconds(10, 7 * 86_400) | None = None
    rate_limit: Annotated[Finite, Range(0, 10_000, low_open=True, unit=" (requests per second)")] | None = None
    max_snapshot_age: _seconds(60, 366 * 86_400) | None = None
    # The retry policy (extractors.http.RetryPolicy, field for field).
    max_attempts: Annotated[int, Range(1, 100)] | None = None
    backoff_base: _seconds(0, 3_600) | None = None
    backoff_cap: _seconds(0, 3_600) | None = None
    max_retry_after: _seconds(0, 86_400) | None = None
    max_total_wait: _seconds(0, 86_400) | None = None
    connect_timeout: _seconds(0, 3_600, low_open=True) | None = None
    read_timeout: _seconds(0, 3_600, low_open=True) | None = None
    request_deadline: _seconds(0, 3_600, low_open=True) | None = None
    # 1 KiB holds the smallest error body; past 1 GiB one page would not fit a worker.
    max_response_bytes: Annotated[int, Range(1_024, 1 << 30, unit=" (bytes)")] | None = None


RETRY_KEYS = tuple(f.name for f in dataclasses.fields(RetryPolicy))
# Every key a source accepts whatever its provider.
SHARED_KEYS = tuple(SourceKeys.model_fields)


def settings_values(settings: Any) -> dict[str, Any]:
    """A provider's settings, key by key, as the source's table writes them."""
    if isinstance(settings, BaseModel):
        return {key: getattr(settings, key) for key in type(settings).model_fields}
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


# What a value of the wrong TOML type should have been, by pydantic's error type.
_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a non-empty string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "datetime_type": "a date or date-time",
}


def config_error(exc: ValidationError, where: str, known: Iterable[str] = (), *,
                 model: type[BaseModel] | None = None, unknown: str = "unknown key",
                 missing: str = "missing") -> ConfigError:
    """The first mistake pydantic found, as one line naming the key: ``<where>.<key>: what is wrong``.

    An unknown key comes first (the alphabetically first), said as
    ``unknown``, with the keys ``known`` there (by default, the fields of
    ``model``) and the nearest of them; in a table inside the table (a
    pair check's ``left``), as plain "unknown key" with that table's own
    fields. A required key left out is said as ``missing``. Our own checks
    raise ``ValueError(message)`` (:class:`~extractors.settings.KeyMistake`
    when a check across keys is about one of them): the message is shown as
    it is; pydantic's text is never shown.
    """
    errors = exc.errors(include_url=False)
    extra = sorted((e for e in errors if e["type"] == "extra_forbidden"), key=lambda e: str(e["loc"]))
    error = (extra or errors)[0]
    at = where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        *inside, key = error["loc"]
        if inside:
            unknown, known = "unknown key", _fields_at(model, inside)
        known = sorted(known or _fields_at(model, []))
        return ConfigError(f"{at}: {unknown}{did_you_mean(str(key), known)} (known: {', '.join(known)})")
    if kind == "missing":
        return ConfigError(f"{at}: {missing}")
    if kind in _EXPECTED:
        return ConfigError(f"{at}: expected {_EXPECTED[kind]}, got {error['input']!r}")
    if kind in ("value_error", "assertion_error"):
        mistake = error["ctx"]["error"]
        if isinstance(mistake, KeyMistake):
            at = f"{at}.{mistake.key}"
        return ConfigError(f"{at}: {mistake}")
    return ConfigError(f"{at}: {error['msg']}")


def _fields_at(model: type[BaseModel] | None, path: list) -> tuple[str, ...]:
    """The keys of the table at ``path`` inside ``model`` (none when it is no model)."""
    for part in path:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        inner = field.annotation if field is not None else None
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return tuple(model.model_fields) if model is not None else ()


def checked(model: type[BaseModel], values: dict[str, Any], where: str, known: Iterable[str] = (), *,
            context: dict[str, Any] | None = None, **wording: str) -> Any:
    """``model`` made from ``values``; ConfigError on the first mistake (:func:`config_error`, which
    ``wording`` is passed to). ``context`` is what validators need beyond the table (the sources a
    check may name)."""
    try:
        return model.model_validate(unblanked(values), context=context)
    except ValidationError as exc:
        raise config_error(exc, where, known, model=model, **wording) from None


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    value = explicit or os.environ.get(CONFIG_ENV)
    if not value:
        raise ConfigError(f"no config file: pass --config PATH or set {CONFIG_ENV}")
    return Path(value)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the config file (``path``, else ``$BALANCES_CONFIG``).

    A source with a mistake is left out of ``sources`` and its error kept
    in ``errors`` (``source(name)`` raises it); a mistake in the file as a
    whole raises.
    """
    path = config_path(path)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"config file {path} is a directory, not a TOML file")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {path} is not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests arrays or tables too deeply") from None
    return parse_config(document, path, partial=True)


def parse_config(document: dict[str, Any], path: Path = Path("<config>"), *, partial: bool = False) -> Config:
    """Validate a parsed config document.

    With ``partial``, a source with a mistake is recorded in ``errors``
    instead of raising (checks are validated later, by
    :mod:`reconciliation.checks`, against the sources that parsed).
    """
    unknown = set(document) - {"sources", "checks", "alerts"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level table(s) {', '.join(sorted(map(ascii, unknown)))}")
    tables = document.get("sources", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: 'sources' must be a table of [sources.<name>] tables")
    sources: dict[str, SourceConfig] = {}
    errors: dict[str, str] = {}
    for name, table in tables.items():
        try:
            sources[name] = parse_source(name, table)
        except ConfigError as exc:
            if not partial:
                raise
            errors[name] = str(exc)
    checks = document.get("checks", {})
    if not isinstance(checks, dict):
        raise ConfigError(f"{path}: 'checks' must be a table of [checks.<name>] tables")
    alerts, alerts_error = None, None
    try:
        alerts = parse_alerts(document.get("alerts"))
    except ConfigError as exc:
        if not partial:
            raise
        alerts_error = str(exc)
    return Config(path=path, sources=sources, checks=checks, errors=errors, alerts=alerts,
                  alerts_error=alerts_error)


def named_table(section: str, name: str, table: Any, selector: str, known) -> str:
    """Check the shape of a ``[<section>.<name>]`` table; return its ``selector`` key.

    The selector (a source's ``provider``, a check's ``kind``) decides which
    other keys the table may have.
    """
    where = f"{section}.{name}"
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{section}.{ascii(name)}: names in [{section}] are 1 to 63 lowercase ASCII letters,"
                          " digits and _, starting with a letter (they become Airflow ids)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    value = table.get(selector)
    if value is None:
        raise ConfigError(f"{where}.{selector}: missing (one of {', '.join(known)})")
    if not isinstance(value, str) or value not in known:
        hint = did_you_mean(value, known) if isinstance(value, str) else ""
        raise ConfigError(f"{where}.{selector}: unknown {selector} {value!r}{hint} (known: {', '.join(known)})")
    return value


def parse_source(name: str, table: Any) -> SourceConfig:
    """One ``[sources.<name>]`` table as a SourceConfig; ConfigError on the first mistake."""
    where = f"sources.{name}"
    provider = named_table("sources", name, table, "provider", registry.names())
    keys = checked(SourceKeys, {k: v for k, v in table.items() if k in SourceKeys.model_fields}, where)
    common = keys.model_dump(exclude_unset=True)
    retry = {key: common.pop(key) for key in RETRY_KEYS if key in common}
    rest = {k: v for k, v in table.items() if k not in SourceKeys.model_fields}
    common.pop("provider")
    start_date = common.get("start_date", DEFAULT_START_DATE)
    low, high = START_DATE_RANGE
    if not low <= start_date < high:
        raise ConfigError(f"{where}.start_date: must be from {low:%Y-%m-%d} and before {high:%Y-%m-%d},"
                          f" got {start_date.isoformat()}")
    schedule = common.get("schedule", DEFAULT_SCHEDULE)
    if schedule in ("", "none", "None"):
        schedule = common["schedule"] = None
    interval = schedule_interval(schedule, start_date, f"{where}.schedule")
    if "task_timeout" not in common:
        common["task_timeout"] = default_task_timeout(interval).total_seconds()
    try:
        contract = registry.provider(provider)
    except registry.ProviderUnavailable as exc:
        # Only the sources of this provider are lost; the others still load.
        raise ConfigError(f"{where}.provider: {exc}") from None
    if common.get("shards", 1) > 1 and not contract.shardable:
        raise ConfigError(f"{where}.shards: {provider} sources cannot be sharded (one request answers all)")
    settings = build_settings(contract.settings, rest, where)
    return SourceConfig(name=name, provider=provider, settings=settings, retry=RetryPolicy(**retry),
                        contract=contract, **common)


def default_task_timeout(interval: timedelta | None) -> timedelta:
    """A task's execution_timeout when ``task_timeout`` is not set.

    One interval of the schedule: a task still running when the next run
    is due has stalled rather than worked. Kept within 10 minutes (a
    every-minute source still gets time for a large crawl) and 6 hours (a
    daily source need not wait a day to learn a task hung).
    """
    if interval is None:
        return MAX_DEFAULT_TASK_TIMEOUT
    return min(max(interval, MIN_DEFAULT_TASK_TIMEOUT), MAX_DEFAULT_TASK_TIMEOUT)


def cron_of(schedule: str | None) -> str | None:
    """The cron expression a schedule fires on; None for no recurring schedule."""
    if schedule is None or schedule == "@once":
        return None
    return CRON_PRESETS.get(schedule, schedule)


def schedule_times(cron: str, start: datetime, count: int = _SCHEDULE_SAMPLE) -> list[datetime]:
    """The first ``count`` fire times of ``cron`` after ``start``.

    ValueError when the cron does not parse or a fire is more than a year
    after the one before (croniter then stops looking instead of searching
    ahead for decades).
    """
    return list(_schedule_times(cron, start, count))


@functools.lru_cache(maxsize=64)
def _schedule_times(cron: str, start: datetime, count: int) -> tuple[datetime, ...]:
    # Remembered: a source's schedule is checked each time its configuration is read (a snapshot
    # reads it twice: from the file, then as the run recorded it), 30 ms each.
    from croniter import CroniterBadCronError, CroniterBadDateError, croniter

    try:
        it = croniter(cron, start, max_years_between_matches=1)
        return tuple(it.get_next(datetime) for _ in range(count))
    except CroniterBadDateError:
        raise ValueError(f"{cron!r} never fires, or fires less often than once a year") from None
    except (CroniterBadCronError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{cron!r} is not a cron expression: {exc}") from None


def schedule_interval(schedule: str | None, start: datetime, where: str) -> timedelta | None:
    """Validate a schedule; return its shortest interval (None: no recurring schedule).

    A schedule is a preset (@hourly, ...), ``none``, or a five-field cron
    (minute hour day-of-month month day-of-week) that fires at least once a
    year; seconds are refused, so no schedule fires more than once a minute.
    """
    if schedule is None or schedule == "@once":
        return None
    if schedule.startswith("@") and schedule not in SCHEDULE_PRESETS:
        raise ConfigError(f"{where}: unknown preset {schedule!r} (known: {', '.join(sorted(SCHEDULE_PRESETS))})")
    if schedule in PRESET_INTERVALS:
        return PRESET_INTERVALS[schedule]
    cron = cron_of(schedule)
    # Split on ASCII blanks only: any other space stays inside a field and
    # fails the ASCII field pattern.
    fields = re.split(r"[ \t]+", cron.strip(" \t"))
    if len(fields) != 5:
        raise ConfigError(f"{where}: {schedule!r} is neither a preset such as @hourly nor a five-field cron"
                          " (minute hour day month weekday; no seconds field: at most one run a minute)")
    if not all(_CRON_FIELD.fullmatch(f) for f in fields):
        raise ConfigError(f"{where}: {schedule!r} is not a cron expression (five fields of ASCII digits,"
                          " month or day names and * / , -)")
    try:
        times = schedule_times(cron, start)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    gaps = [b - a for a, b in zip(times, times[1:])]
    if max(gaps) > MAX_SCHEDULE_INTERVAL:
        raise ConfigError(f"{where}: {schedule!r} fires less often than once a year")
    return min(gaps)


def build_settings(cls: type, values: dict[str, Any], where: str) -> Any:
    """A provider's settings from its TOML keys, checked by its model (:func:`~extractors.settings.settings_model`).

    ``cls`` is the provider's pydantic model, or a plain dataclass, read
    through a model made from its fields and returned as ``cls``.
    """
    model = settings_model(cls)
    settings = checked(model, values, where, known={*model.model_fields, *SHARED_KEYS},
                       missing="missing (required for this provider)")
    if model is cls:
        return settings
    return cls(**settings_values(settings))



# -- durations ("90s", "1h30m"): [checks] and [alerts] keys -------------------------

# ASCII digits only (``\d`` would take any Unicode digit), at most 9 per
# part so the sum cannot overflow before it is bounded.
_DURATION_PART = re.compile(r"([0-9]{1,9})([smhd])")
_DURATION = re.compile(r"(?:[0-9]{1,9}[smhd]){1,4}")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# Longer skews or staleness than a year are a typo, and a window of checks
# built on them would reach back before any snapshot.
MAX_DURATION = timedelta(days=366)


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"``, ``"1h30m"`` as a timedelta; ValueError otherwise.

    At most 366 days: a longer one is refused, never overflows.
    """
    text = text.strip()
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h or 2d")
    # Seconds as an int first: 999999999d is beyond what timedelta holds.
    seconds = sum(int(n) * int(timedelta(**{_UNITS[u]: 1}).total_seconds())
                  for n, u in _DURATION_PART.findall(text))
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def _duration(value: Any, *, zero: bool) -> timedelta:
    if isinstance(value, timedelta):  # a default, or one made in code
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a duration written as a string such as \"1h\", got {value!r}")
    if zero and value.strip() == "0":
        return timedelta(0)
    duration = parse_duration(value)
    if duration <= timedelta(0) and not zero:
        raise ValueError("must be longer than zero")
    return duration


# A duration key: "90s", "1h30m", ...; longer than zero.
Duration = Annotated[timedelta, BeforeValidator(lambda value: _duration(value, zero=False))]
# A duration key that may be "0" (none, never).
DurationOrZero = Annotated[timedelta, BeforeValidator(lambda value: _duration(value, zero=True))]


# -- the [alerts] table (sent by reconciliation.alerts) -----------------------------

DEFAULT_REMIND_EVERY = timedelta(hours=24)
_NO_SMTP = "missing (the Airflow SMTP Connection that sends alerts; or slack_conn_id alone)"
# An address as it may stand in a mail header: local@domain, printable ASCII,
# no space, no CR/LF (a header line break in 'to' made every alert fail, and
# could add headers), none of the characters that separate addresses.
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_HEADER_TEXT = re.compile(r"[^\x00-\x1f\x7f]{0,100}")


def _address(value: Any) -> str:
    # Checked as it is read, so that an alert never fails on it.
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value) or len(value) > 254:
        raise ValueError(f"{value!r} is not an e-mail address (local@domain, ASCII, no spaces or line breaks)")
    return value


def _recipients(value: Any) -> Any:
    if isinstance(value, str):  # one recipient may be written alone
        value = [value]
    if isinstance(value, list) and value:
        return tuple(value)
    if isinstance(value, tuple):  # the default, or one made in code
        return value
    raise ValueError(f"expected one or more e-mail addresses, got {value!r}")


def _slack_conn_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an Airflow Connection id, got {value!r}")
    return value


def _smtp_conn_id(value: Any) -> str:
    # A blank id is no Connection: said as for a missing one.
    if not isinstance(value, str) or not value.strip():
        raise ValueError(_NO_SMTP)
    return value


def _subject_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _HEADER_TEXT.fullmatch(value):
        raise ValueError(f"expected at most 100 printable characters, got {value!r}")
    return value


EmailAddress = Annotated[str, BeforeValidator(_address)]


class AlertsConfig(BaseModel):
    """The ``[alerts]`` table: where incidents are announced, and how often.

    Mail (``smtp_conn_id`` and ``to``), Slack (``slack_conn_id``), or both;
    ``smtp_conn_id`` may be left out only for Slack alone. Fields are
    checked in the order of the table as documented, so the first mistake
    reported is the first a reader meets.
    """

    model_config = STRICT_TABLE

    slack_conn_id: Annotated[str, BeforeValidator(_slack_conn_id)] | None = None
    smtp_conn_id: Annotated[str, BeforeValidator(_smtp_conn_id)] | None = None
    to: Annotated[tuple[EmailAddress, ...], BeforeValidator(_recipients)] = ()
    from_email: EmailAddress | None = None
    subject_prefix: Annotated[str, BeforeValidator(_subject_prefix)] = "[balances]"
    remind_every: DurationOrZero = DEFAULT_REMIND_EVERY
    flap_window: DurationOrZero = timedelta(0)

    @model_validator(mode="after")
    def _mail_or_slack(self) -> AlertsConfig:
        if self.smtp_conn_id is None and (self.slack_conn_id is None or "to" in self.model_fields_set):
            raise KeyMistake("smtp_conn_id", _NO_SMTP)
        if self.smtp_conn_id is not None and not self.to:
            raise KeyMistake("to", "expected one or more e-mail addresses, got None")
        return self

    @property
    def channels(self) -> list[str]:
        return ([f"smtp:{self.smtp_conn_id}"] if self.smtp_conn_id else []) + \
            ([f"slack:{self.slack_conn_id}"] if self.slack_conn_id else [])

    @property
    def conn_ids(self) -> dict[str, str]:
        """``alerts.<key>`` -> Connection id, for each channel configured."""
        return {key: conn_id for key, conn_id in (("smtp_conn_id", self.smtp_conn_id),
                                                  ("slack_conn_id", self.slack_conn_id)) if conn_id}


def parse_alerts(table: Any) -> AlertsConfig | None:
    """The ``[alerts]`` table; None when the file has none. Mistakes name ``alerts.<key>``."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("alerts: must be a table")
    return checked(AlertsConfig, table, "alerts")


def config_error_dag(dag_id: str, errors: list[str]):
    """A DAG that Airflow refuses with ``errors`` as the import error of its file.

    A DAG file that raises loses every DAG it defines. This DAG's timetable
    fails ``validate()``, which the DagBag calls on each DAG before keeping
    it: the DagBag records the failure as an import error of the file (the
    red banner of the UI, ``airflow dags list-import-errors``) and still
    keeps the file's other DAGs.
    """
    from airflow.sdk import DAG
    from airflow.sdk.bases.timetable import BaseTimetable
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    message = "\n".join(one_line(e) for e in errors)

    class ConfigMistakes(BaseTimetable):
        can_be_scheduled = False

        def validate(self) -> None:
            raise AirflowTimetableInvalid(message)

    return DAG(dag_id=dag_id, schedule=ConfigMistakes(), description="config mistakes", tags=["balances"])
