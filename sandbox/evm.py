"""A real EVM node for the evm provider: Foundry's anvil, behind a gateway of ours.

Unlike the other sandboxes this one fakes nothing the chain answers. Each
node is an ``anvil`` process (npm ``@foundry-rs/anvil``, pinned in
``package.json`` and installed by ``scripts/bootstrap``) on a free port of
127.0.0.1, killed with its process group when stopped. :class:`EvmGateway`,
served by :class:`sandbox.server.FakeServer`, forwards JSON-RPC to it and
adds what a hosted endpoint (Infura, Alchemy) does around a node:

* an API key, in the URL path (``/v3/<key>``) or a header; a request without
  it gets HTTP 401 with a JSON-RPC error (Alchemy: "Must be authenticated!");
* a request-rate limit (``limits``: (window seconds, requests) pairs), over
  which it answers HTTP 429 with JSON-RPC error -32005 "limit exceeded"
  (Infura's code, EIP-1474), or, with ``limit_style = "jsonrpc"``, HTTP 200
  with that error in place of every call's answer;
* ``rate_limit_calls(n)``: the next ``n`` calls of batches are answered with
  -32005 while the others of the same batch are answered (a batch partly
  refused, as load-balanced endpoints do);
* batch answers in reverse order (``reorder``; JSON-RPC 2.0 allows any order,
  clients match them by ``id``), and a batch cap (``max_batch``) answered as
  geth does (go-ethereum ``rpc/handler.go``, ``respondWithBatchTooLarge``):
  a one-element array, error -32600 "batch too large", with the id of the
  batch's first call;
* ``missing_methods``: methods the endpoint does not serve (most hosted
  tiers have no ``trace_filter`` or ``debug_*``), answered per call as geth
  answers a method it lacks: -32601 "the method X does not exist/is not
  available" (go-ethereum ``rpc/errors.go:methodNotFoundError``);
* ``max_logs``: an ``eth_getLogs`` that would answer more logs is refused
  with -32005 "query returned more than N results" and the range that
  would fit, as Infura documents it (its code is the one it uses for rate
  limits too);
* only POST (anything else: 405);
* ``error_ids``: how an error answer carries its call's id. ``"kept"`` (geth,
  anvil, Hardhat: the call's id); ``"ganache"``, as Ganache 7 answers a
  single request that fails: a falsy id (``0``) becomes ``null``
  (ganache v7.9.2 ``packages/ethereum/ethereum/src/connector.ts:Connector.formatError``,
  ``makeError(payload && payload.id ? payload.id : null, error)``; a
  batch keeps its ids, ``Connector.format``); ``"null"``, every error
  answered with id ``null``, as JSON-RPC 2.0 (section 5) answers a call
  whose id the server could not read.

FakeServer's faults (statuses, resets, delays, cut bodies) apply on top.
The demo data set (:func:`demo_app`) is a chain seeded by real transactions,
timed relative to now: a treasury wallet funded three days and one day ago
(1234.567890123456789012 ETH, which the Formance sandbox books as
``treasury:evm``), an operations wallet, a 6-decimal ERC-20 (DUSD) deployed
and minted from ``tests/evm/tokens.json`` (Solidity source beside it), two
hours ago a DUSD payment from operations and a payment to it through the
``Forwarder`` contract (value that only traces show), then a block a minute
over the last hour.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable

import requests

from sandbox.server import Request, Response, dumps

REPO = Path(__file__).resolve().parent.parent
ANVIL_ENV = "BALANCES_ANVIL"  # path of an anvil binary, to use another than node_modules'
ARTIFACTS = REPO / "tests" / "evm" / "tokens.json"
LIMIT_EXCEEDED = {"code": -32005, "message": "limit exceeded"}
UNAUTHENTICATED = {"code": -32600, "message": "Must be authenticated!"}
# anvil's first dev account (its well-known test mnemonic): funded, unlocked, deploys the tokens.
DEPLOYER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


class AnvilMissing(RuntimeError):
    """No anvil binary: ``scripts/bootstrap`` installs it with npm."""


def anvil_binary() -> str | None:
    """The anvil to run: ``$BALANCES_ANVIL``, node_modules' (npm ci), or one on PATH."""
    explicit = os.environ.get(ANVIL_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    candidates = []
    if arch and system:
        # The native binary the wrapper would start: no node process in between.
        candidates.append(REPO / "node_modules" / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / "anvil")
    candidates.append(REPO / "node_modules" / ".bin" / "anvil")
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("anvil")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the node gets SIGTERM if the process that started it dies (no orphan anvils)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


class RpcFailed(RuntimeError):
    """The node answered a set-up call with an error."""


class Anvil:
    """One anvil node on 127.0.0.1, seeded through its RPC; :meth:`stop` kills it.

    ``timestamp`` is the genesis block's time; ``prune_history`` makes it keep
    only recent states, as a full (not archive) node does: the latest one
    (``True``), or that many more (an int).
    """

    def __init__(self, *, chain_id: int = 31337, timestamp: int | None = None, prune_history: bool | int = False,
                 auto_impersonate: bool = True) -> None:
        binary = anvil_binary()
        if binary is None:
            raise AnvilMissing("anvil is not installed: run scripts/bootstrap (it runs 'npm ci', which installs "
                               "@foundry-rs/anvil into node_modules), or set BALANCES_ANVIL to an anvil binary")
        self.chain_id = chain_id
        self._session = requests.Session()
        self._session.trust_env = False
        self._ids = 0
        last_error = ""
        for _ in range(5):  # a port taken between choosing and binding: choose again
            self.port = _free_port()
            args = [binary, "--host", "127.0.0.1", "--port", str(self.port), "--chain-id", str(chain_id),
                    "--silent", "--accounts", "3"]
            if timestamp is not None:
                args += ["--timestamp", str(timestamp)]
            if prune_history is True:
                args += ["--prune-history"]
            elif prune_history:
                args += [f"--prune-history={int(prune_history)}"]
            if auto_impersonate:
                args += ["--auto-impersonate"]
            errors = tempfile.TemporaryFile()  # read only if it fails to start: never a full pipe
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=errors, start_new_session=True,
                                            preexec_fn=_die_with_parent if platform.system() == "Linux" else None)
            self._finalizer = weakref.finalize(self, _kill, self.process)
            ready = self._wait_ready()
            if not ready:
                self._finalizer()
            errors.seek(0)
            last_error = errors.read()[-500:].decode("utf-8", "replace")
            errors.close()
            if ready:
                return
        raise RuntimeError(f"anvil did not start: {last_error or 'no answer on its port'}")

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                self.rpc("eth_chainId")
                return True
            except requests.ConnectionError:
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._finalizer()
        self._session.close()

    def rpc(self, method: str, *params: Any) -> Any:
        """One call's result; :class:`RpcFailed` with the node's words on an error."""
        self._ids += 1
        answer = self._session.post(self.url, json={"jsonrpc": "2.0", "id": self._ids, "method": method,
                                                    "params": list(params)}, timeout=30).json()
        if answer.get("error") is not None:
            raise RpcFailed(f"{method}: {answer['error']}")
        return answer["result"]

    # -- what tests and demos do with a chain ------------------------------------------

    def block_number(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def block(self, number: int | str = "latest") -> dict:
        return self.rpc("eth_getBlockByNumber", hex(number) if isinstance(number, int) else number, False)

    def mine(self, timestamp: int | None = None) -> dict:
        """Mine one block (holding the pending transactions) at ``timestamp``; its header."""
        if timestamp is None:
            self.rpc("evm_mine")
        else:
            self.rpc("evm_mine", timestamp)
        return self.block()

    def set_automine(self, on: bool) -> None:
        self.rpc("evm_setAutomine", on)

    def send(self, sender: str, to: str | None, *, value: int = 0, data: bytes = b"") -> str:
        """A transaction from an unlocked or impersonated ``sender``; its hash (mined with the next block)."""
        tx: dict[str, Any] = {"from": sender, "value": hex(value), "gas": hex(3_000_000)}
        if to is not None:
            tx["to"] = to
        if data:
            tx["data"] = "0x" + data.hex()
        return self.rpc("eth_sendTransaction", tx)

    def receipt(self, tx_hash: str) -> dict:
        receipt = self.rpc("eth_getTransactionReceipt", tx_hash)
        if receipt is None or receipt.get("status") != "0x1":
            raise RpcFailed(f"transaction {tx_hash} failed or is not mined: {receipt}")
        return receipt

    def set_balance(self, address: str, wei: int) -> None:
        self.rpc("anvil_setBalance", address, hex(wei))

    def balance(self, address: str, block: int | str = "latest") -> int:
        return int(self.rpc("eth_getBalance", address, hex(block) if isinstance(block, int) else block), 16)

    def snapshot(self) -> str:
        return self.rpc("evm_snapshot")

    def revert(self, snapshot_id: str) -> None:
        if self.rpc("evm_revert", snapshot_id) is not True:
            raise RpcFailed(f"evm_revert({snapshot_id}) refused")


def artifacts() -> dict:
    """The compiled test tokens (``tests/evm/tokens.json``): abi and bytecode per contract."""
    return json.loads(ARTIFACTS.read_text())["contracts"]


def deploy_data(contract: str, *args: Any, types: tuple[str, ...] = ()) -> bytes:
    from eth_abi import encode

    code = bytes.fromhex(artifacts()[contract]["bytecode"][2:])
    return code + (encode(list(types), list(args)) if types else b"")


def call_data(signature: str, types: tuple[str, ...] = (), *args: Any) -> bytes:
    from eth_abi import encode
    from eth_utils import function_signature_to_4byte_selector

    return function_signature_to_4byte_selector(signature) + (encode(list(types), list(args)) if types else b"")


def deploy(node: Anvil, contract: str, *args: Any, types: tuple[str, ...] = (), sender: str = DEPLOYER,
           timestamp: int | None = None) -> str:
    """Deploy one of the test contracts in a block of its own; its (checksummed) address."""
    from eth_utils import to_checksum_address

    tx = node.send(sender, None, data=deploy_data(contract, *args, types=types))
    node.mine(timestamp)
    return to_checksum_address(node.receipt(tx)["contractAddress"])


# --- the gateway ---------------------------------------------------------------------------


class EvmGateway:
    """A hosted JSON-RPC endpoint in front of an :class:`Anvil` (see the module docstring)."""

    def __init__(self, node: Anvil, *, api_key: str | None = None, key_in: str = "header",
                 key_header: str = "x-api-key", path: str = "/", limits: tuple[tuple[float, int], ...] = (),
                 limit_style: str = "http", max_batch: int = 1000, reorder: bool = True,
                 error_ids: str = "kept", missing_methods: tuple[str, ...] = (), max_logs: int | None = None) -> None:
        self.node = node
        self.missing_methods = missing_methods
        self.max_logs = max_logs
        self.error_ids = error_ids
        self.api_key = api_key
        self.key_in = key_in
        self.key_header = key_header
        self.path = "/" + path.strip("/") if path.strip("/") else ""
        self.limits = limits
        self.limit_style = limit_style
        self.max_batch = max_batch
        self.reorder = reorder
        self.calls: deque[dict] = deque(maxlen=100_000)  # calls forwarded, for tests to count and read
        self.rate_limited = 0  # requests and calls refused for the rate
        self._refuse_calls = 0
        self._times: deque[float] = deque()
        self._lock = threading.Lock()
        self._local = threading.local()

    def rate_limit_calls(self, n: int) -> None:
        """Answer the next ``n`` calls with -32005, inside otherwise answered batches."""
        with self._lock:
            self._refuse_calls += n

    def __call__(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(405, body=b"method not allowed", content_type="text/plain")
        expected = self.path + (f"/{self.api_key}" if self.api_key and self.key_in == "path" else "")
        if request.path.rstrip("/") != expected:
            if self.api_key and self.key_in == "path" and request.path.rstrip("/") == self.path:
                return self._error(401, UNAUTHENTICATED)
            return Response(404, body=b"404 page not found", content_type="text/plain")
        if self.api_key and self.key_in == "header" and request.header(self.key_header) != self.api_key:
            return self._error(401, UNAUTHENTICATED)
        if self._over_limit():
            self.rate_limited += 1
            if self.limit_style == "jsonrpc":
                return self._refuse_all(request.body)
            return self._error(429, LIMIT_EXCEEDED, {"Retry-After": "1"})
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._error(200, {"code": -32700, "message": "parse error"})
        if isinstance(body, list) and len(body) > self.max_batch:
            first = next((c.get("id") for c in body if isinstance(c, dict) and "method" in c and "id" in c), None)
            return Response(200, body=dumps([{"jsonrpc": "2.0", "id": first,
                                              "error": {"code": -32600, "message": "batch too large"}}]))
        calls = body if isinstance(body, list) else [body]
        with self._lock:
            self.calls.extend(c for c in calls if isinstance(c, dict))
            refused = min(self._refuse_calls, len(calls)) if isinstance(body, list) else 0
            self._refuse_calls -= refused
        if refused:
            # The last calls of the batch are refused, the others answered by the node.
            answered = self._forward(calls[:len(calls) - refused]) if len(calls) > refused else []
            self.rate_limited += refused
            answers = answered + [{"jsonrpc": "2.0", "id": c.get("id"), "error": LIMIT_EXCEEDED}
                                  for c in calls[len(calls) - refused:]]
            return self._answer(answers)
        answer = self._with_error_ids(body, self._forward(body))
        if isinstance(answer, list) and self.reorder:
            answer = answer[::-1]
        return self._answer(answer)

    def _with_error_ids(self, body: Any, answer: Any) -> Any:
        """The node's answer with the ids of its errors as ``error_ids`` says (module docstring)."""
        def nulled(item: Any) -> Any:
            return {**item, "id": None} if isinstance(item, dict) and item.get("error") is not None else item

        if self.error_ids == "ganache" and isinstance(body, dict) and not body.get("id"):
            return nulled(answer)
        if self.error_ids == "null":
            return [nulled(a) for a in answer] if isinstance(answer, list) else nulled(answer)
        return answer

    def _forward(self, body: Any) -> Any:
        """The node's answer to ``body``, but for the methods this endpoint refuses or limits."""
        calls = body if isinstance(body, list) else [body]
        refused = {id(c): self._refusal(c) for c in calls if isinstance(c, dict)
                   and c.get("method") in self.missing_methods}
        passed = [c for c in calls if id(c) not in refused]
        answers = self._node_answers(passed if isinstance(body, list) else passed[0]) if passed else []
        answers = answers if isinstance(answers, list) else [answers]
        by_call = dict(zip((id(c) for c in passed), answers))
        merged = [refused.get(id(c)) or self._limited(c, by_call.get(id(c))) for c in calls]
        return merged if isinstance(body, list) else merged[0]

    @staticmethod
    def _refusal(call: dict) -> dict:
        return {"jsonrpc": "2.0", "id": call.get("id"),
                "error": {"code": -32601, "message": f"the method {call.get('method')} does not exist/is not available"}}

    def _limited(self, call: Any, answer: Any) -> Any:
        if (self.max_logs is not None and isinstance(call, dict) and call.get("method") == "eth_getLogs"
                and isinstance(answer, dict) and isinstance(answer.get("result"), list)
                and len(answer["result"]) > self.max_logs):
            return {"jsonrpc": "2.0", "id": call.get("id"),
                    "error": {"code": -32005, "message": f"query returned more than {self.max_logs} results"}}
        return answer

    def _node_answers(self, body: Any) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False
        answer = session.post(self.node.url, json=body, timeout=60).json()
        if isinstance(body, list) and isinstance(answer, list):
            by_id = {a.get("id"): a for a in answer if isinstance(a, dict)}
            answer = [by_id.get(c.get("id")) for c in body]  # in the order asked, for merging
        return answer

    def _over_limit(self) -> bool:
        if not self.limits:
            return False
        now = time.monotonic()
        with self._lock:
            longest = max(window for window, _ in self.limits)
            while self._times and self._times[0] < now - longest:
                self._times.popleft()
            for window, most in self.limits:
                if sum(1 for t in self._times if t >= now - window) >= most:
                    return True
            self._times.append(now)
        return False

    def _refuse_all(self, body: bytes) -> Response:
        try:
            calls = json.loads(body)
        except ValueError:
            calls = {}
        if isinstance(calls, list):
            return self._answer([{"jsonrpc": "2.0", "id": c.get("id") if isinstance(c, dict) else None,
                                  "error": LIMIT_EXCEEDED} for c in calls])
        return self._error(200, LIMIT_EXCEEDED)

    @staticmethod
    def _answer(value: Any) -> Response:
        return Response(200, body=dumps(value))

    @staticmethod
    def _error(status: int, error: dict, headers: dict[str, str] | None = None) -> Response:
        return Response(status, body=dumps({"jsonrpc": "2.0", "id": None, "error": error}), headers=dict(headers or {}))


# --- demo ------------------------------------------------------------------------------------

DEMO_CHAIN_ID = 31337
DEMO_API_KEY = "sandbox-rpc-key-7c41e2b9"
ETHER = 10**18
# Deterministic wallets (not anvil's dev accounts): the treasury only receives, so its balance is
# exactly what the Formance sandbox books as treasury:evm.
TREASURY = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
OPERATIONS = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
TREASURY_WEI = 1_234_567_890_123_456_789_012  # 1234.567890123456789012 ETH: above 2**64
DUSD_DECIMALS = 6


def seed_demo_chain(node: Anvil, now: int) -> dict[str, str]:
    """The demo's history, by real transactions at set times; the token addresses by name."""
    node.set_automine(False)
    start, later, recent = now - 3 * 86_400, now - 86_400, now - 2 * 3600
    dusd = deploy(node, "TestToken", "Demo Dollar", "DUSD", DUSD_DECIMALS, types=("string", "string", "uint8"),
                  timestamp=start)
    node.send(DEPLOYER, TREASURY, value=1_200 * ETHER)
    node.send(DEPLOYER, OPERATIONS, value=50 * ETHER)
    node.send(DEPLOYER, dusd, data=call_data("mint(address,uint256)", ("address", "uint256"), TREASURY,
                                             2_500_000 * 10**DUSD_DECIMALS + 1))
    node.send(DEPLOYER, dusd, data=call_data("mint(address,uint256)", ("address", "uint256"), OPERATIONS,
                                             125_000 * 10**DUSD_DECIMALS))
    if dusd != DEMO_TOKEN:
        raise RuntimeError(f"the demo token landed at {dusd}, not {DEMO_TOKEN}: the deployer had sent before")
    node.mine(start + 60)
    forwarder = deploy(node, "Forwarder", timestamp=start + 120)
    node.send(DEPLOYER, TREASURY, value=TREASURY_WEI - 1_200 * ETHER)
    node.send(OPERATIONS, DEPLOYER, value=12_345_678_900_000_000)  # operations pays (gas too)
    node.mine(later)
    node.send(OPERATIONS, dusd, data=call_data("transfer(address,uint256)", ("address", "uint256"), DEPLOYER,
                                               4_321_987_654))
    # Paid through a contract: the chain's balances move by value only a trace shows.
    node.send(DEPLOYER, forwarder, value=2_500_000_000_000_000_000,
              data=call_data("pay(address)", ("address",), OPERATIONS))
    node.mine(recent)
    for minutes in range(60, 0, -1):  # a block a minute over the last hour
        node.mine(now - minutes * 60)
    node.set_automine(True)
    return {"DUSD": dusd, "Forwarder": forwarder}


_DEMO: dict[str, Any] = {}
_DEMO_LOCK = threading.Lock()


def demo_node() -> tuple[Anvil, dict[str, str]]:
    """The demo chain, started and seeded once per process (its gateways only read it)."""
    with _DEMO_LOCK:
        node = _DEMO.get("node")
        if node is None or node.process.poll() is not None:
            node = Anvil(chain_id=DEMO_CHAIN_ID, timestamp=int(time.time()) - 3 * 86_400 - 600)
            _DEMO["tokens"] = seed_demo_chain(node, int(time.time()))
            _DEMO["node"] = node
        return node, _DEMO["tokens"]


def demo_app() -> EvmGateway:
    node, _ = demo_node()
    # Within the provider's documented 10 per second (burst 20).
    return EvmGateway(node, api_key=DEMO_API_KEY, key_in="header", limits=((1.0, 25),))


def _first_contract_address(deployer: str) -> str:
    """CREATE's address for the deployer's nonce 0: keccak(rlp([sender, 0]))[12:]."""
    from eth_utils import keccak, to_bytes, to_checksum_address

    sender = to_bytes(hexstr=deployer)
    encoded = bytes([0xC0 + 1 + 20 + 1, 0x80 + 20]) + sender + b"\x80"  # rlp([sender, 0])
    return to_checksum_address(keccak(encoded)[12:])


DEMO_TOKEN = _first_contract_address(DEPLOYER)


def demo_source(url: str) -> dict:
    return {"provider": "evm", "rpc_url": url, "chain_id": DEMO_CHAIN_ID, "addresses": [TREASURY, OPERATIONS],
            "tokens": [DEMO_TOKEN], "confirmations": 12, "max_batch": 50, "api_key_in": "header",
            "conn_id": DEMO_CONNECTION[0], "schedule": "*/15 * * * *"}


DEMO_CONNECTION = ("evm_sandbox", f"http://:{DEMO_API_KEY}@evm-sandbox")


# --- live: a block a minute, for ``scripts/demo --serve`` ---------------------------------------


class LiveEvm:
    """The demo chain, mining a block at the end of every minute as time passes.

    Before answering, blocks are mined up to the current minute (timestamp a
    second before the minute), each with a small payment from operations:
    its balances change from run to run, the treasury's never (the pair check
    with the ledger holds). :func:`live_app` makes it for ``sandbox.live``.
    """

    def __init__(self, clock: Callable[[], int] = lambda: int(time.time()) // 60) -> None:
        now = int(time.time())
        self.node = Anvil(chain_id=DEMO_CHAIN_ID, timestamp=now - 3 * 86_400 - 600)
        seed_demo_chain(self.node, now - 60)
        self.gateway = EvmGateway(self.node, api_key=DEMO_API_KEY, key_in="header")
        self.clock = clock
        self._minute = clock()
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self._lock:
            minute = self.clock()
            if minute != self._minute:
                self.node.set_automine(False)
                for m in range(max(self._minute + 1, minute - 60), minute + 1):
                    self.node.send(OPERATIONS, DEPLOYER, value=(m % 7 + 1) * 10**15)
                    self.node.mine(m * 60 - 1)
                self.node.set_automine(True)
                self._minute = minute
        return self.gateway(request)


def live_app() -> LiveEvm:
    """The moving demo chain that ``scripts/demo --serve`` and the live tests serve."""
    return LiveEvm()
