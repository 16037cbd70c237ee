"""The gateway over real gRPC, against the real tritonserver and redis-server of the session; the tests
that touch the store run twice (`target`): on the single redis-server and on the session Redis Cluster."""

from __future__ import annotations

import asyncio
import io
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image as PILImage
from scipy.stats import spearmanr

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.features import FEATURE_SPACE_VERSION
from piaa_personalization.core.metrics import TIMING_METADATA_KEY, TIMING_REQUEST_KEY, parse_timings
from piaa_personalization.store import redis_store as store_module
from piaa_personalization.store.format import Keys
from piaa_personalization.store.redis_cluster import LocalCluster
from tests.fixtures.gateway import GatewayProcess, start_gateway
from tests.fixtures.photos import Photo
from tests.fixtures.redis import flush_cluster

STARS = pb.RATING_SCALE_STARS_1_5
# ImageNet classes 0-397 are animals; these are land, water and air vehicles.
VEHICLES = frozenset(
    {403, 404, 407, 408, 417, 436, 444, 466, 468, 472, 484, 510, 511, 547, 554, 555, 565, 569, 573, 575, 576,
     603, 609, 612, 625, 627, 628, 654, 656, 661, 665, 670, 671, 675, 705, 717, 724, 734, 751, 757, 779, 780,
     803, 814, 817, 820, 829, 833, 847, 864, 866, 867, 870, 871, 874, 880, 895, 908, 914}
)  # fmt: skip


def is_animal(photo: Photo) -> bool:
    return photo.imagenet_index < 398


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.PersonalizationStub]:
    with grpc.insecure_channel(gateway.address) as channel:
        yield pb_grpc.PersonalizationStub(channel)


@dataclass
class Target:
    """A gateway, its stub, and the Redis it keeps profiles in (url, mode)."""

    gateway: GatewayProcess
    stub: pb_grpc.PersonalizationStub
    url: str
    mode: str

    def redis(self) -> redis.Redis | redis.RedisCluster:
        """A plain redis-py client of this target's Redis, in its mode."""
        return (
            redis.RedisCluster.from_url(self.url)
            if self.mode == "cluster"
            else redis.Redis.from_url(self.url)
        )

    def store(self) -> store_module.RedisProfileStore:
        return store_module.RedisProfileStore(store_module.StoreConfig(url=self.url, mode=self.mode))

    def keys(self) -> list[bytes]:
        """Every key in this target's Redis (every primary of a cluster)."""
        with self.redis() as r:
            if isinstance(r, redis.RedisCluster):
                return list(r.scan_iter(match="*", target_nodes=redis.RedisCluster.PRIMARIES))
            return list(r.scan_iter(match="*"))


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def mode_gateway(
    request: pytest.FixtureRequest, triton_server: object
) -> Iterator[tuple[GatewayProcess, str, str]]:
    """The session gateway on the single redis-server, then a gateway on the session Redis Cluster
    (`--redis-mode cluster`, the URL naming one node)."""
    if request.param == "standalone":
        yield request.getfixturevalue("gateway"), request.getfixturevalue("redis_server").url, "standalone"
        return
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    triton_url = triton_server.grpc_url  # type: ignore[attr-defined]
    process = start_gateway(cluster.url, triton_url, "--redis-mode", "cluster", "--max-batch-delay-ms", "5")
    try:
        yield process, cluster.url, "cluster"
    finally:
        rc = process.stop()
        assert rc == 0, f"the cluster gateway did not stop cleanly (rc={rc}):\n{process.output_tail()}"
        process.close()


@pytest.fixture
def target(request: pytest.FixtureRequest, mode_gateway: tuple[GatewayProcess, str, str]) -> Iterator[Target]:
    """A test's gateway and Redis, once per mode; every key is removed after the test."""
    process, url, mode = mode_gateway
    cluster = request.getfixturevalue("redis_cluster") if mode == "cluster" else None
    with grpc.insecure_channel(process.address) as channel:
        yield Target(process, pb_grpc.PersonalizationStub(channel), url, mode)
    if cluster is not None:
        flush_cluster(cluster)
    else:
        with redis.Redis.from_url(url) as r:
            r.flushall()


