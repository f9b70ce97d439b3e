"""A sixth provider is its module, its sandbox, its tests and its docs: nothing else changes.

Two checks hold docs/ADDING_A_PROVIDER.md to the code:

* no shared code names a provider: outside the providers' own modules and
  sandboxes, production code and the shared sandbox modules never mention a
  provider or its own columns, whatever the form (a name, a string, SQL);
  only docstrings and comments may use one as an example. The row contract
  (``extractors/records.py``) is where the columns a provider brings are declared.
* a real sixth provider, ``acme`` (``tests/new_provider/``), is added to a
  fresh copy of the repository exactly as the guide says: the files changed
  are the guide's list, no more; the shared suites take it up with nothing
  added; and ``balances snapshot`` of its sandbox publishes into PostgreSQL.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import token
import tokenize
from pathlib import Path

from extractors import registry
from tests.conftest import fetch, reset_database

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "ADDING_A_PROVIDER.md"
TEMPLATES = Path(__file__).resolve().parent / "new_provider"

# Code that serves every provider alike.
SHARED = ("extractors", "loaders", "pipeline", "reconciliation", "cli", "dags", "sandbox")
# Columns of the history that only some provider fills: declared by the row contract.
PROVIDER_COLUMNS = {"spark_factor": "coreledger"}
CONTRACT = REPO / "extractors" / "records.py"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, word) of every name and every word inside a string that is not a docstring."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))
    words, previous = [], token.NEWLINE
    skip = (tokenize.NL, tokenize.COMMENT)
    for i, tok in enumerate(tokens):
        if tok.type == token.NAME:
            words.append((tok.start[0], tok.string))
        elif tok.type == token.STRING:
            following = next((t for t in tokens[i + 1:] if t.type not in skip), None)
            docstring = (previous in (token.NEWLINE, token.INDENT, token.DEDENT, tokenize.ENCODING)
                         and following is not None and following.type in (token.NEWLINE, token.ENDMARKER))
            if not docstring:
                words += [(tok.start[0], w) for w in _WORD.findall(tok.string)]
        if tok.type not in skip:
            previous = tok.type
    return words


def owner(path: Path) -> str | None:
    """The provider whose own file this is (``extractors/<name>.py`` or ``/<name>/``, ``sandbox/<name>.py``)."""
    parts = path.relative_to(REPO).parts
    if parts[0] in ("extractors", "sandbox") and len(parts) > 1:
        name = Path(parts[1]).stem
        if name in registry.names():
            return name
    return None


def mentions(word: str) -> set[str]:
    """The providers a word names: ``hedera``, ``HederaMirror``, ``is_evm``, ``spark_factor``..."""
    lowered = word.lower()
    found = {p for p in registry.names() if p in lowered.split("_") or lowered.startswith(p)}
    if lowered in PROVIDER_COLUMNS:
        found.add(PROVIDER_COLUMNS[lowered])
    return found


def test_no_shared_code_names_a_provider():
    leaks = []
    for folder in SHARED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if owner(path):
                continue  # a provider's own module or sandbox (its demo data may name another's accounts)
            for line, word in code_words(path):
                for provider in mentions(word):
                    if path == CONTRACT and word in PROVIDER_COLUMNS:
                        continue  # the row contract declares the column
                    leaks.append(f"{path.relative_to(REPO)}:{line}: {word} ({provider})")
    assert leaks == []


def test_the_scan_finds_a_provider_named_in_shared_code(tmp_path):
    """The check above can fail: each form a leak takes is found."""
    sample = tmp_path / "leak.py"
    sample.write_text('"""Docstrings may say Hedera."""\n'
                      'def f(page, row):\n'
                      '    """As may this one: CoreLedger."""\n'
                      '    if page.provider == "formance":  # and comments: bitfront\n'
                      '        return row.spark_factor\n'
                      '    return f"SELECT {row} FROM x WHERE chain = \'evm\'"\n')
    found = {w for _, w in code_words(sample) for _ in mentions(w)}
    assert found == {"formance", "spark_factor", "evm"}


def test_the_shipped_providers_each_own_their_files():
    assert {owner(REPO / "extractors" / "hedera.py"), owner(REPO / "extractors" / "evm" / "rpc.py"),
            owner(REPO / "sandbox" / "coreledger.py"), owner(REPO / "loaders" / "publish.py")} \
        == {"hedera", "evm", "coreledger", None}


def guide_files() -> list[str]:
    """The files the guide's table says a provider touches, ``<name>`` as written there."""
    text = GUIDE.read_text()
    table = text.split("| what | where |", 1)[1].split("\n\n", 1)[0]
    return [path for row in table.splitlines()[2:] for path in re.findall(r"`([^`]+)`", row.split("|")[2])]


