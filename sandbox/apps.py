"""The sandbox provider of each name, for ``python -m sandbox`` and the demo.

Each module ``sandbox.<provider>`` defines:

* ``demo_app()`` — the fake with its demo data set, ready to serve;
* ``demo_source(url)`` — the ``[sources.<name>]`` keys pointing at it;
* ``DEMO_CONNECTION`` — ``(conn_id, connection URI)`` with the sandbox's
  credentials, or None when the provider needs none.
"""
from __future__ import annotations

import importlib
from types import ModuleType

SANDBOXES = ("hedera", "formance", "bitfront", "coreledger")


def sandbox(name: str) -> ModuleType:
    if name not in SANDBOXES:
        raise KeyError(name)
    return importlib.import_module(f"sandbox.{name}")


def available() -> list[str]:
    """The sandboxes that exist in this checkout."""
    found = []
    for name in SANDBOXES:
        try:
            sandbox(name)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found
