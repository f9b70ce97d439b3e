"""EVM chains against a real node: Foundry's anvil, installed by scripts/bootstrap (npm).

The chain is built here by real transactions at set block times: the ERC-20s
of ``tests/evm/Tokens.sol`` deployed from ``tokens.json``, balances moved
over several blocks, 12 blocks on top. Snapshots are then taken at and
between those blocks, backfilled, reorganised away, refused by a pruned node,
rate-limited and pointed at the wrong chain. Without anvil these tests skip
locally and fail under CI (``CI=true``).
"""
from __future__ import annotations

import logging
import os
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from eth_utils import to_checksum_address

from extractors.credentials import Credentials
from extractors.errors import ExtractError, HistoryUnavailable, ProviderError, SnapshotError
from extractors.evm import DECIMALS, checksum_address, decode_word, quantity
from extractors.records import RecordError
from pipeline import snapshot as pipeline
from pipeline.config import ConfigError, parse_config
from pipeline.snapshot import RejectedRecordsError, take_snapshot
from sandbox.evm import (DEPLOYER, LIMIT_EXCEEDED, Anvil, EvmGateway, anvil_binary, call_data,
                         deploy)
from sandbox.server import Fault, Response, dumps
from tests.conftest import fetch, load_dag, make_source, staging_tables, write_config

CHAIN_ID = 31337
G = 1_700_000_000  # genesis: 2023-11-14T22:13:20Z
T1, T2, T3 = G + 3600, G + 7200, G + 10_800  # the blocks that move balances
ETHER = 10**18
ALICE = to_checksum_address("0x" + "a1" * 20)
BOB = to_checksum_address("0x" + "b0" * 20)
CAROL = to_checksum_address("0x" + "c4" * 20)  # never funded: an account, not a token
WHALE = to_checksum_address("0x" + "e7" * 20)
WHALE_WEI = 2**255 + 12_345  # a uint256 far beyond 2**64
BIG_TOKENS = 10**30 + 7
KEY = "evm-test-key-3f9a1c77"


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def require_anvil() -> None:
    if anvil_binary() is None:
        message = ("anvil is not installed: scripts/bootstrap installs it (npm ci: @foundry-rs/anvil "
                   "pinned in package.json)")
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the evm tests against a real node")
        pytest.skip(message)


