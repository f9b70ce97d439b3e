"""Staging: rows stream into a private table per run and shard with COPY.

Staging tables live in the ``balance_staging`` schema, are UNLOGGED (they
are rebuilt from the provider if lost) and have no indexes, so COPY runs at
close to the server's limit. Nothing in them is visible to readers of
``balance_history`` until :mod:`loaders.publish` moves them in one
transaction.
"""
from __future__ import annotations

import io
from decimal import Decimal
from typing import Iterable

from psycopg2 import sql

from extractors.records import BalanceRow, Rejection
from loaders import runs

SCHEMA = "balance_staging"
COLUMNS = ("account", "asset", "balance", "decimals", "available_balance", "spark_factor")
FLUSH_BYTES = 4 << 20  # memory per shard stays at a few MB, whatever the crawl size

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def table_name(run_id: int, shard: int) -> sql.Identifier:
    # Built from integers we generated, never from input.
    return sql.Identifier(SCHEMA, f"run_{int(run_id)}_shard_{int(shard)}")


def aggregate_table_name(run_id: int, shard: int) -> sql.Identifier:
    """Provider-reported totals (Formance aggregates) staged beside the rows."""
    return sql.Identifier(SCHEMA, f"run_{int(run_id)}_shard_{int(shard)}_aggregate")


def drop(cur, run_id: int, shard: int) -> None:
    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
        table_name(run_id, shard), aggregate_table_name(run_id, shard)))


def drop_run(cur, run_id: int) -> None:
    """Drop every staging table of a run, whatever its shards."""
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
                (SCHEMA, f"run\\_{int(run_id)}\\_shard\\_%"))
    for (name,) in cur.fetchall():
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, name)))


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


def encode(rows: Iterable[BalanceRow]) -> str:
    """Rows in COPY text format.

    The hot loop of a million-row load: one f-string per row, with the
    common cases (plain text, int amounts, NULLs) inline.
    """
    dec = Decimal
    out: list[str] = []
    append = out.append
    for r in rows:
        b, d, av, sf = r.balance, r.decimals, r.available_balance, r.spark_factor
        append(
            f"{_text(r.account)}\t{_text(r.asset)}\t"
            f"{format(b, 'f') if b.__class__ is dec else b}\t"
            f"{NULL if d is None else d}\t"
            f"{NULL if av is None else _number(av)}\t"
            f"{NULL if sf is None else sf}\n"
        )
    return "".join(out)


class StagingWriter:
    """Buffers encoded rows and COPYs them in batches into one staging table.

    Rejections go into ``rejected_records`` through the same connection, so
    a crawl needs one connection and holds at most ``FLUSH_BYTES`` of rows.
    """

    def __init__(self, conn, run_id: int, shard: int) -> None:
        self.conn = conn
        self.run_id = run_id
        self.shard = shard
        self.table = table_name(run_id, shard)
        self.rows = 0
        self.aggregates = 0
        self.rejected = 0
        self._buffer: list[str] = []
        self._size = 0
        with conn.cursor() as cur:
            drop(cur, run_id, shard)
            # Ids in "C", as in balance_history (migration 0006): sorted
            # here, they arrive in the order of its primary key.
            cur.execute(
                sql.SQL(
                    'CREATE UNLOGGED TABLE {} (account text COLLATE "C" NOT NULL,'
                    ' asset text COLLATE "C" NOT NULL, balance numeric NOT NULL, decimals smallint,'
                    " available_balance numeric, spark_factor numeric)"
                ).format(self.table)
            )
            runs.clear_rejections(cur, run_id, shard)
            runs.forget_staged(cur, run_id, shard)
        conn.commit()

    def add(self, rows: list[BalanceRow], rejected: list[Rejection] = (), kind: str = "balances") -> None:
        if kind == "aggregate":
            self._add_aggregate(rows)
            rows = []
        elif kind != "balances":
            raise ValueError(f"unknown page kind {kind!r}")
        if rows:
            chunk = encode(rows)
            self._buffer.append(chunk)
            self._size += len(chunk)
            self.rows += len(rows)
            if self._size >= FLUSH_BYTES:
                self.flush()
        if rejected:
            with self.conn.cursor() as cur:
                runs.add_rejections(cur, self.run_id, self.shard, ((r.raw, r.reason) for r in rejected))
            # Committed at once: rejected records are kept even if the run fails.
            self.conn.commit()
            self.rejected += len(rejected)

    def _add_aggregate(self, rows: list[BalanceRow]) -> None:
        table = aggregate_table_name(self.run_id, self.shard)
        with self.conn.cursor() as cur:
            cur.execute(sql.SQL('CREATE UNLOGGED TABLE IF NOT EXISTS {} (asset text COLLATE "C" NOT NULL,'
                                " balance numeric NOT NULL, decimals smallint)").format(table))
            if rows:
                cur.copy_expert(sql.SQL("COPY {} (asset, balance, decimals) FROM STDIN").format(table),
                                io.BytesIO("".join(f"{_text(r.asset)}\t{_number(r.balance)}\t{_number(r.decimals)}\n"
                                                   for r in rows).encode()))
        self.conn.commit()
        self.aggregates += len(rows)

    def flush(self) -> None:
        if not self._buffer:
            return
        data = io.BytesIO("".join(self._buffer).encode("utf-8"))
        self._buffer.clear()
        self._size = 0
        with self.conn.cursor() as cur:
            cur.copy_expert(
                sql.SQL("COPY {} ({}) FROM STDIN").format(
                    self.table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
                ),
                data,
                size=1 << 20,
            )
        self.conn.commit()

    def close(self) -> None:
        """Flush: the shard's rows are staged, still unpublished."""
        self.flush()
        with self.conn.cursor() as cur:
            runs.record_staged(cur, self.run_id, self.shard, self.rows, self.aggregates)
        self.conn.commit()

    def abort(self) -> None:
        """Throw the shard's staged rows away (its rejections stay recorded)."""
        self.conn.rollback()
        with self.conn.cursor() as cur:
            drop(cur, self.run_id, self.shard)
        self.conn.commit()
