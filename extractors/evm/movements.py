"""EVM movements: what moved an EVM source's balances between two snapshot blocks.

A window runs from the block after the first snapshot's block ``B1`` to
the second snapshot's block ``B2``, both named by number and hash in the
snapshots' raw times. It is read in chunks of ``logs_block_range`` blocks,
and every chunk's headers must chain onto the one before, from ``B1``'s
hash to ``B2``'s: a chain that reorganised past either snapshot, or while
the window was read, fails the window (nothing of it is stored). What
moves the balances:

* ERC-20: ``Transfer(address,address,uint256)`` logs of the configured
  tokens from or to the configured addresses (``eth_getLogs`` with the
  addresses in the topics, one query for each side), each a leg out of
  ``from`` and one into ``to``; a log's block hash must be the one its
  block has in the chain read, and a ``removed`` log is a reorganisation.
  A node that refuses a range as too large or too full (Infura -32005
  "query returned more than 10000 results", Alchemy "Log response size
  exceeded") gets it again in halves.
* Native: value moves inside transactions only traces show. With
  ``trace_filter`` (Erigon, Nethermind, Reth, anvil) the frames from and to
  the addresses are asked for, then each of their transactions' whole
  traces (``trace_transaction``): a frame moved value only if neither it
  nor a frame above it failed (a reverted call's sub-calls are listed
  without an error of their own). With ``debug_traceBlockByNumber`` and the
  ``callTracer`` (geth, anvil) every block's call trees are walked, a
  failed frame skipped with everything under it. A ``CALL`` (and a
  ``CREATE``, a ``SELFDESTRUCT``) moves value; ``DELEGATECALL``,
  ``STATICCALL`` and ``CALLCODE`` do not. Fees: every transaction an
  address sent pays ``gasUsed × effectiveGasPrice`` (and ``blobGasUsed ×
  blobGasPrice``, and an OP-stack ``l1Fee``), failed or not, read from its
  receipt. A block an address produced pays it the priority fees
  (``effectiveGasPrice - baseFeePerGas`` per gas), a withdrawal credits it
  (``amount`` in gwei), a ``reward`` trace pays a pre-merge block reward.
  Where the node offers neither trace method the native asset is
  **unexplainable** for the window (the node offers no traces): its change
  is reported, never guessed at.

anvil 1.7.1 offers both trace methods, ``trace_transaction`` and
``eth_getBlockReceipts``: ``tests/test_evm.py`` reads its movements.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterator

from eth_utils import keccak, to_checksum_address

from extractors.errors import MalformedResponseError, ProviderError, SnapshotError
from extractors.paginators import check_page_cap
from extractors.records import MovementPage, MovementRow, RecordError, Rejection, Window

from extractors.evm.rpc import (NATIVE_DECIMALS, TOO_MANY, Call, RpcError, data_bytes, decode_word, parse_snapshot_raw,
                                quantity)

if TYPE_CHECKING:  # the extractor imports this module, and hands itself to MovementReader
    from extractors.evm import EvmExtractor

TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
TRACE_METHODS = ("trace_filter", "debug_traceBlockByNumber")
NO_TRACES = "unexplainable: the node offers no traces (neither trace_filter nor debug_traceBlockByNumber)"
GWEI = 10**9
# "this method is not here": JSON-RPC -32601, and the words nodes and gateways use for it.
METHOD_MISSING_CODE = -32601
_METHOD_MISSING = re.compile(r"does not exist|not available|not found|not supported|unsupported|"
                             r"not implemented|unknown method|method .{0,60}(disabled|not allowed)", re.I)
_WORD = re.compile(r"0x[0-9a-fA-F]{64}")
# Frames that move value: a call with value, a contract created with value, a contract destroyed.
_MOVING_CALLS = {"call", "create", "create2", "selfdestruct", "suicide"}


@dataclass(slots=True, frozen=True)
class Block:
    """What a window needs of a block: its place in the chain, its time, its producer, its withdrawals."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int
    miner: str
    base_fee: int | None
    withdrawals: tuple[tuple[int, str, int], ...]  # (index, address, gwei)

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, tz=timezone.utc)


@dataclass(slots=True)
class Frame:
    """A value move inside a transaction: ``value`` from ``sender`` to ``receiver``, at ``path``."""

    tx: str
    block: int
    path: tuple[int, ...]
    sender: str
    receiver: str
    value: int
    moved: bool  # neither the frame nor one above it failed


