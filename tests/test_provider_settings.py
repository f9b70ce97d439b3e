"""Each provider's ``Settings`` model, and the shared keys' model, as the sources file meets them.

Every provider declares its keys as a pydantic model (extractors/settings.py);
whatever it declares, a mistake in its keys is one line naming the source and
the key, never pydantic's own several-line text, and the CLI exits 2 on it.
"""
from __future__ import annotations

import logging
import typing
from datetime import date, datetime, timezone

import pydantic
import pytest

from cli.main import main
from extractors import registry
from extractors.settings import ProviderSettings
from pipeline.config import SHARED_KEYS, ConfigError, SourceKeys, parse_source
from tests.sandboxes import PROVIDERS, source_keys

URL = "http://127.0.0.1:9"


def refused(table: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_source("s", table)
    message = str(caught.value)
    assert "\n" not in message and "validation error" not in message and "pydantic" not in message, message
    return message


def numbers(model: type[pydantic.BaseModel]) -> list[str]:
    """The keys of ``model`` that hold an integer or a number."""
    def holds_number(annotation) -> bool:
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Annotated:
            return holds_number(args[0])
        if args:
            return any(holds_number(a) for a in args if a is not type(None))
        return annotation in (int, float)
    return [key for key, info in model.model_fields.items() if holds_number(info.annotation)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_providers_settings_are_a_strict_frozen_closed_model(provider):
    model = registry.provider(provider).settings
    assert issubclass(model, ProviderSettings)
    assert model.model_config["strict"] and model.model_config["frozen"]
    assert model.model_config["extra"] == "forbid"
    settings = parse_source("s", source_keys(provider, URL)).settings
    key = next(iter(model.model_fields))
    with pytest.raises(pydantic.ValidationError):
        setattr(settings, key, getattr(settings, key))
    # No key of a provider hides a key every source has.
    assert not set(model.model_fields) & set(SHARED_KEYS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_unknown_key_is_refused_naming_the_nearest_and_every_known_key(provider):
    model = registry.provider(provider).settings
    key = next(k for k in model.model_fields if len(k) > 4)
    message = refused(source_keys(provider, URL, **{key[:-1]: 1}))
    assert message.startswith(f"sources.s.{key[:-1]}: unknown key (did you mean '{key}'?) (known: ")
    known = message.split("(known: ")[1].rstrip(")").split(", ")
    assert known == sorted({*model.model_fields, *SHARED_KEYS})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_number_of_a_provider_is_an_integer_in_range(provider):
    for key in numbers(registry.provider(provider).settings):
        assert refused(source_keys(provider, URL, **{key: 2**40})).startswith(f"sources.s.{key}: must be ")
        assert refused(source_keys(provider, URL, **{key: -1})).startswith(f"sources.s.{key}: must be ")
        assert refused(source_keys(provider, URL, **{key: True})).startswith(f"sources.s.{key}: expected ")
        assert refused(source_keys(provider, URL, **{key: "10"})).startswith(f"sources.s.{key}: expected ")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_url_of_a_provider_is_an_http_url_with_a_host(provider):
    model = registry.provider(provider).settings
    urls = [k for k in model.model_fields if k == "url" or k.endswith("_url")]
    assert urls
    for key in urls:
        assert refused(source_keys(provider, URL, **{key: "file:///etc/passwd"})) == (
            f"sources.s.{key}: 'file:///etc/passwd' is not an http:// or https:// URL with a host")


@pytest.mark.parametrize("value, message", [
    (True, "expected an integer, got True"),
    (1.0, "expected an integer, got 1.0"),
    ("100", "expected an integer, got '100'"),
    (0, "must be between 1 and 100, got 0"),
    (2**63, "must be at least 0 and at most 2147483647, got 9223372036854775808"),
])
def test_a_wrong_value_says_what_was_expected(value, message):
    assert refused({"provider": "hedera", "base_url": URL, "limit": value}) == f"sources.s.limit: {message}"


@pytest.mark.parametrize("key, value, message", [
    ("catchup", 1, "expected true or false, got 1"),
    ("task_retry_delay", "60", "expected a number, got '60'"),
    ("task_retry_delay", float("-inf"), "expected a finite number, got -inf"),
    ("rate_limit", 0, "must be more than 0 and at most 10000 (requests per second), got 0"),
    ("conn_id", "  ", "expected a non-empty string, got '  '"),
    ("conn_id", "a\tb", "'a\\tb' contains a control character"),
    ("start_date", "2024-01-01", "expected a date or date-time, got '2024-01-01'"),
    ("max_response_bytes", 10, "must be at least 1024 and at most 1073741824 (bytes), got 10"),
])
def test_a_wrong_shared_key_says_what_was_expected(key, value, message):
    assert refused({"provider": "hedera", "base_url": URL, key: value}) == f"sources.s.{key}: {message}"


def test_shared_keys_as_the_file_writes_them():
    source = parse_source("s", {"provider": "hedera", "base_url": f"  {URL}  ", "conn_id": " c ",
                                "start_date": date(2024, 3, 1), "task_retry_delay": 5, "account_ids": "0.0.98"})
    assert source.start_date == datetime(2024, 3, 1, tzinfo=timezone.utc)
    assert source.task_retry_delay == 5.0 and isinstance(source.task_retry_delay, float)
    assert (source.conn_id, source.settings.base_url, source.settings.account_ids) == ("c", URL, ["0.0.98"])
    # Only what the file sets is set: the rest is SourceConfig's and RetryPolicy's default.
    assert SourceKeys.model_validate({"provider": "hedera", "shards": 2}).model_fields_set == {"provider", "shards"}


def test_a_list_item_is_named_by_its_place():
    message = refused({"provider": "hedera", "base_url": URL, "account_ids": ["0.0.1", 5]})
    assert message == "sources.s.account_ids[1]: expected a non-empty string, got 5"


def test_a_model_made_in_code_is_checked_as_given():
    from extractors.hedera import Settings

    with pytest.raises(pydantic.ValidationError):
        Settings(base_url=URL, colour="red")
    with pytest.raises(pydantic.ValidationError):
        Settings(base_url=f" {URL}")  # only the file reader trims
    assert Settings(URL) == Settings(base_url=URL)


def test_the_cli_exits_2_on_a_providers_mistake_in_one_line(capsys, tmp_path):
    config = tmp_path / "sources.toml"
    config.write_text('[sources.chain]\nprovider = "evm"\nrpc_url = "https://rpc.example"\nchain_id = true\n'
                      'addresses = ["0x' + "a1" * 20 + '"]\n')
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        code = main(["--config", str(config), "snapshot", "chain"])
    finally:
        root.handlers[:] = handlers
    err = capsys.readouterr().err
    assert code == 2 and err == "balances: config error: sources.chain.chain_id: expected an integer, got True\n"
