"""piaa_bench.miss_path: the cache-miss path's CPU per image by process, pooled over points, and its place in
make bench's summary (the capacity model's figures)."""

from __future__ import annotations

from typing import Any

import pytest

from piaa_bench import miss_path, report


def point(
    images: int, gateway: float, server: float, stubs: float = 1.0, sent: int | None = None
) -> dict[str, Any]:
    return {
        "images_ok": images,
        "triton_images": images if sent is None else sent,
        "cpu_role_s": {"gateway": gateway, "tritonserver": server, "triton_stubs": stubs, "redis": 0.01},
        "cpu_wall_s": 10.0,
    }


IDLE = {"gateway": 0.001, "tritonserver": 0.0005, "triton_stubs": 0.0, "redis": 0.0}
"""CPU seconds per second while idle: 1 ms/s of gateway, 0.5 ms/s of tritonserver."""


def test_cpu_per_image_is_pooled_over_points_net_of_idle_and_kept_raw() -> None:
    result = miss_path.summarize_points([point(100, 0.09, 0.02), point(300, 0.25, 0.07)], IDLE)
    assert result["images"] == 400 and result["points"] == 2 and result["wall_s"] == 20.0
    # raw, pooled: (0.09 + 0.25) s / 400 images = 0.85 ms, not the mean of 0.9 and 0.833
    assert result["raw_ms_per_image"]["gateway"] == pytest.approx(0.85)
    assert result["raw_ms_per_image"]["tritonserver"] == pytest.approx(0.225)
    assert [p["gateway"] for p in result["raw_ms_per_image_by_point"]] == pytest.approx(
        [0.9, 0.833], abs=1e-3
    )
    # net of idle: 20 s at 1 ms/s is 0.02 s of the gateway's 0.34 s; 20 s at 0.5 ms/s of tritonserver's 0.09
    assert result["ms_per_image"]["gateway"] == pytest.approx(0.8)
    assert result["ms_per_image"]["tritonserver"] == pytest.approx(0.2)
    assert result["idle_ms_per_s"]["gateway"] == pytest.approx(1.0)
    assert miss_path.ratios(result) == {
        "cpu_miss_gateway_ms_per_image": pytest.approx(0.8),
        "cpu_miss_tritonserver_ms_per_image": pytest.approx(0.2),
        "cpu_miss_triton_stubs_ms_per_image": pytest.approx(5.0),
        "cpu_miss_redis_ms_per_image": pytest.approx(0.05),
    }


def test_a_point_with_cache_hits_is_no_miss_path_figure() -> None:
    with pytest.raises(ValueError, match="skipped Triton"):
        miss_path.summarize_points([point(100, 0.09, 0.02), point(100, 0.05, 0.01, sent=60)], IDLE)
    with pytest.raises(ValueError, match="no successful image"):
        miss_path.summarize_points([point(0, 0.0, 0.0)], IDLE)


def test_the_summary_shows_the_capacity_models_figures() -> None:
    ratios = {"cpu_miss_gateway_ms_per_image": 0.85, "cpu_miss_tritonserver_ms_per_image": 0.21}
    rows = [what for key, (what, _, _) in report.TARGETS.items() if key in ratios]
    assert len(rows) == 2 and "gateway CPU ms per image" in rows[0] and "tritonserver" in rows[1]
    assert report.verdict("cpu_miss_gateway_ms_per_image", 0.85) == ""  # a measurement, not a target