class MovementReader:
    """Reads one window's movement legs for an :class:`~extractors.evm.EvmExtractor`."""

    def __init__(self, extractor: "EvmExtractor", window: Window) -> None:
        self.x = extractor
        self.settings = extractor.settings
        self.window = window
        self.first, self.first_hash = parse_snapshot_raw(window.start_raw)
        self.last, self.last_hash = parse_snapshot_raw(window.end_raw)
        if self.last <= self.first:
            raise SnapshotError(f"window {window}: block {self.last} is not after block {self.first}")
        self.ours = {a.lower(): a for a in self.settings.addresses}
        self.native = self.settings.native_asset
        self.pages_read = 0

    # -- the walk ----------------------------------------------------------------------

    def pages(self) -> Iterator[MovementPage]:
        x = self.x
        (chain,) = x._batch([_call("eth_chainId", ())])
        x._check_chain(chain)
        tokens = self._tokens()
        method = self._trace_method()
        if method is None:
            yield MovementPage(unexplainable={self.native: NO_TRACES})
        parent = self.first_hash
        step = self.settings.logs_block_range
        for low in range(self.first + 1, self.last + 1, step):
            high = min(low + step - 1, self.last)
            blocks = self._blocks(low, high, parent)
            if tokens:
                yield self._page(self._token_legs(low, high, tokens, blocks))
            if method is not None:
                yield self._page(self._native_legs(low, high, blocks, method))
            # Nothing moved under the chunk while it was read.
            self._same(high, blocks[high].hash)
            parent = blocks[high].hash
        if parent != self.last_hash:
            raise SnapshotError(
                f"window {self.window}: block {self.last} now has hash {parent}, not {self.last_hash} as the "
                "snapshot read: the chain reorganised past the window's second snapshot; nothing stored")

    def _page(self, found: tuple[list[MovementRow], list[Rejection]]) -> MovementPage:
        check_page_cap(self.pages_read, self.x.max_pages)
        self.pages_read += 1
        rows, rejected = found
        return MovementPage(rows=rows, rejected=rejected)

    def _tokens(self) -> dict[str, tuple[str, int]]:
        """The configured tokens that are tokens at the window's end: lower-case address -> (address, decimals)."""
        x = self.x
        missing = [t for t in self.settings.tokens if t not in x._decimals]
        if missing:
            x._token_metadata(missing, self.last, self.last_hash)
        return {t.lower(): (t, x._decimals[t]) for t in self.settings.tokens if isinstance(x._decimals[t], int)}

    def _same(self, number: int, block_hash: str) -> None:
        (header,), _ = self.x._headers([number])
        if header is None or header.hash != block_hash:
            now = "no longer exists" if header is None else f"now has hash {header.hash}"
            raise SnapshotError(f"window {self.window}: block {number} {now}, not {block_hash} as read: the chain "
                                "reorganised while the window was read; nothing stored")

    # -- blocks ---------------------------------------------------------------------------

    def _blocks(self, low: int, high: int, parent: str) -> dict[int, Block]:
        """Blocks ``low`` to ``high``, each the child of the one before (``parent`` the hash before ``low``)."""
        x = self.x
        numbers = list(range(low, high + 1))
        calls = [x._header_call(n) for n in numbers]
        answers = x._batch(calls)
        blocks: dict[int, Block] = {}
        for number, call, answer in zip(numbers, calls, answers):
            header = x._header(answer, call, number)
            if header is None:
                raise SnapshotError(f"window {self.window}: block {number} does not exist on the node (it reports "
                                    "a shorter chain): the chain reorganised, or the node lags; nothing stored")
            if header.parent_hash != parent:
                snapshot = number - 1 == self.first
                raise SnapshotError(
                    f"window {self.window}: block {number}'s parent is {header.parent_hash}, not {parent}"
                    + (f", the hash block {self.first} had when the window's first snapshot read it: the chain "
                       "reorganised past that snapshot" if snapshot else ": the chain changed while it was read")
                    + "; nothing stored")
            blocks[number] = _block_extras(answer, header)
            parent = header.hash
        return blocks

    # -- ERC-20 logs ----------------------------------------------------------------------

    def _token_legs(self, low: int, high: int, tokens: dict[str, tuple[str, int]],
                    blocks: dict[int, Block]) -> tuple[list[MovementRow], list[Rejection]]:
        padded = ["0x" + "0" * 24 + a[2:] for a in self.ours]
        base = {"address": [t for t, _ in tokens.values()]}
        queries = [{**base, "topics": [TRANSFER_TOPIC, padded]}, {**base, "topics": [TRANSFER_TOPIC, None, padded]}]
        page = MovementPage()
        seen: set[tuple[int, int]] = set()
        for log in self._ranged("eth_getLogs", queries, low, high):
            try:
                key, legs = self._log_legs(log, tokens, blocks, low, high)
            except RecordError as exc:
                page.reject(log, exc, code="malformed_record")
                continue
            if key not in seen:  # a transfer between two of the addresses answers both queries
                seen.add(key)
                page.rows.extend(legs)
        return page.rows, page.rejected

    def _ranged(self, method: str, queries: list[dict], low: int, high: int) -> list:
        """Every query over blocks ``low`` to ``high``, in halves where the node finds the range too big."""
        x = self.x
        calls = [_call(method, ({**q, "fromBlock": hex(low), "toBlock": hex(high)},)) for q in queries]
        answers = x._batch(calls)
        refused = [a for a in answers if _is_error(a) and TOO_MANY.search(a.message)]
        if refused:
            if low == high:
                raise ProviderError(f"{method} of block {low} alone is over the node's limit: {refused[0]}")
            middle = (low + high) // 2
            return self._ranged(method, queries, low, middle) + self._ranged(method, queries, middle + 1, high)
        found = []
        for call, answer in zip(calls, answers):
            result = x._result(answer, call, high)
            if not isinstance(result, list):
                raise MalformedResponseError(f"{method} answered {type(result).__name__}, not a list", raw=result)
            found += result
        return found

    def _log_legs(self, log: Any, tokens: dict[str, tuple[str, int]], blocks: dict[int, Block], low: int,
                  high: int) -> tuple[tuple[int, int], list[MovementRow]]:
        if not isinstance(log, dict):
            raise RecordError(f"log is {type(log).__name__}, expected an object")
        number, index = quantity(log.get("blockNumber"), "blockNumber"), quantity(log.get("logIndex"), "logIndex")
        if not low <= number <= high:
            raise MalformedResponseError(f"asked for logs of blocks {low} to {high}, got one of block {number}", raw=log)
        if log.get("removed") is True or str(log.get("blockHash", "")).lower() != blocks[number].hash:
            raise SnapshotError(f"window {self.window}: a log of block {number} is from block hash "
                                f"{log.get('blockHash')}, not {blocks[number].hash} of the chain read (removed: "
                                f"{log.get('removed')}): the chain reorganised while it was read; nothing stored")
        token = str(log.get("address", "")).lower()
        if token not in tokens:
            raise MalformedResponseError(f"asked for logs of the configured tokens, got one of {token}", raw=log)
        topics = log.get("topics")
        if not isinstance(topics, list) or len(topics) != 3 or str(topics[0]).lower() != TRANSFER_TOPIC:
            raise RecordError("not an ERC-20 Transfer: it needs exactly the event's topic and two address topics")
        sender, receiver = (_topic_address(t) for t in topics[1:])
        value = decode_word(data_bytes(log.get("data"), "log data"), "uint256", "the Transfer's value")
        tx = log.get("transactionHash")
        if not isinstance(tx, str) or not _WORD.fullmatch(tx):
            raise RecordError(f"transactionHash {tx!r} is not a 32-byte hash")
        asset, decimals = tokens[token]
        kind = "mint" if int(sender, 16) == 0 else "burn" if int(receiver, 16) == 0 else "transfer"
        block = blocks[number]
        raw = f"{number}:{index}"
        legs = []
        for side, (account, other, sign) in (("from", (sender, receiver, -1)), ("to", (receiver, sender, 1))):
            if account in self.ours:
                legs.append(MovementRow(self.ours[account], asset, block.time, raw, f"{tx.lower()}:{index}:{side}",
                                        sign * value, kind, decimals, to_checksum_address(other)))
        return (number, index), legs

    # -- native: traces, fees, blocks produced, withdrawals --------------------------------

    def _trace_method(self) -> str | None:
        """The trace method to read native moves with: the setting, or the first the node answers."""
        x = self.x
        wanted = self.settings.traces
        if wanted == "none":
            return None
        candidates = TRACE_METHODS if wanted == "auto" else (wanted,)
        for method in candidates:
            probe = _call(method, ({"fromBlock": hex(self.last), "toBlock": hex(self.last),
                                    "toAddress": [next(iter(self.ours))]},) if method == "trace_filter"
                          else (hex(self.last), {"tracer": "callTracer"}))
            try:
                (answer,) = x._batch([probe])
            except ProviderError as exc:  # a gateway answering HTTP 4xx for a method it does not serve
                if wanted == "auto" and exc.status is not None and 400 <= exc.status < 500 \
                        and _METHOD_MISSING.search(str(exc)):
                    continue
                raise
            if _is_error(answer) and (answer.code == METHOD_MISSING_CODE or _METHOD_MISSING.search(answer.message)):
                if wanted == "auto":
                    continue
                raise ProviderError(f"the node does not offer {method} (traces = {wanted!r}): {answer}")
            x._result(answer, probe, self.last)
            return method
        return None

    def _native_legs(self, low: int, high: int, blocks: dict[int, Block],
                     method: str) -> tuple[list[MovementRow], list[Rejection]]:
        frames, sent, rewards = (self._filtered_frames if method == "trace_filter" else self._block_frames)(
            low, high, blocks)
        rows = []
        for frame in frames:
            if not frame.moved or frame.value == 0:
                continue
            path = ".".join(map(str, frame.path)) or "top"
            for side, (account, other, sign) in (("out", (frame.sender, frame.receiver, -1)),
                                                 ("in", (frame.receiver, frame.sender, 1))):
                if account in self.ours:
                    rows.append(self._native(account, blocks[frame.block], f"{frame.tx}:{path}:{side}",
                                             sign * frame.value, "transfer", other))
        rows += self._fees(sent, blocks)
        rows += rewards
        for block in blocks.values():
            rows += self._produced(block)
            for index, address, gwei in block.withdrawals:
                if address in self.ours and gwei:
                    rows.append(self._native(address, block, f"block {block.number} withdrawal {index}",
                                             gwei * GWEI, "withdrawal", None))
        return rows, []

    def _native(self, account: str, block: Block, movement_id: str, amount: int, kind: str,
                other: str | None) -> MovementRow:
        return MovementRow(self.ours[account], self.native, block.time, str(block.number), movement_id, amount, kind,
                           NATIVE_DECIMALS, None if other is None else to_checksum_address(other))

    def _filtered_frames(self, low: int, high: int, blocks: dict[int, Block]):
        """trace_filter: the frames touching the addresses, judged against their transactions' whole traces."""
        ours = list(self.ours)
        matched = self._ranged("trace_filter", [{"fromAddress": ours}, {"toAddress": ours}], low, high)
        txs: dict[str, int] = {}
        rewards: list[MovementRow] = []
        for trace in matched:
            number = _number(trace, "blockNumber")
            if not low <= number <= high or str(trace.get("blockHash", "")).lower() != blocks[number].hash:
                raise SnapshotError(f"window {self.window}: a trace of block {number} is from block hash "
                                    f"{trace.get('blockHash')}, not {blocks[number].hash} of the chain read; "
                                    "nothing stored")
            if trace.get("type") == "reward":  # a pre-merge block or uncle reward
                action = _object(trace, "action")
                author = str(action.get("author", "")).lower()
                if author in self.ours:
                    value = _quantity(action.get("value"), "reward value")
                    rewards.append(self._native(author, blocks[number], f"block {number} reward "
                                                f"{action.get('rewardType')} {len(rewards)}", value, "reward", None))
                continue
            txs[_hash(trace.get("transactionHash"))] = number
        hashes = sorted(txs)
        calls = [_call("trace_transaction", (h,)) for h in hashes]
        frames: list[Frame] = []
        sent: dict[str, int] = {}
        for tx, call, answer in zip(hashes, calls, self.x._batch(calls)):
            traces = self.x._result(answer, call)
            if not isinstance(traces, list):
                raise MalformedResponseError(f"trace_transaction({tx}) answered {type(traces).__name__}", raw=traces)
            failed = {tuple(t.get("traceAddress") or ()) for t in traces if isinstance(t, dict) and t.get("error")}
            for trace in traces:
                path = tuple(_path(trace))
                if not path and _address(_object(trace, "action").get("from"), "from") in self.ours:
                    sent[tx] = txs[tx]  # sent by one of the addresses: it paid the fee, failed or not
                frame = _parity_frame(trace, tx, txs[tx], path, failed)
                if frame is not None and (frame.sender in self.ours or frame.receiver in self.ours):
                    frames.append(frame)
        return frames, sent, rewards

    def _block_frames(self, low: int, high: int, blocks: dict[int, Block]):
        """debug_traceBlockByNumber with the callTracer: every block's call trees, walked."""
        frames: list[Frame] = []
        sent: dict[str, int] = {}
        for number in range(low, high + 1):  # a block's trace can be megabytes: one a request
            call = _call("debug_traceBlockByNumber", (hex(number), {"tracer": "callTracer"}))
            (answer,) = self.x._batch([call])
            traced = self.x._result(answer, call, number)
            if not isinstance(traced, list):
                raise MalformedResponseError(f"debug_traceBlockByNumber({number}) answered {type(traced).__name__}",
                                             raw=traced)
            for item in traced:
                tx = _hash(item.get("txHash") if isinstance(item, dict) else None)
                top = _object(item, "result")
                if str(top.get("from", "")).lower() in self.ours:
                    sent[tx] = number
                for frame in _walk(top, tx, number):
                    if frame.sender in self.ours or frame.receiver in self.ours:
                        frames.append(frame)
        return frames, sent, []

    def _fees(self, sent: dict[str, int], blocks: dict[int, Block]) -> list[MovementRow]:
        """What each transaction an address sent cost it: gas, blob gas, an OP-stack L1 fee."""
        hashes = sorted(sent)
        calls = [_call("eth_getTransactionReceipt", (h,)) for h in hashes]
        rows = []
        for tx, call, answer in zip(hashes, calls, self.x._batch(calls)):
            receipt = self.x._result(answer, call)
            if not isinstance(receipt, dict) or _hash(receipt.get("transactionHash")) != tx:
                raise MalformedResponseError(f"the receipt of {tx} is not its receipt", raw=receipt)
            sender = str(receipt.get("from", "")).lower()
            if sender not in self.ours or _quantity(receipt.get("blockNumber"), "blockNumber") != sent[tx]:
                raise MalformedResponseError(f"the receipt of {tx} names sender {sender} in block "
                                             f"{receipt.get('blockNumber')}, not the one traced", raw=receipt)
            fee = _quantity(receipt.get("gasUsed"), "gasUsed") * _quantity(receipt.get("effectiveGasPrice"),
                                                                           "effectiveGasPrice")
            if receipt.get("blobGasUsed") is not None and receipt.get("blobGasPrice") is not None:
                fee += _quantity(receipt["blobGasUsed"], "blobGasUsed") * _quantity(receipt["blobGasPrice"],
                                                                                     "blobGasPrice")
            if receipt.get("l1Fee") is not None:
                fee += _quantity(receipt["l1Fee"], "l1Fee")
            if fee:
                rows.append(self._native(sender, blocks[sent[tx]], f"{tx}:fee", -fee, "fee", None))
        return rows

    def _produced(self, block: Block) -> list[MovementRow]:
        """The priority fees of a block one of the addresses produced."""
        if block.miner not in self.ours:
            return []
        call = _call("eth_getBlockReceipts", (hex(block.number),))
        (answer,) = self.x._batch([call])
        receipts = self.x._result(answer, call, block.number)
        if not isinstance(receipts, list):
            raise MalformedResponseError(f"eth_getBlockReceipts({block.number}) is not a list", raw=receipts)
        tip = 0
        for receipt in receipts:
            if not isinstance(receipt, dict):
                raise MalformedResponseError(f"a receipt of block {block.number} is no object", raw=receipt)
            price = _quantity(receipt.get("effectiveGasPrice"), "effectiveGasPrice")
            tip += _quantity(receipt.get("gasUsed"), "gasUsed") * (price - (block.base_fee or 0))
        if not tip:
            return []
        return [self._native(block.miner, block, f"block {block.number} priority fees", tip, "reward", None)]