class Chain:
    """The module's node and what was built on it."""

    def __init__(self) -> None:
        node = self.node = Anvil(chain_id=CHAIN_ID, timestamp=G)
        node.set_balance(WHALE, WHALE_WEI)  # from genesis on
        node.set_automine(False)
        u256 = ("string", "string", "uint8")
        self.tusd = deploy(node, "TestToken", "Test Dollar", "TUSD", 6, types=u256, timestamp=G + 60)
        self.reverting = deploy(node, "RevertingToken", timestamp=G + 120)
        self.short = deploy(node, "ShortReturnToken", timestamp=G + 180)
        self.bad_decimals = deploy(node, "BadDecimalsToken", timestamp=G + 240)

        def mint(to: str, amount: int) -> None:
            node.send(DEPLOYER, self.tusd, data=call_data("mint(address,uint256)", ("address", "uint256"),
                                                          to, amount))

        node.send(DEPLOYER, ALICE, value=5 * ETHER)
        mint(ALICE, BIG_TOKENS)
        node.mine(T1)  # block 5
        node.send(DEPLOYER, BOB, value=3 * ETHER // 2)
        node.send(DEPLOYER, ALICE, value=1)
        mint(BOB, 250_000_000)
        node.mine(T2)  # block 6
        node.send(DEPLOYER, BOB, value=ETHER // 4)
        mint(ALICE, 1)
        node.mine(T3)  # block 7
        for i in range(1, 13):  # 12 confirmations on top of T3's block
            node.mine(T3 + 600 * i)
        self.hashes = {n: node.block(n)["hash"] for n in range(node.block_number() + 1)}

    def raw(self, number: int) -> str:
        return f"{number}:{self.hashes[number]}"


# Balances after each moving block: (account, asset) -> amount.
AFTER_T1 = {(ALICE, "ETH"): 5 * ETHER, (BOB, "ETH"): 0, (WHALE, "ETH"): WHALE_WEI,
            (ALICE, "TUSD"): BIG_TOKENS, (BOB, "TUSD"): 0, (WHALE, "TUSD"): 0}
AFTER_T2 = {**AFTER_T1, (ALICE, "ETH"): 5 * ETHER + 1, (BOB, "ETH"): 3 * ETHER // 2, (BOB, "TUSD"): 250_000_000}
AFTER_T3 = {**AFTER_T2, (BOB, "ETH"): 7 * ETHER // 4, (ALICE, "TUSD"): BIG_TOKENS + 1}


@pytest.fixture(scope="module")
def chain():
    require_anvil()
    built = Chain()
    yield built
    built.node.stop()


@pytest.fixture
def node():
    """A node of its own, for a test that changes the chain."""
    require_anvil()
    fresh = Anvil(chain_id=CHAIN_ID, timestamp=G)
    yield fresh
    fresh.stop()


def evm_source(url: str, name: str = "evm_test", **keys):
    keys.setdefault("chain_id", CHAIN_ID)
    keys.setdefault("addresses", [ALICE, BOB, WHALE])
    keys.setdefault("rate_limit", 1000)
    return make_source(name, provider="evm", rpc_url=url, **keys)


def landed(db, chain: Chain | None, source: str = "evm_test") -> dict:
    """What the source published: (account, asset) -> amount, the test token named TUSD."""
    rows = fetch(db, "SELECT account, asset, balance, decimals FROM balance_history WHERE source = %s", (source,))
    names = {chain.tusd: "TUSD"} if chain is not None else {}
    found = {}
    for account, asset, balance, decimals in rows:
        assert decimals == (6 if asset in names else 18)
        assert balance == balance.to_integral_value()
        found[(account, names.get(asset, asset))] = int(balance)
    return found


def runs(db) -> list[tuple]:
    return fetch(db, "SELECT status, as_of, as_of_raw, error FROM snapshot_runs ORDER BY run_id")


# --- what needs no node ---------------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    ({}, "sources.s.chain_id: missing"),
    ({"chain_id": 0}, "sources.s.chain_id: must be a chain id"),
    ({"chain_id": 2**40}, "sources.s.chain_id: must be at least 0 and at most 2147483647"),
    ({"chain_id": 1, "addresses": []}, "sources.s.addresses: list at least one account"),
    ({"chain_id": 1, "addresses": ["0x12"]}, "sources.s.addresses: '0x12' is not an address"),
    ({"chain_id": 1, "addresses": ["0xde0B295669a9FD93d5F28D9Ec85E40f4cb697BAE"]},
     "sources.s.addresses: '0xde0B295669a9FD93d5F28D9Ec85E40f4cb697BAE' fails its EIP-55 checksum"),
    ({"chain_id": 1, "addresses": [ALICE, ALICE.lower()]}, "is listed twice"),
    ({"chain_id": 1, "tokens": ["0x" + "g" * 40]}, "sources.s.tokens: "),
    ({"chain_id": 1, "confirmations": 10_001}, "sources.s.confirmations: must be between 0 and 10000"),
    ({"chain_id": 1, "max_batch": 0}, "sources.s.max_batch: must be between 1 and 1000"),
    ({"chain_id": 1, "native_asset": "E TH"}, "sources.s.native_asset: 'E TH' is not an asset code"),
    ({"chain_id": 1, "api_key_in": "query"}, "sources.s.api_key_in: must be 'path' or 'header'"),
    ({"chain_id": 1, "rpc_url": "ws://node:8546"}, "sources.s.rpc_url: 'ws://node:8546' is not an http"),
    ({"chain_id": 1, "rpc_url": "https://rpc.example/v3?key=abc"}, "must not have a query"),
])
def test_mistakes_are_one_line_naming_the_key(keys, message):
    table = {"provider": "evm", "rpc_url": "https://rpc.example", "addresses": [ALICE], **keys}
    with pytest.raises(ConfigError) as caught:
        parse_config({"sources": {"s": table}})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_addresses_are_stored_in_their_eip55_form_whatever_case_was_written():
    lower, upper = ALICE.lower(), "0x" + ALICE[2:].upper()
    assert checksum_address(lower, "a") == checksum_address(upper, "a") == checksum_address(ALICE, "a") == ALICE
    source = evm_source("https://rpc.example", addresses=[lower, BOB], tokens=[WHALE.lower()])
    assert source.settings.addresses == [ALICE, BOB] and source.settings.tokens == [WHALE]


@pytest.mark.parametrize("value, why", [
    ("0x", "expected a hex quantity"), ("12", "expected a hex quantity"), (12, "expected a hex quantity"),
    ("0x" + "f" * 65, "expected a hex quantity"), ("0x1g", "expected a hex quantity")])
def test_quantities_are_hex_strings_of_a_uint256(value, why):
    with pytest.raises(RecordError, match=why):
        quantity(value, "x")
    assert quantity("0x" + "f" * 64, "x") == 2**256 - 1


def test_a_word_is_exactly_32_bytes_and_a_uint8_fits_in_8_bits():
    assert decode_word((2**255 + 1).to_bytes(32, "big"), "uint256", "x") == 2**255 + 1
    with pytest.raises(RecordError, match="returned no data"):
        decode_word(b"", "uint256", "x")
    with pytest.raises(RecordError, match="returned 16 bytes"):
        decode_word(b"\x01" * 16, "uint256", "x")
    with pytest.raises(RecordError, match="not a uint8"):
        decode_word((256).to_bytes(32, "big"), "uint8", "x")


# --- snapshots of the chain ----------------------------------------------------------------


def test_a_snapshot_at_a_block_time_is_that_block_exactly(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    source = evm_source(server.url, tokens=[chain.tusd])
    summary = take_snapshot(db, source, at(T2))
    assert summary["status"] == "published", summary["error"]
    assert runs(db) == [("published", at(T2), chain.raw(6), None)]
    assert landed(db, chain) == AFTER_T2
    [(whale,)] = fetch(db, "SELECT balance FROM balance_history WHERE account = %s AND asset = 'ETH'", (WHALE,))
    assert whale == Decimal(WHALE_WEI) and str(whale) == str(WHALE_WEI)  # every digit of a uint256
    # decimals() once per token and run; every balance read at the snapshot's block.
    reads = [c for c in server.app.calls if c["method"] in ("eth_getBalance", "eth_call")]
    assert sum(1 for c in reads if isinstance(c["params"][0], dict)
               and c["params"][0]["data"] == "0x" + DECIMALS.hex()) == 1
    assert {c["params"][1] for c in reads} == {hex(6)}


@pytest.mark.parametrize("when, block, expected", [
    (T2 + 1800, 6, AFTER_T2),  # between blocks: the one before
    (T3 - 1, 6, AFTER_T2),  # a second before a block: not that block
    (T3, 7, AFTER_T3),
    (T1 - 1, 4, {k: 0 for k in AFTER_T1} | {(WHALE, "ETH"): WHALE_WEI}),
])
def test_a_snapshot_between_blocks_is_the_latest_block_at_or_before_it(db, serve, chain, when, block, expected):
    server = serve(EvmGateway(chain.node))
    summary = take_snapshot(db, evm_source(server.url, tokens=[chain.tusd]), at(when))
    assert summary["status"] == "published", summary["error"]
    block_time = at(int(chain.node.block(block)["timestamp"], 16))
    assert runs(db)[0][:3] == ("published", block_time, chain.raw(block))
    assert landed(db, chain) == expected


def test_backfills_load_the_past_blocks_in_any_order(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    source = evm_source(server.url, tokens=[chain.tusd])
    for when in (T3, T1, T2):
        assert take_snapshot(db, source, at(when) + timedelta(minutes=5))["status"] == "published"
    assert [r[2] for r in runs(db)] == [chain.raw(7), chain.raw(5), chain.raw(6)]
    history = fetch(db, "SELECT as_of, account, asset, balance FROM balance_history ORDER BY as_of")
    for when, expected in ((T1, AFTER_T1), (T2, AFTER_T2), (T3, AFTER_T3)):
        held = {(a, "TUSD" if s == chain.tusd else s): int(b) for t, a, s, b in history if t == at(when)}
        assert held == expected
    # The same interval again adds nothing.
    assert take_snapshot(db, source, at(T2) + timedelta(minutes=5))["rows_inserted"] == 0


def test_confirmations_keep_the_snapshot_below_the_tip(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    tip = chain.node.block_number()
    late = at(T3 + 600 * 12 + 60)  # after the tip's time
    assert take_snapshot(db, evm_source(server.url), late)["as_of_raw"] == chain.raw(tip - 12)
    assert take_snapshot(db, evm_source(server.url, confirmations=3), late)["as_of_raw"] == chain.raw(tip - 3)
    # With none, the tip itself is not yet known to be the last block of its second: the one before it.
    assert take_snapshot(db, evm_source(server.url, confirmations=0), late)["as_of_raw"] == chain.raw(tip - 1)
    # More confirmations than the chain has blocks: no block qualifies yet.
    assert take_snapshot(db, evm_source(server.url, confirmations=tip + 1), late)["status"] == "no_snapshot"


def test_before_the_first_block_there_is_no_snapshot(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    summary = take_snapshot(db, evm_source(server.url), at(G - 60))
    assert summary["status"] == "no_snapshot"
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


def test_a_chain_that_stopped_is_refused_by_max_snapshot_age(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    with pytest.raises(pipeline.SnapshotTooFar, match="max_snapshot_age"):
        take_snapshot(db, evm_source(server.url), at(T3 + 3 * 86_400))
    assert runs(db)[0][0] == "failed"


def test_tokens_that_misbehave_are_rejected_records_never_zeros(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    tokens = [chain.tusd, chain.reverting, chain.short, chain.bad_decimals, CAROL]
    source = evm_source(server.url, addresses=[ALICE, BOB], tokens=tokens, max_rejected=100)
    summary = take_snapshot(db, source, at(T3))
    assert summary["status"] == "published", summary["error"]
    assert landed(db, chain) == {k: v for k, v in AFTER_T3.items() if k[0] in (ALICE, BOB)}
    rejected = fetch(db, "SELECT raw, reason FROM rejected_records ORDER BY reason")
    reasons = [reason for _, reason in rejected]
    assert len(rejected) == 6 == summary["rejected"]
    assert sum(f"token {chain.reverting} failed at block 7" in r and "balances frozen" in r for r in reasons) == 2
    assert sum(f"token {chain.short} returned 16 bytes, expected one 32-byte word" in r for r in reasons) == 2
    assert sum(f"decimals() of token {chain.bad_decimals} returned" in r and "not a uint8" in r for r in reasons) == 1
    assert sum(f"token {CAROL} has no contract code at block 7" in r for r in reasons) == 1
    assert all(chain.reverting in raw or chain.short in raw or chain.bad_decimals in raw or CAROL in raw
               for raw, _ in rejected)
    # Not tolerated: the run fails and nothing is published.
    with pytest.raises(RejectedRecordsError):
        take_snapshot(db, evm_source(server.url, name="evm_strict", tokens=tokens), at(T3))
    assert fetch(db, "SELECT count(*) FROM balance_history WHERE source = 'evm_strict'") == [(0,)]


def test_a_token_not_yet_deployed_at_the_block_is_rejected(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    summary = take_snapshot(db, evm_source(server.url, tokens=[chain.tusd], max_rejected=1), at(G + 30))
    assert (summary["status"], summary["as_of_raw"]) == ("published", chain.raw(0))
    [(reason,)] = fetch(db, "SELECT reason FROM rejected_records")
    assert f"token {chain.tusd} has no contract code at block 0" in reason
    assert landed(db, chain) == {(ALICE, "ETH"): 0, (BOB, "ETH"): 0, (WHALE, "ETH"): WHALE_WEI}


def test_a_wrong_chain_id_fails_before_reading_any_balance(db, serve, chain):
    server = serve(EvmGateway(chain.node))
    with pytest.raises(ExtractError, match=f"serves chain {CHAIN_ID}, not chain_id 1 as configured"):
        take_snapshot(db, evm_source(server.url, chain_id=1), at(T3))
    [(status, _, _, error)] = runs(db)
    assert status == "failed" and "not chain_id 1" in error
    assert {c["method"] for c in server.app.calls} <= {"eth_chainId", "eth_blockNumber"}
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


# --- batches, rate limits, keys --------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 2, 3, 100])
def test_batches_stay_within_max_batch_and_answers_are_matched_by_id(db, serve, chain, max_batch):
    gateway = EvmGateway(chain.node, max_batch=max_batch)  # answers batches in reverse order
    sizes = []
    server = serve(lambda request: sizes.append(request.body.count(b'"jsonrpc"')) or gateway(request))
    summary = take_snapshot(db, evm_source(server.url, tokens=[chain.tusd], max_batch=max_batch), at(T2))
    assert summary["status"] == "published", summary["error"]
    assert landed(db, chain) == AFTER_T2
    assert max(sizes) == min(max_batch, 6) if max_batch < 100 else max(sizes) <= 100
    if max_batch == 1:
        assert all(not body.startswith(b"[") for body in (r.body for r in server.requests))


def test_a_batch_over_the_endpoints_cap_fails_naming_max_batch(db, serve, chain):
    # Answered as geth answers it: one error, with the first call's id.
    server = serve(EvmGateway(chain.node, max_batch=2))
    with pytest.raises(ProviderError, match="batch too large.*lower max_batch"):
        take_snapshot(db, evm_source(server.url, tokens=[chain.tusd], max_batch=3), at(T2))
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


def test_a_batch_partly_refused_for_the_rate_is_sent_again(db, serve, chain):
    gateway = EvmGateway(chain.node)
    server = serve(gateway)
    gateway.rate_limit_calls(2)  # the first batch: answered, but two of its calls refused (-32005)
    summary = take_snapshot(db, evm_source(server.url, tokens=[chain.tusd]), at(T2))
    assert summary["status"] == "published", summary["error"]
    assert summary["retries"] == 1 and gateway.rate_limited == 2
    assert landed(db, chain) == AFTER_T2


@pytest.mark.parametrize("response", [
    Response(429, body=dumps({"jsonrpc": "2.0", "id": None, "error": LIMIT_EXCEEDED}), headers={"Retry-After": "0"}),
    Response(200, body=dumps({"jsonrpc": "2.0", "id": None, "error": LIMIT_EXCEEDED})),
    Response(200, body=dumps({"jsonrpc": "2.0", "id": None,
                              "error": {"code": -32000, "message": "Too Many Requests: rate limit exceeded"}})),
], ids=["http-429", "json-rpc-32005-in-200", "json-rpc-words"])
def test_a_rate_limited_endpoint_is_retried_and_the_snapshot_completes(db, serve, chain, response):
    server = serve(EvmGateway(chain.node))
    server.inject(Fault("status", times=2, after=3, response=response))
    summary = take_snapshot(db, evm_source(server.url, tokens=[chain.tusd], max_batch=3), at(T2))
    assert summary["status"] == "published", summary["error"]
    assert summary["retries"] == 2
    assert landed(db, chain) == AFTER_T2


def test_a_rate_limit_that_does_not_clear_fails_the_run_after_its_attempts(db, serve, chain):
    gateway = EvmGateway(chain.node, limits=((60.0, 2),), limit_style="jsonrpc")
    server = serve(gateway)
    with pytest.raises(ExtractError, match="limit exceeded"):
        take_snapshot(db, evm_source(server.url, max_attempts=3), at(T2))
    assert runs(db)[0][0] == "failed" and gateway.rate_limited >= 2
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


class EchoPath:
    """An endpoint whose error quotes the request's path (where the key travels)."""

    def __init__(self, app):
        self.app, self.fail = app, False

    def __call__(self, request):
        if self.fail:
            return Response(400, body=dumps({"jsonrpc": "2.0", "id": None,
                                             "error": {"code": -32600, "message": f"bad request to {request.path}"}}))
        return self.app(request)


def test_an_api_key_in_the_path_reaches_the_node_and_nothing_else(db, serve, chain, caplog):
    caplog.set_level(logging.DEBUG)
    app = EchoPath(EvmGateway(chain.node, api_key=KEY, key_in="path", path="/v3"))
    server = serve(app)
    creds = Credentials(password=KEY)
    source = evm_source(server.url + "/v3", tokens=[chain.tusd])
    assert take_snapshot(db, source, at(T2), credentials=creds)["status"] == "published"
    assert {r.path for r in server.requests} == {f"/v3/{KEY}"}
    # Without the key the endpoint refuses, and says so.
    with pytest.raises(ExtractError, match="HTTP 401 .*Must be authenticated"):
        take_snapshot(db, evm_source(server.url + "/v3", name="evm_nokey"), at(T2))
    app.fail = True
    with pytest.raises(ExtractError, match=r"bad request to /v3/\*\*\*"):
        take_snapshot(db, evm_source(server.url + "/v3", name="evm_echo", max_attempts=1), at(T2),
                      credentials=creds)
    stored = "\n".join(str(row) for row in fetch(db, "SELECT * FROM snapshot_runs")
                       + fetch(db, "SELECT * FROM rejected_records"))
    assert "urllib3" in caplog.text or "POST" in caplog.text  # the debug lines were there to leak
    assert KEY not in caplog.text and KEY not in stored


def test_a_key_in_a_header_is_sent_as_the_source_says(db, serve, chain):
    server = serve(EvmGateway(chain.node, api_key=KEY, key_in="header", key_header="x-goog-api-key"))
    source = evm_source(server.url, api_key_in="header", api_key_header="x-goog-api-key")
    assert take_snapshot(db, source, at(T2), credentials=Credentials(password=KEY))["status"] == "published"
    assert {r.header("x-goog-api-key") for r in server.requests} == {KEY}
    with pytest.raises(ExtractError, match="empty password"):
        take_snapshot(db, evm_source(server.url, name="evm_empty"), at(T2), credentials=Credentials(login="x"))


def test_each_endpoint_has_its_own_request_budget(db, serve, chain):
    first, second = serve(EvmGateway(chain.node)), serve(EvmGateway(chain.node))
    for name, server in (("evm_one", first), ("evm_two", second)):
        source = make_source(name, provider="evm", rpc_url=server.url, chain_id=CHAIN_ID, addresses=[ALICE])
        assert source.rate_limit is None  # the provider's documented 10 per second, burst 20
        assert take_snapshot(db, source, at(T2))["status"] == "published"
    budgets = {b for (b,) in fetch(db, "SELECT budget FROM request_budgets WHERE budget LIKE %s", ("evm %",))}
    assert {f"evm http://127.0.0.1:{first.port}", f"evm http://127.0.0.1:{second.port}"} <= budgets


@pytest.mark.parametrize("error_ids, max_batch, outcome", [
    ("ganache", 1, "published"),  # Ganache 7: a failing single call of id 0 is answered with id null
    ("null", 1, "published"),  # every error without its id: one call per request, no doubt
    ("null", 2, "published"),  # one call beside the header in each batch: no doubt either
    ("null", 3, "which call failed is unknown"),  # two reverting calls in one batch: refused
])
def test_an_error_answered_without_its_id_is_the_calls_when_nothing_else_can_be(db, serve, chain, error_ids,
                                                                                 max_batch, outcome):
    gateway = EvmGateway(chain.node, error_ids=error_ids)
    server = serve(gateway)
    source = evm_source(server.url, addresses=[ALICE, BOB], tokens=[chain.tusd, chain.reverting],
                        max_batch=max_batch, max_rejected=10, max_attempts=1)
    if outcome != "published":
        with pytest.raises(ProviderError, match=f"2 error.s. without an id came with 2 of 3 calls unanswered: {outcome}"):
            take_snapshot(db, source, at(T3))
        assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
        return
    summary = take_snapshot(db, source, at(T3))
    assert summary["status"] == "published", summary["error"]
    reasons = [r for (r,) in fetch(db, "SELECT reason FROM rejected_records")]
    assert len(reasons) == 2 and all(f"token {chain.reverting} failed at block 7" in r for r in reasons)
    assert landed(db, chain) == {k: v for k, v in AFTER_T3.items() if k[0] in (ALICE, BOB)}
    assert min(c["id"] for c in gateway.calls) == 1  # ids start at 1: 0 is no id to some servers


# --- blocks several a second, block times out of order --------------------------------------------

S = G + 3600  # the second several blocks share


def several_a_second(node: Anvil, *seconds: int) -> list[int]:
    """One block per entry, at that second, each paying ALICE one more wei; their numbers."""
    numbers = []
    for second in seconds:
        node.send(DEPLOYER, ALICE, value=1)
        numbers.append(int(node.mine(second)["number"], 16))
    return numbers


def test_several_blocks_a_second_the_snapshot_of_a_second_is_its_last_block(db, serve, node):
    node.set_automine(False)
    blocks = several_a_second(node, S - 60, S, S, S, S + 1, S + 1, S + 2)
    assert blocks == [1, 2, 3, 4, 5, 6, 7]
    server = serve(EvmGateway(node))
    source = evm_source(server.url, addresses=[ALICE], confirmations=0)
    raw = {n: f"{n}:{node.block(n)['hash']}" for n in blocks}
    for when, block, second in ((S, 4, S), (S + 1, 6, S + 1), (S - 1, 1, S - 60)):
        summary = take_snapshot(db, source, at(when))
        assert (summary["status"], summary["as_of"], summary["as_of_raw"]) == ("published", at(second), raw[block])
    # Any time within the second, again and in any order: the same block, nothing added.
    for when in (at(S) + timedelta(milliseconds=999), at(S)):
        again = take_snapshot(db, source, when)
        assert (again["as_of_raw"], again["rows_inserted"]) == (raw[4], 0)
    held = dict(fetch(db, "SELECT as_of, balance FROM balance_history ORDER BY as_of"))
    assert held == {at(S - 60): 1, at(S): 4, at(S + 1): 6}


def test_a_second_still_filling_is_no_snapshot_until_its_last_block_is_known(db, serve, node):
    """The issue's case: the safe block's second went on above it; a later run of the interval was refused."""
    node.set_automine(False)
    several_a_second(node, S - 10, S, S)  # blocks 1, 2, 3: with one confirmation block 2 is safe
    server = serve(EvmGateway(node))
    source = evm_source(server.url, addresses=[ALICE], confirmations=1)
    first = take_snapshot(db, source, at(S))
    assert first["status"] == "published", first["error"]
    assert (first["as_of"], first["as_of_raw"]) == (at(S - 10), f"1:{node.block(1)['hash']}")
    several_a_second(node, S, S + 1)  # block 4 ends the second S, block 5 confirms it
    second = take_snapshot(db, source, at(S))  # the same interval, later
    assert second["status"] == "published", second["error"]
    assert (second["as_of"], second["as_of_raw"]) == (at(S), f"4:{node.block(4)['hash']}")
    assert take_snapshot(db, source, at(S) + timedelta(milliseconds=500))["rows_inserted"] == 0
    assert dict(fetch(db, "SELECT as_of, balance FROM balance_history")) == {at(S - 10): 1, at(S): 4}


def test_a_tip_older_than_its_parent_fails_the_run_naming_both_blocks(db, serve, node):
    node.set_automine(False)
    several_a_second(node, S - 120, S - 60, S)
    node.rpc("evm_setTime", S - 3000)  # the node's clock set back: the next block is older than its parent
    node.mine()
    tip = node.block(4)
    assert int(tip["timestamp"], 16) < S
    server = serve(EvmGateway(node))
    with pytest.raises(SnapshotError, match=r"block times go backwards: block 4 \(.*\) is earlier than block 3 "
                                            r"\(2023-11-14T23:13:20\+00:00\) below it"):
        take_snapshot(db, evm_source(server.url, addresses=[ALICE], confirmations=0), at(S + 60))
    [(status, _, _, error)] = runs(db)
    assert status == "failed" and "is earlier than block 3" in error
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


def test_block_times_out_of_order_deep_in_the_chain_fail_the_search_naming_both_blocks(db, serve, node):
    node.set_automine(False)
    several_a_second(node, S - 120, S - 60, S)
    node.rpc("evm_setTime", S - 3000)
    node.mine()  # block 4, older than block 3
    back = int(node.block(4)["timestamp"], 16)
    several_a_second(node, *[back + 10 * i for i in range(1, 9)])  # blocks 5..12, in order again
    server = serve(EvmGateway(node))
    with pytest.raises(SnapshotError, match="block times go backwards: block 4 .* is earlier than block 3"):
        take_snapshot(db, evm_source(server.url, addresses=[ALICE], confirmations=2), at(back + 25))
    assert runs(db)[0][0] == "failed"
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


# --- the chain changes under the run ----------------------------------------------------------


def build_small_chain(node: Anvil) -> None:
    node.set_automine(False)
    node.send(DEPLOYER, ALICE, value=ETHER)
    node.mine(T1)  # block 1
    node.send(DEPLOYER, BOB, value=2 * ETHER)
    node.mine(T2)  # block 2
    for i in range(1, 4):
        node.mine(T2 + 60 * i)  # blocks 3..5


def test_a_reorganisation_past_the_block_is_caught_before_publish(db, serve, node):
    build_small_chain(node)
    server = serve(EvmGateway(node))
    source = evm_source(server.url, addresses=[ALICE, BOB], confirmations=2)
    read_hash = node.block(2)["hash"]
    run_id = pipeline.begin(db, source, at(T2 + 30))
    shards = pipeline.plan_shards(db, source, run_id)
    assert pipeline.crawl(db, source, run_id, **shards[0]).status == "staged"
    assert fetch(db, "SELECT as_of_raw FROM snapshot_runs") == [(f"2:{read_hash}",)]
    node.rpc("anvil_reorg", 4, [])  # blocks 2..5 replaced: block 2 has another hash now
    assert node.block(2)["hash"] != read_hash
    with pytest.raises(SnapshotError, match="reorganised past the snapshot's block 2"):
        pipeline.publish(db, source, run_id)
    [(status, _, _, error)] = runs(db)
    assert status == "failed" and f"not {read_hash} as read; nothing published" in error
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
    assert staging_tables(db) == 0
    # A new run reads the chain as it is now.
    summary = take_snapshot(db, source, at(T2 + 30))
    assert summary["status"] == "published" and summary["as_of_raw"] != f"2:{read_hash}"


def test_a_reorganisation_during_the_crawl_fails_it(db, serve, node):
    build_small_chain(node)
    gateway = EvmGateway(node)
    served = []

    def app(request):
        served.append(request)
        if len(served) == 5:  # mid-crawl: after the plan and the first balance batch
            node.rpc("anvil_reorg", 4, [])
        return gateway(request)

    server = serve(app)
    source = evm_source(server.url, addresses=[ALICE, BOB, CAROL, WHALE], confirmations=2, max_batch=2)
    with pytest.raises(SnapshotError, match="reorganised past the snapshot's block 2"):
        take_snapshot(db, source, at(T2 + 30))
    assert runs(db)[0][0] == "failed" and staging_tables(db) == 0
    assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]


def test_a_node_without_old_state_is_not_an_archive_node(db, serve):
    require_anvil()
    pruned = Anvil(chain_id=CHAIN_ID, timestamp=G, prune_history=3)  # the last 4 states, as geth keeps 128
    try:
        build_small_chain(pruned)
        server = serve(EvmGateway(pruned))
        source = evm_source(server.url, addresses=[ALICE, BOB], confirmations=0, tokens=[])
        with pytest.raises(HistoryUnavailable, match="this node is not an archive node: it no longer holds "
                                                     "the state of block 1"):
            take_snapshot(db, source, at(T1 + 30))
        [(status, _, _, error)] = runs(db)
        assert status == "failed" and "BlockOutOfRangeError" in error
        assert fetch(db, "SELECT count(*) FROM balance_history") == [(0,)]
        # Its latest state it has: the present loads.
        latest = int(pruned.block()["timestamp"], 16)
        assert take_snapshot(db, source, at(latest))["status"] == "published"
        assert landed(db, None) == {(ALICE, "ETH"): ETHER, (BOB, "ETH"): 2 * ETHER}
    finally:
        pruned.stop()


# --- movements: the roll-forward between two snapshot blocks -----------------------------------

M0 = G + 600  # the block both wallets are funded in


class Payments:
    """A chain where value moves every way a roll-forward must see, between two snapshot blocks.

    Block 3 (M0): Alice funded, TUSD minted to her. Block 4 (M0 + 600): Alice pays Bob directly
    and in TUSD, the deployer pays Bob through the Forwarder (an internal call), pays him inside
    a call that reverts (nothing moves), Alice splits a payment between Bob and herself; then
    four empty blocks.
    """

    def __init__(self) -> None:
        node = self.node = Anvil(chain_id=CHAIN_ID, timestamp=G)
        node.set_automine(False)
        self.tusd = deploy(node, "TestToken", "Test Dollar", "TUSD", 6, types=("string", "string", "uint8"),
                           timestamp=G + 60)
        self.forwarder = deploy(node, "Forwarder", timestamp=G + 120)
        node.send(DEPLOYER, ALICE, value=ETHER)
        node.send(DEPLOYER, self.tusd, data=call_data("mint(address,uint256)", ("address", "uint256"), ALICE,
                                                      10**9))
        node.mine(M0)
        self.sent = [node.send(ALICE, BOB, value=ETHER // 10),
                     node.send(ALICE, self.tusd, data=call_data("transfer(address,uint256)", ("address", "uint256"),
                                                                BOB, 12_345)),
                     node.send(ALICE, self.forwarder, value=3 * ETHER // 100,
                               data=call_data("split(address,address)", ("address", "address"), BOB, ALICE))]
        node.send(DEPLOYER, self.forwarder, value=7 * ETHER // 100, data=call_data("pay(address)", ("address",), BOB))
        node.send(DEPLOYER, self.forwarder, value=5 * ETHER // 100,
                  data=call_data("tryPay(address)", ("address",), BOB))
        node.mine(M0 + 600)
        for i in range(1, 5):
            node.mine(M0 + 600 + 60 * i)

    def fees(self) -> int:
        """What Alice's transactions of block 4 cost her, from their receipts."""
        total = 0
        for tx in self.sent:
            receipt = self.node.receipt(tx)
            total += int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)
        return total


@pytest.fixture(scope="module")
def payments():
    require_anvil()
    built = Payments()
    yield built
    built.node.stop()


def rolled(db, source: str = "evm_test") -> dict:
    return {(r[0], r[1]): r[2:] for r in fetch(db, """
        SELECT account, asset, opening, inflow, outflow, closing, unexplained, status, note FROM balance_rollforward
         WHERE source = %s""", (source,))}


def load_window(db, source, first: int, second: int) -> list[dict]:
    from pipeline import movements

    for seconds in (first, second):
        assert take_snapshot(db, source, at(seconds))["status"] == "published"
    return movements.load_windows(db, source, movements.missing_windows(db, source))


@pytest.mark.parametrize("traces", ["auto", "trace_filter", "debug_traceBlockByNumber"])
def test_a_window_rolls_forward_exactly_with_internal_payments_reverts_and_fees(db, serve, payments, traces):
    server = serve(EvmGateway(payments.node))
    source = evm_source(server.url, addresses=[ALICE, BOB], tokens=[payments.tusd], confirmations=0,
                        traces=traces, max_snapshot_age=10**7)
    [summary] = load_window(db, source, M0 + 30, M0 + 900)
    assert summary["status"] == "published" and summary["unexplainable"] == {}
    fees = payments.fees()
    half = 3 * ETHER // 200
    statement = rolled(db)
    # opening, inflow, outflow, closing, unexplained, status, note; to the wei.
    assert statement[(ALICE, "ETH")] == (ETHER, half, ETHER // 10 + 3 * ETHER // 100 + fees,
                                         ETHER - ETHER // 10 - half - fees, 0, "explained", None)
    # Direct, split, forwarded: 0.1 + 0.015 + 0.07; the reverted 0.05 never arrived.
    assert statement[(BOB, "ETH")] == (0, ETHER // 10 + half + 7 * ETHER // 100, 0,
                                       ETHER // 10 + half + 7 * ETHER // 100, 0, "explained", None)
    assert statement[(ALICE, payments.tusd)][:5] == (10**9, 0, 12_345, 10**9 - 12_345, 0)
    assert statement[(BOB, payments.tusd)][:5] == (0, 12_345, 0, 12_345, 0)
    kinds = fetch(db, "SELECT kind, count(*), sum(amount) FROM balance_movements WHERE account = %s AND asset = 'ETH'"
                      " GROUP BY kind ORDER BY kind", (ALICE,))
    assert kinds == [("fee", 3, -fees), ("transfer", 3, half - ETHER // 10 - 3 * ETHER // 100)]
    # A rerun finds the window loaded and reads nothing.
    from pipeline import movements
    assert movements.load_windows(db, source, movements.missing_windows(db, source)) == []
    assert fetch(db, "SELECT count(*) FROM movement_runs") == [(1,)]


def test_a_node_without_traces_leaves_the_native_asset_unexplainable_never_guessed(db, serve, payments):
    from reconciliation.checks import RollforwardCheck
    from reconciliation.reconcile import reconcile

    server = serve(EvmGateway(payments.node, missing_methods=("trace_filter", "debug_traceBlockByNumber")))
    source = evm_source(server.url, addresses=[ALICE, BOB], tokens=[payments.tusd], confirmations=0,
                        max_snapshot_age=10**7)
    [summary] = load_window(db, source, M0 + 30, M0 + 900)
    assert summary["status"] == "published"
    assert summary["unexplainable"] == {"ETH": "unexplainable: the node offers no traces (neither trace_filter nor "
                                               "debug_traceBlockByNumber)"}
    statement = rolled(db)
    assert statement[(ALICE, "ETH")][1:] == (None, None, statement[(ALICE, "ETH")][3], None, "unexplainable",
                                             summary["unexplainable"]["ETH"])
    assert statement[(BOB, payments.tusd)][4:6] == (0, "explained")  # the logs still explain the token
    assert fetch(db, "SELECT count(*) FROM balance_movements WHERE asset = 'ETH'") == [(0,)]
    check = RollforwardCheck("evm_roll", "evm_test", "evm")
    run = reconcile(db, {"evm_roll": check}, at(G), at(M0 + 1000))
    assert run.breaks_open == 0
    assert "with assets the provider cannot explain (unexplainable: the node offers no traces" in run.notes["evm_roll"]
    # Asked for explicitly, a missing method is an error, not a quiet fallback.
    explicit = evm_source(server.url, name="evm_explicit", addresses=[ALICE], confirmations=0, traces="trace_filter",
                          max_snapshot_age=10**7)
    with pytest.raises(ProviderError, match="does not offer trace_filter"):
        load_window(db, explicit, M0 + 30, M0 + 900)


def test_logs_over_the_endpoints_limit_are_asked_for_again_in_halves(db, serve, payments):
    gateway = EvmGateway(payments.node, max_logs=1)
    server = serve(gateway)
    source = evm_source(server.url, addresses=[ALICE, BOB], tokens=[payments.tusd], confirmations=0,
                        max_snapshot_age=10**7)
    # From block 2 (the token deployed, nothing minted) to block 7: the mint and the transfer in range.
    [summary] = load_window(db, source, G + 130, M0 + 900)
    assert summary["status"] == "published"
    assert rolled(db)[(ALICE, payments.tusd)][:5] == (0, 10**9, 12_345, 10**9 - 12_345, 0)
    ranges = [(int(c["params"][0]["fromBlock"], 16), int(c["params"][0]["toBlock"], 16))
              for c in gateway.calls if c.get("method") == "eth_getLogs"]
    # Refused whole (two logs), then in halves until each answer holds one log at most.
    assert ranges[0] == (3, 7) and (3, 5) in ranges and (6, 7) in ranges and (3, 3) in ranges


@pytest.mark.parametrize("depth, past", [(2, "second"), (5, "first")])
def test_a_reorganisation_between_the_snapshots_fails_the_window(db, serve, node, depth, past):
    from pipeline import movements

    build_small_chain(node)  # blocks 1 and 2 move ETH, then 3..5
    server = serve(EvmGateway(node))
    source = evm_source(server.url, addresses=[ALICE, BOB], confirmations=0, max_snapshot_age=10**7)
    for seconds in (T1 + 1, T2 + 150):  # blocks 1 and 4
        assert take_snapshot(db, source, at(seconds))["status"] == "published"
    [window] = movements.missing_windows(db, source)
    node.rpc("anvil_reorg", depth, [])
    with pytest.raises(SnapshotError, match=f"reorganised past the window's {past} snapshot|reorganised past that"):
        movements.load_windows(db, source, [window])
    assert fetch(db, "SELECT status FROM movement_runs") == [("failed",)]
    assert fetch(db, "SELECT count(*) FROM balance_movements") == [(0,)]
    assert staging_tables(db) == 0


# --- through Airflow -------------------------------------------------------------------------


@pytest.mark.airflow
def test_the_dag_publishes_the_block_of_its_interval(airflow_env, db, serve, chain):
    server = serve(EvmGateway(chain.node))
    write_config(f"""
[sources.evm_dagtest]
provider = "evm"
rpc_url = "{server.url}"
chain_id = {CHAIN_ID}
addresses = ["{ALICE}", "{BOB}", "{WHALE}"]
tokens = ["{chain.tusd}"]
schedule = "*/15 * * * *"
start_date = {date(2023, 1, 1).isoformat()}
task_retries = 0
rate_limit = 1000
""")
    dag = load_dag("balances_evm_dagtest")
    assert [t.task_id for t in dag.topological_sort()][3] == "publish_snapshot"
    dag_run = dag.test(logical_date=at(T2 + 900))  # an interval ending between T2 and T3
    assert dag_run.state == "success"
    [(status, as_of, as_of_raw, scheduled_for)] = fetch(
        db, "SELECT status, as_of, as_of_raw, scheduled_for FROM snapshot_runs")
    assert at(T2) < scheduled_for < at(T3)
    assert (status, as_of, as_of_raw) == ("published", at(T2), chain.raw(6))
    assert landed(db, chain, "evm_dagtest") == AFTER_T2


# --- the demo: the ledger's book of the wallet against the chain ---------------------------------


def test_the_demo_pair_check_holds_the_ledger_book_against_the_chain(db, serve, tmp_path):
    require_anvil()
    import tomllib
    from datetime import datetime as clock

    from devtools.demo import evm_checks, write_sources
    from pipeline import connections
    from reconciliation.checks import load_checks
    from reconciliation.reconcile import reconcile
    from sandbox import evm as evm_sandbox, formance as formance_sandbox
    from tests.sandboxes import install_connection, source_keys

    ledger_app = formance_sandbox.demo_app()
    servers = {"formance": serve(ledger_app), "evm": serve(evm_sandbox.demo_app())}
    keys = {f"{name}_sandbox": source_keys(name, server.url) for name, server in servers.items()}
    for name in servers:
        install_connection(name)
    config = tmp_path / "balances.toml"
    write_sources(config, keys, evm_checks())  # as the demo writes its sources file
    parsed = parse_config(tomllib.loads(config.read_text()), config)
    sources, checks = parsed.sources, load_checks(parsed)

    def check_now() -> list[tuple]:
        now = clock.now(timezone.utc)
        for source in sources.values():
            summary = take_snapshot(db, source, now, credentials=connections.credentials(source.conn_id))
            assert summary["status"] == "published", summary["error"]
        reconcile(db, checks, now - timedelta(hours=1), now + timedelta(seconds=30))
        return fetch(db, "SELECT kind, status FROM reconciliation_breaks WHERE check_name = 'treasury_eth'"
                         " AND status = 'open'")

    assert check_now() == []  # 1234.567890123456789012 ETH on both sides, to the wei
    [(treasury,)] = fetch(db, "SELECT balance FROM balance_history WHERE source = 'evm_sandbox'"
                              " AND account = %s AND asset = 'ETH'", (evm_sandbox.TREASURY,))
    assert treasury == evm_sandbox.TREASURY_WEI == formance_sandbox.TREASURY_ETH
    # One wei more in the book: the check sees it.
    ledger_app.ledgers[formance_sandbox.DEMO_LEDGER].transfer(
        clock.now(timezone.utc), "world", "treasury:evm", "ETH/18", 1)
    assert ("mismatch", "open") in check_now()
