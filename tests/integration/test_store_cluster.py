"""Redis Cluster faults with the real gateway: a primary SIGKILLed under AddRatings load (no acknowledged
rating lost, Score answers throughout), a node down at start-up, a cluster without quorum, resharding.

Each test that breaks a cluster starts its own (about 2 s); the session cluster stays healthy for the
store and gateway tests that run in both modes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import subprocess
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_personalization.model.residual import FeatureLayout, Prior
from piaa_personalization.store.redis_cluster import LocalCluster, find_redis_cli
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig, StoreUnavailable
from piaa_triton.server import TritonServer
from tests.fixtures.gateway import start_gateway
from tests.fixtures.photos import Photo
from tests.integration.test_store import make_records

USERS = [f"fan-{i}" for i in range(9)]
TENANT = "default"


async def _rate_forever(  # noqa: PLR0917
    stub: pb_grpc.PersonalizationStub,
    users: list[str],
    images: list[bytes],
    acked: Counter[tuple[str, int]],
    failed: Counter[str],
    stop: asyncio.Event,
) -> None:
    """AddRatings of one image at a time for `users` in turn; counts what was acknowledged."""
    counter = itertools.count()
    while not stop.is_set():
        k = next(counter)
        user, image = users[k % len(users)], (k // len(users)) % len(images)
        rating = pb.Rating(
            image=pb.Image(data=images[image]), value=1 + k % 5, scale=pb.RATING_SCALE_STARS_1_5
        )
        try:
            await stub.AddRatings(pb.AddRatingsRequest(user_id=user, ratings=[rating]), timeout=10)
            acked[(user, image)] += 1
        except grpc.aio.AioRpcError as err:
            failed[err.code().name] += 1
            await asyncio.sleep(0.05)


async def _score_forever(
    stub: pb_grpc.PersonalizationStub,
    image: bytes,
    log: list[tuple[float, str]],
    stop: asyncio.Event,
) -> None:
    """Score for every user in turn; logs (time, outcome) with outcome 'personal', a fallback reason,
    or an error code."""
    for k in itertools.count():
        if stop.is_set():
            return
        try:
            reply = await stub.Score(
                pb.ScoreRequest(user_id=USERS[k % len(USERS)], images=[pb.Image(data=image)]), timeout=10
            )
            (s,) = reply.scores
            outcome = "personal" if s.personalized else pb.FallbackReason.Name(s.fallback_reason)
        except grpc.aio.AioRpcError as err:
            outcome = err.code().name
        log.append((time.monotonic(), outcome))
        await asyncio.sleep(0.02)


async def test_a_primary_killed_under_add_ratings_loses_no_acknowledged_rating(
    triton_server: TritonServer, photos: list[Photo]
) -> None:
    images = [p.path.read_bytes() for p in photos[:40]]
    with LocalCluster(3, node_timeout_ms=1000) as cluster:
        gateway = start_gateway(cluster.url, triton_server.grpc_url, "--redis-mode", "cluster")
        store = RedisProfileStore(StoreConfig(url=cluster.url, mode="cluster"))
        try:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = pb_grpc.PersonalizationStub(channel)
                # Features cached and every user with a profile before the fault.
                await stub.Score(
                    pb.ScoreRequest(generic_only=True, images=[pb.Image(data=b) for b in images]),
                    timeout=120,
                )
                acked: Counter[tuple[str, int]] = Counter()
                failed: Counter[str] = Counter()
                log: list[tuple[float, str]] = []
                stop = asyncio.Event()
                groups = [USERS[i::3] for i in range(3)]
                tasks = [
                    asyncio.create_task(_rate_forever(stub, g, images, acked, failed, stop)) for g in groups
                ]
                tasks.append(asyncio.create_task(_score_forever(stub, images[0], log, stop)))
                await asyncio.sleep(2.0)
                victim = await store.conn.node_of(store.keys.profile(TENANT, USERS[0]))
                assert victim is not None
                before_kill = sum(acked.values())
                killed_at = time.monotonic()
                cluster.kill(int(victim.port))
                await asyncio.to_thread(cluster.wait_failover, int(victim.port))
                healed_at = time.monotonic()
                await asyncio.sleep(3.0)  # writes and scores after the failover
                stop.set()
                await asyncio.gather(*tasks)

                outcomes = Counter(o for t, o in log if t >= killed_at)
                fallback = [t for t, o in log if o == "FALLBACK_REASON_STORE_UNAVAILABLE"]
                window = (max(fallback) - min(fallback)) if fallback else 0.0
                found: Counter[tuple[str, int]] = Counter()
                digest_of = {p: i for i, p in enumerate(_digests(images))}
                for user in USERS:
                    ratings = await store.get_ratings(TENANT, user)
                    found.update((user, digest_of[r.digest]) for r in ratings)
                    profile = await store.get_profile(TENANT, user)
                    assert profile is not None and profile.num_ratings == len(ratings)
                    assert profile.covers <= len(ratings)
                missing = acked - found
                print(
                    f"\nfailover: {sum(acked.values())} ratings acknowledged "
                    f"({before_kill} before the kill), "
                    f"{sum(found.values())} found, {sum(missing.values())} acknowledged but missing; "
                    f"failed calls {dict(failed)}; failover took {healed_at - killed_at:.1f} s; "
                    f"Score outcomes {dict(outcomes)}; generic fallback for {window:.1f} s"
                )
                assert not missing, f"acknowledged ratings lost: {missing}"
                assert sum(acked.values()) > before_kill, "no rating was acknowledged after the failover"
                # from the kill on: personal, or generic because the store is unavailable; never an error
                assert set(outcomes) <= {"personal", "FALLBACK_REASON_STORE_UNAVAILABLE"}, outcomes
                assert log[-1][1] == "personal"  # personalized again after the failover
                assert [o for t, o in log if t > healed_at + 1.0].count("personal") >= 5
        finally:
            await store.close()
            gateway.stop()
            gateway.close()


def _digests(images: list[bytes]) -> list[str]:
    return [hashlib.sha256(b).hexdigest() for b in images]


def _node_id(port: int) -> str:
    with redis.Redis(port=port, decode_responses=True) as c:
        return str(c.execute_command("CLUSTER", "MYID"))


async def test_a_node_down_at_start_and_a_cluster_without_quorum_are_unavailable() -> None:
    layout = FeatureLayout()
    prior = Prior.zero(layout.dim)
    with LocalCluster(3, node_timeout_ms=1000) as cluster:
        primaries = cluster.primary_ports()
        cluster.kill(primaries[0])  # down before the store ever connects: it learns the slots elsewhere
        cluster.wait_failover(primaries[0])
        store = RedisProfileStore(StoreConfig(url=cluster.url, mode="cluster", retries=0))
        try:
            users = [f"u{i}" for i in range(60)]
            ports = {u: int((await store.conn.node_of(store.keys.profile(TENANT, u))).port) for u in users}  # type: ignore[union-attr]
            paired = next(u for u in users if ports[u] in primaries)
            lonely = next(u for u in users if ports[u] not in primaries)  # on the promoted replica
            await store.add_ratings(TENANT, paired, make_records(1, 3), layout=layout, prior=prior)
            # the promoted primary has no replica: a write that needs one is refused, not acknowledged
            with pytest.raises(StoreUnavailable, match="replicas"):
                await store.add_ratings(TENANT, lonely, make_records(2, 1), layout=layout, prior=prior)
            # two of three primaries gone: no quorum, no failover; reads and writes say unavailable
            for port in cluster.primary_ports()[:2]:
                cluster.kill(port)
            await asyncio.sleep(3.0)
            with pytest.raises(StoreUnavailable):
                await store.get_profiles(TENANT, users)
            with pytest.raises(StoreUnavailable):
                await store.add_ratings(TENANT, "late", make_records(3, 1), layout=layout, prior=prior)
        finally:
            await store.close()


async def test_reads_and_writes_follow_a_reshard(redis_cluster: LocalCluster, tmp_path: Path) -> None:
    """`redis-cli --cluster reshard` moves slots while the store reads and writes: MOVED and ASK are
    followed, every acknowledged rating is there, nothing is half-written."""
    layout, prior = FeatureLayout(), Prior.zero(21)
    store = RedisProfileStore(StoreConfig(url=redis_cluster.url, mode="cluster"))
    users = [f"mover-{i}" for i in range(30)]
    try:
        for i, u in enumerate(users):
            await store.add_ratings(TENANT, u, make_records(100 + i, 2), layout=layout, prior=prior)
        ports = redis_cluster.primary_ports()
        source, target = (_node_id(port) for port in ports[:2])
        cli = find_redis_cli()
        log = (tmp_path / "reshard.log").open("w")  # redis-cli prints every key it moves
        reshard = subprocess.Popen(
            [str(cli), "--cluster", "reshard", f"127.0.0.1:{ports[0]}", "--cluster-from", source,
             "--cluster-to", target, "--cluster-slots", "2000", "--cluster-yes",
             "--cluster-pipeline", "10"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        written: Counter[str] = Counter({u: 2 for u in users})
        errors = 0
        k = 0
        while reshard.poll() is None or k < 60:
            u = users[k % len(users)]
            try:
                await store.add_ratings(TENANT, u, make_records(1000 + k, 1), layout=layout, prior=prior)
                written[u] += 1
            except StoreUnavailable:
                errors += 1
            await store.get_profiles(TENANT, users)
            k += 1
        reshard.wait(60)
        log.close()
        assert reshard.returncode == 0, (tmp_path / "reshard.log").read_text()[-2000:]
        redis_cluster.wait_healthy(30.0)
        print(f"\nreshard: {k} writes during the move, {errors} refused as unavailable")
        for u in users:
            profile = await store.get_profile(TENANT, u)
            ratings = await store.get_ratings(TENANT, u)
            assert profile is not None and profile.num_ratings == len(ratings) >= written[u]
            assert profile.covers == len(ratings)
    finally:
        await store.close()
