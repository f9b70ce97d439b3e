"""The documents say what the code does: names, kinds, defaults and commands.

Drift between the docs and the code is what a newcomer meets first: a table
the README calls a table that is a view, a default that changed, a command
that no longer parses. Each check here reads the document as text and asks
the code (or the migrated database) whether it holds.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, fetch

README = (REPO / "README.md").read_text()
SCHEMA = (REPO / "docs" / "SCHEMA.md").read_text()


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^#{1,2} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + (following.start() if following else len(text))]


def relkind(db, name: str) -> str | None:
    kinds = {"r": "table", "p": "table", "v": "view"}
    found = fetch(db, "SELECT relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                      " WHERE n.nspname = 'public' AND c.relname = %s", (name,))
    return kinds.get(found[0][0]) if found else None


def test_every_table_and_view_schema_md_names_exists_as_that_kind(db):
    tables = section(SCHEMA, "## Tables")
    views = section(SCHEMA, "## Views")
    named_tables = re.findall(r"^#{3,4} `([a-z_]+)`(.*)$", tables, re.M)
    named_views = re.findall(r"^#{3,4} `([a-z_]+)`", views, re.M)
    assert len(named_tables) >= 10 and len(named_views) >= 9
    for name, rest in named_tables:
        expected = "view" if "a view" in rest else "table"
        assert relkind(db, name) == expected, f"SCHEMA.md calls {name} a {expected}"
    for name in named_views:
        assert relkind(db, name) == "view", f"SCHEMA.md calls {name} a view"
    # Every view the migrations make is documented.
    made = {v for (v,) in fetch(db, "SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    assert made - set(named_views) - {"balance_history", "balances_latest", "balances_daily_close"} == set()


def test_every_table_and_view_the_readme_names_exists_as_that_kind(db):
    views = re.findall(r"^\| `([a-z_]+)` \|", section(README, "## SQL and BI"), re.M)
    assert len(views) >= 9
    for name in views:
        assert relkind(db, name) == "view", f"README's SQL and BI lists {name} as a view"
    tables = section(README, "## Tables")
    first_mentions = {}
    for name, after in re.findall(r"`([a-z_]+)`(.{0,12})", tables, re.S):
        first_mentions.setdefault(name, after)  # where the paragraph says what it is
    for name, after in first_mentions.items():
        kind = relkind(db, name)
        if kind is not None:
            expected = "view" if after.lstrip().startswith("(a view") else "table"
            assert kind == expected, f"README's Tables paragraph calls {name} a {expected}"


def test_schema_md_lists_every_provider():
    from extractors.registry import names

    line = next(line for line in SCHEMA.splitlines() if line.startswith("| `provider` | text |"))
    assert sorted(re.findall(r"`([a-z]+)`", line.split("|")[3])) == sorted(names())


# A value for each placeholder of the CLI synopsis.
PLACEHOLDERS = {"SOURCE": "hedera_mainnet", "TIME": "2026-11-01T00:00Z", "N": "3", "DIR": "out",
                "A": "0.0.98", "X": "HBAR", "NAME": "grafana", "RUN": "7", "URL": "postgresql://u@h/db",
                "PATH": "b.toml", "COMMAND": "runs", "ID": "17", "TEXT": "pays back on Monday"}


def synopsis_commands() -> list[list[str]]:
    block = section(README, "## The CLI")
    lines = block.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    commands = []
    for line in lines:
        if not line.startswith("balances "):
            continue
        usage = re.split(r"\s{2,}", line)[0]  # the description follows after a gap
        words = []
        for word in shlex.split(usage.replace("[", " ").replace("]", " ")):
            word = word.split("|")[0]  # alternatives: the first
            words.append(PLACEHOLDERS.get(word, word))
        commands.append(words[1:])
    return commands


@pytest.mark.parametrize("words", synopsis_commands(), ids=lambda w: " ".join(w[:2]))
def test_every_cli_command_the_readme_shows_parses(words):
    from cli.main import build_parser

    args = build_parser().parse_args(words)
    assert callable(args.func)


def test_the_readme_synopsis_shows_every_subcommand():
    from cli.main import build_parser

    shown = {words[0] for words in synopsis_commands() if words and not words[0].startswith("-")}
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert shown == set(commands)


def test_the_readme_defaults_are_the_code_defaults():
    from extractors.http import RetryPolicy
    from pipeline.config import SourceConfig

    table = section(README, "## The sources file")
    rows = dict(re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", table, re.M))

    def numbers(cell: str) -> list[float]:
        return [float(n.replace(",", "")) for n in re.findall(r"[0-9][0-9,]*(?:\.[0-9]+)?", cell)]

    policy = RetryPolicy()
    defaults = {f.name: f.default for f in dataclasses.fields(SourceConfig)}
    assert numbers(rows["`max_attempts`"]) == [policy.max_attempts]
    assert numbers(rows["`backoff_base`, `backoff_cap`"]) == [policy.backoff_base, policy.backoff_cap]
    assert numbers(rows["`max_retry_after`, `max_total_wait`"]) == [policy.max_retry_after, policy.max_total_wait]
    assert numbers(rows["`connect_timeout`, `read_timeout`, `request_deadline`"]) == [
        policy.connect_timeout, policy.read_timeout, policy.request_deadline]
    assert numbers(rows["`max_response_bytes`"]) == [policy.max_response_bytes / 2**20]
    assert numbers(rows["`max_pages`"]) == [defaults["max_pages"]]
    assert numbers(rows["`max_snapshot_age`"]) == [defaults["max_snapshot_age"]]
    assert numbers(rows["`max_rejected`"]) == [defaults["max_rejected"]]
    assert numbers(rows["`task_retries`, `task_retry_delay`"]) == [defaults["task_retries"],
                                                                   defaults["task_retry_delay"]]


def test_every_document_the_readme_links_exists():
    for target in re.findall(r"\]\(((?:docs/)?[A-Za-z_]+\.md)(?:#[^)]*)?\)", README):
        assert (REPO / target).is_file(), target
    assert Path(REPO / "CHANGELOG.md").is_file()
