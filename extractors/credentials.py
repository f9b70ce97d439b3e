"""Credentials as extractors see them: a key pair and extras, nothing Airflow.

The pipeline reads them from an Airflow Connection (``login``/``password``
hold the key pair, ``extra`` the rest) and hands them over in this form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extractors.errors import ExtractError


@dataclass(slots=True, frozen=True)
class Credentials:
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def secrets(self) -> list[str]:
        """Every value that must never be written anywhere."""
        values = [self.password] + [v for k, v in self.extra.items() if "secret" in k.lower()]
        return [v for v in values if isinstance(v, str) and v]


def require_credentials(credentials: Credentials | None, who: str, **meaning: str) -> Credentials:
    """The credentials, with every field named in ``meaning`` set; else one clear error.

    ``meaning`` says what each Connection field holds for this provider
    (``login="the API key"``): the message tells the user what to set.
    Raised when the extractor is built, so the run fails with it.
    """
    missing = [name for name in meaning if credentials is None or not getattr(credentials, name)]
    if missing:
        wanted = " and ".join(f"whose {name} is {what}" if i == 0 else f"{name} {what}"
                              for i, (name, what) in enumerate(meaning.items()))
        found = "no conn_id" if credentials is None else f"an empty {' and '.join(missing)}"
        raise ExtractError(f"{who} needs conn_id: an Airflow Connection {wanted} ({found})")
    return credentials
