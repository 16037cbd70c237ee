"""The store's operator commands and the redis-server process class, against real redis-servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from piaa_personalization.store import tools as store_tools
from piaa_personalization.store.redis_server import RedisServer, RedisServerError, find_redis_server, link


def test_bench_and_learn_prior_commands(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--redis-url", redis_url, "--users", "8", "--concurrent", "12", "--repeat", "1"]
    assert store_tools.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["users"] == 8 and out["get_profiles_batch_ms"] > 0 and out["fit_d85_ms"] > 0
    with redis.Redis.from_url(redis_url) as c:
        assert c.keys("*{t:bench:*") == []  # the bench cleans up after itself
    assert store_tools.main(["learn-prior", "--redis-url", redis_url, "--tenant", "empty"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "tenant": "empty", "layout": "fs1/paper20", "users": 0, "stored": False
    }  # fmt: skip


def test_link_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "bin" / "redis-server"
    assert link(target).startswith("linked")
    assert link(target).startswith("up to date")
    assert target.resolve() == find_redis_server()
    out = subprocess.run(
        [sys.executable, "-m", "piaa_personalization.store.redis_server", "--link", str(target)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "up to date" in out.stdout and "Redis server v=" in out.stdout


def test_redis_server_options_and_clean_stop() -> None:
    with RedisServer(password="pw", appendonly=True) as server:
        with redis.Redis.from_url(server.url) as c:
            assert c.config_get("appendonly") == {"appendonly": "yes"}
            assert c.config_get("appendfsync") == {"appendfsync": "everysec"}
        with pytest.raises(redis.AuthenticationError), redis.Redis(port=server.port) as anonymous:
            anonymous.set("k", "v")
        proc, workdir = server.process, server.workdir
    assert proc is not None and proc.returncode is not None
    assert workdir is not None and not workdir.exists()


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'cannot start: test' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RedisServerError, match="cannot start: test"):
        RedisServer(binary=fake, startup_timeout_s=2).start()
