"""deploy/monitoring: the generated files are current, promtool checks the rules and runs their unit tests
(every alert firing and not firing), the PrometheusRule kustomize renders holds the same groups as compose's
rule file, and every metric, label value and runbook the dashboard and rules name exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from piaa_personalization.core import metrics as gateway_metrics
from piaa_personalization.core.metrics import STAGES, Metrics
from piaa_personalization.core.types import FALLBACK_REASONS
from piaa_personalization.history.writer import WriterMetrics
from tests.deploy_scripts import load
from tests.unit.test_deploy_k8s_checkov import CHECKOV, run_checkov

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
COMPOSE = REPO / "deploy" / "compose"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "monitoring" / "piaa-rules.test.yml"
GEN = load("monitoring/generate.py")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """promtool (Debian's prometheus package, scripts/test_deps.sh); fails the test when it is missing."""
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: apt-get install prometheus (scripts/test_deps.sh does, as root)"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def all_exprs() -> list[str]:
    """Every PromQL expression: each dashboard target and each rule."""
    exprs = [query.expr for row in GEN.rows() for panel in row.panels for query in panel.queries]
    return exprs + [rule["expr"] for group in GEN.rule_groups() for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for group in GEN.rule_groups() for rule in group["rules"] if "alert" in rule]


def test_generated_files_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert GEN.main(["--check"]) == 0, capsys.readouterr().out


def test_promtool_checks_the_rule_file() -> None:
    done = promtool("check", "rules", str(GEN.RULES_FILE))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = sum(len(g["rules"]) for g in GEN.rule_groups())
    assert f"SUCCESS: {rules} rules found" in done.stdout


def test_promtool_unit_tests_pass_with_every_alert_firing_and_not_firing() -> None:
    done = promtool("test", "rules", PROMTOOL_TESTS.name, cwd=PROMTOOL_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = [c for t in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} is never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} is never shown not firing"


@pytest.mark.parametrize(
    ("constant", "changed"),
    [
        ("STORE_ERROR_RATIO", 0.9),
        ("TRITON_QUEUE_S", 1.0),
        ("RESTARTS_IN_30M", 3),
        ("ERROR_SLO", 0.99),
        ("HISTORY_BACKLOG", 1500),
    ],
)
def test_promtool_unit_tests_fail_when_a_threshold_moves(
    constant: str, changed: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit tests can fail: with one threshold moved, an alert they expect no longer fires."""
    monkeypatch.setattr(GEN, constant, changed)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": GEN.rule_groups()}, sort_keys=False))
    spec = yaml.safe_load(PROMTOOL_TESTS.read_text())
    spec["rule_files"] = [str(rules)]
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    done = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert done.returncode != 0, f"moving {constant} to {changed} broke no promtool test"


def test_the_latency_threshold_is_a_bucket_of_the_request_histogram() -> None:
    assert GEN.LATENCY_THRESHOLD_S in gateway_metrics._LATENCY_BUCKETS


def exported_series(registry: Any) -> set[str]:
    """The series names a registry's /metrics exports (counters with _total, histograms' three)."""
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_every_gateway_and_writer_series_the_dashboard_and_rules_name_is_exported() -> None:
    """piaa_history_* come from the history writer's own registry, every other piaa_* and process_* from the
    gateway's; the history series are queried on the writer's job only."""
    gateway = exported_series(Metrics().registry)
    writer = exported_series(WriterMetrics().registry)
    used = {n for e in all_exprs() for n in re.findall(r"\b((?:piaa|process)_[a-z_]+)\b", e)}
    history = {n for n in used if n.startswith("piaa_history_")}
    assert used - history, "no gateway series found in the queries"
    assert used - history <= gateway, f"not exported by the gateway: {sorted(used - history - gateway)}"
    assert history, "no history writer series found in the queries"
    assert history <= writer, f"not exported by the history writer: {sorted(history - writer)}"
    for expr in all_exprs():
        for matchers in re.findall(r"piaa_history_[a-z_]+\{([^}]*)\}", expr):
            assert matchers in (GEN.H, f'job="{GEN.HISTORY_JOB}"'), expr


def test_label_values_the_queries_match_exist() -> None:
    text = "\n".join(all_exprs())
    codes = {c.name for c in grpc.StatusCode}
    assert set(GEN.SERVER_ERRORS.split("|")) <= codes
    assert set(GEN.SCORE_METHODS.split("|")) <= {"Score", "ScoreStream"}
    for reasons in re.findall(r'reason=~?"([^"]+)"', text):
        assert set(reasons.split("|")) <= set(FALLBACK_REASONS), reasons
    assert set(re.findall(r'stage="(\w+)"', text)) <= set(STAGES)
    assert set(re.findall(r'kind="(\w+)"', text)) <= set(gateway_metrics.REDIS_ERROR_KINDS)
    store = (REPO / "personalization" / "piaa_personalization" / "store" / "redis_store.py").read_text()
    for op in re.findall(r'op="(\w+)"', text):
        assert f'"{op}"' in store, f"the store has no operation {op}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_heading_in_operations_md() -> None:
    docs = (REPO / "docs" / "operations.md").read_text()
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", docs, re.M)}
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/operations.md#"), url
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no heading for {url}"
        assert rule["alert"] in docs, f"{rule['alert']} is not described in docs/operations.md"


def test_kustomize_renders_the_same_rules_and_the_dashboard_configmap() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing (kustomize 5.5 is built in)"
    done = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(done.stdout) if d}
    assert set(docs) == {"PrometheusRule", "ConfigMap"}
    plain = yaml.safe_load(GEN.RULES_FILE.read_text())
    assert docs["PrometheusRule"]["spec"]["groups"] == plain["groups"]
    monitors = [
        d for d in yaml.safe_load_all((REPO / "deploy/k8s/base/service-monitors.yaml").read_text()) if d
    ]
    rule_meta = docs["PrometheusRule"]["metadata"]
    assert rule_meta["namespace"] == monitors[0]["metadata"]["namespace"]
    assert rule_meta["labels"]["release"] == monitors[0]["metadata"]["labels"]["release"]
    config_map = docs["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"piaa.json": GEN.DASHBOARD_FILE.read_text()}
    # kubectl apply keeps the last applied object in an annotation limited to 256 KiB.
    assert len(done.stdout.encode()) < 256 * 1024


def test_checkov_passes_the_rendered_monitoring_manifests(tmp_path: Path) -> None:
    """The same scanner the overlays pass (tests/unit/test_deploy_k8s_checkov.py), on deploy/monitoring."""
    assert CHECKOV.is_file(), f"{CHECKOV} is missing: `bash scripts/test_deps.sh` installs it"
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120, check=True
    )
    (tmp_path / "monitoring.yaml").write_text(rendered.stdout)
    done = run_checkov(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)["summary"]
    assert summary["failed"] == 0 and summary["passed"] >= 1, summary


def test_the_service_monitors_jobs_are_the_ones_the_rules_and_compose_name() -> None:
    """A ServiceMonitor's job label is its Service's name; compose's job_name must be the same."""
    monitors = [
        d for d in yaml.safe_load_all((REPO / "deploy/k8s/base/service-monitors.yaml").read_text()) if d
    ]
    services = {m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for m in monitors}
    assert services == {GEN.GATEWAY_JOB, GEN.TRITON_JOB, GEN.HISTORY_JOB}
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())["scrape_configs"]
    assert {job["job_name"] for job in scrape} == {GEN.GATEWAY_JOB, GEN.TRITON_JOB, GEN.HISTORY_JOB}


