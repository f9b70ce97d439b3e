"""Staging: rows stream into a private table per run and shard with COPY.

Staging tables live in the ``balance_staging`` schema, are UNLOGGED (they
are rebuilt from the provider if lost) and have no indexes, so COPY runs at
close to the server's limit. Nothing in them is visible to readers of
``balance_history`` until :mod:`loaders.publish` moves them in one
transaction. Their columns, and the COPY encoding of a row, are built from
:data:`extractors.records.ROW_COLUMNS` (a window's movements are staged
the same way, from :data:`~extractors.records.MOVEMENT_COLUMNS`, by
:mod:`loaders.movements`).

What a shard staged is recorded on its run (``snapshot_runs.staged``), so
publish can tell a finished shard from one emptied by a crash.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
from decimal import Decimal
from typing import Callable, Iterable

import psycopg2
from psycopg2 import sql

from extractors.records import ROW_COLUMNS, BalanceRow, Column, PageKind, Rejection
from extractors.text import one_line
from loaders import rejections
from loaders.db import reconnect_like

log = logging.getLogger(__name__)

SCHEMA = "balance_staging"
COLUMNS = tuple(c.name for c in ROW_COLUMNS)


def columns_ddl(columns: tuple[Column, ...]) -> sql.Composable:
    """The columns of a staging table, as the history table has them without its keys and defaults."""
    return sql.SQL(", ").join(
        sql.SQL("{} {}{}").format(sql.Identifier(c.name), sql.SQL(c.sql_type),
                                  sql.SQL("" if c.nullable else " NOT NULL"))
        for c in columns
    )


_COLUMNS_DDL = columns_ddl(ROW_COLUMNS)
FLUSH_BYTES = 4 << 20  # memory per shard stays at a few MB, whatever the crawl size

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def table_name(run_id: int, shard: int) -> sql.Identifier:
    # Built from integers we generated, never from input.
    return sql.Identifier(SCHEMA, f"run_{int(run_id)}_shard_{int(shard)}")


def totals_table_name(run_id: int, shard: int) -> sql.Identifier:
    """The provider's own totals (a ``PageKind.TOTALS`` page) staged beside the rows, for aggregate_balances."""
    return sql.Identifier(SCHEMA, f"run_{int(run_id)}_shard_{int(shard)}_aggregate")


def drop(cur, run_id: int, shard: int) -> None:
    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
        table_name(run_id, shard), totals_table_name(run_id, shard)))


def drop_run(cur, run_id: int) -> None:
    """Drop every staging table of a run, whatever its shards."""
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
                (SCHEMA, f"run\\_{int(run_id)}\\_shard\\_%"))
    for (name,) in cur.fetchall():
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, name)))


RUNS = "snapshot_runs"


def forget_staged(cur, run_id: int, shard: int, runs: str = RUNS) -> None:
    """A shard starting (again) has staged nothing yet (``runs``: the table of the run)."""
    cur.execute(sql.SQL("UPDATE {} SET staged = staged - %s WHERE run_id = %s").format(sql.Identifier(runs)),
                (str(shard), run_id))


def record_staged(cur, run_id: int, shard: int, rows: int, aggregates: int, runs: str = RUNS) -> None:
    """Written durably once the shard's rows are committed to staging."""
    cur.execute(
        sql.SQL("UPDATE {} SET staged = staged || jsonb_build_object(%s::text,"
                " jsonb_build_object('rows', %s::bigint, 'aggregates', %s::bigint)) WHERE run_id = %s")
        .format(sql.Identifier(runs)),
        (str(shard), rows, aggregates, run_id),
    )


def staged_counts(cur, run_id: int, runs: str = RUNS) -> dict[int, tuple[int, int]]:
    """Rows and aggregates each finished shard staged, by shard."""
    cur.execute(sql.SQL("SELECT staged FROM {} WHERE run_id = %s").format(sql.Identifier(runs)), (run_id,))
    staged = cur.fetchone()[0]
    return {int(shard): (v["rows"], v["aggregates"]) for shard, v in staged.items()}


def _text(value: str) -> str:
    # Account ids and assets almost never need escaping; checking is cheaper
    # than translating every one.
    return value if value.isprintable() and "\\" not in value else value.translate(_ESCAPES)


def _number(value: int | Decimal | None) -> str:
    if value is None:
        return NULL
    if value.__class__ is Decimal:
        # Never an exponent: plain digits read back exactly as NUMERIC.
        return format(value, "f")
    return str(value)


NULL = "\\N"


