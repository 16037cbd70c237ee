"""deploy/k8s/overlays/redis-cluster: the 6-node Redis Cluster, its init Job and the gateway on it agree with
each other and with the store (ACL rules, cluster settings the store's durable writes rely on)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from piaa_personalization.config import GatewayConfig
from piaa_personalization.store.redis_store import acl_rules
from tests.unit.test_deploy_k8s import K8S, Doc, container, env_of, find, render, secret_file

NAME = "piaa-redis-cluster"


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return render(K8S / "overlays" / "redis-cluster")


def conf_of(docs: list[Doc]) -> dict[str, str]:
    """redis.conf of the cluster's ConfigMap as {directive: value}."""
    text = find(docs, "ConfigMap", NAME)["data"]["redis.conf"]
    lines = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {k: v for k, v in lines}


def shell_check(shell: str, script: str) -> None:
    """`<shell> -n` on the script: it parses (does not run it)."""
    binary = shutil.which(shell)
    assert binary, f"{shell} is needed to check the manifests' scripts"
    out = subprocess.run([binary, "-n", "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_six_nodes_with_state_on_the_volume_and_aof(docs: list[Doc]) -> None:
    statefulset = find(docs, "StatefulSet", NAME)
    assert statefulset["spec"]["replicas"] == 6  # 3 primaries, one replica each (the init Job)
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    conf = conf_of(docs)
    assert conf["cluster-enabled"] == "yes" and conf["appendonly"] == "yes"
    assert conf["cluster-require-full-coverage"] == "no"  # as LocalCluster, which the tests fail over
    redis = container(statefulset, "redis")
    data = next(m["mountPath"] for m in redis["volumeMounts"] if m["name"] == "data")
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    assert claims == ["data"]
    assert conf["dir"] == data and Path(conf["cluster-config-file"]).parent == Path(data)
    ports = {p["name"]: p["containerPort"] for p in redis["ports"]}
    assert ports == {"redis": int(conf["port"]), "cluster-bus": int(conf["port"]) + 10000}


def test_the_start_script_announces_the_pod_ip_and_defines_the_gateways_user(docs: list[Doc]) -> None:
    config_map = find(docs, "ConfigMap", NAME)["data"]
    statefulset = find(docs, "StatefulSet", NAME)
    redis = container(statefulset, "redis")
    mount = next(m["mountPath"] for m in redis["volumeMounts"] if m["name"] == "config")
    assert redis["command"] == ["sh", f"{mount}/start.sh"]
    start = config_map["start.sh"]
    shell_check("sh", start)
    env = {e["name"]: e for e in redis["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "cluster-announce-ip %s" in start and '"$POD_IP"' in start
    assert f"{mount}/redis.conf" in start and f"{mount}/piaa-user.acl" in start
    # the runtime file the script writes is the one redis.conf includes
    runtime = re.search(r"> (/\S+)$", start, re.MULTILINE)
    assert runtime and conf_of(docs)["include"] == runtime.group(1)
    assert "requirepass" in start and "masterauth" in start  # replicas authenticate to their primaries
    # the ACL user: exactly the store's rules, under the name and password the gateway connects with
    assert config_map["piaa-user.acl"].split() == acl_rules()
    user = re.search(r"user (\w+) on >%s", start)
    assert user, start
    deployment = find(docs, "Deployment", "piaa-gateway")
    gateway = container(deployment, "gateway")
    config = GatewayConfig.load([], env_of(gateway))
    assert config.redis_mode == "cluster" and config.redis_url.startswith(f"redis://{user.group(1)}:")
    # The passwords: files of the Secret, the gateway's user's the same key as the gateway reads.
    pod = statefulset["spec"]["template"]["spec"]
    read = dict(re.findall(r'^(\w+)="\$\(cat (/\S+)\)"$', start, re.MULTILINE))
    assert "printf 'user piaa on >%s %s\\n' \"$gateway_password\"" in start, start
    assert secret_file(pod, redis, read["gateway_password"]) == ("piaa-redis", "gateway-password")
    assert secret_file(pod, redis, read["password"]) == ("piaa-redis", "password")
    path = next(e["value"] for e in gateway["env"] if e["name"] == "PIAA_REDIS_PASSWORD_FILE")
    assert secret_file(deployment["spec"]["template"]["spec"], gateway, path) == (
        "piaa-redis",
        "gateway-password",
    )
    for probe in ("readinessProbe", "livenessProbe"):
        files = re.findall(r"\$\(cat (/\S+)\)", " ".join(redis[probe]["exec"]["command"]))
        assert [secret_file(pod, redis, f) for f in files] == [("piaa-redis", "password")], probe


def test_services_and_disruption_budget(docs: list[Doc]) -> None:
    statefulset = find(docs, "StatefulSet", NAME)
    headless = find(docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert {p["name"] for p in headless["spec"]["ports"]} == {"redis", "cluster-bus"}
    gateway = GatewayConfig.load([], env_of(container(find(docs, "Deployment", "piaa-gateway"), "gateway")))
    seed = re.match(r"redis://\w+:[^@]+@([\w-]+):(\d+)/0$", gateway.redis_url)
    assert seed, gateway.redis_url
    service = find(docs, "Service", seed.group(1))
    assert service["spec"].get("clusterIP") != "None", "the seed is any ready node, not a not-ready one"
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert int(seed.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    pdb = find(docs, "PodDisruptionBudget", NAME)
    assert pdb["spec"]["maxUnavailable"] == 1  # one node at a time: its replica takes over
    assert pdb["spec"]["selector"] == statefulset["spec"]["selector"]


def test_the_init_job_forms_the_cluster_once(docs: list[Doc]) -> None:
    statefulset = find(docs, "StatefulSet", NAME)
    job = find(docs, "Job", f"{NAME}-init")
    create = container(job, "create")
    assert create["image"] == container(statefulset, "redis")["image"]  # the same redis-cli
    assert create["command"] == ["bash", "-c"]
    (script,) = create["args"]
    shell_check("bash", script)
    env = {e["name"]: e.get("value") for e in create["env"]}
    assert env["STATEFULSET"] == statefulset["metadata"]["name"]
    assert env["SERVICE"] == statefulset["spec"]["serviceName"]
    assert int(env["NODES"]) == statefulset["spec"]["replicas"]
    assert int(env["PORT"]) == int(conf_of(docs)["port"])
    # the nodes require a password: redis-cli's, from the Secret's file
    assert secret_file(job["spec"]["template"]["spec"], create, env["REDIS_PASSWORD_FILE"]) == (
        "piaa-redis",
        "password",
    )
    assert re.search(
        r'^\s*REDISCLI_AUTH="\$\(cat "\$REDIS_PASSWORD_FILE"\)"\s+export REDISCLI_AUTH', script, re.M
    )
    # idempotent: leaves an ok cluster alone and never re-creates a formed one
    skip, refuse = script.index("cluster_state:ok"), script.index("cluster_known_nodes")
    create_at = re.search(r"^\s*redis-cli --cluster create ", script, re.MULTILINE)
    assert create_at, script
    assert skip < refuse < create_at.start()
    assert "--cluster-replicas 1" in script and "--cluster-yes" in script
    assert "sort -u" in script  # six distinct addresses, or no create: it would join duplicates happily
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
