"""deploy/locust.Dockerfile and deploy/k8s/overlays/loadtest: the image carries the locustfile and what it
imports, and the rendered master and workers agree with it and with each other (no cluster, no Docker).

The overlay is also rendered, schema-validated and scanned with checkov with every other overlay
(test_deploy_k8s.py, test_deploy_k8s_checkov.py)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.dockerfiles import DEPLOY, REPO_ROOT, image_tree, instructions
from tests.unit.test_deploy_k8s import K8S, container, find, render

DOCKERFILE = DEPLOY / "locust.Dockerfile"
OVERLAY = K8S / "overlays" / "loadtest"
LOCUSTFILE = REPO_ROOT / "benchmarks" / "locustfile.py"
Doc = dict[str, Any]


def entrypoint() -> list[str]:
    (line,) = [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "ENTRYPOINT"]
    return list(ast.literal_eval(line))


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the modules `path` imports ("piaa_bench.slo" stays whole)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_image_holds_the_locustfile_and_every_piaa_bench_module_it_imports(tmp_path: Path) -> None:
    placed = image_tree(DOCKERFILE, tmp_path)
    assert entrypoint()[:2] == ["locust", "-f"]
    locustfile = entrypoint()[2]
    assert placed[locustfile] == "benchmarks/locustfile.py"
    folder = Path(locustfile).parent  # Locust puts it on sys.path
    bench = sorted(m for m in imported_modules(LOCUSTFILE) if m.startswith("piaa_bench."))
    assert bench, "the locustfile imports its helpers from piaa_bench"
    for module in bench:
        image_path = str(folder / (module.replace(".", "/") + ".py"))
        assert image_path in placed, f"{module} is not in the image"
        # ...and those helpers need nothing of ours beyond themselves (the image has no server code).
        ours = {m for m in imported_modules(REPO_ROOT / placed[image_path]) if m.startswith("piaa")}
        assert ours <= set(bench), (module, ours)
    assert str(folder / "piaa_bench" / "__init__.py") in placed
    ours = {m.split(".")[0] for m in imported_modules(LOCUSTFILE)} & {"piaa_personalization", "piaa_triton"}
    assert not ours, f"the locustfile imports server packages the image lacks: {ours}"


def test_the_image_runs_as_the_uid_the_pods_ask_for() -> None:
    (user,) = [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "USER"]
    docs = render(OVERLAY)
    for name in ("piaa-locust-master", "piaa-locust-worker"):
        security = find(docs, "Deployment", name)["spec"]["template"]["spec"]["securityContext"]
        assert user == f"{security['runAsUser']}:{security['runAsGroup']}"
        assert security["runAsUser"] >= 10000


def locustfile_variables() -> set[str]:
    """The environment variables the locustfile reads its options from: PIAA_LOCUST_<NAME> for each
    --piaa-<name> of its OPTIONS table and PIAA_LOCUST_SLO_<NAME> for each --slo-<name> of SLO_OPTIONS
    (tests/integration/test_locust.py sets one and sees it act), and those it names literally."""
    tree = ast.parse(LOCUSTFILE.read_text())
    tables = {
        node.target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None
        and node.target.id in ("OPTIONS", "SLO_OPTIONS")
    }  # fmt: skip
    names = {f"PIAA_LOCUST_{row[0]}" for row in tables["OPTIONS"]}
    names |= {f"PIAA_LOCUST_SLO_{row[0]}" for row in tables["SLO_OPTIONS"]}
    names = {n.replace("-", "_").upper() for n in names}
    return names | set(re.findall(r'env_var="(PIAA_\w+)"', LOCUSTFILE.read_text()))


def settings(docs: list[Doc]) -> dict[str, str]:
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("piaa-locust")
    ]
    return dict(config["data"])


def test_the_workers_reach_the_master_where_it_listens_and_the_policy_lets_them() -> None:
    docs = render(OVERLAY)
    master = container(find(docs, "Deployment", "piaa-locust-master"), "locust")
    worker_deployment = find(docs, "Deployment", "piaa-locust-worker")
    worker = container(worker_deployment, "locust")
    bind = int(master["args"][master["args"].index("--master-bind-port") + 1])
    host = worker["args"][worker["args"].index("--master-host") + 1]
    port = int(worker["args"][worker["args"].index("--master-port") + 1])
    service = find(docs, "Service", host)
    (target,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert {p["name"]: p["containerPort"] for p in master["ports"]}[target["targetPort"]] == bind
    assert (
        service["spec"]["selector"].items()
        <= find(docs, "Deployment", "piaa-locust-master")["spec"]["template"]["metadata"]["labels"].items()
    )
    policy = find(docs, "NetworkPolicy", "piaa-locust-master-ingress")
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [bind]
    worker_labels = worker_deployment["spec"]["template"]["metadata"]["labels"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= worker_labels.items()


def test_settings_are_options_of_the_locustfile_and_name_the_gateway_and_the_mounted_key() -> None:
    docs = render(OVERLAY)
    values = settings(docs)
    known = locustfile_variables()
    assert len(known) > 20 and "PIAA_LOCUST_SLO_P99_MS" in known, known
    assert {k for k in values if k.startswith("PIAA_")} <= known, set(values) - known
    # The gateway as every stack overlay deploys it: its Service in namespace piaa, on its gRPC port.
    gateway = find(render(K8S / "overlays" / "cpu"), "Service", "piaa-gateway")
    (grpc_port,) = [p["port"] for p in gateway["spec"]["ports"] if p["name"] == "grpc"]
    assert (
        values["LOCUST_HOST"]
        == f"piaa-gateway.{gateway['metadata']['namespace']}.svc.cluster.local:{grpc_port}"
    )
    # The API key file is where the workers mount the Secret (the master only sends them the path).
    worker = find(docs, "Deployment", "piaa-locust-worker")
    (mount,) = [m for m in container(worker, "locust")["volumeMounts"] if m["name"] == "api-key"]
    (volume,) = [v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-key"]
    assert Path(values["PIAA_LOCUST_TOKEN_FILE"]).parent == Path(mount["mountPath"])
    assert volume["secret"]["secretName"] == "piaa-loadtest-key"
    assert not [d for d in docs if d["kind"] == "Secret"], "the key is created by hand, never committed"


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