# How each kind of column is written in COPY text, ``@`` standing for its
# value. Inline expressions, not calls: this runs for every value of a
# million-row load.
_FORMATS = {
    ("text", False): "{_text(@)}",
    ("text", True): "{NULL if @ is None else _text(@)}",
    ("integer", False): "{@}",
    ("integer", True): "{NULL if @ is None else @}",
    # Never an exponent: plain digits read back exactly as NUMERIC.
    ("amount", False): "{format(@, 'f') if @.__class__ is dec else @}",
    ("amount", True): "{NULL if @ is None else format(@, 'f') if @.__class__ is dec else @}",
    ("time", False): "{@.isoformat()}",
    ("time", True): "{NULL if @ is None else @.isoformat()}",
}


def _encoder_source(columns: tuple[Column, ...]) -> str:
    """The source of an encoder for ``columns``: one f-string per row.

    A value used more than once in its format is read into a local first;
    the helpers are locals too (cheaper to look up than globals).
    """
    reads, parts = [], []
    for c in columns:
        fmt = _FORMATS[c.kind, c.nullable]
        if fmt.count("@") > 1:
            reads.append((f"v{len(reads)}", f"r.{c.name}"))
            parts.append(fmt.replace("@", reads[-1][0]))
        else:
            parts.append(fmt.replace("@", f"r.{c.name}"))
    line = "\\t".join(parts)
    unpack = (f"        {', '.join(n for n, _ in reads)}, = {', '.join(a for _, a in reads)},\n"
              if reads else "")
    return (
        "def encode(rows):\n"
        "    _text, dec, NULL = _TEXT, _DECIMAL, _NULL\n"
        "    out = []\n"
        "    append = out.append\n"
        "    for r in rows:\n"
        f"{unpack}"
        f'        append(f"{line}\\n")\n'
        '    return "".join(out)\n'
    )


def encoder(columns: tuple[Column, ...]) -> Callable[[Iterable], str]:
    # Generated once, as dataclasses generates __init__: a loop over the
    # columns inside the loop over rows makes encoding nearly twice as
    # slow; this is the function one would write by hand for these columns.
    namespace = {"_TEXT": _text, "_DECIMAL": Decimal, "_NULL": NULL}
    source = _encoder_source(columns)
    exec(compile(source, f"<encoder of {', '.join(c.name for c in columns)}>", "exec"), namespace)
    return namespace["encode"]


_encode = encoder(ROW_COLUMNS)


def encode(rows: Iterable[BalanceRow]) -> str:
    """Rows in COPY text format, one line per row, columns as :data:`COLUMNS`."""
    return _encode(rows)


class CopyBuffer:
    """Rows encoded as they come and COPYed into ``table`` in batches of ``FLUSH_BYTES``, behind the crawl.

    PostgreSQL takes about as long to take in a batch (parsing every
    number, writing the pages) as the crawl takes to read it: COPYed from
    the crawl's own thread, the crawl would wait that long each time. So a
    batch filled while the crawl goes on is handed to :class:`_Copier`,
    which COPYs and commits it on a connection of its own while the crawl
    reads on; at most one batch waits for it, so memory stays at a few MB.
    Its failure is raised here, at the next batch or at :meth:`finish`.
    The last batch, and a crawl too small to fill one, is COPYed on the
    crawl's connection: no second connection for a small crawl. Without a
    second connection to be had, every batch is COPYed there, as before.
    """

    def __init__(self, conn, table: sql.Composable, columns: tuple[Column, ...],
                 encode: Callable[[Iterable], str]) -> None:
        self.conn = conn
        self.statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(sql.Identifier(c.name) for c in columns))
        self.encode = encode
        self.rows = 0
        self._buffer: list[str] = []
        self._size = 0
        self._copier: _Copier | None = None
        self._alone = False  # no second connection could be opened

    def add(self, rows: list) -> None:
        if not rows:
            return
        chunk = self.encode(rows)
        self._buffer.append(chunk)
        self._size += len(chunk)
        self.rows += len(rows)
        if self._size >= FLUSH_BYTES:
            copier = self._background()
            if copier is not None:
                copier.put(self._take())
            else:
                copy_batch(self.conn, self.statement, self._take())

    def _background(self) -> _Copier | None:
        """The copier, started at the first full batch; None if no second connection can be had."""
        if self._copier is None and not self._alone:
            try:
                self._copier = _Copier(self.conn, self.statement)
            except psycopg2.OperationalError as exc:
                # Every connection slot taken, say: COPY on the crawl's own, as before.
                self._alone = True
                log.warning("staging COPYs on the crawl's own connection: a second one could not be "
                            "opened (%s)", one_line(str(exc)))
        return self._copier

    def _take(self) -> bytes:
        data = "".join(self._buffer).encode("utf-8")
        self._buffer.clear()
        self._size = 0
        return data

    def finish(self) -> None:
        """Every row added so far is in the table, committed."""
        if self._copier is not None:
            copier, self._copier = self._copier, None
            copier.close()  # raises what failed in it
        if self._buffer:
            copy_batch(self.conn, self.statement, self._take())

    def discard(self) -> None:
        """Stop copying (the rows are being thrown away): whatever failed in the copier no longer matters."""
        self._buffer.clear()
        self._size = 0
        if self._copier is not None:
            copier, self._copier = self._copier, None
            copier.close(quietly=True)