# -- reading what the node sent -----------------------------------------------------------


def _call(method: str, params: tuple) -> "Call":
    return Call(method, params, method)


def _is_error(answer: Any) -> bool:
    return isinstance(answer, RpcError)


def _quantity(value: Any, what: str) -> int:
    try:
        return quantity(value, what)
    except RecordError as exc:
        raise MalformedResponseError(str(exc), raw=value) from None


def _number(item: Any, key: str) -> int:
    """A block number as traces give it: an integer (anvil, Erigon) or a quantity."""
    value = item.get(key) if isinstance(item, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return _quantity(value, key)


def _hash(value: Any) -> str:
    if not isinstance(value, str) or not _WORD.fullmatch(value):
        raise MalformedResponseError(f"{value!r} is not a transaction hash", raw=value)
    return value.lower()


def _object(item: Any, key: str) -> dict:
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, dict):
        raise MalformedResponseError(f"{key} is {type(value).__name__}, expected an object", raw=item)
    return value


def _path(trace: Any) -> list[int]:
    path = trace.get("traceAddress") if isinstance(trace, dict) else None
    if not isinstance(path, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in path):
        raise MalformedResponseError("a trace has no traceAddress list", raw=trace)
    return path


def _topic_address(topic: Any) -> str:
    if not isinstance(topic, str) or not _WORD.fullmatch(topic) or int(topic[2:26], 16):
        raise RecordError(f"topic {topic!r} is not an address padded to 32 bytes")
    return "0x" + topic[26:].lower()


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"0x[0-9a-fA-F]{40}", value):
        raise MalformedResponseError(f"{what} {value!r} is not an address", raw=value)
    return value.lower()


