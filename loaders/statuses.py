"""The states of a run, exactly as ``snapshot_runs.status``, ``reconciliation_runs.status`` and
``movement_runs.status`` store them.

The text of each member is the stored value (and what the views, the
reports and the CHECK constraints of migrations 0001, 0005, 0008 and 0015 read),
so a member compares equal to the text a query returns.
"""
from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """A snapshot run: ``running`` until it ends in one of the others."""

    RUNNING = "running"
    PUBLISHED = "published"
    FAILED = "failed"  # a retried task resumes it
    NO_SNAPSHOT = "no_snapshot"  # the provider held no snapshot for the time asked
    ABANDONED = "abandoned"  # its process died; reaped by the next run of the source
    SKIPPED = "skipped"  # a rerun of an interval a present-only provider already published


class ReconciliationStatus(StrEnum):
    """A reconciliation run: ``running`` until it ends in one of the others."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABANDONED = "abandoned"  # its process died; reaped by the next reconciliation


class MovementStatus(StrEnum):
    """A run loading the movements of one window: ``running`` until it ends in one of the others."""

    RUNNING = "running"
    PUBLISHED = "published"  # its movements are in balance_movements: the window is rolled forward
    FAILED = "failed"  # a retried task resumes it
    ABANDONED = "abandoned"  # its process died; reaped by the next movement run of the source
    NOT_AVAILABLE = "not_available"  # the provider offers no movements: nothing to explain with, no break
    SUPERSEDED = "superseded"  # a snapshot backfilled inside its window split it; its movements went
    SKIPPED = "skipped"  # another run published its window first, or the window is no longer one
