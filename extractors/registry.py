"""The providers this pipeline knows, by the name used in ``provider = "..."``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from extractors import hedera
from extractors.http import RequestStats


class Extractor(Protocol):
    provider: str

    def pages(self, at, account_range=None) -> Iterator[Any]: ...


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    settings: type
    build: Callable[..., Any]
    # False for APIs that only report the present: a past snapshot time is refused.
    has_history: bool


PROVIDERS: dict[str, Provider] = {
    "hedera": Provider("hedera", hedera.HederaSettings, hedera.build, has_history=True),
}


def stats_of(extractor: Any) -> RequestStats:
    return extractor.client.stats
