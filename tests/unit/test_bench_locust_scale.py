"""piaa_bench.locust_scale's commands and figures, on made-up rounds (the runs themselves need a stack:
python -m piaa_bench.locust_scale)."""

from __future__ import annotations

from pathlib import Path

import pytest

from piaa_bench.locust_scale import loadgen_command, locust_command, ratios, summary_line


def point(calls_per_s: float, cpu_ms: float) -> dict[str, float]:
    return {
        "calls_per_s": calls_per_s,
        "generator_cpu_ms_per_call": cpu_ms,
        "generator_cores": calls_per_s * cpu_ms / 1e3,
        "gateway_cores": 0.5,
    }


RESULTS = {
    "config": {"processes": 2},
    "rounds": {
        "locust_1": [point(400, 1.2), point(200, 1.0)],
        "locust_2": [point(600, 1.1), point(500, 1.3)],
        "loadgen": [point(700, 0.7), point(650, 0.8)],
    },
    "medians": {"locust_1": point(300, 1.1), "locust_2": point(550, 1.2), "loadgen": point(675, 0.75)},
}


def test_the_scaled_ratio_is_the_median_of_per_round_ratios() -> None:
    got = ratios(RESULTS)
    assert got["locust_2_workers_vs_1"] == pytest.approx((1.5 + 2.5) / 2)  # not 550 / 300
    assert got["locust_cpu_ms_per_call"] == 1.1 and got["loadgen_cpu_ms_per_call"] == 0.75
    line = summary_line(RESULTS)
    assert "2.00x the calls/s of one (550 vs 300/s" in line and "1.10 ms" in line and "0.75 ms" in line


def test_both_generators_send_one_image_score_calls_of_the_same_photos() -> None:
    photos = Path("/tmp/pool")
    one = locust_command("h:1", photos, 1, 8, 18)
    two = locust_command("h:1", photos, 2, 16, 18)
    assert "--processes" not in one and two[-2:] == ["--processes", "2"]
    expected = {
        "--tags": "score",
        "--piaa-think-s": "0",
        "--piaa-score-images": "1",
        "--piaa-repeat-share": "1",
        "--piaa-photos": str(photos),
        "-u": "8",
    }
    assert {flag: one[one.index(flag) + 1] for flag in expected} == expected
    gen = loadgen_command("h:1", photos, 8)
    assert gen[gen.index("--photos") + 1] == str(photos) and "--cache-hits" in gen
    assert gen[gen.index("--images-per-request") + 1] == "1" and gen[gen.index("--closed") + 1] == "8"
