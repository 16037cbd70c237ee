"""deploy/k8s: every overlay rendered by `kubectl kustomize` (kustomize 5.5) and checked against the
Kubernetes schemas, and agreement with the gateway's config, the Triton launcher and the gateway's metrics
(no cluster, no network: kubectl renders locally)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from piaa_personalization.config import ENV_PREFIX, GatewayConfig
from piaa_personalization.core.metrics import STAGES, Metrics
from piaa_triton.repository import ENSEMBLE

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(k.parent.name for k in (K8S / "overlays").glob("*/kustomization.yaml"))
"""Every overlay, found on disk: one added later is rendered, validated and scanned without a change here."""
PROFILE = {"gpu": "gpu", "cpu": "cpu", "redis-cluster": "gpu"}
"""The overlays that deploy the whole stack, with their Triton profile; the others add to a stack."""
STACKS = [o for o in OVERLAYS if o in PROFILE]
# The oldest Kubernetes we claim (gRPC probes are GA since 1.27) and the newest schemas bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
NOT_CORE = {"monitoring.coreos.com/v1"}  # CRDs: checked structurally below
NOT_DEPLOYED_YET = {"piaa-history"}
"""ServiceMonitors whose workload no manifest runs yet (the history writer): they may select no Service."""
SECRET_FILES = "/etc/piaa/redis"
"""Where the workloads mount the piaa-redis Secret's keys as files (no password in an env var)."""
Doc = dict[str, Any]


def load_launch() -> ModuleType:
    """deploy/triton/launch.py (a script, not a package) as a module, loaded once per session."""
    name = "piaa_deploy_launch"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, K8S.parent / "triton" / "launch.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


LAUNCH = load_launch()


def docs_of(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubectl() -> str:
    """The kubectl binary; fails the test (never skips) when there is none."""
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.fail(
            "kubectl is not on PATH: the deploy tests render every overlay with `kubectl kustomize` "
            "(kustomize 5.5, built into kubectl >= 1.31). Install kubectl and run the tests again."
        )
    return binary


@functools.cache
def rendered_text(folder: Path) -> str:
    """`kubectl kustomize folder`: exactly what `kubectl apply -k folder` would apply, as YAML."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {folder} failed:\n{out.stderr}"
    return out.stdout


def render(folder: Path) -> list[Doc]:
    """The documents `kubectl kustomize folder` renders (parsed afresh: callers may change them)."""
    return [d for d in yaml.safe_load_all(rendered_text(folder.resolve())) if d is not None]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(deployment: Doc, name: str, init: bool = False) -> Doc:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def port_of(c: Doc, name: str) -> int:
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name))


@functools.cache
def placeholder_secret() -> Path:
    """A file holding "secret", standing in for a Secret's key mounted as a file (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="piaa-k8s-secret-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "password").write_text("secret\n")
    return folder / "password"


def env_of(c: Doc) -> dict[str, str]:
    """The container's plain env values, $(VAR) references expanded, and the Secret files it names
    (PIAA_REDIS_PASSWORD_FILE under SECRET_FILES) replaced by a placeholder file that says "secret"."""
    values = {e["name"]: e.get("value", "secret") for e in c.get("env", [])}
    env = {
        k: re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), v) for k, v in values.items()
    }
    for key, value in env.items():
        if key.endswith("_FILE") and value.startswith(SECRET_FILES + "/"):
            env[key] = str(placeholder_secret())
    return env