def copy_batch(conn, statement: sql.Composable, data: bytes) -> None:
    """COPY one batch of encoded rows and commit it."""
    with conn.cursor() as cur:
        cur.copy_expert(statement, io.BytesIO(data), size=1 << 20)
    conn.commit()


class _Copier:
    """One thread COPYing batches into a staging table on its own connection, each committed.

    Its own connection, never the crawl's: the crawl's transactions (the
    snapshot chosen under a row lock, rejected records) must not be
    committed or blocked by a COPY running beside them.
    """

    def __init__(self, like, statement: sql.Composable) -> None:
        self._conn = reconnect_like(like, application_name="balances-staging")
        self._statement = statement
        self._batches: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="staging-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._batches.get()) is not None:
            if self._error is None:
                try:
                    copy_batch(self._conn, self._statement, data)
                except BaseException as exc:  # raised in the crawl's thread
                    self._error = exc

    def put(self, data: bytes) -> None:
        self._raise()
        self._batches.put(data)

    def close(self, *, quietly: bool = False) -> None:
        """Wait for the batches handed over, then close; raise what failed unless ``quietly``."""
        self._batches.put(None)
        self._thread.join()
        try:
            self._conn.close()
        except Exception:
            pass
        if not quietly:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class StagingWriter:
    """Buffers encoded rows and COPYs them in batches into one staging table.

    Rejections go into ``rejected_records`` through the crawl's connection;
    a crawl holds at most three batches of ``FLUSH_BYTES`` of rows, and a
    crawl larger than one batch COPYs through a second connection
    (:class:`CopyBuffer`).
    """

    def __init__(self, conn, run_id: int, shard: int) -> None:
        self.conn = conn
        self.run_id = run_id
        self.shard = shard
        self.table = table_name(run_id, shard)
        self.aggregates = 0
        self.rejected = 0
        self._copy = CopyBuffer(conn, self.table, ROW_COLUMNS, encode)
        with conn.cursor() as cur:
            drop(cur, run_id, shard)
            cur.execute(sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(self.table, _COLUMNS_DDL))
            rejections.clear(cur, run_id, shard)
            forget_staged(cur, run_id, shard)
        conn.commit()

    def add(self, rows: list[BalanceRow], rejected: list[Rejection] = (),
            kind: PageKind = PageKind.BALANCES) -> None:
        if kind is PageKind.TOTALS:
            self._add_totals(rows)
            rows = []
        elif kind is not PageKind.BALANCES:
            raise ValueError(f"a {kind!r} page has no rows to stage")
        self._copy.add(rows)
        if rejected:
            with self.conn.cursor() as cur:
                rejections.add(cur, self.run_id, self.shard, rejected)
            # Committed at once: rejected records are kept even if the run fails.
            self.conn.commit()
            self.rejected += len(rejected)

    def _add_totals(self, rows: list[BalanceRow]) -> None:
        table = totals_table_name(self.run_id, self.shard)
        with self.conn.cursor() as cur:
            cur.execute(sql.SQL('CREATE UNLOGGED TABLE IF NOT EXISTS {} (asset text COLLATE "C" NOT NULL,'
                                " balance numeric NOT NULL, decimals smallint)").format(table))
            if rows:
                cur.copy_expert(sql.SQL("COPY {} (asset, balance, decimals) FROM STDIN").format(table),
                                io.BytesIO("".join(f"{_text(r.asset)}\t{_number(r.balance)}\t{_number(r.decimals)}\n"
                                                   for r in rows).encode()))
        self.conn.commit()
        self.aggregates += len(rows)

    @property
    def rows(self) -> int:
        return self._copy.rows

    def flush(self) -> None:
        self._copy.finish()

    def close(self) -> None:
        """Flush: the shard's rows are staged, still unpublished."""
        self.flush()
        with self.conn.cursor() as cur:
            record_staged(cur, self.run_id, self.shard, self.rows, self.aggregates)
        self.conn.commit()

    def abort(self) -> None:
        """Throw the shard's staged rows away (its rejections stay recorded)."""
        self._copy.discard()
        self.conn.rollback()
        with self.conn.cursor() as cur:
            drop(cur, self.run_id, self.shard)
        self.conn.commit()
