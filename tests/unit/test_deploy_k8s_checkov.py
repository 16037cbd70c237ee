"""checkov (the Kubernetes policy scanner) over every overlay as `kubectl kustomize` renders it: no failed
check, and every check waived in a manifest (a `checkov.io/skipN` annotation) says why.

checkov lives in its own venv, .venv-checkov (scripts/checkov_venv.sh, run by `make test-deps`): its pinned
dependencies clash with ours. One scan covers all overlays, and a control manifest that must fail."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_k8s import K8S, OVERLAYS, REPO, find, rendered_text

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
CONTROL = "checkov-control"
"""A copy of the gateway's Deployment made to break three checks: the scan must report them."""
BROKEN = {"CKV_K8S_22", "CKV_K8S_35", "CKV_K8S_43"}
"""Writable root filesystem, a secret as an env var, no image digest (and no waiver)."""


def control(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = yaml.safe_load(yaml.safe_dump(find(docs, "Deployment", "piaa-gateway")))
    deployment["metadata"]["name"] = CONTROL
    deployment["metadata"].pop("annotations", None)
    gateway = deployment["spec"]["template"]["spec"]["containers"][0]
    gateway["securityContext"]["readOnlyRootFilesystem"] = False
    secret = {"secretKeyRef": {"name": "piaa-redis", "key": "password"}}
    gateway["env"].append({"name": "REDIS_PASSWORD", "valueFrom": secret})
    return deployment


def run_checkov(folder: Path) -> subprocess.CompletedProcess[str]:
    """checkov's Kubernetes checks over every manifest in `folder`, a JSON report on stdout (exit 1: a check
    failed). --skip-download: no call to the vendor's API (policies and guidelines are in the package)."""
    return subprocess.run(
        [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "LOG_LEVEL": "ERROR"},
    )


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """checkov's JSON report over one folder: <overlay>.yaml for each overlay, and control.yaml."""
    if not CHECKOV.is_file():
        pytest.fail(
            f"{CHECKOV} is missing: `bash scripts/test_deps.sh` (make test-deps) installs checkov into "
            ".venv-checkov; the deploy tests scan every overlay with it."
        )
    folder = tmp_path_factory.mktemp("rendered")
    for overlay in OVERLAYS:
        (folder / f"{overlay}.yaml").write_text(rendered_text((K8S / "overlays" / overlay).resolve()))
    gpu = [d for d in yaml.safe_load_all(rendered_text((K8S / "overlays" / "gpu").resolve())) if d]
    (folder / "control.yaml").write_text(yaml.safe_dump(control(gpu)))
    out = run_checkov(folder)
    assert out.returncode in (0, 1), f"checkov failed to run ({out.returncode}):\n{out.stderr[-3000:]}"
    report = json.loads(out.stdout)
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", out.stdout[:500]
    return report


def checks(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return list(report["results"].get(kind, []))


def file_of(check: dict[str, Any]) -> str:
    return Path(check["file_path"]).stem


def test_checkov_passes_every_rendered_overlay(scan: dict[str, Any]) -> None:
    scanned = {file_of(c) for c in checks(scan, "passed_checks")}
    assert scanned >= set(OVERLAYS), f"overlays checkov did not scan: {set(OVERLAYS) - scanned}"
    failed = [c for c in checks(scan, "failed_checks") if file_of(c) != "control"]
    assert not failed, "checkov failed checks (fix, or waive in the manifest with a reason):\n" + "\n".join(
        f"  {file_of(c)}: {c['resource']}: {c['check_id']} {c['check_name']}" for c in failed
    )


def test_the_scan_can_fail(scan: dict[str, Any]) -> None:
    """Control: the broken copy of the gateway fails exactly the checks it was broken for."""
    failed = {c["check_id"] for c in checks(scan, "failed_checks") if CONTROL in c["resource"]}
    assert failed == BROKEN, failed


def test_every_waiver_says_why(scan: dict[str, Any]) -> None:
    skipped = checks(scan, "skipped_checks")
    assert skipped, "no waiver was read: checkov ignores the checkov.io/skip annotations"
    for c in skipped:
        reason = c["check_result"].get("suppress_comment") or ""
        assert len(reason.split()) >= 8, (
            f"{c['resource']}: {c['check_id']} waived without a reason: {reason!r}"
        )