def test_the_guide_counts_its_own_table():
    files = guide_files()
    count = re.search(r"Adding a provider touches (\w+) files", GUIDE.read_text()).group(1)
    words = {"four": 4, "five": 5, "six": 6, "seven": 7}
    assert words[count] == len(files) == 5, files


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], cwd=dest, check=True)


def _add_acme(root: Path) -> None:
    """What the guide says to write, and nothing more."""
    shutil.copy(TEMPLATES / "acme_extractor.py", root / "extractors" / "acme.py")
    shutil.copy(TEMPLATES / "acme_sandbox.py", root / "sandbox" / "acme.py")
    shutil.copy(TEMPLATES / "acme_tests.py", root / "tests" / "test_acme.py")
    readme = root / "README.md"
    text = readme.read_text()
    readme.write_text(text.replace("\n## Credentials\n", "\n" + (TEMPLATES / "readme_section.md").read_text()
                                   + "## Credentials\n", 1))
    example = root / "config" / "balances.example.toml"
    text = example.read_text().replace("| evm   (required)", "| evm | acme   (required)", 1)
    example.write_text(text + (TEMPLATES / "example_source.toml").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sixth_provider_is_its_module_sandbox_tests_and_docs(tmp_path, database_url, db):
    root = tmp_path / "checkout"
    _copy_checkout(root)
    _add_acme(root)

    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split("\n")
    touched = sorted(line[3:] for line in changed if line)
    assert touched == sorted(path.replace("<name>", "acme") for path in guide_files())

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "AIRFLOW", "PYTEST"))}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")

    # The shared suites take the new provider up by themselves; its own test passes.
    suites = ["tests/test_acme.py", "tests/test_dags.py", "tests/test_faults.py", "tests/test_hostile_input.py",
              "tests/test_secrets.py", "tests/test_provider_contract.py", "tests/test_provider_settings.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-k", "acme or providers_are_the_modules", *suites],
                         cwd=root, env={**env, "BALANCES_TEST_DB_URL": database_url}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 10, run.stdout[-2000:]  # the shared suites ran it, not only its own test
    print(f"acme in the shared suites: {passed} passed")

    # As a user: its sandbox on its own, then a snapshot of it published into PostgreSQL.
    port = _free_port()
    sandbox = subprocess.Popen([sys.executable, "-m", "sandbox", "acme", "--port", str(port)], cwd=root,
                               env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert sandbox.stdout.readline().startswith(f"sandbox acme listening on http://127.0.0.1:{port}")
        config = tmp_path / "balances.toml"
        config.write_text(f'[sources.acme_demo]\nprovider = "acme"\nbase_url = "http://127.0.0.1:{port}"\n')
        user = {**env, "BALANCES_CONFIG": str(config), "BALANCES_DB_URL": database_url}
        for command in (["check", "--connect"], ["snapshot", "acme_demo"]):
            done = subprocess.run([sys.executable, "-m", "cli.main", *command], cwd=root, env=user,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        sandbox.terminate()
        sandbox.wait(10)
    assert fetch(db, "SELECT account, asset, balance::text FROM balance_history WHERE source = 'acme_demo'"
                     " ORDER BY 1, 2") == [("vault-1", "EUR", "99.99"), ("vault-1", "USD", "1250.50"),
                                           ("vault-2", "USD", "0.01")]
    reset_database(db)
