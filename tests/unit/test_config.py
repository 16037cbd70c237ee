"""Gateway config: defaults < environment < flags, typed parsing, validation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from piaa_personalization.config import DEFAULT_PORT, GatewayConfig, add_arguments, field_docs


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
