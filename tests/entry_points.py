"""Running documented commands as a user types them: shared by the entry-point tests.

A user starts from a fresh clone, types the commands the README and
docs/DEPLOYMENT.md show, in a shell, with only the environment they set
themselves. So do these helpers: :func:`fresh_clone` copies the working
tree as git sees it (tracked files and new ones not ignored: no ``.venv``,
no ``.pgdata``, no ``node_modules``), :func:`documented_blocks` reads the
``sh`` blocks marked ``<!-- tested: NAME -->``, :func:`run_block` runs one
in ``bash -e`` with the documented placeholders filled in, and
:func:`leftovers` finds every process a command left behind (each carries
a marker in its environment, inherited by all it starts).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "ENTRY_POINT_TEST_MARK"
_BLOCK = re.compile(r"<!-- tested: ([a-z0-9-]+) -->\n```sh\n(.*?)\n```", re.S)
_ANY_SH_BLOCK = re.compile(r"^```sh$", re.M)


def documented_blocks(path: Path) -> dict[str, str]:
    """The marked ``sh`` blocks of a document, by name."""
    return {name: body for name, body in _BLOCK.findall(path.read_text())}


def unmarked_sh_blocks(path: Path) -> int:
    """``sh`` blocks that carry no ``tested`` mark: commands no test would run."""
    return len(_ANY_SH_BLOCK.findall(path.read_text())) - len(documented_blocks(path))


def fresh_clone(target: Path) -> Path:
    """The working tree as a new clone has it (uncommitted changes included), at ``target``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a file deleted but not yet committed is listed and absent
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """What a user's shell has: no project variables, no virtualenv, the caches of this machine.

    ``SUPERSET_VENV`` (where CI caches Superset) and the pip/npm caches pass
    through: a user's machine keeps its caches too.
    """
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if "/.venv" not in p]
    env = {"PATH": ":".join(path), "HOME": str(home), "LANG": "C.UTF-8", "USER": os.environ.get("USER", "root"),
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
           "npm_config_cache": os.environ.get("npm_config_cache", str(Path.home() / ".npm"))}
    for passed in ("SUPERSET_VENV", "CI", "TMPDIR"):
        if passed in os.environ:
            env[passed] = os.environ[passed]
    env.update(extra)
    return env


def new_mark() -> str:
    return uuid.uuid4().hex


def run_block(body: str, cwd: Path, env: dict[str, str], *, substitutions: dict[str, str] | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """The block in one ``bash`` session that stops at the first failing command."""
    for placeholder, value in (substitutions or {}).items():
        assert placeholder in body, f"{placeholder} is not in the block: the test and the docs disagree"
        body = body.replace(placeholder, value)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def leftovers(mark: str) -> list[str]:
    """Processes alive with ``MARK=mark`` in their environment: ``pid command``."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in environ.split(b"\0") and stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z":
            found.append(f"{entry} {command[:200]}")
    return found


def wait_gone(mark: str, timeout: float = 30) -> list[str]:
    """Until no marked process is left (or ``timeout``); what is left."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_marked(mark: str) -> None:
    """Clean up after a failed test: whatever it left must not disturb the next one."""
    for line in leftovers(mark):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening_sockets(pids: set[int]) -> list[tuple[int, str]]:
    """``(pid, local address)`` of every TCP socket the processes listen on."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((inodes[fields[9]], f"{_address(address, width)}:{int(port, 16)}"))
    return found


def _address(hex_address: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_address)
    # /proc/net prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words if width == 32 else words[:4]))


def marked_pids(mark: str) -> set[int]:
    return {int(line.split()[0]) for line in leftovers(mark)}


def env_file_value(path: Path, name: str) -> str:
    """A value ``export NAME=...`` in a file written by the demo (shell-quoted)."""
    import shlex

    for line in path.read_text().splitlines():
        if line.startswith(f"export {name}="):
            return shlex.split(line.split("=", 1)[1])[0]
    raise KeyError(name)