def _block_extras(answer: Any, header) -> Block:
    """A header the extractor read (``header``), with what the movements need from its block."""
    withdrawals = []
    for item in answer.get("withdrawals") or ():
        if not isinstance(item, dict):
            raise MalformedResponseError(f"block {header.number} has a withdrawal that is no object", raw=item)
        withdrawals.append((_quantity(item.get("index"), "withdrawal index"), _address(item.get("address"),
                                                                                      "withdrawal address"),
                            _quantity(item.get("amount"), "withdrawal amount")))
    base_fee = answer.get("baseFeePerGas")
    return Block(header.number, header.hash, header.parent_hash, header.timestamp,
                 _address(answer.get("miner"), "miner"), None if base_fee is None else _quantity(base_fee,
                                                                                                  "baseFeePerGas"),
                 tuple(withdrawals))


def _parity_frame(trace: Any, tx: str, block: int, path: tuple[int, ...], failed: set) -> Frame | None:
    """A ``trace_transaction`` frame that moves value (a call, a create, a self-destruct), or None."""
    if not isinstance(trace, dict):
        raise MalformedResponseError("a trace is no object", raw=trace)
    kind = trace.get("type")
    action = _object(trace, "action")
    moved = not any(path[:n] in failed for n in range(len(path) + 1))
    if kind == "call":
        if str(action.get("callType", "call")).lower() != "call":
            return None  # delegatecall, staticcall, callcode: no value leaves the caller
        sender, receiver = _address(action.get("from"), "from"), _address(action.get("to"), "to")
        value = _quantity(action.get("value"), "value")
    elif kind == "create":
        result = trace.get("result") if isinstance(trace.get("result"), dict) else {}
        if not result.get("address"):
            return None  # the creation failed: nothing was created, no value moved
        sender, receiver = _address(action.get("from"), "from"), _address(result.get("address"), "created address")
        value = _quantity(action.get("value"), "value")
    elif kind in ("suicide", "selfdestruct"):
        sender = _address(action.get("address"), "address")
        receiver = _address(action.get("refundAddress"), "refundAddress")
        value = _quantity(action.get("balance"), "balance")
    else:
        return None
    return Frame(tx, block, path, sender, receiver, value, moved)


def _walk(frame: dict, tx: str, block: int, path: tuple[int, ...] = ()) -> Iterator[Frame]:
    """The callTracer tree under ``frame``: its value moves, none under a frame that failed."""
    if frame.get("error"):
        return  # reverted: it and everything it called moved nothing
    kind = str(frame.get("type", "")).lower()
    if kind in _MOVING_CALLS and frame.get("value") is not None:
        yield Frame(tx, block, path, _address(frame.get("from"), "from"), _address(frame.get("to"), "to"),
                    _quantity(frame.get("value"), "value"), True)
    calls = frame.get("calls") or []
    if not isinstance(calls, list):
        raise MalformedResponseError("calls is not a list", raw=frame)
    for index, child in enumerate(calls):
        if not isinstance(child, dict):
            raise MalformedResponseError("a call frame is no object", raw=child)
        yield from _walk(child, tx, block, path + (index,))