def test_no_target_up_does_not_name_the_history_writer() -> None:
    """A deployment without a writer has no piaa-history target: an absent() on it would page forever."""
    for rule in alerts():
        if rule["alert"] == "PiaaNoTargetUp":
            assert GEN.HISTORY_JOB not in rule["expr"], rule["expr"]


def compose_service(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"][name])


def mounts(service: dict[str, Any]) -> dict[Path, str]:
    """Host folder (resolved) → container path of a service's bind mounts."""
    out = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[(COMPOSE / source).resolve()] = target
    return out


def test_compose_prometheus_loads_the_rule_file() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    target = mounts(compose_service("prometheus"))[GEN.RULES_FILE.parent]
    (pattern,) = config["rule_files"]
    assert Path(pattern).parent == Path(target)
    assert Path(GEN.RULES_FILE.name).match(Path(pattern).name)


def test_compose_grafana_provisions_the_dashboard_and_the_datasource() -> None:
    grafana = compose_service("grafana")
    bound = mounts(grafana)
    provisioning = MONITORING / "grafana" / "provisioning"
    assert bound[provisioning] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "piaa.yaml").read_text())["providers"]
    assert bound[GEN.DASHBOARD_FILE.parent] == provider["options"]["path"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert set(grafana["networks"]) & set(compose_service("prometheus")["networks"])
    assert grafana["ports"] == ["127.0.0.1:${PIAA_GRAFANA_PORT:-3000}:3000"]  # loopback, like Prometheus


def test_every_panel_query_uses_only_the_dashboards_variables() -> None:
    dashboard = GEN.dashboard()
    declared = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
    assert set(GEN.VARIABLES) <= declared
    values = dict.fromkeys(GEN.VARIABLES, "x")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for y in {p["gridPos"]["y"] for p in panels}:  # each row's panels side by side, filling its width
        spans = sorted((p["gridPos"]["x"], p["gridPos"]["w"]) for p in panels if p["gridPos"]["y"] == y)
        assert [x for x, _ in spans] == [sum(w for _, w in spans[:i]) for i in range(len(spans))]
        assert sum(w for _, w in spans) == 24
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "$" not in GEN.concrete(target["expr"], values), target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"
    gpu = [p.title for row in GEN.rows() for p in row.panels if p.empty_without_gpu]
    assert gpu and all(
        "nv_gpu_" in q.expr
        for row in GEN.rows()
        for p in row.panels
        if p.empty_without_gpu
        for q in p.queries
    )
