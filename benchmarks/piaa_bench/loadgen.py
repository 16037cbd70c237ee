"""Async gRPC load generator for the gateway, speaking piaa.v1 through the stubs of piaa_client.api.v1.

Closed loop: `concurrency` callers, each sending its next request when the last one answered.
Open loop: requests leave at Poisson arrival times at a fixed rate whatever the answers do, and latency
is measured from each request's *scheduled* time, so queueing (in the server or in this process) shows.

    python -m piaa_bench.loadgen --address 127.0.0.1:50151 --closed 1,4,16 --images-per-request 8
    python -m piaa_bench.loadgen --address 127.0.0.1:50151 --open 2,4 --duration 10 --users 1000

Every request's images are made unique by a nonce after the JPEG's end (decoders ignore trailing bytes),
so the gateway's feature cache never hits and every image runs through Triton; `--cache-hits` turns that
off to measure the cached path.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from piaa_bench.stats import Sample, poisson_schedule, summarize
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.errors import STATUS_BY_NUMBER
from piaa_personalization.core.metrics import TIMING_METADATA_KEY, TIMING_REQUEST_KEY, parse_timings

SHARED_PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "photos"
_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def load_photos(folder: Path | None = None, limit: int | None = None) -> list[bytes]:
    """Encoded photos from `folder`; by default ../shared/data/photos when present, else the demo album.

    Raises FileNotFoundError when the folder holds no JPEG, PNG or WebP.
    """
    if folder is None and not SHARED_PHOTOS.is_dir():
        import tempfile

        from piaa_personalization.demo.album import make_album

        with tempfile.TemporaryDirectory(prefix="piaa-bench-album-") as tmp:
            return [p.read_bytes() for p in make_album(Path(tmp))][:limit]
    folder = folder or SHARED_PHOTOS
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no photos in {folder}")
    return [p.read_bytes() for p in files[:limit]]


def user_ids(count: int) -> list[str]:
    """The ids of the benchmark's users (what preload.preload_profiles writes)."""
    return [f"bench-u{i}" for i in range(count)]


@dataclass
class Workload:
    """What every request of a run carries."""

    photos: Sequence[bytes]
    images_per_request: int = 1
    users: Sequence[str] = ("bench-u0",)
    generic_only: bool = False
    unique: bool = True
    """Append a per-image nonce so no image is ever a feature-cache hit."""
    seed: int = 0
    by_digest: bool = False
    """Send each photo's SHA-256 (`Image.digest`) instead of its bytes: a client re-scoring known photos."""
    timings: bool = True
    """Ask for the server's stage timings (TIMING_REQUEST_KEY); a production client does not."""

    def __post_init__(self) -> None:
        if not self.photos or not self.users or self.images_per_request < 1:
            raise ValueError("a workload needs photos, users and at least one image per request")
        if self.by_digest and self.unique:
            raise ValueError("by_digest sends known photos: it needs unique=False")
        self._digests = [hashlib.sha256(p).hexdigest() for p in self.photos] if self.by_digest else []
        self._next = itertools.count()
        self._rng = np.random.default_rng(self.seed)
        self._run = f"{time.time_ns():x}".encode()

    def request(self) -> pb.ScoreRequest:
        """The next request: photos taken in turn, a user drawn uniformly from `users`."""
        i = next(self._next)
        k = self.images_per_request
        images = []
        for j in range(i * k, i * k + k):
            if self.by_digest:
                images.append(pb.Image(digest=self._digests[j % len(self.photos)], id=str(j)))
                continue
            data = self.photos[j % len(self.photos)]
            if self.unique:
                data = data + b"piaa-bench:" + self._run + b":%d" % j
            images.append(pb.Image(data=data, id=str(j)))
        user = self.users[int(self._rng.integers(len(self.users)))]
        return pb.ScoreRequest(user_id=user, images=images, generic_only=self.generic_only)


_ASK_TIMINGS = ((TIMING_REQUEST_KEY, "1"),)


async def _call(
    stub: pb_grpc.PersonalizationStub, workload: Workload, scheduled: float, timeout: float
) -> Sample:
    request = workload.request()
    sent = time.perf_counter()
    call = stub.Score(request, timeout=timeout, metadata=_ASK_TIMINGS if workload.timings else ())
    stages: dict[str, float] = {}
    try:
        await call
        code = "OK"
        trailing = dict(await call.trailing_metadata() or ())
        if TIMING_METADATA_KEY in trailing:
            stages = parse_timings(str(trailing[TIMING_METADATA_KEY]))
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    return Sample(scheduled, sent, time.perf_counter(), len(request.images), code, stages)


