"""The gateway when a dependency is down, with several workers, and while it drains on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_common.process import ProcessStartError, free_port
from piaa_personalization.api.server import READY_LINE
from piaa_personalization.gateway_process import SERVE_MODULE, GatewayProcess
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.server import TritonServer
from tests.fixtures.gateway import start_gateway
from tests.fixtures.photos import Photo


def dead_address() -> str:
    """A loopback port nothing listens on."""
    return f"127.0.0.1:{free_port()}"


def test_store_down_scores_generic_and_refuses_ratings(
    triton_server: TritonServer, photos: list[Photo]
) -> None:
    gateway = start_gateway(f"redis://{dead_address()}/0", triton_server.grpc_url)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.PersonalizationStub(channel)
            image = pb.Image(data=photos[600].path.read_bytes())
            reply = stub.Score(pb.ScoreRequest(user_id="someone", images=[image]), timeout=60)
            (score,) = reply.scores
            assert not score.personalized
            assert score.fallback_reason == pb.FALLBACK_REASON_STORE_UNAVAILABLE
            assert score.score == pytest.approx(score.generic_score)
            with pytest.raises(grpc.RpcError) as err:
                stub.AddRatings(
                    pb.AddRatingsRequest(
                        user_id="someone",
                        ratings=[pb.Rating(image=image, value=4, scale=pb.RATING_SCALE_STARS_1_5)],
                    ),
                    timeout=60,
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as err:
                stub.GetProfile(pb.GetProfileRequest(user_id="someone"), timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 'piaa_fallbacks_total{reason="store_unavailable"} 1.0' in gateway.metrics()
    finally:
        assert gateway.stop() == 0


def test_triton_down_is_unavailable(redis_server: RedisServer, photos: list[Photo]) -> None:
    gateway = start_gateway(redis_server.url, dead_address())
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.PersonalizationStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(
                    pb.ScoreRequest(user_id="u", images=[pb.Image(data=photos[601].path.read_bytes())]),
                    timeout=60,
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # What needs no Triton still works.
            assert not stub.GetProfile(pb.GetProfileRequest(user_id="u"), timeout=30).exists
    finally:
        assert gateway.stop() == 0


async def test_two_workers_share_the_port_and_drain_on_sigterm(
    triton_server: TritonServer, redis_server: RedisServer, photos: list[Photo]
) -> None:
    port = free_port()
    gateway = start_gateway(
        redis_server.url,
        triton_server.grpc_url,
        "--workers",
        "2",
        "--port",
        str(port),
        "--max-batch-delay-ms",
        "1000",
    )
    try:
        assert gateway.address == f"127.0.0.1:{port}"
        images = [pb.Image(data=p.path.read_bytes()) for p in photos[610:614]]
        # Separate channels land on either worker (SO_REUSEPORT balances connections).
        channels = [grpc.aio.insecure_channel(gateway.address) for _ in range(6)]
        try:
            for channel in channels:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="piaa.v1.Personalization"), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.PersonalizationStub(channels[0])
            # A call in flight when SIGTERM arrives still completes (the batch delay keeps it queued).
            in_flight = asyncio.ensure_future(
                stub.Score(pb.ScoreRequest(user_id="u", images=images), timeout=60)
            )
            await asyncio.sleep(0.3)
            assert gateway.proc is not None
            gateway.proc.terminate()
            reply = await in_flight
            assert len(reply.scores) == 4
            assert gateway.stop() == 0
            assert gateway.output().count("draining") == 2  # both workers drained
        finally:
            for channel in channels:
                await channel.close()
    finally:
        assert gateway.stop() == 0, gateway.output()[-3000:]


def test_workers_die_with_a_killed_parent(triton_server: TritonServer, redis_server: RedisServer) -> None:
    """A SIGKILLed parent cannot stop its workers itself: the kernel's parent-death signal does."""
    port = free_port()
    gateway = start_gateway(redis_server.url, triton_server.grpc_url, "--workers", "2", "--port", str(port))
    try:
        assert gateway.proc is not None
        parent = psutil.Process(gateway.proc.pid)
        workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, ([c.cmdline() for c in parent.children()], gateway.output_tail())
        parent.kill()
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers outlived their killed parent: {[w.pid for w in alive]}"
        assert not _port_open(f"127.0.0.1:{port}")
    finally:
        gateway.stop()


def test_a_worker_that_dies_before_serving_is_never_announced(
    triton_server: TritonServer, redis_server: RedisServer
) -> None:
    """Worker 1 cannot bind its metrics port (taken here): the gateway exits with the error and never
    prints its ready line, so no caller takes a half-served port for a serving gateway."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1] - 1  # worker i serves metrics on metrics_port + i
        args = ["--workers", "2", "--port", str(free_port()), "--metrics-port", str(metrics_port)]
        urls = ["--redis-url", redis_server.url, "--triton-url", triton_server.grpc_url]
        process = GatewayProcess(["--host", "127.0.0.1", *urls, *args])
        with pytest.raises(ProcessStartError) as failed:
            process.start(60.0)
        process.close()
    assert READY_LINE not in str(failed.value), str(failed.value)
    assert "exited on its own" in str(failed.value) or "Address already in use" in str(failed.value)


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_piaa_serve_starts_the_stack_and_stops_all_of_it_on_sigint() -> None:
    port = free_port()
    serve = GatewayProcess(["--port", str(port)], module=SERVE_MODULE, start_timeout_s=300)
    with serve.start():
        seen = {
            "redis": (serve.line_starting("redis ") or "").removeprefix("redis://").split("/")[0],
            "triton": serve.line_starting("triton ") or "",
            "gateway": serve.address,
        }
        assert seen["gateway"] == f"127.0.0.1:{port}" and all(seen.values()), seen
        with grpc.insecure_channel(seen["gateway"]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(timeout=120) == 0, serve.output_tail()
        for address in seen.values():
            assert not _port_open(address), address
