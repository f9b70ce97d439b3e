"""The provider contract holds when a module loads, and a source carries its provider from then on."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

import extractors
from extractors import registry
from extractors.provider import CAPABILITIES, BaseExtractor, DeclarationError, Provider
from pipeline.config import parse_source
from pipeline import snapshot


@dataclass
class Settings:
    base_url: str = "http://127.0.0.1:9"


class Plain(BaseExtractor):
    def pages(self, at, account_range=None):
        yield from ()

    def probe(self):
        return "ok"


def declare(**claims):
    return Provider(name="acme", settings=Settings, build=lambda *a, **k: None, extractor=Plain,
                    has_history=False, **claims)


@pytest.mark.parametrize("capability, method", [(c, m[0]) for c, m in CAPABILITIES.items()])
def test_a_claimed_capability_without_its_method_fails_in_one_line(capability, method):
    with pytest.raises(DeclarationError) as refused:
        declare(**{capability: True})
    message = str(refused.value)
    assert message == f"extractors/acme.py: PROVIDER claims {capability}, but Plain has no {method}()"
    assert "\n" not in message
    # With the method, the same claim holds.
    with_method = type("WithMethod", (Plain,), {method: lambda self, *a, **k: None})
    assert getattr(Provider(name="acme", settings=Settings, build=lambda *a, **k: None, extractor=with_method,
                            has_history=False, **{capability: True}), capability) is True


@pytest.mark.parametrize("claims, words", [
    ({"shardable": "yes"}, "shardable must be True or False, got 'yes'"),
    ({"has_history": None}, "has_history must be True or False or a function of the settings, got None"),
    ({"rate_limit": (0, 5)}, "rate_limit must be (requests per second, burst), both positive"),
    ({"budget": "evm"}, "budget must be a function of the settings"),
])
def test_a_claim_of_the_wrong_type_is_refused(claims, words):
    keys = {"has_history": False} | claims
    with pytest.raises(DeclarationError, match=r"^extractors/acme\.py: PROVIDER: " + _escaped(words)):
        Provider(name="acme", settings=Settings, build=lambda *a, **k: None, extractor=Plain, **keys)


def test_every_extractor_needs_pages_and_probe():
    with pytest.raises(DeclarationError, match=r"Bare has no pages\(\), which every extractor needs"):
        Provider(name="acme", settings=Settings, build=lambda *a, **k: None,
                 extractor=type("Bare", (BaseExtractor,), {}), has_history=False)


def test_a_module_claiming_what_it_lacks_fails_at_import(tmp_path, monkeypatch):
    """``shardable`` without ``shard_ranges``: the module does not import, and its sources say why."""
    (tmp_path / "acme.py").write_text(
        "from dataclasses import dataclass\n"
        "from extractors.provider import BaseExtractor, Provider\n"
        "@dataclass\nclass Settings:\n    base_url: str\n"
        "class AcmeExtractor(BaseExtractor):\n"
        "    def pages(self, at, account_range=None):\n        yield from ()\n"
        "    def probe(self):\n        return ''\n"
        "PROVIDER = Provider(name='acme', settings=Settings, build=AcmeExtractor, extractor=AcmeExtractor,\n"
        "                    has_history=False, shardable=True)\n")
    monkeypatch.setattr(extractors, "__path__", [str(tmp_path), *extractors.__path__])
    try:
        assert "acme" in registry.names()
        with pytest.raises(registry.ProviderUnavailable) as refused:
            registry.provider("acme")
        assert str(refused.value).endswith(
            "failed to import: DeclarationError: extractors/acme.py: PROVIDER claims shardable, "
            "but AcmeExtractor has no shard_ranges()")
    finally:
        sys.modules.pop("extractors.acme", None)


def test_the_registry_reads_the_package_again_only_when_it_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(extractors, "__path__", [str(tmp_path), *extractors.__path__])
    reads = []
    scan = registry._scan
    monkeypatch.setattr(registry, "_scan", lambda folders: reads.append(folders) or scan(folders))
    first = registry.names()
    assert registry.names() == first and len(reads) == 1
    (tmp_path / "newcomer.py").write_text("PROVIDER = None\n")
    assert registry.names() == tuple(sorted((*first, "newcomer"))) and len(reads) == 2


def test_a_source_carries_its_provider_resolved_once(monkeypatch):
    source = parse_source("acme_main", {"provider": "hedera", "base_url": "http://127.0.0.1:9"})
    assert source.contract is registry.provider("hedera")

    def looked_up(name):
        raise AssertionError(f"the registry was asked for {name} again")

    monkeypatch.setattr(registry, "provider", looked_up)
    extractor = snapshot.build_extractor(source)
    try:
        assert type(extractor) is source.contract.extractor
        assert snapshot.chooses_snapshot(source) and source.contract.answers_for_past(source.settings)
    finally:
        snapshot.close_extractor(extractor)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)
