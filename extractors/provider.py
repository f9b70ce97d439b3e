"""What a provider is: the contract between a provider module and the run.

A provider module (``extractors/<name>.py``) ends with one declaration::

    PROVIDER = Provider(
        name="hedera",
        settings=Settings,
        build=build,
        extractor=HederaExtractor,
        has_history=True,
        shardable=True,
        chooses_snapshot=True,
        has_movements=True,
    )

and the run (:mod:`pipeline.snapshot`) uses nothing else of the module. The
declaration says what differs between providers; what they share (the HTTP
client, its retries and statistics, closing, the lines every extractor's
constructor has: :class:`BaseExtractor`) is written once, here and in
:mod:`extractors.http`.

Each capability the declaration claims (``shardable``, ``chooses_snapshot``,
``verifies_snapshot``, ``has_movements``) names the methods its extractor
must have (:data:`CAPABILITIES`); the declaration checks them when the
module is imported, so a provider claiming ``shardable`` without
``shard_ranges`` fails there, in one line, not in the middle of a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterator, Protocol

from extractors.credentials import Credentials
from extractors.http import HttpClient, RequestStats, RetryPolicy
from extractors.records import Page

AccountRange = tuple[str | None, str | None]


class Extractor(Protocol):
    """One crawl's view of a provider, made by :meth:`Provider.open`.

    ``pages`` yields the snapshot for ``at`` one :class:`~extractors.records.Page`
    at a time, never the whole crawl. A shardable provider's extractor also has
    ``shard_ranges(at, shards, snapshot=None)`` and honours ``account_range``;
    one that chooses its snapshot has ``choose_snapshot(at) -> (as_of,
    as_of_raw) | None`` and its ``pages`` accepts ``snapshot=``. One whose
    snapshot can still change after it was read has ``verify_snapshot(snapshot)``,
    which raises :class:`~extractors.errors.SnapshotError` when it no longer stands.
    One that has movements has ``movements(window, account_range=None)``: the
    :class:`~extractors.records.MovementPage` pages of every movement leg in
    ``window`` (:class:`~extractors.records.Window`, the span between two
    published snapshots), one page at a time, restricted to ``account_range``
    as ``pages`` is for a shard.
    """

    client: HttpClient  # every request goes through it: retries, statistics, closing

    def pages(self, at: datetime, account_range: AccountRange | None = None) -> Iterator[Page]: ...

    def probe(self) -> str:
        """Reach the provider with as few requests as it takes (one, where one answers), creating
        nothing and storing nothing; a short line on what answered (``balances check --connect``)."""
        ...


class BaseExtractor:
    """What every extractor holds: the source's settings, its client, its page cap.

    A provider's extractor derives from it and adds only its own state
    (caches, the server it found); :meth:`Provider.open` makes one per crawl.
    """

    def __init__(self, settings: Any, client: HttpClient, *, max_pages: int) -> None:
        self.settings = settings
        self.client = client  # every request goes through it: retries, statistics, closing
        self.max_pages = max_pages


# What each capability a provider may claim requires of its extractor class.
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "shardable": ("shard_ranges",),
    "chooses_snapshot": ("choose_snapshot",),
    "verifies_snapshot": ("verify_snapshot",),
    "has_movements": ("movements",),
}
# What every extractor has, whatever it claims.
REQUIRED_METHODS = ("pages", "probe")


class DeclarationError(TypeError):
    """A ``PROVIDER = Provider(...)`` that does not hold together; raised when its module is imported."""


@dataclass(frozen=True, slots=True)
class Throttle:
    """Called before every request, e.g. to draw on a request budget shared by processes.

    ``release`` frees what the hook holds (the budget's own connection) when
    the extractor is closed.
    """

    acquire: Callable[[], None]
    release: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.acquire()


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider as its module declares it (``PROVIDER = Provider(...)``).

    Attributes:
        name: the ``provider = "..."`` of a source; also the module's name.
        settings: the pydantic model of the provider's own ``[sources.<name>]`` keys
            (a :class:`~extractors.settings.ProviderSettings`): its field types and
            ranges say what each key holds, its ``field_validator``\ s raise
            ``ValueError(message)`` on what types cannot say. A plain dataclass is
            read through a model made from its fields
            (:func:`~extractors.settings.settings_model`).
        build: ``build(settings, credentials, policy, *, max_pages, throttle)``
            makes the extractor; ``throttle`` goes to its :class:`HttpClient`.
        extractor: the class ``build`` makes (a :class:`BaseExtractor`): the
            methods each claimed capability needs are checked on it.
        has_history: whether the API answers for a past time; a function of the
            settings when that depends on them (Formance: v2 does, v1 does not).
            A provider without history refuses a past snapshot time.
        shardable: the account space splits into ranges crawled in parallel.
        chooses_snapshot: the snapshot is chosen once per run, before the crawl,
            and every shard reads that one.
        verifies_snapshot: the snapshot read can still be undone (a chain's
            reorganisation): the extractor's ``verify_snapshot((as_of, as_of_raw))``
            is asked again just before publish, and a snapshot that no longer
            stands publishes nothing.
        has_movements: the API lists the movements behind balance changes
            (transfers, fees, rewards), so a window between two snapshots can
            be rolled forward; a function of the settings when that depends on
            them. The extractor's ``movements(window, account_range=None)``
            yields them; without it, the roll-forward of the source's windows
            is recorded as not available, never as a break.
        rate_limit: the documented limit as (requests per second, burst); a
            source's ``rate_limit`` overrides it.
        budget: the name of the request budget a source draws on, from its
            settings; None (the default) is the provider's name: one budget
            for all its sources. A provider whose sources reach different
            services (an EVM source's ``rpc_url``: one chain's endpoint or
            another's) names one budget per service.
    """

    name: str
    settings: type
    build: Callable[..., Extractor]
    extractor: type
    has_history: bool | Callable[[Any], bool]
    shardable: bool = False
    chooses_snapshot: bool = False
    verifies_snapshot: bool = False
    has_movements: bool | Callable[[Any], bool] = False
    rate_limit: tuple[float, float] | None = None
    budget: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        where = f"extractors/{self.name}.py: PROVIDER"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise DeclarationError(f"{where}: name {self.name!r} is not a module name")
        for key in ("settings", "extractor"):
            if not isinstance(getattr(self, key), type):
                raise DeclarationError(f"{where}: {key} must be a class, got {getattr(self, key)!r}")
        if not callable(self.build):
            raise DeclarationError(f"{where}: build must be a function, got {self.build!r}")
        for flag in ("has_history", "shardable", "chooses_snapshot", "verifies_snapshot", "has_movements"):
            value = getattr(self, flag)
            if not isinstance(value, bool) and not (flag in ("has_history", "has_movements") and callable(value)):
                raise DeclarationError(f"{where}: {flag} must be True or False"
                                       + (" or a function of the settings" if flag.startswith("has_") else "")
                                       + f", got {value!r}")
        if self.rate_limit is not None and not (
                isinstance(self.rate_limit, tuple) and len(self.rate_limit) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in self.rate_limit)):
            raise DeclarationError(f"{where}: rate_limit must be (requests per second, burst), both positive, "
                                   f"got {self.rate_limit!r}")
        if self.budget is not None and not callable(self.budget):
            raise DeclarationError(f"{where}: budget must be a function of the settings, got {self.budget!r}")
        cls = self.extractor
        for method in REQUIRED_METHODS:
            if not callable(getattr(cls, method, None)):
                raise DeclarationError(f"{where}: {cls.__name__} has no {method}(), which every extractor needs")
        for capability, methods in CAPABILITIES.items():
            if getattr(self, capability) is False:
                continue
            for method in methods:
                if not callable(getattr(cls, method, None)):
                    raise DeclarationError(f"{where} claims {capability}, but {cls.__name__} has no {method}()")

    def budget_name(self, settings: Any) -> str:
        return self.name if self.budget is None else self.budget(settings)

    def answers_for_past(self, settings: Any) -> bool:
        if callable(self.has_history):
            return self.has_history(settings)
        return self.has_history

    def offers_movements(self, settings: Any) -> bool:
        if callable(self.has_movements):
            return self.has_movements(settings)
        return self.has_movements

    def open(self, settings: Any, credentials: Credentials | None, policy: RetryPolicy, *,
             max_pages: int, throttle: Throttle | None = None) -> Extractor:
        """An extractor for one crawl; :func:`close` it when done."""
        return self.build(settings, credentials, policy, max_pages=max_pages, throttle=throttle)


def close(extractor: Extractor) -> None:
    """Close the extractor's connections, and release its throttle's."""
    client = extractor.client
    client.close()
    if isinstance(client.throttle, Throttle) and client.throttle.release is not None:
        client.throttle.release()


def stats(extractor: Extractor) -> RequestStats:
    """Requests made and retried so far by this extractor."""
    return extractor.client.stats