def channel(address: str) -> grpc.aio.Channel:
    """An insecure channel that takes the largest requests the gateway accepts."""
    return grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )


Send = Callable[[float], Awaitable[Sample]]
"""Sends one request that was due at the given perf_counter time and returns its Sample."""


async def drive_closed(send: Send, concurrency: int, requests: int) -> list[Sample]:
    """`requests` sends from `concurrency` callers, each sending again as soon as its answer is in."""
    left = itertools.count()
    samples: list[Sample] = []

    async def caller() -> None:
        while next(left) < requests:
            samples.append(await send(time.perf_counter()))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return samples


async def drive_open(send: Send, offsets: Sequence[float], lead: float = 0.05) -> list[Sample]:
    """Sends at `offsets` seconds from now (+ lead), never waiting for answers; each Sample is scheduled
    at its due time, so a late send or a slow answer both count in its latency."""
    start = time.perf_counter() + lead
    tasks = []
    for offset in offsets:
        due = start + offset
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(send(due)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(
    address: str, workload: Workload, concurrency: int, requests: int, timeout: float = 60.0
) -> list[Sample]:
    """Closed loop against the gateway at `address` (see drive_closed)."""
    async with channel(address) as ch:
        stub = pb_grpc.PersonalizationStub(ch)
        return await drive_closed(lambda due: _call(stub, workload, due, timeout), concurrency, requests)


async def streamed_loop(
    address: str, workload: Workload, streams: int, requests: int, timeout: float = 60.0
) -> list[Sample]:
    """`requests` requests over `streams` ScoreStreams, each stream a closed loop (the next request is
    written when the last one's answer is in): drive_closed's load on open streams instead of calls."""
    async with channel(address) as ch:
        stub = pb_grpc.PersonalizationStub(ch)
        calls = [stub.ScoreStream(timeout=timeout) for _ in range(streams)]
        idle: asyncio.Queue[Any] = asyncio.Queue()
        for call in calls:
            idle.put_nowait(call)

        async def send(scheduled: float) -> Sample:
            call = await idle.get()
            request = workload.request()
            sent = time.perf_counter()
            await call.write(request)
            answer = await call.read()
            idle.put_nowait(call)
            failed = answer.error.code if answer.HasField("error") else 0
            code = STATUS_BY_NUMBER[failed].name
            return Sample(scheduled, sent, time.perf_counter(), len(request.images), code)

        try:
            return await drive_closed(send, streams, requests)
        finally:
            for call in calls:
                await call.done_writing()
                await call.code()  # the stream's end


async def open_loop(
    address: str, workload: Workload, rate: float, duration: float, *, seed: int = 0, timeout: float = 30.0
) -> list[Sample]:
    """Requests at Poisson arrivals of `rate`/s for `duration` s against the gateway (see drive_open)."""
    offsets = poisson_schedule(rate, duration, np.random.default_rng(seed))
    async with channel(address) as ch:
        stub = pb_grpc.PersonalizationStub(ch)
        return await drive_open(lambda due: _call(stub, workload, due, timeout), offsets)


def main(argv: list[str] | None = None) -> int:
    """CLI against a running gateway: one JSON summary per load point on stdout."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the gateway, HOST:PORT")
    parser.add_argument("--photos", type=Path, default=None, help="default: shared photos or demo album")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--users", type=int, default=1, help="draw users from bench-u0..N-1 (see preload)")
    parser.add_argument("--generic-only", action="store_true")
    parser.add_argument("--cache-hits", action="store_true", help="send the photos as they are")
    parser.add_argument("--closed", default="", help="comma-separated concurrencies")
    parser.add_argument("--requests", type=int, default=64, help="requests per closed-loop point")
    parser.add_argument(
        "--stream", action="store_true", help="closed loop on open ScoreStreams (one per caller), not calls"
    )
    parser.add_argument("--open", default="", help="comma-separated arrival rates, requests/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per open-loop point")
    args = parser.parse_args(argv)
    workload = Workload(
        load_photos(args.photos),
        args.images_per_request,
        user_ids(args.users),
        args.generic_only,
        unique=not args.cache_hits,
    )
    for c in [int(x) for x in args.closed.split(",") if x]:
        drive = streamed_loop if args.stream else closed_loop
        samples = asyncio.run(drive(args.address, workload, c, args.requests))
        mode = "closed_stream" if args.stream else "closed"
        print(json.dumps({"mode": mode, "concurrency": c, **summarize(samples).to_json()}), flush=True)
    for r in [float(x) for x in args.open.split(",") if x]:
        samples = asyncio.run(open_loop(args.address, workload, r, args.duration))
        print(json.dumps({"mode": "open", "rate": r, **summarize(samples).to_json()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
