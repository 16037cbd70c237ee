"""benchmarks/locustfile.py with the stock `locust` command against the real gateway (Triton, Redis).

The first run is the issue's "Done when" command (shorter and with the session's gateway): two processes,
20 users, every RPC counted in the CSV, no failure, and the gateway counted the same calls. The second
asks for an impossible SLO (through its environment variable) with --tags and must exit with the SLO's code
having run only the tagged RPC.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.gateway import GatewayProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
RPCS = {"Score", "ScoreStream", "RankAlbum", "AddRatings"}
SLO_MISSED_EXIT_CODE = 3  # benchmarks/locustfile.py


def _locust(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_LOCUST_")}
    return subprocess.run(
        [str(LOCUST), "-f", "benchmarks/locustfile.py", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _stats(prefix: Path) -> dict[str, dict[str, str]]:
    """Locust's final statistics by name (the RPC, or "Aggregated")."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def _gateway_requests(gateway: GatewayProcess) -> dict[tuple[str, str], float]:
    """piaa_requests_total by (method, code), from the gateway's metrics."""
    text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    found = re.findall(r'^piaa_requests_total\{code="(\w+)",method="(\w+)"\} (\S+)$', text, re.M)
    return {(method, code): float(value) for code, method, value in found}


def test_two_processes_count_every_rpc_without_failures(gateway: GatewayProcess, tmp_path: Path) -> None:
    before = _gateway_requests(gateway)
    out = tmp_path / "run"
    run = _locust(
        *("--headless", "--processes", "2", "-u", "20", "-r", "10", "-t", "15s"),
        *("--host", gateway.address, "--csv", str(out)),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    stats = _stats(out)
    assert set(stats) == RPCS | {"Aggregated"}, stats.keys()
    for rpc in RPCS:
        assert stats[rpc]["Type"] == "grpc"
        assert int(stats[rpc]["Request Count"]) > 0, rpc
        assert int(stats[rpc]["Failure Count"]) == 0, (rpc, run.stderr[-4000:])
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    with open(f"{out}_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
    # The calls reached the gateway: it answered at least what Locust counted, and it failed none (users
    # stopped at the time limit cancel their calls in flight: CANCELLED only).
    after = _gateway_requests(gateway)
    delta = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    for rpc in RPCS:
        assert delta.get((rpc, "OK"), 0) >= int(stats[rpc]["Request Count"]), (rpc, delta)
    assert {code for (_, code) in delta} <= {"OK", "CANCELLED"}, delta


def test_an_slo_breach_exits_non_zero_and_tags_select_the_rpc(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    out = tmp_path / "slo"
    run = _locust(
        *("--headless", "-u", "4", "-r", "4", "-t", "6s", "--tags", "score"),
        *("--host", gateway.address, "--csv", str(out)),
        env={"PIAA_LOCUST_SLO_P99_MS": "0.001"},  # the option from its variable, as the k8s overlay sets them
    )
    assert run.returncode == SLO_MISSED_EXIT_CODE, run.stderr[-4000:]
    assert "SLO missed: Score: p99" in run.stderr
    stats = _stats(out)
    assert set(stats) == {"Score", "Aggregated"}
    assert int(stats["Score"]["Request Count"]) > 0 and int(stats["Score"]["Failure Count"]) == 0
