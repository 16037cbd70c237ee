"""Result aggregation of the benchmark suite and the peer: ratio verdicts, the summary, the files written,
the Redis/CPU accounting around a run, matched-p99 comparison and the peer's request format."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from piaa_bench import cluster, report
from piaa_bench.peer import at_matched_p99
from piaa_bench.ray_peer import split_body
from piaa_bench.stack import per_batch, round_trips
from piaa_bench.stats import Sample, rounded, summarize
from piaa_bench.suite import _cached_ratios, _ratios

pytestmark = pytest.mark.unit


def _point(rate: float, per_cpu: float, trips: float = 2.0, gateway_cpu: float = 0.5) -> dict[str, Any]:
    s = summarize([Sample(0.0, 0.0, 1.0, 8), Sample(0.0, 0.0, 2.0, 8)]).to_json()
    return {
        **s,
        "images_per_s": rate,
        "images_per_cpu_s": per_cpu,
        "redis_per_triton_call": trips,
        "cpu_s": {"redis": 0.1, "triton": 3.0, "gateway": gateway_cpu},
        "client_cpu_s": 0.2,
    }


def _results() -> dict[str, Any]:
    # Three rounds; round 2 is a neighbour's burst that halves every configuration alike.
    scale = [1.0, 0.5, 1.0]
    rounds = {
        "in_process": [{"images_per_s": 20 * k, "cpu_s": 4.0, "images_per_cpu_s": 10.0} for k in scale],
        # Serial is slower in two rounds and faster in one: the limit takes the better of each round.
        "in_process_serial": [
            {"images_per_s": v, "cpu_s": 4.0, "images_per_cpu_s": 9.0} for v in (15.0, 12.0, 16.0)
        ],
        "in_process_fp32": [{"images_per_s": 14 * k, "cpu_s": 4.0, "images_per_cpu_s": 7.0} for k in scale],
        "in_process_int8": [{"images_per_s": 21 * k, "cpu_s": 4.0, "images_per_cpu_s": 10.5} for k in scale],
        "triton_direct": [_point(18 * k, 9.0) for k in scale],
        "gateway_generic": [_point(17 * k, 8.5) for k in scale],
        "gateway_personalized_1": [_point(16.8 * k, 8.4, 2.0, gateway_cpu=0.6) for k in scale],
        "gateway_personalized_100000": [_point(16.0 * k, 8.0, 3.0, gateway_cpu=0.6) for k in scale],
    }
    ratios = _ratios(rounds, (1, 100_000))
    sweep = [{"concurrency": c, **_point(10.0 + c, 8.0)} for c in (1, 2)]
    return {
        "date": "2026-11-29T05:00:00+00:00",
        "command": "make bench",
        "machine": {"cores": 2, "cpu": "x86_64", "load_avg_start": [6.0], "load_avg_end": [7.0]},
        "config": {
            "images_per_point": 96,
            "batch": 8,
            "concurrency": 4,
            "rounds": 3,
            "photos": 800,
            "mean_photo_kib": 107.0,
            "cpu_layout": "fused",
        },
        "wall_s": 300.0,
        "rounds": rounds,
        "ratios": ratios,
        "sweep_concurrency": sweep,
        "sweep_images_per_request": [{"images_per_request": 1, **sweep[0]}],
        "open_loop": [{"fraction_of_saturation": 0.5, "requests_per_s": 1.0, **_point(8.0, 8.0)}],
    }


def test_ratios_are_medians_of_per_round_ratios() -> None:
    ratios = _results()["ratios"]
    # Round 2: serial (12) beat pipelined (10), so that round's limit is 12 and its ratio 8.4 / 12.
    assert ratios["personalized_vs_in_process"] == pytest.approx(0.84)
    assert ratios["triton_direct_vs_in_process"] == pytest.approx(0.9)
    assert ratios["personalized_vs_generic"] == pytest.approx(16.8 / 17, abs=1e-3)
    assert ratios["users_100000_vs_1"] == pytest.approx(16 / 16.8, abs=1e-3)
    assert ratios["cpu_personalized_vs_in_process"] == pytest.approx(0.84)
    assert ratios["redis_round_trips_per_triton_call_100000_users"] == 3.0
    assert ratios["int8_vs_fp32"] == ratios["cpu_int8_vs_fp32"] == 1.5
    # Personalization added 0.1 s of gateway CPU to 3.6 s of pipeline CPU (per 16 images).
    assert ratios["cpu_overhead_personalized"] == pytest.approx(0.1 / 3.6, abs=1e-3)
    assert ratios["cpu_overhead_users_100000"] == pytest.approx(0.0)


def test_verdicts_say_met_or_by_how_much() -> None:
    assert report.verdict("personalized_vs_in_process", 0.84) == "met"
    assert report.verdict("personalized_vs_generic", 0.88) == "missed by 0.09 (9.3%)"
    assert report.verdict("redis_round_trips_per_triton_call_100000_users", 3.0) == "missed by 2"
    assert report.verdict("generic_vs_triton_direct", 0.9) == ""  # no target


def test_write_produces_json_plots_and_summary(tmp_path: Path) -> None:
    results = _results()
    report.write(results, {"50% of saturation": [100.0, 120.0, 300.0]}, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["ratios"] == results["ratios"]
    for png in ("throughput.png", "latency.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "summary.md").read_text()
    assert "`make bench` on 2 CPU cores" in text
    assert "Triton's cpu layout: fused." in text
    assert "| personalized end-to-end / in-process limit | 0.84 | 0.84 | >= 0.8: met / met |" in text
    assert "Redis round trips per Triton call | 3 |" in text and "missed by 2" in text


def test_round_trips_are_read_from_the_gateways_metric() -> None:
    text = "\n".join([
        "# TYPE piaa_redis_round_trips_total counter",
        'piaa_redis_round_trips_total{node="127.0.0.1:7000",op="batch_read"} 12.0',
        'piaa_redis_round_trips_total{node="standalone",op="feature_write"} 3.0',
        'piaa_redis_round_trips_created{node="standalone",op="feature_write"} 1.7e9',
    ])  # fmt: skip
    assert round_trips(text) == {"rt|batch_read|127.0.0.1:7000": 12.0, "rt|feature_write|standalone": 3.0}


def test_per_batch_differences_counters() -> None:
    before = {
        "cpu_triton": 10.0,
        "cpu_gateway": 1.0,
        "client_cpu": 5.0,
        "rt|batch_read|a:1": 5.0,
        "rt|feature_write|a:1": 1.0,
        "batches": 10.0,
        "triton_calls": 10.0,
        "triton_images": 100.0,
    }
    after = {
        "cpu_triton": 14.0,
        "cpu_gateway": 2.0,
        "client_cpu": 5.5,
        "rt|batch_read|a:1": 15.0,  # 10 batch reads on a:1 and 10 on b:2 (a series new since `before`)
        "rt|batch_read|b:2": 10.0,
        "rt|feature_write|a:1": 6.0,  # behind the answer: counted apart
        "rt|profiles|b:2": 2.0,
        "batches": 20.0,
        "triton_calls": 20.0,
        "triton_images": 260.0,
    }
    d = per_batch(before, after, images=160)
    assert d["cpu_s"] == {"triton": 4.0, "gateway": 1.0}
    assert d["images_per_cpu_s"] == pytest.approx(32.0)
    assert d["redis_round_trips"] == 20.0 and d["redis_per_micro_batch"] == 2.0
    assert d["redis_per_micro_batch_by_node"] == {"a:1": 1.0, "b:2": 1.0}
    assert d["redis_behind_per_micro_batch"] == pytest.approx(0.7)
    assert d["redis_per_triton_call"] == 2.0 and d["images_per_triton_call"] == 16.0
    idle = per_batch(before, before, images=0)
    assert math.isnan(idle["redis_per_triton_call"]) and idle["redis_per_micro_batch_by_node"] == {}
    assert rounded(idle)["redis_per_triton_call"] is None  # valid JSON


def test_cluster_comparison_reports_ratios_and_round_trips_by_node() -> None:
    def run(rate: float, per_cpu: float, nodes: dict[str, float]) -> dict[str, Any]:
        return {
            **_point(rate, per_cpu),
            "images_ok": 96,
            "redis_per_micro_batch": sum(nodes.values()),
            "redis_per_micro_batch_by_node": nodes,
            "redis_behind_per_micro_batch": 1.0,
        }

    three = {"n1": 1.0, "n2": 1.0, "n3": 1.0}
    points = {
        # round 2: a neighbour's burst halves both configurations alike
        "standalone": [run(20.0 * k, 10.0 * k, {"standalone": 1.0}) for k in (1.0, 0.5, 1.0)],
        "cluster": [run(19.0 * k, 9.0 * k, three) for k in (1.0, 0.5, 1.0)],
    }
    ratios = cluster.ratios(points)
    assert ratios == {"cluster_vs_standalone": 0.95, "cpu_cluster_vs_standalone": 0.9}
    medians = cluster.medians(points)
    assert medians["cluster"]["redis_per_micro_batch_by_node"] == three
    assert medians["standalone"]["redis_per_micro_batch"] == 1.0
    # (gateway 0.5 + redis 0.1) CPU seconds over 96 images
    assert medians["cluster"]["front_cpu_ms_per_image"] == pytest.approx(6.25)
    results = {**_results(), "cluster": {"medians": medians}}
    results["ratios"].update(ratios)
    text = report.summary(results)
    assert (
        "| personalized, gateway on a 3-primary Redis Cluster / on one Redis (1,000 users) | 0.95 | 0.9 |"
        in text
    )
    assert ">= 0.95: met / missed by 0.05 (5.3%)" in text
    assert "cluster 3 (3 nodes: 1, 1, 1; 1 behind the answer)" in text
    assert "standalone 1 (1 node: 1; 1 behind the answer)" in text


def test_matched_p99_compares_throughput_at_one_latency() -> None:
    gateway = [{"p99_ms": 1000.0, "images_per_s": 20.0}, {"p99_ms": 2000.0, "images_per_s": 24.0}]
    peer = [{"p99_ms": 800.0, "images_per_s": 12.0}, {"p99_ms": 1500.0, "images_per_s": 15.0}]
    m = at_matched_p99(gateway, peer)
    assert m["p99_ms"] == 1500.0
    assert m["gateway_images_per_s"] == pytest.approx(22.0)  # halfway between 1000 and 2000 ms
    assert m["peer_images_per_s"] == pytest.approx(15.0)
    assert m["ratio"] == pytest.approx(22 / 15)


def test_peer_request_body_splits_by_lengths() -> None:
    assert split_body(b"abcdef", "2,4") == [b"ab", b"cdef"]
    for bad in ("2,3", "", "6,0"):
        with pytest.raises(ValueError):
            split_body(b"abcdef", bad)


def test_cached_path_figures_and_their_verdicts() -> None:
    results = {
        "median_cpu_ms_per_image": {
            "gateway": {"8x1": 0.2, "1x1": 0.39},
            "grpc_floor": {"8x1": 0.1, "1x1": 0.3},
        },
        "vs_floor": {"gateway": {"8x1": 2.04, "1x1": 1.3}},
    }
    ratios = _cached_ratios(results)
    assert ratios == {
        "cpu_cached_ms_per_image_8x1": 0.2,
        "cpu_grpc_floor_ms_per_image_8x1": 0.1,
        "cpu_cached_vs_grpc_floor_8x1": 2.04,
        "cpu_cached_ms_per_image_1x1": 0.39,
        "cpu_grpc_floor_ms_per_image_1x1": 0.3,
        "cpu_cached_vs_grpc_floor_1x1": 1.3,
    }
    assert report.verdict("cpu_cached_ms_per_image_8x1", 0.2) == "missed by 0.05"
    assert report.verdict("cpu_cached_ms_per_image_1x1", 0.39) == "met"
    assert report.verdict("cpu_grpc_floor_ms_per_image_8x1", 0.1) == ""
