"""Faults with real processes: Triton frozen (slow), Triton killed under load and restarted, Redis killed
and restarted with AOF. The gateway fails fast, sheds instead of buffering, loses no acknowledged rating
outside AOF's one-second window, writes nothing half-way, and recovers by itself.

Redis down with the gateway started against it, and Triton never reachable, are in
test_gateway_resilience.py; this file covers a dependency that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_common.process import free_port
from piaa_personalization.store.format import Keys
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import repository_dir
from piaa_triton.server import ServerOptions, TritonServer
from tests.fixtures.gateway import GatewayProcess, start_gateway
from tests.fixtures.photos import Photo

SERVICE = "piaa.v1.Personalization"
STARS = pb.RATING_SCALE_STARS_1_5
QUEUE = 6
_rng = np.random.default_rng()


def noise_jpeg() -> bytes:
    """A small JPEG never seen before (a feature-cache miss: Triton must run)."""
    pixels = _rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


async def timed_score(stub: pb_grpc.PersonalizationStub, timeout: float) -> tuple[grpc.StatusCode, float]:
    """One single-image Score call of a fresh image: its status and how long it took."""
    start = time.monotonic()
    try:
        await stub.Score(pb.ScoreRequest(user_id="u", images=[pb.Image(data=noise_jpeg())]), timeout=timeout)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        code = err.code()
    return code, time.monotonic() - start


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not {what} after {timeout_s} s")


# --- Triton slow, then killed ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_triton() -> Iterator[TritonServer]:
    """A Triton of this module's own (it gets frozen and killed), stopped at the end."""
    with TritonServer(ServerOptions(repository=repository_dir("cpu"))) as server:
        yield server


@pytest.fixture(scope="module")
def fragile(own_triton: TritonServer, redis_server: RedisServer) -> Iterator[GatewayProcess]:
    """A gateway with a small queue (QUEUE images) and one Triton call at a time, checking health often."""
    gateway = start_gateway(
        redis_server.url, own_triton.grpc_url,
        "--max-queued-images", str(QUEUE), "--max-concurrent-batches", "1", "--triton-max-inflight", "1",
        "--max-batch-size", "2", "--health-check-interval-s", "0.3",
    )  # fmt: skip
    try:
        yield gateway
    finally:
        assert gateway.stop() == 0, gateway.output()[-3000:]


