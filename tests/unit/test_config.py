"""Gateway config: defaults < environment < flags, typed parsing, validation."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

import pytest

from piaa_personalization.config import DEFAULT_PORT, GatewayConfig, add_arguments, field_docs
from piaa_personalization.core import personalizer


def test_defaults() -> None:
    config = GatewayConfig.load([], environ={})
    assert config.port == DEFAULT_PORT == 50151
    assert config.workers == 1 and config.triton_model == "piaa"


def test_environment_overrides_defaults_and_flags_override_environment() -> None:
    env = {
        "PIAA_PORT": "6000",
        "PIAA_MAX_BATCH_SIZE": "8",
        "PIAA_WITH_EMBEDDING": "yes",
        "PIAA_REDIS_URL": "redis://x",
    }
    config = GatewayConfig.load(["--port", "7000", "--max-batch-delay-ms", "0.5"], environ=env)
    assert config.port == 7000  # flag beats environment
    assert config.max_batch_size == 8  # environment beats default
    assert config.max_batch_delay_ms == 0.5
    assert config.with_embedding is True
    assert config.redis_url == "redis://x"
    assert GatewayConfig.load(["--no-with-embedding"], environ=env).with_embedding is False


def test_every_field_has_a_flag_and_a_docstring_shown_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help or "" for a in parser._actions}
    docs = field_docs()
    for f in dataclasses.fields(GatewayConfig):
        assert f.name in helps
        assert len(docs.get(f.name, "")) > 10, f"{f.name} has no docstring"
        assert helps[f.name].startswith(docs[f.name]) and f"PIAA_{f.name.upper()}" in helps[f.name]
    parser.format_help()  # renders (no stray % in any help text)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PIAA_PORT": "abc"}, "PIAA_PORT"),
        ({"PIAA_WITH_EMBEDDING": "maybe"}, "PIAA_WITH_EMBEDDING"),
        ({"PIAA_WORKERS": "0"}, "workers"),
        ({"PIAA_WORKERS": "2", "PIAA_PORT": "0"}, "fixed port"),
        ({"PIAA_MAX_IMAGES_PER_REQUEST": "0"}, "max_images_per_request"),
        ({"PIAA_PORT": "70000"}, "TCP port"),
    ],
)
def test_malformed_values_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayConfig.load([], environ=env)


def test_unrelated_environment_is_ignored() -> None:
    assert GatewayConfig.load([], environ={"PIAA_NOT_A_FIELD": "1", "PATH": "/bin"}) == GatewayConfig()


def test_an_unknown_flag_is_an_error_naming_the_closest_flag() -> None:
    with pytest.raises(ValueError, match=r"--max-batch-sise.*did you mean --max-batch-size\?"):
        GatewayConfig.load(["--max-batch-sise", "8"], environ={})
    with pytest.raises(ValueError, match="unrecognized arguments: --nonsense"):
        GatewayConfig.load(["--nonsense"], environ={})
    with pytest.raises(ValueError, match="--max-batch-delay"):  # no silent abbreviations either
        GatewayConfig.load(["--max-batch-delay", "1"], environ={})


def test_an_unknown_piaa_variable_warns_with_the_closest_setting(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="piaa_personalization.config"):
        config = GatewayConfig.load([], environ={"PIAA_MAX_BATCH_SISE": "8", "PIAA_SERVER": "x:1"})
    assert config == GatewayConfig()
    (record,) = caplog.records
    assert "PIAA_MAX_BATCH_SISE" in record.getMessage()
    assert "did you mean PIAA_MAX_BATCH_SIZE?" in record.getMessage()


def test_store_settings_and_the_prior_cache_reach_the_store() -> None:
    config = GatewayConfig.load(
        [
            "--redis-key-prefix",
            "blue",
            "--redis-socket-timeout-s",
            "0.5",
            "--redis-max-connections",
            "8",
            "--redis-retries",
            "0",
            "--prior-cache-ttl-s",
            "5",
        ],
        environ={"PIAA_REDIS_URL": "redis://127.0.0.1:1/0", "PIAA_REDIS_POOL_TIMEOUT_S": "3"},
    )
    adapter = asyncio.run(personalizer.connect_store(config))  # connects lazily: no socket opened
    store_config = adapter.inner.config
    assert (store_config.key_prefix, store_config.socket_timeout_s) == ("blue", 0.5)
    assert (store_config.max_connections, store_config.retries, store_config.pool_timeout_s) == (8, 0, 3.0)
    assert adapter.prior_ttl_s == 5.0
    with pytest.raises(ValueError, match="redis_key_prefix"):
        GatewayConfig(redis_key_prefix="a:b")
