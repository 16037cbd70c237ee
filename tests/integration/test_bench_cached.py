"""The cached-path benchmark's floor: a real grpc.aio server with canned answers, driven by the load
generator, and its CPU counted the way the gateway's is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest

from piaa_bench import loadgen
from piaa_bench.cached import CachedPoint, floor_server, measure
from piaa_bench.stack import Stack
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import Photo

pytestmark = pytest.mark.integration


def test_the_grpc_floor_answers_every_image_and_its_cpu_is_counted() -> None:
    photos = [b"\xff\xd8" + bytes([k]) * 50_000 + b"\xff\xd9" for k in range(5)]
    with floor_server() as floor:
        with grpc.insecure_channel(floor.gateway) as ch:
            request = pb.ScoreRequest(
                user_id="u", images=[pb.Image(id=str(k), data=p) for k, p in enumerate(photos)]
            )
            reply = pb_grpc.PersonalizationStub(ch).Score(request, timeout=30)
        assert [s.id for s in reply.scores] == ["0", "1", "2", "3", "4"]
        assert all(
            len(s.attributes) == 10 and len(s.content) == 10 and len(s.digest) == 64 for s in reply.scores
        )
        m = measure(floor, photos, CachedPoint(8, 1, 800))
    assert m["images_ok"] == 800 and m["errors"] == {}
    assert set(m["cpu_ms_per_image_by_process"]) == {"floor"}
    assert m["cpu_ms_per_image"] > 0  # 100 calls of 400 KB cannot cost no CPU: the count is live


def test_the_streamed_points_go_through_score_stream_and_count_the_gateways_cpu(
    gateway: GatewayProcess, photos: list[Photo]
) -> None:
    """A streamed point against the real gateway: every request answered, each counted by the gateway as a
    ScoreStream request (not a Score call), and the gateway's CPU counted."""
    sent = [p.path.read_bytes() for p in photos[600:606]]  # in the feature cache after the first pass
    stack = Stack("", "", gateway.address, gateway.metrics_url, Path(), {"gateway": gateway.pid or 0})
    streamed = _requests_counted(gateway.metrics(), "ScoreStream")
    unary = _requests_counted(gateway.metrics(), "Score")
    m = measure(stack, sent, CachedPoint(1, 1, 60, streamed=True))
    assert m["images_ok"] == 60 and m["errors"] == {}
    assert m["cpu_ms_per_image_by_process"]["gateway"] > 0
    assert _requests_counted(gateway.metrics(), "ScoreStream") - streamed == 60
    assert _requests_counted(gateway.metrics(), "Score") == unary


def _requests_counted(metrics: str, method: str) -> float:
    pattern = rf'piaa_requests_total{{code="OK",method="{method}"}} (\S+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


def test_the_load_generator_cli_drives_open_streams(
    gateway: GatewayProcess, photos: list[Photo], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for p in photos[600:603]:
        (tmp_path / p.path.name).write_bytes(p.path.read_bytes())
    before = _requests_counted(gateway.metrics(), "ScoreStream")
    args = ["--address", gateway.address, "--photos", str(tmp_path), "--cache-hits", "--stream"]
    assert loadgen.main([*args, "--closed", "2", "--requests", "12"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    point = json.loads(line)
    assert point["mode"] == "closed_stream" and point["images_ok"] == 12
    assert _requests_counted(gateway.metrics(), "ScoreStream") - before == 12
