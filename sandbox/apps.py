"""The sandbox provider of each name, for ``python -m sandbox`` and the demo.

A provider's sandbox is the module ``sandbox.<provider>``, found by its
presence (the providers are listed by :func:`extractors.registry.names`).
Each defines:

* ``demo_app()`` — the fake with its demo data set, ready to serve;
* ``demo_source(url)`` — the ``[sources.<name>]`` keys pointing at it;
* ``DEMO_CONNECTION`` — ``(conn_id, connection URI)`` with the sandbox's
  credentials, or None when the provider needs none.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from extractors import registry
from pipeline.config import toml_table


def sandbox(name: str) -> ModuleType:
    if name not in registry.names():
        raise KeyError(name)
    return importlib.import_module(f"sandbox.{name}")


def available() -> list[str]:
    """The providers that have a sandbox in this checkout."""
    return [name for name in registry.names() if importlib.util.find_spec(f"sandbox.{name}") is not None]


def sources_text(sources: dict[str, dict]) -> str:
    """``[sources.<name>]`` tables in TOML."""
    lines = []
    for name, keys in sources.items():
        lines += [*toml_table("sources", name, keys), ""]
    return "\n".join(lines)
