"""The providers this pipeline knows, by the name used in ``provider = "..."``.

A provider is a module of this package that declares
``PROVIDER = Provider(...)`` (see :mod:`extractors.provider`). The list is
found, not kept: every module whose source has that declaration at its top
level is a provider, named after the module. The sandbox list, the tests
and the example config are checked against it.

Finding a provider reads its source without importing it, and a module is
imported only when a source uses it: a provider module that fails to import
costs its own sources (:class:`ProviderUnavailable`), never the others. The
list is read again only when a folder of the package changed (a module added
or removed), and a source's provider is resolved once, onto its
configuration (``SourceConfig.contract``).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
from pathlib import Path

import extractors
from extractors.provider import Provider

# ``PROVIDER = ...`` or ``PROVIDER: Provider = ...`` at the start of a line
# (searched in "\n" + the source: a literal prefix keeps the search fast).
_DECLARATION = re.compile(r"\nPROVIDER[ \t]*(?::[^=\n]*)?=(?!=)")


class ProviderUnavailable(ImportError):
    """The provider's module exists but could not be imported (or declares no Provider)."""


# (the package's folders and their modification times) -> the names found there.
_found: dict[tuple, tuple[str, ...]] = {}


def names() -> tuple[str, ...]:
    """Every provider module in the package, sorted."""
    folders = tuple(extractors.__path__)
    key = tuple((folder, _mtime(folder)) for folder in folders)
    if key not in _found:
        _found.clear()
        _found[key] = _scan(folders)
    return _found[key]


def _mtime(folder: str) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _scan(folders: tuple[str, ...]) -> tuple[str, ...]:
    found = set()
    for info in pkgutil.iter_modules(folders):
        folder = Path(info.module_finder.path)
        source = folder / info.name / "__init__.py" if info.ispkg else folder / f"{info.name}.py"
        try:
            text = source.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if _DECLARATION.search("\n" + text):
            found.add(info.name)
    return tuple(sorted(found))


def provider(name: str) -> Provider:
    """The provider ``name``: KeyError if there is none, ProviderUnavailable if it is broken."""
    if name not in names():
        raise KeyError(name)
    try:
        module = importlib.import_module(f"extractors.{name}")
    except Exception as exc:  # a syntax error, a missing dependency, a module that raises
        raise ProviderUnavailable(
            f"the {name} provider module (extractors/{name}.py) failed to import: "
            f"{type(exc).__name__}: {exc}", name=f"extractors.{name}") from exc
    declared = getattr(module, "PROVIDER", None)
    if not isinstance(declared, Provider) or declared.name != name:
        raise ProviderUnavailable(f"extractors/{name}.py must end with PROVIDER = Provider(name={name!r}, ...)",
                                  name=f"extractors.{name}")
    return declared
