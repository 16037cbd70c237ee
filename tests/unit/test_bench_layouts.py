"""piaa_bench.layouts and the suite's served layout: the ratios to the in-process limit, the variants'
repositories, and which layout a written repository serves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from piaa_bench.layouts import VARIANTS, summarize_rounds, write_variant
from piaa_bench.suite import served_layout
from piaa_triton.config import parse
from piaa_triton.paths import onnx_dir

pytestmark = pytest.mark.unit


def _point(per_s: float, per_cpu_s: float) -> dict[str, Any]:
    by_process = {"tritonserver": 1e3 / per_cpu_s / 4, "backbone": 3e3 / per_cpu_s / 4}
    return {"images_per_s": per_s, "images_per_cpu_s": per_cpu_s, "cpu_ms_per_image_by_process": by_process}


def test_ratios_are_medians_of_per_round_ratios_to_the_better_limit() -> None:
    rounds = {
        # round 2: a neighbour's burst halves everything alike; the serial run is the better limit there
        "in_process": [_point(100, 125), _point(40, 50), _point(100, 125)],
        "serial": [_point(90, 120), _point(50, 60), _point(95, 100)],
        "serial_one_thread": [_point(80, 130), _point(40, 65), _point(80, 130)],
        "split": [_point(70, 100), _point(35, 48), _point(70, 100)],
        "fused": [_point(110, 119), _point(55, 57), _point(110, 119)],
    }
    out = summarize_rounds(rounds, ["split", "fused"])
    assert out["vs_in_process"]["split"] == {"per_cpu": 0.8, "wall": 0.7}
    assert out["vs_in_process"]["fused"] == {"per_cpu": 0.952, "wall": 1.1}
    assert out["vs_split"] == {"fused": {"per_cpu": 1.19, "wall": 1.571}}
    assert out["per_cpu_vs_one_thread"] == {"split": 0.769, "fused": 0.915}
    assert out["cpu_ms_per_image"]["fused"] == pytest.approx(1e3 / 119, abs=1e-3)
    assert out["cpu_ms_per_image_by_process"]["fused"] == {
        "tritonserver": pytest.approx(1e3 / 119 / 4, abs=1e-3),
        "backbone": pytest.approx(3e3 / 119 / 4, abs=1e-3),
    }


def test_variants_change_only_the_backbone_config(tmp_path: Path) -> None:
    if not (onnx_dir() / "heads.onnx").is_file():
        pytest.fail(f"{onnx_dir()} lacks the exported models: run `make setup`")
    one = write_variant(VARIANTS["fused_one"], tmp_path / "one")
    plan = write_variant(VARIANTS["fused"], tmp_path / "plan")
    backbone = {name: parse((root / "backbone" / "config.pbtxt").read_text()) for name, root in
                (("one", one), ("plan", plan))}  # fmt: skip
    assert [g.count for g in backbone["one"].instance_group] == [1]
    assert [g.count for g in backbone["plan"].instance_group] == [2 if (os.cpu_count() or 1) > 1 else 1]
    assert backbone["one"].input == backbone["plan"].input
    assert (one / "piaa" / "config.pbtxt").read_text() == (plan / "piaa" / "config.pbtxt").read_text()
    assert served_layout(one) == served_layout(plan) == "fused"
    assert served_layout(write_variant(VARIANTS["split"], tmp_path / "split")) == "split"
    assert served_layout(write_variant(VARIANTS["fused_heads"], tmp_path / "heads")) == "fused_heads"
