"""Credentials as extractors see them: a key pair and extras, nothing Airflow.

The pipeline reads them from an Airflow Connection (``login``/``password``
hold the key pair, ``extra`` the rest) and hands them over in this form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class Credentials:
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def secrets(self) -> list[str]:
        """Every value that must never be written anywhere."""
        values = [self.password] + [v for k, v in self.extra.items() if "secret" in k.lower()]
        return [v for v in values if isinstance(v, str) and v]