def image(photo: Photo) -> pb.Image:
    return pb.Image(data=photo.path.read_bytes(), id=photo.path.name)


def fresh_variant(photo: Photo, seed: int) -> bytes:
    """The photo re-encoded with one pixel changed: new bytes, so no cache has seen them."""
    img = PILImage.open(photo.path).convert("RGB")
    img.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 7))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92)
    return out.getvalue()


def user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def triton_count(metrics_url: str, model: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        return metric(reply.read().decode(), "nv_inference_count", model=model)


def rate(
    stub: pb_grpc.PersonalizationStub, user_id: str, photos: list[Photo], stars: list[float]
) -> pb.Profile:
    """Adds the ratings in calls of at most 50 (the server's limit is 64); returns the last profile."""
    profile = pb.Profile()
    for start in range(0, len(photos), 50):
        pairs = list(zip(photos, stars, strict=True))[start : start + 50]
        reply = stub.AddRatings(
            pb.AddRatingsRequest(
                user_id=user_id, ratings=[pb.Rating(image=image(p), value=v, scale=STARS) for p, v in pairs]
            ),
            timeout=120,
        )
        profile = reply.profile
    return profile


def score_all(stub: pb_grpc.PersonalizationStub, user_id: str, photos: list[Photo]) -> list[pb.ImageScore]:
    out: list[pb.ImageScore] = []
    for start in range(0, len(photos), 50):
        chunk = photos[start : start + 50]
        out.extend(
            stub.Score(pb.ScoreRequest(user_id=user_id, images=[image(p) for p in chunk]), timeout=120).scores
        )
    return out


def test_personal_ranking_beats_generic_with_10_and_100_ratings(
    stub: pb_grpc.PersonalizationStub, photos: list[Photo]
) -> None:
    """Users who like animals and dislike vehicles (plus noise): the personalized scores of held-out
    photos follow their ratings better than the generic ones, after 10 and after 100 ratings.

    Several users per size, each rating another random (stratified) draw, so the claim is about the mean
    and not one lucky draw; features are cached by digest after the first user, so extra users are cheap.
    """
    rng = np.random.default_rng(7)

    def taste(p: Photo) -> float:
        base = 3.0 + 1.5 * is_animal(p) - 1.5 * (p.imagenet_index in VEHICLES)
        return float(np.clip(base + rng.normal(0, 0.5), 1, 5))

    groups = {
        "animal": [p for p in photos if is_animal(p)],
        "vehicle": [p for p in photos if p.imagenet_index in VEHICLES],
        "other": [p for p in photos if not is_animal(p) and p.imagenet_index not in VEHICLES],
    }
    for g in groups.values():
        rng.shuffle(g)  # type: ignore[arg-type]
    held_out = groups["animal"][:40] + groups["vehicle"][:20] + groups["other"][:40]
    train = {
        "animal": groups["animal"][40:],
        "vehicle": groups["vehicle"][20:],
        "other": groups["other"][40:],
    }
    draws = {10: (4, 3, 3), 100: (40, 25, 35)}  # animals, vehicles, others per user
    users_per_size = {10: 5, 100: 2}
    truth = [taste(p) for p in held_out]
    generic: float | None = None
    report: dict[int, list[float]] = {}
    for n, (na, nv, no) in draws.items():
        for _ in range(users_per_size[n]):
            chosen = [
                *rng.choice(np.array(train["animal"], dtype=object), na, replace=False),
                *rng.choice(np.array(train["vehicle"], dtype=object), nv, replace=False),
                *rng.choice(np.array(train["other"], dtype=object), no, replace=False),
            ]
            user_id = user()
            profile = rate(stub, user_id, chosen, [taste(p) for p in chosen])
            assert profile.num_ratings == n and profile.exists
            scores = score_all(stub, user_id, held_out)
            assert all(s.personalized for s in scores)
            report.setdefault(n, []).append(float(spearmanr(truth, [s.score for s in scores]).statistic))
            generic = float(spearmanr(truth, [s.generic_score for s in scores]).statistic)
    assert generic is not None
    means = {n: float(np.mean(v)) for n, v in report.items()}
    print(
        f"\nSpearman with the users' ratings on 100 held-out photos: generic {generic:.3f}; "
        + "; ".join(
            f"{n} ratings: personalized mean {means[n]:.3f} (" + ", ".join(f"{v:.3f}" for v in vals) + ")"
            for n, vals in report.items()
        )
    )
    assert means[10] > generic
    assert means[100] > generic
    assert means[100] > means[10]


async def test_200_concurrent_add_ratings_lose_nothing(target: Target, photos: list[Photo]) -> None:
    gateway, stub = target.gateway, target.stub
    pool = photos[100:120]
    cached = stub.Score(pb.ScoreRequest(images=[image(p) for p in pool], generic_only=True), timeout=60)
    digests = [s.digest for s in cached.scores]
    user_id = user()
    rng = np.random.default_rng(3)
    values = rng.uniform(1, 5, 200)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        astub = pb_grpc.PersonalizationStub(channel)
        replies = await asyncio.gather(
            *(
                astub.AddRatings(
                    pb.AddRatingsRequest(
                        user_id=user_id,
                        ratings=[
                            pb.Rating(image=pb.Image(digest=digests[i % 20]), value=float(v), scale=STARS)
                        ],
                    ),
                    timeout=120,
                )
                for i, v in enumerate(values)
            )
        )
    assert max(r.profile.num_ratings for r in replies) == 200
    final = stub.GetProfile(pb.GetProfileRequest(user_id=user_id), timeout=30)
    assert final.num_ratings == 200 and final.feature_space_version == FEATURE_SPACE_VERSION

    with target.redis() as r:
        assert r.llen(Keys().ratings("default", user_id)) == 200
    # The statistics are those of exactly the stored ratings: refit from scratch and compare.
    from piaa_personalization.model.residual import (
        FeatureLayout,
        HeadOutputs,
        SufficientStats,
        rating_to_unit,
    )

    s = target.store()
    try:
        profile = await s.get_profile("default", user_id)
        ratings = await s.get_ratings("default", user_id)
    finally:
        await s.close()
    assert profile is not None and profile.stats is not None
    assert len(ratings) == 200 and profile.n == 200 and profile.covers == 200
    outputs = HeadOutputs.from_packed(np.stack([r.outputs for r in ratings]))
    y = [rating_to_unit(r.value, r.scale) - float(r.outputs[0]) for r in ratings]
    expected = SufficientStats.from_data(FeatureLayout().features(outputs), y)
    # Values are kept as float32 (format 2), the statistics too.
    assert sorted(r.value for r in ratings) == sorted(float(np.float32(v)) for v in values)
    np.testing.assert_allclose(profile.stats.gram, expected.gram, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(profile.stats.moment, expected.moment, rtol=1e-6, atol=1e-5)


async def test_stale_profile_falls_back_with_its_reason_and_is_refit(
    target: Target, photos: list[Photo]
) -> None:
    from piaa_personalization.model.residual import FeatureLayout, Prior

    gateway, stub = target.gateway, target.stub
    user_id = user()
    rate(stub, user_id, photos[200:212], [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 3, 3])
    # Refit the profile in another feature space, as if it had been fitted before the heads changed.
    old = FeatureLayout(with_embedding=False, fs_version="fs0")
    s = target.store()
    try:
        refit = await s.refit("default", user_id, layout=old, prior=Prior.zero(old.dim))
        (lean,) = await s.get_profiles("default", [user_id])
    finally:
        await s.close()
    assert refit is not None and lean is not None and lean.layout_key == "fs0/paper20"
    # (No GetProfile here: reading a stale profile through the gateway already schedules its refit.)
    refits_before = metric(gateway.metrics(), "piaa_refits_total")
    request = pb.ScoreRequest(user_id=user_id, images=[image(photos[300])])
    first = stub.Score(request, timeout=60).scores[0]
    assert not first.personalized
    assert first.fallback_reason == pb.FALLBACK_REASON_STALE_PROFILE
    assert first.score == pytest.approx(first.generic_score)
    until = time.monotonic() + 30
    while True:
        again = stub.Score(request, timeout=60).scores[0]
        if again.personalized or time.monotonic() > until:
            break
        await asyncio.sleep(0.2)
    assert again.personalized and again.fallback_reason == pb.FALLBACK_REASON_UNSPECIFIED
    profile = stub.GetProfile(pb.GetProfileRequest(user_id=user_id), timeout=30)
    assert profile.num_ratings == 12 and profile.feature_space_version == FEATURE_SPACE_VERSION
    assert len(profile.weights) == 21
    assert metric(gateway.metrics(), "piaa_refits_total") >= refits_before + 1


def test_delete_profile_leaves_no_key_of_the_user(target: Target, photos: list[Photo]) -> None:
    stub = target.stub
    user_id, other = user(), user()
    rate(stub, user_id, photos[220:224], [5, 4, 2, 1])
    rate(stub, other, photos[220:222], [3, 3])
    reply = stub.DeleteProfile(pb.DeleteProfileRequest(user_id=user_id), timeout=30)
    assert reply.deleted and reply.keys_removed >= 2
    tag = Keys.tag("default", user_id)
    keys = target.keys()
    assert [k for k in keys if tag.encode() in k] == []
    assert any(Keys.tag("default", other).encode() in k for k in keys)
    assert not stub.GetProfile(pb.GetProfileRequest(user_id=user_id), timeout=30).exists
    score = stub.Score(pb.ScoreRequest(user_id=user_id, images=[image(photos[220])]), timeout=30).scores[0]
    assert score.fallback_reason == pb.FALLBACK_REASON_NO_PROFILE
    assert not stub.DeleteProfile(pb.DeleteProfileRequest(user_id=user_id), timeout=30).deleted


def test_score_for_users_runs_the_backbone_once(
    gateway: GatewayProcess, stub: pb_grpc.PersonalizationStub, photos: list[Photo], triton_server: object
) -> None:
    enrolled = [user(), user()]
    for u, stars in zip(enrolled, ([5, 1, 4], [1, 5, 2]), strict=True):
        rate(stub, u, photos[230:233], stars)
    users = enrolled + [user() for _ in range(48)]
    data = fresh_variant(photos[240], seed=int(uuid.uuid4().int % 10_000))
    metrics_url = triton_server.metrics_url  # type: ignore[attr-defined]
    before = triton_count(metrics_url, "backbone")
    gateway_before = metric(gateway.metrics(), "piaa_triton_images_total")
    reply = stub.ScoreForUsers(pb.ScoreForUsersRequest(image=pb.Image(data=data), user_ids=users), timeout=60)
    # Triton records a model's statistics after its response is on the way; with the backbone as the
    # ensemble's last step (fused_heads) the answer can arrive first, so wait for the count to move.
    until = time.monotonic() + 10
    while triton_count(metrics_url, "backbone") == before and time.monotonic() < until:
        time.sleep(0.05)
    assert triton_count(metrics_url, "backbone") - before == 1
    assert metric(gateway.metrics(), "piaa_triton_images_total") - gateway_before == 1
    assert [s.user_id for s in reply.scores] == users
    assert [s.personalized for s in reply.scores[:2]] == [True, True]
    assert reply.scores[0].score != pytest.approx(reply.scores[1].score)
    assert all(s.fallback_reason == pb.FALLBACK_REASON_NO_PROFILE for s in reply.scores[2:])
    assert all(s.score == pytest.approx(reply.image.generic_score) for s in reply.scores[2:])


async def test_concurrent_calls_share_batches_and_return_stage_timings(
    gateway: GatewayProcess, photos: list[Photo]
) -> None:
    text = gateway.metrics()
    count0 = metric(text, "piaa_batch_images_count")
    ones0 = metric(text, "piaa_batch_images_bucket", le="1.0")
    seed = int(uuid.uuid4().int % 10_000)
    images = [fresh_variant(p, seed) for p in photos[250:274]]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        astub = pb_grpc.PersonalizationStub(channel)
        # Only a call that asks for the stage timings (TIMING_REQUEST_KEY) gets them.
        asked = [((TIMING_REQUEST_KEY, "1"),) if i % 2 == 0 else () for i in range(len(images))]
        calls = [
            astub.Score(pb.ScoreRequest(user_id="anyone", images=[pb.Image(data=d)]), timeout=60, metadata=m)
            for d, m in zip(images, asked, strict=True)
        ]
        replies = await asyncio.gather(*calls)
        trailing = await calls[0].trailing_metadata()
        unasked = await calls[1].trailing_metadata()
    assert all(len(r.scores) == 1 for r in replies)
    text = gateway.metrics()
    batches = metric(text, "piaa_batch_images_count") - count0
    singles = metric(text, "piaa_batch_images_bucket", le="1.0") - ones0
    print(f"\n24 concurrent one-image calls formed {batches:.0f} batches ({singles:.0f} of one image)")
    assert batches < 24  # some batch held more than one image
    assert TIMING_METADATA_KEY not in dict(unasked or ())
    timing = dict(trailing)[TIMING_METADATA_KEY]
    stages = parse_timings(timing)
    assert set(stages) == {"queue", "triton", "redis", "personalize"}
    assert stages["triton"] > 0 and all(v >= 0 for v in stages.values())


async def test_a_bad_image_fails_only_its_own_request(gateway: GatewayProcess, photos: list[Photo]) -> None:
    seed = int(uuid.uuid4().int % 10_000)
    goods = [fresh_variant(p, seed) for p in photos[280:285]]
    bad = b"\xff\xd8\xff" + b"\x00" * 500  # a JPEG header and nothing decodable
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        astub = pb_grpc.PersonalizationStub(channel)
        requests = [
            pb.ScoreRequest(user_id="u", images=[pb.Image(data=d)]) for d in [*goods[:3], bad, *goods[3:]]
        ]
        outcomes = await asyncio.gather(
            *(astub.Score(r, timeout=60) for r in requests), return_exceptions=True
        )
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(errors) == 1 and outcomes[3] is errors[0]
    assert errors[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(
        isinstance(o, pb.ScoreResponse) and len(o.scores) == 1 for i, o in enumerate(outcomes) if i != 3
    )


def test_request_validation_maps_to_status_codes(
    stub: pb_grpc.PersonalizationStub, photos: list[Photo]
) -> None:
    one = [image(photos[0])]
    cases = [
        (pb.ScoreRequest(user_id="", images=one), grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty"),
        (pb.ScoreRequest(user_id="x" * 129, images=one), grpc.StatusCode.INVALID_ARGUMENT, "129 bytes"),
        (pb.ScoreRequest(user_id="é" * 65, images=one), grpc.StatusCode.INVALID_ARGUMENT, "130 bytes"),
        (
            pb.ScoreRequest(user_id="u", images=[pb.Image(digest="0" * 64)] * 65),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 64",
        ),
        (pb.ScoreRequest(user_id="u"), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        (
            pb.ScoreRequest(user_id="u", images=[pb.Image(id="empty")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "neither",
        ),
        (
            pb.ScoreRequest(user_id="u", images=[pb.Image(digest="zz")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SHA-256",
        ),
        (
            pb.ScoreRequest(user_id="u", images=[pb.Image(digest="ab" * 32)]),
            grpc.StatusCode.NOT_FOUND,
            "not cached",
        ),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request, timeout=30)
        assert err.value.code() == code, (request, err.value.details())
        assert text in (err.value.details() or "")
    for value, scale in (
        (6.0, STARS),
        (float("nan"), STARS),
        (0.5, pb.RATING_SCALE_UNSPECIFIED),
        (1.5, pb.RATING_SCALE_UNIT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.AddRatings(
                pb.AddRatingsRequest(
                    user_id="u", ratings=[pb.Rating(image=one[0], value=value, scale=scale)]
                ),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(
            pb.ScoreRequest(user_id="u", images=one), timeout=30, metadata=(("x-piaa-tenant", "no spaces!"),)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tenants_are_separate(target: Target, photos: list[Photo]) -> None:
    stub = target.stub
    user_id = user()
    rate(stub, user_id, photos[400:403], [5, 1, 3])
    other = stub.GetProfile(
        pb.GetProfileRequest(user_id=user_id), timeout=30, metadata=(("x-piaa-tenant", "acme"),)
    )
    assert not other.exists
    assert stub.GetProfile(pb.GetProfileRequest(user_id=user_id), timeout=30).num_ratings == 3


def test_rank_suggest_and_profile(target: Target, photos: list[Photo]) -> None:
    stub = target.stub
    user_id = user()
    album = photos[500:512]
    ranked = stub.RankAlbum(
        pb.RankAlbumRequest(user_id=user_id, images=[image(p) for p in album], top_k=5), timeout=60
    )
    assert len(ranked.ranked) == 5
    assert [s.score for s in ranked.ranked] == sorted((s.score for s in ranked.ranked), reverse=True)
    suggestions = stub.SuggestImagesToRate(
        pb.SuggestImagesToRateRequest(user_id=user_id, candidates=[image(p) for p in album], k=4), timeout=60
    ).suggestions
    assert len(suggestions) == 4 and len({s.digest for s in suggestions}) == 4
    assert all(s.uncertainty > 0 for s in suggestions)
    profile = rate(stub, user_id, album[:8], [5, 5, 4, 1, 1, 2, 3, 5])
    assert profile.exists and profile.num_ratings == 8 and len(profile.weights) == 21
    assert profile.weights[0].name == "intercept"
    for factor in list(profile.likes) + list(profile.dislikes):
        assert factor.name in {w.name for w in profile.weights}


def test_health_and_reflection(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "piaa.v1.Personalization"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"piaa.v1.Personalization", "grpc.health.v1.Health"} <= names


async def test_a_profile_changed_elsewhere_reaches_the_gateway_cache_through_pubsub(
    target: Target, photos: list[Photo]
) -> None:
    """The gateway caches "no profile"; ratings written by another process (as another worker would)
    are picked up well before the cache's TTL, through the store's change channel."""
    from piaa_personalization.model.residual import FeatureLayout, Prior, RatingScale

    stub = target.stub
    user_id = user()
    request = pb.ScoreRequest(user_id=user_id, images=[image(photos[700])])
    first = stub.Score(request, timeout=60).scores[0]
    assert first.fallback_reason == pb.FALLBACK_REASON_NO_PROFILE  # now cached for profile_cache_ttl_s (5 s)
    cached = stub.Score(
        # Bytes no gateway has seen (its memory would answer known ones without writing the cache).
        pb.ScoreRequest(
            images=[pb.Image(data=fresh_variant(p, uuid.uuid4().int % 10_000)) for p in photos[701:704]],
            generic_only=True,
        ),
        timeout=60,
    )
    s = target.store()
    try:
        # The gateway writes new features to the cache behind its answer: wait for them to land.
        until = time.monotonic() + 10
        outputs = await s.get_features([x.digest for x in cached.scores])
        while any(o is None for o in outputs):
            assert time.monotonic() < until, "the gateway never wrote the features it computed"
            await asyncio.sleep(0.02)
            outputs = await s.get_features([x.digest for x in cached.scores])
        records = [
            store_module.RatingRecord(digest=x.digest, value=v, scale=RatingScale.STARS_1_5, outputs=o)
            for x, v, o in zip(cached.scores, (5.0, 1.0, 4.0), outputs, strict=True)
        ]
        start = time.monotonic()
        await s.add_ratings("default", user_id, records, layout=FeatureLayout(), prior=Prior.zero(21))
    finally:
        await s.close()
    while True:
        now = stub.Score(request, timeout=60).scores[0]
        if now.personalized or time.monotonic() - start > 3.0:
            break
        await asyncio.sleep(0.05)
    assert now.personalized, "the cached 'no profile' outlived the change message"
    assert time.monotonic() - start < 3.0
