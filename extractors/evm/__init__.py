"""EVM chains (Ethereum and its kin): native and ERC-20 balances at one block, over JSON-RPC.

What differs from the other providers: a snapshot is one block, not a
time. For a run's time T the snapshot is the latest block whose timestamp
is at or before T, that has ``confirmations`` blocks on top of it (a
reorganisation that deep is not expected) and that is the last block of
its second, found by a bounded search over block headers. ``as_of`` is
that block's timestamp, ``as_of_raw`` its number and hash
(``19000000:0x...``): chains with several blocks a second (Arbitrum, many
L2s) give several blocks one timestamp, and only the last of them is ever
a snapshot, so a snapshot time names one block. Block times must not go
backwards along the headers read. Every balance is read at that block
number, each JSON-RPC batch re-reads the block's header and the hash must not
change, and the hash is checked once more just before publish
(``verifies_snapshot``): a chain that reorganised past the block fails the
run and nothing is published.

Requests are JSON-RPC 2.0 POSTs, batched ``max_batch`` calls at a time
(answers come in any order and are matched by ``id``). The native balance is
``eth_getBalance(address, block)``; an ERC-20 balance is ``eth_call`` of
``balanceOf(address)`` at the same block, and the token's ``decimals()`` is
read once per run, beside ``eth_getCode`` (an address with no code is no
token). Values are uint256, stored exactly as integers in the chain's
smallest unit (wei) with ``decimals`` (18 for the native asset).

What real nodes do that shapes this module:

* A node that no longer holds the state of an old block (a full node, not an
  archive node) answers with an error, never with zero: geth "missing trie
  node", Erigon "state ... not available", anvil ``--prune-history``
  "BlockOutOfRangeError". Such an answer fails the run naming it.
* Rate limits come as HTTP 429 or as JSON-RPC errors inside HTTP 200 (Infura
  -32005 "limit exceeded", others -32029 or "rate limit" in the message),
  for a whole batch or for some of its calls: either way the request is
  retried under the shared retry policy.
* A call that reverts answers with an error (code 3 or -32000 "execution
  reverted"); a call to an address without code answers ``0x``. A token
  doing either, or answering anything but one 32-byte word, is a rejected
  record with the reason, never a zero balance.
* JSON-RPC ids start at 1: Ganache 7 answers a failing call of id 0 with id
  null. An error without an id is taken as the answer of the one call
  left unanswered, when exactly one is; otherwise the request fails.
* Movements (``movements(window)``, the roll-forward between two snapshot
  blocks) are read by :mod:`extractors.evm.movements`: ERC-20 ``Transfer``
  logs, native moves from traces (``trace_filter`` or
  ``debug_traceBlockByNumber``, ``traces`` says which, by default the
  first the node offers), fees from receipts; without traces the native
  asset is reported unexplainable, never guessed.
* Hosted endpoints take an API key in the URL path (Infura ``/v3/<key>``,
  Alchemy ``/v2/<key>``) or in a header: either way it is added to each
  request as it is sent, never part of any URL we log or store.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests
from pydantic import field_validator
from eth_abi import encode as abi_encode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from extractors.credentials import Credentials, require_credentials
from extractors.errors import (
    ExtractError,
    HistoryUnavailable,
    MalformedResponseError,
    NoSnapshotAvailable,
    ProviderError,
    SnapshotError,
)
from extractors.http import (
    HttpClient,
    RetryPolicy,
    error_text,
    http_error,
    parse_retry_after,
)
from extractors.paginators import check_page_cap
from extractors.provider import BaseExtractor, Provider, Throttle
from extractors.settings import Between, Count, Matching, OneOf, OneOrMore, ProviderSettings, Text, Url
from extractors.records import BalanceRow, Page, RecordError, Rejection, shown, to_json_text
from extractors.evm.movements import MovementReader
from extractors.evm.rpc import (  # noqa: F401  (quantity and decode_word are read from here too)
    NATIVE_DECIMALS,
    Call,
    RpcError,
    data_bytes,
    decode_word,
    parse_snapshot_raw,
    quantity,
    rpc_error,
    snapshot_raw,
    _errors,
)
from extractors.redaction import redact_url

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # geth's default BatchRequestLimit; hosted endpoints allow less
MAX_CONFIRMATIONS = 10_000
TRACES = ("auto", "trace_filter", "debug_traceBlockByNumber", "none")
MAX_LOGS_BLOCK_RANGE = 100_000
UINT256_MAX = 2**256 - 1
# Header probes per round of the snapshot search, and rounds at most: 17-ary
# search over 2**63 blocks takes 16 rounds; more means a node that lies.
SEARCH_FANOUT = 16
MAX_SEARCH_ROUNDS = 64

BALANCE_OF = function_signature_to_4byte_selector("balanceOf(address)")
DECIMALS = function_signature_to_4byte_selector("decimals()")

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_ASSET = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,31}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")

def checksum_address(text: Any, where: str | None = None) -> str:
    """The EIP-55 form of an address; ValueError unless it is one (its message starts ``<where>: ``
    when ``where`` names the address).

    All lower or all upper case carries no checksum; mixed case must be the
    EIP-55 checksum, which catches a mistyped character.
    """
    said = f"{where}: " if where else ""
    if not isinstance(text, str) or not _ADDRESS.fullmatch(text):
        raise ValueError(f"{said}{text!r} is not an address (0x and 40 hex digits)")
    checksummed = to_checksum_address(text)
    digits = text[2:]
    if digits != digits.lower() and digits != digits.upper() and text != checksummed:
        raise ValueError(f"{said}{text!r} fails its EIP-55 checksum (mixed case must be exactly "
                         f"{checksummed!r}): a character is mistyped")
    return checksummed


class Settings(ProviderSettings):
    """The ``[sources.<name>]`` keys an EVM source accepts."""

    rpc_url: Url
    chain_id: Count
    addresses: OneOrMore[Text]
    tokens: OneOrMore[Text] = []
    native_asset: Text = "ETH"
    confirmations: Annotated[Count, Between(0, MAX_CONFIRMATIONS)] = 12
    max_batch: Annotated[Count, Between(1, MAX_BATCH)] = 100
    # Where a Connection's API key goes: "path" (appended to rpc_url's path,
    # as Infura and Alchemy take it) or "header" (named by api_key_header).
    api_key_in: Annotated[Text, OneOf("path", "header")] = "path"
    api_key_header: Annotated[Text, Matching(_HEADER_NAME, "an HTTP header name")] = "x-api-key"
    # Movements: how native moves are read ("auto": the first the node offers), and the most
    # blocks one eth_getLogs or trace_filter asks for (a range the node refuses is halved).
    traces: Annotated[Text, OneOf(*TRACES)] = "auto"
    logs_block_range: Annotated[Count, Between(1, MAX_LOGS_BLOCK_RANGE, grouped=True)] = 1000

    @field_validator("chain_id")
    @classmethod
    def _chain_id(cls, chain_id: int) -> int:
        if chain_id < 1:
            raise ValueError(f"must be a chain id (1 for Ethereum mainnet), got {chain_id}")
        return chain_id

    @field_validator("addresses")
    @classmethod
    def _some_addresses(cls, addresses: list[str]) -> list[str]:
        if not addresses:
            raise ValueError("list at least one account to snapshot")
        return _unique(addresses)

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, tokens: list[str]) -> list[str]:
        return _unique(tokens)

    @field_validator("native_asset")
    @classmethod
    def _asset_code(cls, native_asset: str) -> str:
        if not _ASSET.fullmatch(native_asset):
            raise ValueError(f"{native_asset!r} is not an asset code (a letter, then up to "
                             "31 letters, digits, '.', '_' or '-')")
        return native_asset



def _unique(values: list[str]) -> list[str]:
    """The addresses in their EIP-55 form, each once; ValueError naming one listed twice."""
    found: list[str] = []
    for text in values:
        address = checksum_address(text)
        if address in found:
            raise ValueError(f"{text!r} is listed twice")
        found.append(address)
    return found


@dataclass(slots=True, frozen=True)
class Header:
    number: int
    hash: str
    timestamp: int
    parent_hash: str

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, tz=timezone.utc)


def _check_times(known: dict[int, Header]) -> None:
    """Block times never go backwards along the chain: of the blocks read, none is earlier than one below it."""
    numbers = sorted(known)
    for below, above in zip(numbers, numbers[1:]):
        earlier, later = known[below], known[above]
        if later.timestamp < earlier.timestamp:
            raise SnapshotError(
                f"block times go backwards: block {later.number} ({later.time.isoformat()}) is earlier than "
                f"block {earlier.number} ({earlier.time.isoformat()}) below it; no snapshot is chosen on such "
                "a chain")


# --- the HTTP side: POST, the key added as the request is sent -------------------


class _PathKey(requests.auth.AuthBase):
    """Appends the API key to the URL path of each request, and hides it from the response's URL.

    The key is never part of a URL the client joins, logs or raises with:
    only the request on the wire carries it.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        shown = request.url
        parts = urlsplit(shown)
        path = parts.path.rstrip("/") + "/" + self.key
        request.url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))

        def hide(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
            response.url = shown
            return response

        request.register_hook("response", hide)
        return request


def rpc_http_error(response: requests.Response) -> ProviderError:
    """An HTTP error, in the JSON-RPC error's words when the body holds one; 429 retried."""
    errors: list[RpcError] = []
    try:
        errors = _errors(response.json())
    except (ValueError, TypeError):
        pass  # not JSON: a proxy's page, say
    message = str(errors[0]) if errors else error_text(response)
    return http_error(response, message, retriable=any(e.rate_limited for e in errors))


def rpc_check(data: Any, response: requests.Response) -> None:
    """A 200 that says "slow down" (for the whole batch or any call in it) is retried.

    Any other error, with an id or without, is the answer of a call: the
    extractor matches it (``EvmExtractor._send``).
    """
    for error in _errors(data):
        if error.rate_limited:
            raise ProviderError(f"rate limited by {redact_url(response.url)}: {error}",
                                code=None if error.code is None else str(error.code), retriable=True,
                                retry_after=parse_retry_after(response.headers.get("Retry-After")))


# --- the extractor ------------------------------------------------------------------


class EvmExtractor(BaseExtractor):
    """Reads one block's balances of the configured addresses and tokens."""


    def __init__(self, settings: Settings, client: HttpClient, *, max_pages: int) -> None:
        super().__init__(settings, client, max_pages=max_pages)
        self._decimals: dict[str, int | Rejection] = {}

    # -- JSON-RPC ------------------------------------------------------------------

    def _batch(self, calls: Sequence[Call]) -> list[Any]:
        """Each call's ``result``, or its :class:`RpcError`, in the order asked.

        Calls go ``max_batch`` to a request: one as a plain request, more
        as a batch whose answers are matched by ``id`` (a batch may answer
        in any order).
        """
        size = self.settings.max_batch
        answers: list[Any] = []
        for start in range(0, len(calls), size):
            answers += self._send(calls[start:start + size])
        return answers

    def _send(self, calls: Sequence[Call]) -> list[Any]:
        # Ids start at 1: Ganache 7 answers a failing call of id 0 with id null
        # (see _unclaimed), and some clients and servers treat 0 as no id.
        body = [{"jsonrpc": "2.0", "id": i, "method": c.method, "params": list(c.params)}
                for i, c in enumerate(calls, start=1)]
        data = self.client.post_json(self.client.base_url, body[0] if len(body) == 1 else body)
        items = [data] if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise MalformedResponseError(f"a batch of {len(body)} calls was answered with "
                                         f"{type(data).__name__}, not a list", raw=data)
        answers: dict[int, Any] = {}
        unclaimed: list[RpcError] = []  # errors answered with id null
        for item in items:
            ident = item.get("id") if isinstance(item, dict) else None
            if ident is None and isinstance(item, dict) and item.get("error") is not None:
                unclaimed.append(rpc_error(item["error"]))
                continue
            if isinstance(ident, bool) or not isinstance(ident, int) or not 1 <= ident <= len(body):
                raise MalformedResponseError(f"an answer has id {shown(ident)}, not one of the {len(body)} "
                                             "calls sent", raw=item)
            if ident in answers:
                raise MalformedResponseError(f"call {ident} was answered twice", raw=data)
            if item.get("error") is not None:
                answers[ident] = rpc_error(item["error"])
            elif "result" in item:
                answers[ident] = item["result"]
            else:
                raise MalformedResponseError(f"the answer to call {ident} has neither result nor error",
                                             raw=item)
        if len(body) > 1 and len(items) == 1 and isinstance(answers.get(1), RpcError):
            # geth refuses an oversized batch with one error carrying the first call's id.
            raise ProviderError(f"the endpoint refused a batch of {len(body)} calls: {answers[1]} "
                                "(lower max_batch)")
        missing = [i for i in range(1, len(body) + 1) if i not in answers]
        if unclaimed:
            answers[self._unclaimed(unclaimed, missing, len(body))] = unclaimed[0]
            missing = missing[1:]
        if missing:
            raise MalformedResponseError(f"{len(missing)} of {len(body)} calls got no answer "
                                         f"({calls[missing[0] - 1].what} first)", raw=data)
        return [answers[i] for i in range(1, len(body) + 1)]

    @staticmethod
    def _unclaimed(errors: list[RpcError], missing: list[int], calls: int) -> int:
        """The call an error answered with id null belongs to: the only one left unanswered.

        JSON-RPC 2.0 answers with id null when the server could not read the
        call's id, and Ganache 7 does it for a failing call whose id is 0 (a
        single request: ``payload.id ? payload.id : null``). One such error
        and one unanswered call leave no doubt; anything else does.
        """
        if len(errors) == 1 and len(missing) == 1:
            return missing[0]
        if len(errors) == 1 and len(missing) == calls:
            raise ProviderError(f"JSON-RPC error for the whole batch: {errors[0]}")
        raise ProviderError(f"{len(errors)} error(s) without an id came with {len(missing)} of {calls} calls "
                            f"unanswered: which call failed is unknown (first: {errors[0]})")

    def _fatal(self, answer: RpcError, call: Call, block: int | None = None) -> ExtractError:
        """The run-ending error for a call that failed where no record can take the blame."""
        if answer.pruned and block is not None:
            return HistoryUnavailable(
                f"this node is not an archive node: it no longer holds the state of block {block} "
                f"({call.what}: {answer}); use an archive node for backfills, or snapshot recent blocks only")
        return ProviderError(f"{call.what} failed: {answer}", code=None if answer.code is None else str(answer.code))

    def _result(self, answer: Any, call: Call, block: int | None = None) -> Any:
        if isinstance(answer, RpcError):
            raise self._fatal(answer, call, block)
        return answer

    def _header_call(self, number: int) -> Call:
        return Call("eth_getBlockByNumber", (hex(number), False), f"eth_getBlockByNumber({number})")

    def _header(self, answer: Any, call: Call, number: int) -> Header | None:
        block = self._result(answer, call)
        if block is None:
            return None
        try:
            if not isinstance(block, dict):
                raise RecordError(f"is {type(block).__name__}, expected an object")
            found = quantity(block.get("number"), "number")
            timestamp = quantity(block.get("timestamp"), "timestamp")
            block_hash, parent_hash = block.get("hash"), block.get("parentHash")
            for key, value in (("hash", block_hash), ("parentHash", parent_hash)):
                if not isinstance(value, str) or not _HASH.fullmatch(value):
                    raise RecordError(f"{key} is {shown(value)}, expected 0x and 64 hex digits")
        except RecordError as exc:
            raise MalformedResponseError(f"block {number}: {exc}", raw=block) from None
        if found != number:
            raise MalformedResponseError(f"asked for block {number}, got block {found}", raw=block)
        if timestamp > 2**40:
            raise MalformedResponseError(f"block {number} has timestamp {timestamp}, beyond any date",
                                         raw=block)
        return Header(number, block_hash.lower(), timestamp, parent_hash.lower())

    def _headers(self, numbers: Sequence[int], extra: Sequence[Call] = ()) -> tuple[list[Header | None], list[Any]]:
        calls = [self._header_call(n) for n in numbers]
        answers = self._batch(list(extra) + calls)
        headers = [self._header(a, c, n) for a, c, n in zip(answers[len(extra):], calls, numbers)]
        return headers, answers[:len(extra)]

    def _check_chain(self, answer: Any) -> None:
        call = Call("eth_chainId", (), "eth_chainId")
        try:
            chain = quantity(self._result(answer, call), "eth_chainId")
        except RecordError as exc:
            raise MalformedResponseError(str(exc), raw=answer) from None
        if chain != self.settings.chain_id:
            raise ExtractError(f"the node at {redact_url(self.settings.rpc_url)} serves chain {chain}, not chain_id "
                               f"{self.settings.chain_id} as configured; nothing read (a wrong rpc_url or chain_id)")

    # -- the snapshot: one block -------------------------------------------------------

    def _tip(self) -> int:
        """The node's latest block number, after checking it serves the configured chain."""
        chain_call, tip_call = Call("eth_chainId", (), "eth_chainId"), Call("eth_blockNumber", (), "eth_blockNumber")
        chain, tip = self._batch([chain_call, tip_call])
        self._check_chain(chain)
        try:
            return quantity(self._result(tip, tip_call), "eth_blockNumber")
        except RecordError as exc:
            raise MalformedResponseError(str(exc), raw=tip) from None

    def probe(self) -> str:
        """One batched request: the chain id checked and the latest block (``balances check --connect``)."""
        return f"chain {self.settings.chain_id}, latest block {self._tip()}"

    def choose_snapshot(self, at: datetime) -> tuple[datetime, str] | None:
        """The snapshot for ``at``: (its block's time, number:hash), or None if no block qualifies.

        The latest block at or before ``at`` that has ``confirmations``
        blocks on top and is the last block of its second. Block times are
        whole seconds, and chains with sub-second blocks (Arbitrum, many
        L2s) give several blocks one timestamp: taking the last of them
        makes ``as_of`` name one block, so two runs never store two blocks
        as one snapshot time. The last of a second is known once a later
        block with a later time exists; until then (the next block has the
        same time, or there is no next block yet: ``confirmations = 0``) the
        snapshot is the last block of an earlier second. Block times must
        not go backwards along the blocks read (a chain or node that says
        otherwise fails the run, naming both blocks).
        """
        tip = self._tip()
        safe = tip - self.settings.confirmations
        if safe < 0:
            return None
        target = int(at.timestamp() // 1)  # block times are whole seconds
        # The safe block, its parent and the block after it (on the node when
        # confirmations > 0: it says whether the safe block ends its second).
        known = self._read({0, max(safe - 1, 0), safe, min(safe + 1, tip)}, tip)
        _check_times(known)
        top, genesis = known[safe], known[0]
        settled = known[safe + 1].timestamp > top.timestamp if safe < tip else False
        goal = min(target, top.timestamp if settled else top.timestamp - 1)
        if top.timestamp <= goal:
            return self._chosen(top, known, tip)
        if genesis.timestamp > goal:
            return None
        low, high = genesis, top  # low.timestamp <= goal < high.timestamp
        fanout = max(1, min(SEARCH_FANOUT, self.settings.max_batch))
        for _ in range(MAX_SEARCH_ROUNDS):
            gap = high.number - low.number
            if gap <= 1:
                # The block after it is later: it is the last block of its second.
                return self._chosen(low, known, tip)
            probes = sorted({low.number + gap * i // (fanout + 1) for i in range(1, fanout + 1)} - {low.number})
            read = self._read(probes, tip)
            known.update(read)
            _check_times(known)
            for number in probes:
                header = read[number]
                if header.timestamp > goal:
                    high = header  # the probes above it are later still
                    break
                low = header
        raise MalformedResponseError(f"no block found for {at.isoformat()} after {MAX_SEARCH_ROUNDS} rounds")

    def _read(self, numbers, tip: int) -> dict[int, Header]:
        """Headers by number; every one must exist, at or below the node's latest block ``tip``."""
        numbers = sorted(set(numbers))
        headers, _ = self._headers(numbers)
        for number, header in zip(numbers, headers):
            if header is None:
                raise MalformedResponseError(f"the node reports block {tip} as its latest, but not block {number}")
        return dict(zip(numbers, headers))

    def _chosen(self, block: Header, known: dict[int, Header], tip: int) -> tuple[datetime, str]:
        """``block`` as the snapshot, once it is seen to sit on the chain in time order: after its
        parent, before its child."""
        if block.number > 0 and block.number - 1 not in known:
            known.update(self._read([block.number - 1], tip))
            _check_times(known)
        for parent, child in ((block.number - 1, block.number), (block.number, block.number + 1)):
            if parent in known and child in known:
                if known[child].parent_hash != known[parent].hash:
                    raise SnapshotError(
                        f"block {child}'s parent is {known[child].parent_hash}, not block {parent} "
                        f"({known[parent].hash}) as read: the chain changed while the snapshot was chosen")
        return block.time, snapshot_raw(block.number, block.hash)

    def verify_snapshot(self, snapshot: tuple[datetime, str]) -> None:
        """Fail unless the snapshot's block is still on the chain: its number still has its hash."""
        number, block_hash = parse_snapshot_raw(snapshot[1])
        (header,), _ = self._headers([number])
        self._same_block(header, number, block_hash)

    def _same_block(self, header: Header | None, number: int, block_hash: str) -> None:
        if header is None or header.hash != block_hash:
            now = "no longer exists" if header is None else f"now has hash {header.hash}"
            raise SnapshotError(
                f"the chain reorganised past the snapshot's block {number}: it {now}, not {block_hash} as "
                f"read; nothing published (raise confirmations, now {self.settings.confirmations}, if this recurs)")

    # -- movements: the roll-forward of a window ---------------------------------------

    def movements(self, window, account_range: tuple[str | None, str | None] | None = None) -> Iterator:
        """Yield the window's movement legs (see :mod:`extractors.evm.movements`)."""
        if account_range is not None:
            raise ValueError("evm sources are not sharded")
        yield from MovementReader(self, window).pages()

    # -- the crawl ---------------------------------------------------------------------

    def pages(self, at: datetime, account_range: tuple[str | None, str | None] | None = None,
              snapshot: tuple[datetime, str] | None = None) -> Iterator[Page]:
        """Yield the block's balances, one page per JSON-RPC batch.

        Tokens first: their code and ``decimals()`` (a token that is not a
        contract or whose ``decimals()`` fails is one rejected record).
        Then every address's native balance and each good token's
        ``balanceOf``. Each batch also re-reads the block's header: a hash
        that changed fails the crawl.
        """
        if account_range is not None:
            raise ValueError("evm sources are not sharded")
        if snapshot is None:
            snapshot = self.choose_snapshot(at)
            if snapshot is None:
                raise NoSnapshotAvailable(f"the chain has no block at or before {at.isoformat()} with "
                                          f"{self.settings.confirmations} confirmations")
        as_of, raw = snapshot
        number, block_hash = parse_snapshot_raw(raw)
        (header,), (chain,) = self._headers([number], extra=[Call("eth_chainId", (), "eth_chainId")])
        self._check_chain(chain)
        self._same_block(header, number, block_hash)
        tokens = [t for t in self.settings.tokens if t not in self._decimals]
        if tokens:
            self._token_metadata(tokens, number, block_hash)
        rejected = [self._decimals[t] for t in self.settings.tokens if isinstance(self._decimals[t], Rejection)]
        good = [t for t in self.settings.tokens if not isinstance(self._decimals[t], Rejection)]
        addresses = self.settings.addresses
        holdings = [(a, None) for a in addresses] + [(a, t) for t in good for a in addresses]
        per = self._per_batch()
        for read, start in enumerate(range(0, len(holdings), per)):
            check_page_cap(read, self.max_pages)
            page = self._balances(holdings[start:start + per], number, block_hash, as_of, raw)
            if start == 0:
                page.rejected[:0] = rejected
            yield page

    def _per_batch(self) -> int:
        """Calls of a batch besides the header that rides along (none when batches are off)."""
        return self.settings.max_batch - 1 if self.settings.max_batch > 1 else 1

    def _watch(self, number: int) -> list[Call]:
        """The header call that rides along in a batch, when the batch has room."""
        return [self._header_call(number)] if self.settings.max_batch > 1 else []

    def _checked(self, answers: list[Any], watch: list[Call], number: int, block_hash: str) -> list[Any]:
        if watch:
            self._same_block(self._header(answers[0], watch[0], number), number, block_hash)
        return answers[len(watch):]

    def _token_metadata(self, tokens: list[str], number: int, block_hash: str) -> None:
        block = hex(number)
        calls: list[Call] = []
        for token in tokens:
            calls.append(Call("eth_getCode", (token, block), f"eth_getCode({token})"))
            calls.append(Call("eth_call", ({"to": token, "data": "0x" + DECIMALS.hex()}, block),
                              f"decimals() of token {token}"))
        answers: list[Any] = []
        per = self._per_batch()
        for start in range(0, len(calls), per):
            watch = self._watch(number)
            answers += self._checked(self._batch(watch + calls[start:start + per]), watch, number, block_hash)
        for i, token in enumerate(tokens):
            code_call, decimals_call = calls[2 * i], calls[2 * i + 1]
            code, decimals = answers[2 * i], answers[2 * i + 1]
            raw = {"token": token, "block": number, "eth_getCode": _brief(code), "decimals()": _brief(decimals)}
            try:
                if isinstance(code, RpcError):
                    raise self._fatal(code, code_call, number)
                if not data_bytes(code, f"eth_getCode of {token}"):
                    raise RecordError(f"token {token} has no contract code at block {number}: not a token "
                                      "(an account's address, or a contract not yet deployed)")
                if isinstance(decimals, RpcError):
                    if decimals.pruned or not decimals.call_failed:
                        raise self._fatal(decimals, decimals_call, number)
                    raise RecordError(f"decimals() of token {token} failed at block {number}: {decimals}")
                value = decode_word(data_bytes(decimals, f"decimals() of {token}"), "uint8",
                                    f"decimals() of token {token}")
                self._decimals[token] = value
            except RecordError as exc:
                self._decimals[token] = Rejection(raw=to_json_text(raw), reason=str(exc),
                                                  code="token_call_failed")

    def _balances(self, holdings: list[tuple[str, str | None]], number: int, block_hash: str,
                  as_of: datetime, raw_snapshot: str) -> Page:
        block = hex(number)
        calls = []
        for address, token in holdings:
            if token is None:
                calls.append(Call("eth_getBalance", (address, block), f"eth_getBalance({address})"))
            else:
                data = BALANCE_OF + abi_encode(["address"], [address])
                calls.append(Call("eth_call", ({"to": token, "data": "0x" + data.hex()}, block),
                                  f"balanceOf({address}) of token {token}"))
        watch = self._watch(number)
        answers = self._checked(self._batch(watch + calls), watch, number, block_hash)
        page = Page(as_of=as_of, as_of_raw=raw_snapshot)
        for (address, token), call, answer in zip(holdings, calls, answers):
            asset = self.settings.native_asset if token is None else token
            try:
                if isinstance(answer, RpcError):
                    if token is None or answer.pruned or not answer.call_failed:
                        raise self._fatal(answer, call, number)
                    raise RecordError(f"{call.what} failed at block {number}: {answer}")
                if token is None:
                    amount = quantity(answer, f"native balance of {address}")
                    decimals = NATIVE_DECIMALS
                else:
                    amount = decode_word(data_bytes(answer, call.what), "uint256", call.what)
                    decimals = self._decimals[token]
                page.rows.append(BalanceRow(address, asset, amount, decimals))
            except RecordError as exc:
                page.reject({"account": address, "asset": asset, "block": number, "call": call.method,
                             "answer": _brief(answer)}, exc, code="token_call_failed" if token else None)
        return page


def _brief(answer: Any) -> Any:
    """An answer as a rejection keeps it: the error object, or the result (cut short)."""
    if isinstance(answer, RpcError):
        return {"error": answer.raw}
    if isinstance(answer, str) and len(answer) > 2000:
        return answer[:2000] + "..."
    return answer


def build(settings: Settings, credentials: Credentials | None, policy: RetryPolicy, *,
          max_pages: int, throttle: Throttle | None = None) -> EvmExtractor:
    """An EVM extractor. A Connection's password, if any, is the endpoint's API key."""
    key = None
    if credentials is not None:  # public endpoints need none
        key = require_credentials(credentials, "the evm source", password="the endpoint's API key").password
    headers: dict[str, str] = {}
    auth = None
    if key and settings.api_key_in == "header":
        headers[settings.api_key_header] = key
    elif key:
        auth = _PathKey(key)
    # The key is named as a secret: in the URL path no header rule would find it.
    client = HttpClient(settings.rpc_url, url_key="rpc_url", auth=auth, headers=headers, policy=policy,
                        error_for=rpc_http_error, check=rpc_check, throttle=throttle,
                        secrets=[key] if key else [])
    return EvmExtractor(settings, client, max_pages=max_pages)


def request_budget(settings: Settings) -> str:
    """One request budget per endpoint (scheme, host, port): chains on other endpoints do not share it."""
    parts = urlsplit(settings.rpc_url)
    return f"evm {parts.scheme}://{parts.hostname}:{parts.port or {'http': 80, 'https': 443}[parts.scheme.lower()]}"


PROVIDER = Provider(
    name="evm",
    settings=Settings,
    build=build,
    extractor=EvmExtractor,
    has_history=True,  # any block's state, where the node keeps it (an archive node)
    chooses_snapshot=True,  # choose_snapshot(at): one block per run, by a search over headers
    verifies_snapshot=True,  # verify_snapshot: the block's hash is checked again before publish
    rate_limit=(10.0, 20),  # hosted free tiers allow about this; a source's rate_limit overrides it
    budget=request_budget,  # per endpoint: an Ethereum endpoint's limit is not a Polygon endpoint's
    has_movements=True,  # movements(window): Transfer logs, traces, fees, between the two snapshot blocks
)