def secret_file(pod: Doc, c: Doc, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in container `c` of a pod spec: a readOnly mount of a
    secret volume that projects exactly that key to that file. Fails the test otherwise."""
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{c['name']}: {path} is on no mount (or on several)"
    mount = mounts[0]
    assert mount.get("readOnly"), f"{c['name']}: the mount of {path} is writable"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, f"{c['name']}: {path} is not a Secret's file"
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    keys = [i["key"] for i in volume["secret"].get("items", []) if i["path"] == relative]
    assert len(keys) == 1, f"{c['name']}: {path} is no item of {volume['secret']['secretName']}"
    return volume["secret"]["secretName"], keys[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=STACKS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """An overlay that deploys the whole stack, rendered."""
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module", params=OVERLAYS)
def any_overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """Any overlay, rendered (those that add to a stack as well)."""
    return request.param, render(K8S / "overlays" / request.param)


def test_the_overlays_are_found_and_the_stacks_among_them_known() -> None:
    assert set(PROFILE) <= set(OVERLAYS), f"stack overlays missing on disk: {set(PROFILE) - set(OVERLAYS)}"
    for overlay in set(OVERLAYS) - set(PROFILE):  # an add-on must not carry a second copy of the stack
        names = {(d["kind"], d["metadata"]["name"]) for d in render(K8S / "overlays" / overlay)}
        assert not names & {("Deployment", "piaa-gateway"), ("Deployment", "piaa-triton")}, (
            f"overlays/{overlay} deploys the stack: add it to PROFILE so the stack's tests check it"
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_rendered_manifest_is_valid_against_the_kubernetes_schemas(folder: str, version: str) -> None:
    docs = render(K8S / folder)
    assert docs, f"{folder} renders no manifest"
    for doc in docs:
        assert doc.get("metadata", {}).get("name"), f"{folder}: a document without a name"
        if doc["apiVersion"] in NOT_CORE:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{folder}: {doc['kind']}/{doc['metadata']['name']}: {err}")


def kustomization_files(folder: Path) -> set[Path]:
    """The files a kustomization names: resources that are files, patch files, generators' files."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    named = [*k.get("resources", []), *k.get("patchesStrategicMerge", [])]
    named += [p["path"] for p in k.get("patches", []) if "path" in p]
    for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        named += [f.rpartition("=")[2] for f in generator.get("files", [])]
    return {(folder / n).resolve() for n in named if (folder / n).is_file()}


def test_every_manifest_file_is_part_of_a_kustomization() -> None:
    """A YAML file that no kustomization names is never rendered, so never validated or scanned."""
    folders = [K8S / "base", *(K8S / "overlays" / o for o in OVERLAYS)]
    named = set().union(*(kustomization_files(f) for f in folders))
    files = {p.resolve() for f in folders for p in f.glob("*.yaml") if p.name != "kustomization.yaml"}
    files -= {(K8S / "base" / "secrets.template.yaml").resolve()}  # applied by hand, filled (see its header)
    assert not files - named, f"not in any kustomization: {sorted(str(p) for p in files - named)}"


def test_no_overlay_renders_a_resource_twice(any_overlay: tuple[str, list[Doc]]) -> None:
    overlay, docs = any_overlay
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{overlay}: a resource is defined twice"


def test_the_schema_check_rejects_a_broken_manifest() -> None:
    """Control: strict validation does fail on a misspelt field (the test above can fail)."""
    deployment = find(render(K8S / "overlays" / "gpu"), "Deployment", "piaa-gateway")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_each_overlay_renders_the_whole_stack_once(rendered: tuple[str, list[Doc]]) -> None:
    overlay, docs = rendered
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "a resource is defined twice"
    for kind, name in [
        ("Namespace", "piaa"),
        ("Deployment", "piaa-gateway"), ("Service", "piaa-gateway"),
        ("HorizontalPodAutoscaler", "piaa-gateway"), ("PodDisruptionBudget", "piaa-gateway"),
        ("Deployment", "piaa-triton"), ("Service", "piaa-triton"),
        ("HorizontalPodAutoscaler", "piaa-triton"), ("PodDisruptionBudget", "piaa-triton"),
        ("ServiceMonitor", "piaa-gateway"), ("ServiceMonitor", "piaa-triton"),
        ("NetworkPolicy", "default-deny-ingress"),
    ]:  # fmt: skip
        assert (kind, name) in keys, f"missing {kind}/{name}"
    single = [("StatefulSet", "piaa-redis"), ("Service", "piaa-redis"), ("ConfigMap", "piaa-redis")]
    cluster = [
        ("StatefulSet", "piaa-redis-cluster"), ("Service", "piaa-redis-cluster-headless"),
        ("Service", "piaa-redis-cluster"), ("PodDisruptionBudget", "piaa-redis-cluster"),
        ("Job", "piaa-redis-cluster-init"), ("ConfigMap", "piaa-redis-cluster"),
    ]  # fmt: skip
    present, absent = (cluster, single) if overlay == "redis-cluster" else (single, cluster)
    assert set(present) <= set(keys), f"{overlay}: missing {set(present) - set(keys)}"
    assert not set(absent) & set(keys), f"{overlay}: {set(absent) & set(keys)} should not be there"
    assert {d["metadata"].get("namespace", "piaa") for d in docs} == {"piaa"}


def test_gateway_env_parses_with_the_gateways_own_config(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    gateway = container(find(docs, "Deployment", "piaa-gateway"), "gateway")
    env = env_of(gateway)
    fields = {ENV_PREFIX + f.upper() for f in GatewayConfig.__dataclass_fields__}
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - fields
    assert not unknown, f"env vars the gateway does not read: {unknown}"
    config = GatewayConfig.load([], env)  # raises on a malformed value
    assert config.host == "0.0.0.0" and config.workers == 1
    assert config.triton_model == ENSEMBLE
    assert config.port == port_of(gateway, "grpc")
    assert config.metrics_port == port_of(gateway, "metrics")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["grpc"]["port"] == config.port, probe
    pod = find(docs, "Deployment", "piaa-gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_grace_s


def test_the_redis_password_reaches_the_gateway_and_redis_as_a_file(rendered: tuple[str, list[Doc]]) -> None:
    """The gateway reads the password that Redis requires (standalone: the same key; the cluster's gateway
    user: test_deploy_k8s_redis_cluster), each from a file of the piaa-redis Secret."""
    _, docs = rendered
    deployment = find(docs, "Deployment", "piaa-gateway")
    gateway = container(deployment, "gateway")
    path = next(e["value"] for e in gateway["env"] if e["name"] == ENV_PREFIX + "REDIS_PASSWORD_FILE")
    clustered = any(d["metadata"]["name"] == "piaa-redis-cluster" for d in docs if d["kind"] == "StatefulSet")
    key = "gateway-password" if clustered else "password"
    assert secret_file(deployment["spec"]["template"]["spec"], gateway, path) == ("piaa-redis", key)
    if clustered:
        return
    statefulset = find(docs, "StatefulSet", "piaa-redis")
    pod, redis = statefulset["spec"]["template"]["spec"], container(statefulset, "redis")
    (start,) = [a for a in redis["command"] if "requirepass" in a]
    probes = [" ".join(redis[p]["exec"]["command"]) for p in ("readinessProbe", "livenessProbe")]
    for script in (start, *probes):
        files = re.findall(r"\$\(cat (/\S+)\)", script)
        assert files, f"reads no password file: {script}"
        assert {secret_file(pod, redis, f) for f in files} == {("piaa-redis", "password")}, script


def test_gateway_reaches_triton_and_redis_by_their_service_names_and_ports(
    rendered: tuple[str, list[Doc]],
) -> None:
    _, docs = rendered
    config = GatewayConfig.load([], env_of(container(find(docs, "Deployment", "piaa-gateway"), "gateway")))
    triton_host, triton_port = config.triton_url.rsplit(":", 1)
    triton_service = find(docs, "Service", triton_host)
    grpc = next(p for p in triton_service["spec"]["ports"] if p["name"] == "grpc")
    assert int(triton_port) == grpc["port"] == LAUNCH.GRPC_PORT
    triton = container(find(docs, "Deployment", "piaa-triton"), "triton")
    assert port_of(triton, grpc["targetPort"]) == LAUNCH.GRPC_PORT
    redis_url = re.match(r"redis://(\w*):[^@]+@([\w-]+):(\d+)/0$", config.redis_url)
    assert redis_url, config.redis_url
    redis_service = find(docs, "Service", redis_url.group(2))
    assert int(redis_url.group(3)) in [p["port"] for p in redis_service["spec"]["ports"]]
    clustered = any(
        d["kind"] == "StatefulSet" and d["metadata"]["name"] == "piaa-redis-cluster" for d in docs
    )
    assert config.redis_mode == ("cluster" if clustered else "standalone")
    # on the cluster, the least-privilege ACL user the cluster's nodes define (test_deploy_k8s_redis_cluster)
    assert redis_url.group(1) == ("piaa" if clustered else "")


def test_triton_runs_the_launcher_with_its_ports_probes_and_shm(rendered: tuple[str, list[Doc]]) -> None:
    overlay, docs = rendered
    profile = PROFILE[overlay]
    deployment = find(docs, "Deployment", "piaa-triton")
    triton = container(deployment, "triton")
    args = LAUNCH.build_parser().parse_args(triton["args"])
    assert (args.command, args.profile) == ("serve", profile)
    assert port_of(triton, "http") == LAUNCH.HTTP_PORT
    assert port_of(triton, "metrics") == LAUNCH.METRICS_PORT
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "startupProbe"):
        assert triton[probe]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert port_of(triton, triton[probe]["httpGet"]["port"]) == LAUNCH.HTTP_PORT
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    shm = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_gpu_triton_builds_engines_first_on_the_gpu_it_serves_from() -> None:
    docs = render(K8S / "overlays" / "gpu")
    deployment = find(docs, "Deployment", "piaa-triton")
    engines = container(deployment, "engines", init=True)
    triton = container(deployment, "triton")
    args = LAUNCH.build_parser().parse_args(engines["args"])
    assert (args.command, args.profile, args.engines) == ("prepare", "gpu", True)
    assert engines["image"] == triton["image"], "engines must be built by the TensorRT Triton runs"
    served = LAUNCH.build_parser().parse_args(triton["args"]).repository
    assert [m["mountPath"] for m in engines["volumeMounts"] if m["name"] == "models"] == [str(args.out)]
    assert [m["mountPath"] for m in triton["volumeMounts"] if m["name"] == "models"] == [str(served)]
    for c in (engines, triton):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cpu_triton_gets_whole_cores_and_no_gpu() -> None:
    triton = container(find(render(K8S / "overlays" / "cpu"), "Deployment", "piaa-triton"), "triton")
    resources = triton["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    # The launcher plans ONNX Runtime threads from the cgroup quota: an integer limit, equal to the request.
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert float(resources["limits"]["cpu"]).is_integer()


def test_secret_references_exist_in_the_template(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    secrets = {d["metadata"]["name"]: d for d in docs_of(K8S / "base" / "secrets.template.yaml")}
    assert all(d["kind"] == "Secret" for d in secrets.values())
    assert not [d for d in docs if d["kind"] == "Secret"], "real Secrets must not be part of the overlays"
    used = 0
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")):
        spec = workload["spec"]["template"]["spec"]
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            refs = [e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert not refs, f"{c['name']}: secrets as env vars {refs}: mount them as files"
        for v in spec.get("volumes", []):
            if "secret" in v:
                used += 1
                data = secrets[v["secret"]["secretName"]]["stringData"]
                assert {i["key"] for i in v["secret"].get("items", [])} <= set(data), v
    assert used >= 3  # the API keys, and the Redis password for the gateway and for Redis


def test_only_the_gateway_reaches_triton_and_redis(rendered: tuple[str, list[Doc]]) -> None:
    """Triton's gRPC port and Redis only from the gateway; a Redis Cluster's nodes also from each other
    (replication, and the cluster bus only from them) and from the Job that forms the cluster."""
    _, docs = rendered
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = find(docs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    names = {d["metadata"]["name"] for d in docs if "template" in d.get("spec", {})}
    gateway, cluster, init = "piaa-gateway", "piaa-redis-cluster", "piaa-redis-cluster-init"
    fences = [("piaa-triton", LAUNCH.GRPC_PORT, {gateway}), ("piaa-redis", 6379, {gateway})]
    fences += [(cluster, 6379, {gateway, init, cluster}), (cluster, 16379, {cluster})]
    assert {"piaa-redis", cluster} & names
    for name, port, allowed in (f for f in fences if f[0] in names):
        workload = next(d for d in docs if d["metadata"]["name"] == name and "template" in d.get("spec", {}))
        labels = workload["spec"]["template"]["metadata"]["labels"]
        rules = [
            rule
            for p in policies
            if p["spec"]["podSelector"] and matches(p["spec"]["podSelector"]["matchLabels"], labels)
            for rule in p["spec"].get("ingress", [])
            if any(x["port"] == port for x in rule.get("ports", []))
        ]
        assert rules, f"nothing may reach {name}:{port}"
        for rule in rules:
            sources = rule.get("from")
            assert sources, f"{name}:{port} is open to every pod"
            for source in sources:
                assert set(source) == {"podSelector"}, f"{name}:{port} open beyond the namespace's pods"
                source_name = source["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                assert source_name in allowed, f"{source_name} reaches {name}:{port}"
                pods = [
                    d
                    for d in docs
                    if d["metadata"]["name"] == source_name and "template" in d.get("spec", {})
                ]
                assert len(pods) == 1, f"{name}:{port}: the source {source_name} is no workload here"
                assert matches(
                    source["podSelector"]["matchLabels"], pods[0]["spec"]["template"]["metadata"]["labels"]
                )


def test_selectors_of_services_pdbs_and_monitors_select_real_pods(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    services = [d for d in docs if d["kind"] == "Service"]
    for doc in docs:
        if doc["kind"] == "Service":
            pods = [
                w
                for w in workloads
                if matches(doc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(pods) == 1, doc["metadata"]["name"]
            for p in doc["spec"]["ports"]:
                port_of(next(iter(pods[0]["spec"]["template"]["spec"]["containers"])), p["targetPort"])
        if doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert any(matches(selector, w["spec"]["template"]["metadata"]["labels"]) for w in workloads)
        if doc["kind"] == "ServiceMonitor":  # the CRD's shape, checked by hand (not a core schema)
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(doc["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
            selected = [
                s
                for s in services
                if matches(doc["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
            ]
            if not selected and doc["metadata"]["name"] in NOT_DEPLOYED_YET:
                continue
            assert len(selected) == 1, doc["metadata"]["name"]
            names = {p["name"] for p in selected[0]["spec"]["ports"]}
            for endpoint in doc["spec"]["endpoints"]:
                assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
                assert endpoint["port"] in names and endpoint["path"] == "/metrics"


def test_autoscalers_use_metrics_that_the_adapter_defines_from_real_series(
    rendered: tuple[str, list[Doc]],
) -> None:
    _, docs = rendered
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = {r["name"]["as"]: r for r in values["rules"]["custom"]}
    gateway_series = {m.name for m in Metrics().registry.collect()}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        find(docs, target["kind"], target["name"])
        assert hpa["spec"]["minReplicas"] >= 2, "one replica leaves the PodDisruptionBudget nothing to keep"
        custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert custom, f"{hpa['metadata']['name']} scales on no Prometheus metric"
        for name in custom:
            query = rules[name]["metricsQuery"]
            if name.startswith("piaa_gateway"):
                used = set(re.findall(r"(piaa_\w+?)(?:_sum|_count)?\{", query))
                assert used and used <= gateway_series, used
                assert set(re.findall(r'stage="(\w+)"', query)) <= set(STAGES)
            else:
                assert "nv_inference_queue_duration_us" in query and 'model="backbone"' in query
