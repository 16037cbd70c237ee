"""redis_password_file: the Redis password read from a mounted Secret into redis_url when the config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from piaa_personalization.config import GatewayConfig


def test_the_password_file_fills_the_urls_password(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr/t@:x\n")  # as `kubectl create secret --from-file` of an echoed value keeps it
    env = {"PIAA_REDIS_URL": "redis://redis:6379/0", "PIAA_REDIS_PASSWORD_FILE": str(secret)}
    assert GatewayConfig.load([], env).redis_url == "redis://:s3cr%2Ft%40%3Ax@redis:6379/0"
    flags = ["--redis-url", "redis://piaa@node:7000/0", "--redis-password-file", str(secret)]
    assert GatewayConfig.load(flags, {}).redis_url == "redis://piaa:s3cr%2Ft%40%3Ax@node:7000/0"


def test_redis_py_reads_back_the_password_and_user(tmp_path: Path) -> None:
    """The quoted password is what redis-py sends (its URL parser unquotes it)."""
    from redis.connection import parse_url

    secret = tmp_path / "password"
    secret.write_text("p@ss word/:%")
    env = {"PIAA_REDIS_URL": "redis://piaa@node:7000/0", "PIAA_REDIS_PASSWORD_FILE": str(secret)}
    parsed = parse_url(GatewayConfig.load([], env).redis_url)
    assert (parsed["username"], parsed["password"], parsed["host"]) == ("piaa", "p@ss word/:%", "node")


@pytest.mark.parametrize(
    ("url", "content", "error"),
    [
        ("redis://:inline@redis:6379/0", "file", "names a password"),
        ("", "file", "needs redis_url"),
        ("redis://redis:6379/0", "\n", "is empty"),
        ("redis://redis:6379/0", None, "cannot read"),
    ],
)
def test_a_missing_empty_or_conflicting_password_is_refused(
    tmp_path: Path, url: str, content: str | None, error: str
) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    env = {"PIAA_REDIS_URL": url, "PIAA_REDIS_PASSWORD_FILE": str(secret)}
    with pytest.raises(ValueError, match=error):
        GatewayConfig.load([], env)


def test_without_the_file_the_url_is_kept_as_given() -> None:
    env = {"PIAA_REDIS_URL": "redis://:inline@redis:6379/0"}
    assert GatewayConfig.load([], env).redis_url == "redis://:inline@redis:6379/0"
