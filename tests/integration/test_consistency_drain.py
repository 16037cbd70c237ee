"""What a caller may rely on while a gateway drains, on the real stack, with the order of events fixed by
barriers instead of sleeps: Triton is frozen (SIGSTOP) so that work in flight stays in flight, the
gateway's own Triton counter says when it got there, and the gateway's health says when the drain began.

Once a draining gateway says NOT_SERVING (or no longer takes calls), a new call or ScoreStream is refused
with UNAVAILABLE before anything is done, so the client sends it again elsewhere; a stream open when the
drain began answers every request the gateway had read and then ends with UNAVAILABLE; a call in flight
completes; and the gateway exits as soon as that work is done, not after its whole drain grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import repository_dir
from piaa_triton.server import ServerOptions, TritonServer
from tests.fixtures.gateway import start_gateway
from tests.fixtures.photos import Photo

GRACE_S = 600
"""The gateway's drain_grace_s: far beyond what the test waits, so that waiting it out cannot pass."""
EXIT_BOUND_S = 120.0
"""How long the gateway may take to exit once the last work in flight is answered (generous: 2 loaded
cores); a gateway that waited for its grace would take GRACE_S."""


def noise_jpeg() -> bytes:
    """A JPEG never seen before: no feature cache or memory has it, so Triton must run."""
    pixels = np.random.default_rng().integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def triton_images(metrics: str) -> float:
    """piaa_triton_images_total: images the gateway has sent to Triton (counted as each call starts)."""
    found = re.search(r"^piaa_triton_images_total (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def own_triton() -> Iterator[TritonServer]:
    """A Triton of this module's own (it gets frozen), stopped at the end."""
    with TritonServer(ServerOptions(repository=repository_dir("cpu"))) as server:
        yield server


async def _until(condition: object, timeout_s: float, what: str) -> None:
    """Polls `condition` (an async callable) until it is true; fails after `timeout_s`."""
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if await condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {what} after {timeout_s} s")


async def _next(call: grpc.aio.StreamStreamCall) -> object:
    """The stream's next answer, or grpc.aio.EOF once it ended (with whatever status); fails after a
    minute without either."""
    try:
        return await asyncio.wait_for(call.read(), 60)
    except grpc.aio.AioRpcError:
        return grpc.aio.EOF


async def test_a_draining_gateway_refuses_new_streams_and_calls_answers_the_open_ones_and_exits_early(
    own_triton: TritonServer, redis_server: RedisServer, photos: list[Photo]
) -> None:
    gateway = start_gateway(redis_server.url, own_triton.grpc_url, "--drain-grace-s", str(GRACE_S))
    triton = own_triton.process
    assert gateway.proc is not None and triton is not None
    known = pb.Image(id="known.jpg", data=photos[720].path.read_bytes())
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.PersonalizationStub(channel)
            # Stream A, open before the drain: its first request answered while Triton runs.
            open_stream = stub.ScoreStream(timeout=300)
            await open_stream.write(pb.ScoreRequest(user_id="drain-a", images=[known]))
            first = await _next(open_stream)
            assert isinstance(first, pb.ScoreStreamResponse)
            assert first.HasField("response"), first
            sent = triton_images(gateway.metrics())

            # Triton frozen: a request on A and a unary call go in flight and stay there.
            os.kill(triton.pid, signal.SIGSTOP)
            pending = pb.Image(id="pending.jpg", data=noise_jpeg())
            await open_stream.write(pb.ScoreRequest(user_id="drain-a", images=[pending]))
            in_flight = asyncio.ensure_future(
                stub.Score(
                    pb.ScoreRequest(user_id="drain-x", images=[pb.Image(data=noise_jpeg())]), timeout=300
                )
            )

            async def both_at_triton() -> bool:
                return triton_images(gateway.metrics()) >= sent + 2

            await _until(both_at_triton, 60, "both images sent to Triton")

            # The drain begins; whoever sees it (health "" NOT_SERVING, or the gateway no longer taking
            # calls) opens new work only after it.
            gateway.proc.terminate()
            health = health_pb2_grpc.HealthStub(channel)

            async def draining() -> bool:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                except grpc.aio.AioRpcError as err:
                    return err.code() == grpc.StatusCode.UNAVAILABLE
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await _until(draining, 60, "draining")

            # Stream B, opened during the drain on the same channel (as the client reopens): refused, no
            # answer, nothing read. The old gateway answered it and then held its drain for B.
            late_stream = stub.ScoreStream(timeout=300)
            with contextlib.suppress(grpc.aio.AioRpcError):  # already ended: its status says how
                await late_stream.write(pb.ScoreRequest(user_id="drain-b", images=[known]))
            late = await _next(late_stream)
            assert late is grpc.aio.EOF, f"a stream opened during the drain was served: {late}"
            assert await late_stream.code() == grpc.StatusCode.UNAVAILABLE
            # A unary call opened during the drain: refused the same way.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Score(pb.ScoreRequest(user_id="drain-y", images=[known]), timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            # Triton back: the work in flight when the drain began is answered.
            os.kill(triton.pid, signal.SIGCONT)
            done = await asyncio.wait_for(in_flight, 120)
            assert len(done.scores) == 1
            answered = await _next(open_stream)
            assert isinstance(answered, pb.ScoreStreamResponse)
            assert answered.HasField("response"), answered
            assert answered.response.scores[0].id == "pending.jpg"
            assert await _next(open_stream) is grpc.aio.EOF
            assert await open_stream.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (await open_stream.details() or "")
            # Nothing is in flight any more: the gateway exits now, not after its grace.
            exit_code = await asyncio.get_running_loop().run_in_executor(
                None, gateway.proc.wait, EXIT_BOUND_S
            )
            assert exit_code == 0, gateway.output_tail()
    finally:
        os.kill(triton.pid, signal.SIGCONT)
        gateway.close()