async def test_triton_slow_deadlines_are_honoured_and_the_queue_sheds(
    fragile: GatewayProcess, own_triton: TritonServer
) -> None:
    assert own_triton.process is not None
    os.kill(own_triton.process.pid, signal.SIGSTOP)  # frozen: accepts connections, answers nothing
    try:
        async with grpc.aio.insecure_channel(fragile.address) as channel:
            stub = pb_grpc.PersonalizationStub(channel)
            outcomes = await asyncio.gather(*(timed_score(stub, timeout=3.0) for _ in range(24)))
        codes = [c for c, _ in outcomes]
        shed = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        late = codes.count(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert shed + late == len(codes), codes
        assert shed >= 24 - QUEUE - 4 and late >= 1, (shed, late)  # the queue held at most QUEUE images
        # No call outlived its deadline by more than scheduling noise (generous: 2 loaded cores).
        assert max(t for _, t in outcomes) < 3.0 + 3.0, outcomes
        wait_for(lambda: health(fragile.address, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING, 15,
                 "NOT_SERVING while Triton is frozen")  # fmt: skip
    finally:
        os.kill(own_triton.process.pid, signal.SIGCONT)
    wait_for(
        lambda: health(fragile.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING"
    )
    async with grpc.aio.insecure_channel(fragile.address) as channel:
        code, _ = await timed_score(pb_grpc.PersonalizationStub(channel), timeout=60)
    assert code == grpc.StatusCode.OK


async def test_triton_killed_under_load_fails_fast_and_the_gateway_recovers_by_itself(
    fragile: GatewayProcess, own_triton: TritonServer
) -> None:
    assert own_triton.process is not None
    timeout = 8.0
    outcomes: list[tuple[grpc.StatusCode, float]] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(fragile.address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)

        async def client() -> None:
            while not stop.is_set():
                outcomes.append(await timed_score(stub, timeout))

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(2.0)
        served_before = len(outcomes)
        os.killpg(own_triton.process.pid, signal.SIGKILL)  # server and Python stubs, no goodbye
        killed_at = len(outcomes)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*clients)
    assert served_before >= 1 and outcomes[0][0] == grpc.StatusCode.OK, outcomes[:5]
    after = outcomes[killed_at:]
    codes = {c for c, _ in after}
    assert grpc.StatusCode.UNAVAILABLE in codes and codes <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
    }, after
    assert max(t for _, t in after) < timeout, after  # in-flight calls failed, none waited out its deadline
    wait_for(lambda: health(fragile.address, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING, 15,
             "NOT_SERVING with Triton dead")  # fmt: skip
    assert health(fragile.address, "") == health_pb2.HealthCheckResponse.SERVING  # alive, not ready

    own_triton.stop()  # reap the killed group and its shared memory
    own_triton.start(keep_ports=True)  # the same address: nothing tells the gateway
    wait_for(lambda: health(fragile.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING, 30,
             "SERVING once Triton is back")  # fmt: skip
    async with grpc.aio.insecure_channel(fragile.address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        results = await asyncio.gather(*(timed_score(stub, timeout=60) for _ in range(4)))
    assert [c for c, _ in results] == [grpc.StatusCode.OK] * 4, results


# --- Redis killed and restarted with AOF ------------------------------------------------------------------
def ratings(photos: list[Photo], values: list[int]) -> list[pb.Rating]:
    return [
        pb.Rating(image=pb.Image(data=p.path.read_bytes()), value=v, scale=STARS)
        for p, v in zip(photos, values, strict=True)
    ]


async def test_redis_killed_and_restarted_with_aof_loses_no_settled_rating_and_nothing_is_half_written(
    triton_server: TritonServer, photos: list[Photo], tmp_path: Path
) -> None:
    port, workdir = free_port(), tmp_path / "redis"
    store = RedisServer(port=port, appendonly=True, workdir=workdir).start()
    gateway = start_gateway(store.url, triton_server.grpc_url)
    keys = Keys()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.PersonalizationStub(channel)
            settled = ratings(photos[740:744], [5, 4, 2, 1])
            await stub.AddRatings(pb.AddRatingsRequest(user_id="keep", ratings=settled), timeout=120)
            images = [r.image for r in settled]
            await asyncio.sleep(2.0)  # past appendfsync everysec: on disk now

            async def writer(user: str) -> int:
                acked = 0
                for i in range(40):
                    try:
                        one = pb.Rating(image=images[i % 4], value=1 + i % 5, scale=STARS)
                        await stub.AddRatings(pb.AddRatingsRequest(user_id=user, ratings=[one]), timeout=10)
                        acked += 1
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                        break  # Redis is gone: the write failed cleanly
                return acked

            storm = asyncio.gather(*(writer(f"storm{i}") for i in range(4)))
            await asyncio.sleep(0.7)
            assert store.process is not None
            store.process.kill()  # SIGKILL mid-write: AOF is all that is left
            acked = await storm
            store.stop()

            # Down: a fresh user's Score falls back with the reason; writes fail and leave nothing.
            (fallback,) = (
                await stub.Score(pb.ScoreRequest(user_id="ghost", images=images[:1]), timeout=60)
            ).scores
            assert not fallback.personalized
            assert fallback.fallback_reason == pb.FALLBACK_REASON_STORE_UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.AddRatings(pb.AddRatingsRequest(user_id="during", ratings=settled[:1]), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            store = RedisServer(port=port, appendonly=True, workdir=workdir).start()
            # Back: the gateway reconnects by itself (no restart), and the settled profile survived.
            profile = await stub.GetProfile(pb.GetProfileRequest(user_id="keep"), timeout=30)
            assert profile.exists and profile.num_ratings == 4
            (again,) = (
                await stub.Score(pb.ScoreRequest(user_id="keep", images=images[:1]), timeout=60)
            ).scores
            assert again.personalized
            assert not (await stub.GetProfile(pb.GetProfileRequest(user_id="during"), timeout=30)).exists
            await stub.AddRatings(pb.AddRatingsRequest(user_id="during", ratings=settled[:1]), timeout=60)

            # Nothing half-written: each stormed user's rating count matches its ratings list exactly.
            with redis.Redis.from_url(store.url) as admin:
                for i, acked_n in enumerate(acked):
                    user = f"storm{i}"
                    stored = admin.llen(keys.ratings("default", user))
                    count = admin.hget(keys.profile("default", user), "num_ratings")
                    assert int(count or 0) == stored, (user, count, stored)
                    print(f"{user}: {acked_n} acknowledged before the kill, {stored} on disk after it")
                    # Redis writes the AOF before it replies, so a killed process loses no acknowledged
                    # rating (fsync every second bounds only what a machine crash can lose); one
                    # call may have been applied with its reply lost.
                    assert acked_n <= stored <= acked_n + 1, (user, acked_n, stored)
                    if stored:
                        reply = await stub.GetProfile(pb.GetProfileRequest(user_id=user), timeout=30)
                        assert reply.num_ratings == stored
    finally:
        assert gateway.stop() == 0, gateway.output()[-3000:]
        store.stop()
