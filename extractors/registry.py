"""The providers this pipeline knows, by the name used in ``provider = "..."``.

Each provider is one module in this package that defines:

* ``Settings`` — a dataclass of the ``[sources.<name>]`` keys it accepts
  (``__post_init__`` raises ``ValueError(field, message)`` on bad values);
* ``build(settings, credentials, policy, *, max_pages)`` — an extractor,
  whose ``pages(at, account_range=None)`` yields :class:`~extractors.records.Page`
  objects and whose ``client`` is the :class:`~extractors.http.HttpClient`;
* ``HAS_HISTORY`` — whether the API can answer for a past time (or a
  function ``has_history(settings)`` when that depends on the settings, as
  for Formance's v1 and v2 APIs);
* optionally ``SHARDABLE`` (the extractor has ``shard_ranges(at, shards)``
  and honours ``account_range``) and ``RATE_LIMIT`` (requests per second,
  burst) from the provider's documented limits.

Modules are imported on first use, so a broken provider cannot stop the
others from loading.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from extractors.http import RequestStats

PROVIDER_NAMES = ("hedera", "formance", "bitfront", "coreledger")


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    settings: type
    build: Callable[..., Any]
    # False for APIs that only report the present: a past snapshot time is refused.
    has_history: bool | Callable[[Any], bool]
    shardable: bool = False
    rate_limit: tuple[float, float] | None = None

    def answers_for_past(self, settings: Any) -> bool:
        if callable(self.has_history):
            return self.has_history(settings)
        return self.has_history


def provider(name: str) -> Provider:
    if name not in PROVIDER_NAMES:
        raise KeyError(name)
    module: ModuleType = importlib.import_module(f"extractors.{name}")
    has_history = getattr(module, "has_history", None) or module.HAS_HISTORY
    return Provider(name, module.Settings, module.build, has_history,
                    getattr(module, "SHARDABLE", False), getattr(module, "RATE_LIMIT", None))


def stats_of(extractor: Any) -> RequestStats:
    return extractor.client.stats
