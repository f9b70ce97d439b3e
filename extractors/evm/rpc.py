"""JSON-RPC as EVM nodes speak it: calls, their errors, and the values they answer with.

Shared by the balances (:mod:`extractors.evm`) and the movements
(:mod:`extractors.evm.movements`) of an EVM source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError

from extractors.errors import SnapshotError
from extractors.records import RecordError, shown, to_json_text
from extractors.text import safe_text

NATIVE_DECIMALS = 18
_QUANTITY = re.compile(r"0x[0-9a-fA-F]{1,64}")
_DATA = re.compile(r"0x(?:[0-9a-fA-F]{2})*")
_RAW = re.compile(r"([0-9]{1,20}):(0x[0-9a-f]{64})")

# JSON-RPC error codes that say "slow down" (EIP-1474 -32005; -32029 and
# 429 used by hosted endpoints), and the words others use.
RATE_LIMIT_CODES = {-32005, -32029, 429}
_RATE_LIMIT_WORDS = re.compile(r"rate.?limit|too many requests|limit exceeded|exceeded .{0,40}(capacity|quota|rate)|"
                               r"compute units", re.I)
# A node that has pruned the state of old blocks (not an archive node).
_PRUNED_WORDS = re.compile(r"missing trie node|BlockOutOfRange|state .{0,40}not available|historical state|"
                           r"state histor|no state available|pruned|not an archive|distance to target block",
                           re.I)
# A call that ran and failed: it reverted (EIP-1474 code 3, or geth's -32000
# with these words), hit an invalid opcode, ran out of gas. Not a node-side
# timeout or a block the node does not have: those are no fault of the token.
_CALL_FAILED_CODES = {3, -32015}
_CALL_FAILED_WORDS = re.compile(r"revert|invalid opcode|out of gas|vm exception|stack (?:underflow|overflow)|"
                                r"invalid jump", re.I)


# "ask for less": a range or answer over the node's limit (Infura -32005, Alchemy, QuickNode).
TOO_MANY = re.compile(r"more than [0-9,]+ results|too many (results|logs|traces)|response size|block range|"
                      r"range (is )?too (large|wide|big)|exceeds? (the )?max(imum)? (block )?range|"
                      r"query timeout|limit .{0,30}(results|logs)", re.I)


@dataclass(slots=True, frozen=True)
class Call:
    method: str
    params: tuple
    what: str  # how an error names it


def quantity(value: Any, what: str) -> int:
    """A JSON-RPC quantity (``0x`` and hex digits) as an int; RecordError otherwise."""
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
        raise RecordError(f"{what} is {shown(value)}, expected a hex quantity such as '0x1a'")
    return int(value, 16)


def data_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _DATA.fullmatch(value):
        raise RecordError(f"{what} is {shown(value)}, expected hex data such as '0x00ff'")
    return bytes.fromhex(value[2:])


def decode_word(data: bytes, abi_type: str, what: str) -> int:
    """The one ABI word a view function returns (``uint256``, ``uint8``): exactly 32 bytes."""
    if not data:
        raise RecordError(f"{what} returned no data (0x): no contract code answers it")
    if len(data) != 32:
        raise RecordError(f"{what} returned {len(data)} bytes, expected one 32-byte word")
    try:
        (value,) = abi_decode([abi_type], data)
    except DecodingError as exc:
        raise RecordError(f"{what} returned {('0x' + data.hex())!r}, not a {abi_type}: {exc}") from None
    return value


def snapshot_raw(number: int, block_hash: str) -> str:
    """``as_of_raw`` of a block: its number and hash."""
    return f"{number}:{block_hash.lower()}"


def parse_snapshot_raw(raw: str) -> tuple[int, str]:
    match = _RAW.fullmatch(raw or "")
    if not match:
        raise SnapshotError(f"snapshot {raw!r} is not a block's number:hash")
    return int(match[1]), match[2]


@dataclass(slots=True)
class RpcError:
    """One call's JSON-RPC error: ``code``, ``message`` and the whole error object."""

    code: Any
    message: str
    raw: Any

    @property
    def rate_limited(self) -> bool:
        # Infura answers an eth_getLogs over its limit with -32005 too: that is "ask for less", not "slow down".
        if TOO_MANY.search(self.message):
            return False
        return self.code in RATE_LIMIT_CODES or bool(_RATE_LIMIT_WORDS.search(self.message))

    @property
    def pruned(self) -> bool:
        return bool(_PRUNED_WORDS.search(self.message))

    @property
    def call_failed(self) -> bool:
        return self.code in _CALL_FAILED_CODES or bool(_CALL_FAILED_WORDS.search(self.message))

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code is not None else self.message


def rpc_error(value: Any) -> RpcError:
    code = value.get("code") if isinstance(value, dict) else None
    message = value.get("message") if isinstance(value, dict) else None
    if isinstance(code, bool) or not isinstance(code, int):
        code = None
    text = message if isinstance(message, str) else to_json_text(value)[:300]
    return RpcError(code, safe_text(text, 300), value)


def _errors(data: Any) -> list[RpcError]:
    items = data if isinstance(data, list) else [data]
    return [rpc_error(item["error"]) for item in items if isinstance(item, dict) and item.get("error") is not None]


