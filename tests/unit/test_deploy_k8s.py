"""deploy/k8s: every manifest against the Kubernetes schemas, every overlay rendered, and agreement with
the gateway's config, the Triton launcher and the gateway's metrics (no cluster, no network)."""

from __future__ import annotations

import importlib.util
import re
import sys
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
OVERLAYS = ("gpu", "cpu")
# Overlays on top of a profile's overlay, with that profile.
DERIVED = {"redis-cluster": "gpu"}
PROFILE = {**{o: o for o in OVERLAYS}, **DERIVED}
# The oldest Kubernetes we claim (gRPC probes are GA since 1.27) and the newest schemas bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
NOT_CORE = {"monitoring.coreos.com/v1"}  # CRDs: checked structurally below
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


def render(folder: Path) -> list[Doc]:
    """What `kubectl apply -k folder` applies: `resources` followed depth first, then `patches` in order,
    each a strategic merge patch of one resource (`merge`). Fails on any other kustomize feature."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, "renderer: unknown field"
    out: list[Doc] = []
    for entry in kustomization["resources"]:
        target = (folder / entry).resolve()
        assert target.exists(), f"{folder}/kustomization.yaml names missing {entry}"
        out += render(target) if target.is_dir() else docs_of(target)
    for entry in kustomization.get("patches", []):
        assert set(entry) in ({"path"}, {"patch"}), f"renderer: patch without a target only, got {entry}"
        text = (folder / entry["path"]).read_text() if "path" in entry else entry["patch"]
        (patch,) = [d for d in yaml.safe_load_all(text) if d is not None]  # kustomize: one per entry
        key = (patch["kind"], patch["metadata"]["name"])
        (i,) = [i for i, d in enumerate(out) if (d["kind"], d["metadata"]["name"]) == key]
        if patch.get("$patch") == "delete":
            del out[i]
        else:
            out[i] = merge(out[i], patch)
    return out


def merge(doc: Any, patch: Any) -> Any:
    """The strategic merge patch our overlays use: maps merged key by key; lists of maps with a `name`
    (containers, env: their patchMergeKey) merged by name, the patch's items first in its order, then
    the others (what kustomize 5.5 does: `kubectl kustomize` renders the same); other values replaced."""
    if isinstance(doc, dict) and isinstance(patch, dict):
        return {**doc, **{k: merge(doc[k], v) if k in doc else v for k, v in patch.items()}}
    if isinstance(doc, list) and isinstance(patch, list) and all("name" in x for x in doc + patch):
        old = {x["name"]: x for x in doc}
        named = {x["name"] for x in patch}
        return [merge(old[x["name"]], x) if x["name"] in old else x for x in patch] + [
            x for x in doc if x["name"] not in named
        ]
    return patch


def patch_files() -> set[Path]:
    """The files that kustomizations name as patches: partial manifests, checked once rendered."""
    out = set()
    for k in K8S.rglob("kustomization.yaml"):
        out |= {
            (k.parent / e["path"]).resolve()
            for e in yaml.safe_load(k.read_text()).get("patches", [])
            if "path" in e
        }
    return out


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest we ship (Helm values for prometheus-adapter are not manifests)."""
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    files = [p for p in files if p.resolve() not in patch_files()]
    return [p for p in files if "monitoring" not in p.relative_to(K8S).parts]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(deployment: Doc, name: str, init: bool = False) -> Doc:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def port_of(c: Doc, name: str) -> int:
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name))


def env_of(c: Doc) -> dict[str, str]:
    """The container's plain env values, with $(VAR) references to secrets replaced by a placeholder."""
    values = {e["name"]: e.get("value", "secret") for e in c.get("env", [])}
    return {
        k: re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), v) for k, v in values.items()
    }


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=[*OVERLAYS, *DERIVED])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = docs_of(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        assert doc.get("metadata", {}).get("name"), f"{path}: a document without a name"
        if doc["apiVersion"] in NOT_CORE:
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path


@pytest.mark.parametrize("overlay", list(DERIVED))
def test_patched_overlays_render_valid_manifests(overlay: str) -> None:
    """An overlay's patches are partial manifests: what they render to must pass the same schemas."""
    docs = render(K8S / "overlays" / overlay)
    for doc in docs:
        if doc["apiVersion"] not in NOT_CORE:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


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
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used += 1
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
        for v in spec.get("volumes", []):
            if "secret" in v:
                used += 1
                assert v["secret"]["secretName"] in secrets
    assert used >= 3


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
