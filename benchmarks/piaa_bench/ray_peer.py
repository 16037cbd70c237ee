"""The peer a user might pick instead of PIAA's stack: Ray Serve with the same ONNX models and math.

One deployment replica: HTTP POST /score with the images concatenated in the body (`x-lengths`:
comma-separated sizes) and the user in `x-user`; every image goes through one `@serve.batch` method that
decodes with piaa_triton.imaging, runs the backbone and heads in ONNX Runtime (the threads of Triton's
CPU profile), reads the batch's profiles in one pipelined round trip through the same RedisProfileStore,
and applies the same personalization (residual.personalize). Needs the optional group
requirements/bench-peer.txt (ray[serve]); run by `python -m piaa_bench.peer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from piaa_bench.stats import Sample
from piaa_client import features as fs
from piaa_personalization.model import residual
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig

log = logging.getLogger(__name__)

ROUTE = "/score"
MAX_BATCH = 16
"""The same largest batch as the CPU ensemble and the gateway's micro-batcher."""
BATCH_WAIT_S = 0.002
"""The same wait for company as the gateway's max_batch_delay_ms."""


class PeerModel:
    """The pipeline of one replica, without Ray (unit-testable and reused by the deployment)."""

    def __init__(self, repository: Path, redis_url: str, tenant: str = "default") -> None:
        from piaa_bench.baselines import Pipeline

        # The same sessions as the in-process limit and Triton's CPU profile: backbone 2 intra-op threads,
        # heads 1, idle threads sleep (ORT's default spinning burned ~4x the CPU per image here).
        pipeline = Pipeline(repository)
        self.backbone, self.heads = pipeline.backbone, pipeline.heads
        self.store = RedisProfileStore(StoreConfig(url=redis_url))
        self.tenant = tenant
        self.layout = residual.FeatureLayout()

    def infer(self, images: list[bytes]) -> residual.HeadOutputs:
        """Head outputs of encoded images (decode + backbone + heads). Raises ImageError on a bad image."""
        from piaa_triton.imaging import preprocess

        pixels = np.stack([preprocess(d) for d in images])
        (feature,) = self.backbone.run(["feature"], {"image": pixels})
        names = [o.name for o in fs.HEAD_OUTPUTS]
        out = dict(zip(names, self.heads.run(names, {"feature": feature}), strict=True))
        return residual.HeadOutputs(
            out["generic"].reshape(-1), out["attributes"], out["content"], out["embedding"]
        )

    async def score(self, items: list[tuple[bytes, str, bool]]) -> list[float]:
        """Scores of (image, user, generic_only) items: one inference, one profile read for the batch."""
        heads = await asyncio.to_thread(self.infer, [image for image, _, _ in items])
        users = sorted({user for _, user, generic in items if not generic})
        read = await self.store.get_profiles(self.tenant, users) if users else []
        profiles = dict(zip(users, read, strict=True))
        weights = np.zeros((len(items), self.layout.dim))
        for i, (_, user, generic) in enumerate(items):
            p = profiles.get(user)
            if not generic and p is not None and p.weights is not None and p.is_current(self.layout):
                weights[i] = p.weights
        return [float(s) for s in residual.personalize(heads.generic, self.layout.features(heads), weights)]


def split_body(body: bytes, lengths: str) -> list[bytes]:
    """The images of a request body from the `x-lengths` header. Raises ValueError when they disagree."""
    sizes = [int(x) for x in lengths.split(",") if x]
    if sum(sizes) != len(body) or not sizes or min(sizes) <= 0:
        raise ValueError(f"x-lengths {lengths!r} does not split a body of {len(body)} bytes")
    offsets = np.cumsum([0, *sizes])
    return [body[a:b] for a, b in itertools.pairwise(offsets)]


def deploy(repository: Path, redis_url: str, port: int) -> str:
    """Starts Ray (local, no dashboard) and the deployment; returns the URL to POST to."""
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class PiaaPeer:
        def __init__(self) -> None:
            self.model = PeerModel(repository, redis_url)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def score(self, items: list[tuple[bytes, str, bool]]) -> list[float]:
            return await self.model.score(items)

        async def __call__(self, request: Request) -> JSONResponse:
            try:
                images = split_body(await request.body(), request.headers.get("x-lengths", ""))
            except ValueError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            user = request.headers.get("x-user", "")
            generic = request.headers.get("x-generic-only") == "1"
            scores = await asyncio.gather(*(self.score((im, user, generic)) for im in images))
            return JSONResponse({"scores": scores})

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment: Any = PiaaPeer  # the decorator's type is only known when ray is installed
    serve.run(deployment.bind(), route_prefix=ROUTE)
    _unnice()
    return f"http://127.0.0.1:{port}{ROUTE}"


def ray_pids(exclude: set[int]) -> list[int]:
    """Ray's processes started by this process (its descendants outside the `exclude` trees)."""
    import psutil

    skip = set(exclude)
    for pid in exclude:
        with contextlib.suppress(psutil.NoSuchProcess):
            skip.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in skip]


def _unnice() -> None:
    """Ray starts its workers at niceness 15; on a machine shared with other jobs that would hand the
    peer fewer cycles than the gateway's processes (niceness 0), so they are put back to 0 (needs root or
    CAP_SYS_NICE; otherwise the comparison says so)."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.nice() > 0:
                try:
                    p.nice(0)
                except psutil.AccessDenied:
                    log.warning("cannot renice Ray worker %d to 0: the peer runs at lower priority", p.pid)


def shutdown() -> None:
    """Stops Serve and Ray."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


async def http_send(session: Any, url: str, workload: Any, due: float, timeout: float = 60.0) -> Sample:
    """One workload request as an HTTP POST to the peer; code is OK or HTTP_<status> / the error's name."""
    request = workload.request()
    images = [im.data for im in request.images]
    headers = {
        "x-lengths": ",".join(str(len(d)) for d in images),
        "x-user": request.user_id,
        "x-generic-only": "1" if request.generic_only else "0",
    }
    import aiohttp

    sent = time.perf_counter()
    try:
        limit = aiohttp.ClientTimeout(total=timeout)
        async with session.post(url, data=b"".join(images), headers=headers, timeout=limit) as resp:
            await resp.read()
            code = "OK" if resp.status == 200 else f"HTTP_{resp.status}"
    except (TimeoutError, OSError, aiohttp.ClientError) as e:
        code = type(e).__name__
    return Sample(due, sent, time.perf_counter(), len(images), code)
