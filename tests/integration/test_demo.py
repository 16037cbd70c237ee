"""`make demo`'s journey runs end to end from the bundled sample photos and leaves nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _processes_with(mark: str) -> list[str]:
    """Command lines of live processes whose environment carries the mark (inherited by every child)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if mark.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return found


def test_demo_journey(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    mark = f"PIAA_TEST_MARK={token}"
    result = subprocess.run(
        [sys.executable, "-m", "piaa_personalization.demo", "--out", str(tmp_path)],
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "PIAA_TEST_MARK": token},
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
    # Everything the demo started (serve, gateway, Triton, its stubs, Redis) is gone.
    assert _processes_with(mark) == []
