"""`make demo`'s journey runs end to end from the bundled sample photos and leaves nothing running."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _stack_pids() -> set[str]:
    """PIDs of every Redis, Triton, gateway or `piaa serve` process on the machine."""
    pattern = "redis-server|tritonserver|piaa_personalization.(serve|server)"
    found = subprocess.run(["pgrep", "-f", pattern], check=False, capture_output=True, text=True)
    return set(found.stdout.split())


def test_demo_journey(tmp_path: Path) -> None:
    before = _stack_pids()
    result = subprocess.run(
        [sys.executable, "-m", "piaa_personalization.demo", "--out", str(tmp_path)],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "recorded 40 ratings for vivid-vera" in out
    assert re.search(r"Spearman .* generic [+-]\d\.\d{3}, personalized [+-]\d\.\d{3}", out)
    assert "stack stopped (exit code 0)" in out
    (report,) = tmp_path.glob("run-*/report.html")
    assert report.stat().st_size > 10_000
    # Everything the demo started is gone: no serve, gateway, Triton or Redis beyond those running before.
    assert _stack_pids() <= before
