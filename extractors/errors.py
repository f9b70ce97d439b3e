"""Every error an extraction can raise, defined once.

The split that matters is retriable (the provider may answer next time: 429,
5xx, dropped connections) versus fatal (retrying cannot help: bad key, bad
request, a response we cannot understand, a hostile pagination link).
"""
from __future__ import annotations

from typing import Any

from extractors.records import to_json_text
from extractors.text import safe_text

# An error message is stored in snapshot_runs.error and logged: long enough
# for a provider's message and a URL, bounded whatever the provider sent.
MESSAGE_LIMIT = 4000
# How much of a malformed response is kept with the error for quarantine.
RAW_LIMIT = 2000


class ExtractError(Exception):
    """Base class for every extraction failure.

    Its message is made storable here (no NUL, no lone surrogate, at most
    MESSAGE_LIMIT characters): messages quote providers, and a failure that
    cannot be recorded loses the real error.
    """

    retriable = False

    def __init__(self, *args: object) -> None:
        super().__init__(*(safe_text(a, MESSAGE_LIMIT) if isinstance(a, str) else a for a in args))


class ProviderError(ExtractError):
    """The provider answered with an error.

    Carries the provider's own code and message so the run's error column
    says what the provider said, not just an HTTP status.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retriable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retriable = retriable
        self.retry_after = retry_after


class TransportError(ExtractError):
    """The request did not complete: connection refused or reset, timeout.

    Retriable unless the cause cannot pass by itself (a host name that does
    not exist, a certificate that does not verify): ``retriable=False``.
    """

    retriable = True
    retry_after = None

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class DeadlineExceeded(TransportError):
    """A whole request (connect, headers and body) took longer than ``request_deadline``.

    Retriable like a timeout; the time it cost counts against ``max_total_wait``.
    """


class ResponseTooLarge(ExtractError):
    """A body, as received or as decompressed, passed ``max_response_bytes``.

    Not retriable: the provider would send the same page again.
    """


class MalformedResponseError(ExtractError):
    """The response is not what the provider's documentation promises.

    ``raw`` keeps the start of what was wrong so it can be quarantined: pass
    the decoded document (or part of it) as it came; its exact JSON text is
    made here, once.
    """

    def __init__(self, message: str, raw: Any = "") -> None:
        super().__init__(message)
        self.raw = (raw if isinstance(raw, str) else to_json_text(raw))[:RAW_LIMIT]


class PaginationError(ExtractError):
    """A pagination stop rule fired: repeated cursor, foreign link, page cap."""


class SnapshotError(ExtractError):
    """The pages of one crawl do not describe one consistent snapshot."""


class SnapshotMoved(SnapshotError):
    """The provider's data changed while a live (non point-in-time) crawl read it."""


class SnapshotInFuture(SnapshotError):
    """The snapshot time asked is later than the present: ours, or the provider's own clock.

    A point-in-time read of the future is not a snapshot: it would see what
    is written while it reads.
    """


class LedgerUnavailable(ExtractError):
    """The configured ledger does not exist, or lacks a feature a read needs."""


class NoSnapshotAvailable(Exception):
    """The provider has no snapshot at or before the requested time.

    Not a failure: the run ends cleanly and loads nothing.
    """


class HistoryUnavailable(ExtractError):
    """A past snapshot was requested from a provider that only has the present."""
