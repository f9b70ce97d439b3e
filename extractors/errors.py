"""Every error an extraction can raise, defined once.

The split that matters is retriable (the provider may answer next time: 429,
5xx, dropped connections) versus fatal (retrying cannot help: bad key, bad
request, a response we cannot understand, a hostile pagination link).
"""
from __future__ import annotations


class ExtractError(Exception):
    """Base class for every extraction failure."""

    retriable = False


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
    """The request did not complete: connection refused or reset, timeout."""

    retriable = True
    retry_after = None


class MalformedResponseError(ExtractError):
    """The response is not what the provider's documentation promises.

    ``raw`` keeps (the start of) the body so it can be quarantined.
    """

    def __init__(self, message: str, raw: str = "") -> None:
        super().__init__(message)
        self.raw = raw


class PaginationError(ExtractError):
    """A pagination stop rule fired: repeated cursor, foreign link, page cap."""


class SnapshotError(ExtractError):
    """The pages of one crawl do not describe one consistent snapshot."""


class NoSnapshotAvailable(Exception):
    """The provider has no snapshot at or before the requested time.

    Not a failure: the run ends cleanly and loads nothing.
    """


class HistoryUnavailable(ExtractError):
    """A past snapshot was requested from a provider that only has the present."""
