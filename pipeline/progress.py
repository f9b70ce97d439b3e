"""Progress of long work: pages and rows per shard, checks of a reconciliation.

A crawl of a million accounts takes minutes; nobody should watch a silent
terminal for that long. The run reports what it did after every page (and
the reconciliation after every check) to a :class:`Progress`, which decides
how to show it:

* :class:`LiveProgress` — a terminal: one live line per shard (``rich``);
* :class:`LineProgress` — anything else (a pipe, a file, Airflow's task
  log): one plain line every ``every`` pages, and one when a shard ends;
* :class:`Progress` itself — says nothing (``--quiet``, tests).

Lines go to standard error, or to a logger: standard output keeps what a
command was asked for (a summary, a table, CSV).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

# A line every this many pages: at Hedera's 100 rows a page, one per 10,000 rows.
EVERY_PAGES = 100


@dataclass(slots=True)
class ShardCount:
    """What one shard has done so far."""

    pages: int = 0
    rows: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Rows per second since the shard started."""
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0


def format_count(shard: ShardCount) -> str:
    return (f"{shard.pages:,} pages, {shard.rows:,} rows, {shard.rate:,.0f} rows/s, "
            f"{format_elapsed(shard.elapsed)}" + (f", {shard.rejected:,} rejected" if shard.rejected else ""))


def format_elapsed(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``): a clock, as progress bars show elapsed time."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Reports nothing; the base of the reporters below.

    ``label`` names what runs (a source); a shard is reported as
    ``<label> shard <n>`` when the run has more than one.
    """

    def __init__(self) -> None:
        self.shards: dict[int, ShardCount] = {}
        self.label = ""
        self.sharded = False

    def begin(self, label: str, shards: int = 1) -> None:
        self.label, self.sharded = label, shards > 1

    def name(self, shard: int) -> str:
        return f"{self.label} shard {shard}" if self.sharded else self.label

    def page(self, shard: int, rows: int, rejected: int = 0) -> None:
        count = self.shards.setdefault(shard, ShardCount())
        count.pages += 1
        count.rows += rows
        count.rejected += rejected
        self.show(shard, count)

    def restart(self, shard: int) -> None:
        """The shard's staged rows were dropped and it reads the snapshot again."""
        self.shards[shard] = ShardCount()

    def shard_done(self, shard: int) -> None:
        self.finish(shard, self.shards.setdefault(shard, ShardCount()))

    def step(self, what: str, detail: str) -> None:
        """One step of a run that is not pages (a reconciliation's check)."""

    def show(self, shard: int, count: ShardCount) -> None:
        pass

    def finish(self, shard: int, count: ShardCount) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress(Progress):
    """Plain lines: every ``every`` pages, and when a shard ends; to ``write``."""

    def __init__(self, write: Callable[[str], None], every: int | None = None) -> None:
        super().__init__()
        self.write = write
        self.every = max(1, every or EVERY_PAGES)

    @classmethod
    def to_stream(cls, stream: TextIO, every: int | None = None) -> "LineProgress":
        def write(line: str) -> None:
            print(line, file=stream, flush=True)
        return cls(write, every)

    @classmethod
    def to_log(cls, logger: logging.Logger, every: int | None = None) -> "LineProgress":
        return cls(lambda line: logger.info("%s", line), every)

    def show(self, shard: int, count: ShardCount) -> None:
        if count.pages % self.every == 0:
            self.write(f"{self.name(shard)}: {format_count(count)}")

    def finish(self, shard: int, count: ShardCount) -> None:
        self.write(f"{self.name(shard)}: done, {format_count(count)}")

    def step(self, what: str, detail: str) -> None:
        self.write(f"{what}: {detail}")


class LiveProgress(Progress):
    """A live line per shard on a terminal, redrawn as pages arrive (``rich``)."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import Progress as Bars, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__()
        self.console = Console(file=stream)
        self.bars = Bars(SpinnerColumn(), TextColumn("{task.description}"),
                         TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                         console=self.console, transient=False)
        self.tasks: dict[int, int] = {}
        self.started = False

    def _task(self, shard: int) -> int:
        if not self.started:
            self.bars.start()
            self.started = True
        if shard not in self.tasks:
            self.tasks[shard] = self.bars.add_task(self.name(shard), total=None, counts="")
        return self.tasks[shard]

    def show(self, shard: int, count: ShardCount) -> None:
        self.bars.update(self._task(shard), counts=_counts(count))

    def finish(self, shard: int, count: ShardCount) -> None:
        self.bars.update(self._task(shard), counts=_counts(count) + " done", total=1, completed=1)

    def step(self, what: str, detail: str) -> None:
        self.console.print(f"{what}: {detail}", markup=False, highlight=False)

    def close(self) -> None:
        if self.started:
            self.bars.stop()
            self.started = False


def _counts(count: ShardCount) -> str:
    text = f"{count.pages:,} pages  {count.rows:,} rows  {count.rate:,.0f} rows/s"
    return text + (f"  {count.rejected:,} rejected" if count.rejected else "")


def for_terminal(quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """What a command shows: live on a terminal, lines elsewhere, nothing with ``quiet``."""
    stream = stream or sys.stderr
    if quiet:
        return Progress()
    if stream.isatty():
        return LiveProgress(stream)
    return LineProgress.to_stream(stream)
