"""The service's batch pipeline against counting fakes of Triton and the store (no network).

What the integration tests cannot see directly: how many Triton calls and store round trips a batch
costs, and which fallback each kind of profile gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import numpy as np
import pytest

from piaa_client.features import HEAD_OUTPUTS
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core import personalizer
from piaa_personalization.core.metrics import Metrics
from piaa_personalization.core.service import Call, Failed, ImageRef, PersonalizationService, RatingIn, Scored
from piaa_personalization.core.triton_client import InferResult
from piaa_personalization.errors import ImageRejected, InvalidArgument, NotFound, StoreDown
from piaa_personalization.store.format import Profile

D = 21


def fake_outputs(image: bytes) -> dict[str, np.ndarray]:
    """Deterministic head outputs derived from the bytes."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(image).digest()[:4], "little"))
    return {o.name: rng.uniform(0.1, 0.9, (1, *o.dims)).astype(np.float32) for o in HEAD_OUTPUTS}


class FakeTriton:
    model = "piaa"

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def infer(self, images: list[bytes], deadline: float | None = None, **_: Any) -> InferResult:
        self.calls.append(len(images))
        rows = [fake_outputs(i) for i in images]
        outputs = {o.name: np.concatenate([r[o.name] for r in rows]) for o in HEAD_OUTPUTS}
        errors = {
            i: ImageRejected("not an image") for i, data in enumerate(images) if data.startswith(b"bad")
        }
        return InferResult(outputs, errors)

    async def close(self) -> None:
        pass


def profile(user: str, weights: np.ndarray, layout_key: str = "fs1/paper20") -> Profile:
    return Profile("default", user, layout_key, weights.astype(np.float32), 5, 5, 5, 1, 0.0)


class FakeStore:
    """The StoreAdapter surface the scoring path uses, counting round trips."""

    def __init__(self, profiles: dict[str, Profile]) -> None:
        self.profiles = profiles
        self.features: dict[str, personalizer.Head] = {}
        self.trips: dict[str, int] = {"read_batch": 0, "put_features": 0, "get_profiles": 0}
        self.refits: list[str] = []
        self.down = False
        self.channel = "piaa:changes"
        self.space = "fs1"

    def tag(self, tenant: str, user: str) -> str:
        return f"t:{tenant}:u:{user}"

    def usable(self, p: Profile) -> bool:
        return p.is_current(personalizer.layout(False, self.space))

    async def read_batch(
        self, digests: Any, users: Any
    ) -> tuple[dict[str, personalizer.Head], list[Profile | None]]:
        self.trips["read_batch"] += 1
        if self.down:
            raise StoreDown("redis unavailable")
        return {d: self.features[d] for d in digests if d in self.features}, [
            self.profiles.get(u) for _, u in users
        ]

    async def put_features(self, heads: dict[str, personalizer.Head]) -> None:
        self.trips["put_features"] += 1
        self.features.update(heads)

    async def get_profiles(self, tenant: str, users: Any) -> list[Profile | None]:
        self.trips["get_profiles"] += 1
        if self.down:
            raise StoreDown("redis unavailable")
        return [self.profiles.get(u) for u in users]

    async def refit(self, tenant: str, user: str) -> None:
        self.refits.append(user)

    async def close(self) -> None:
        pass


def make(profiles: dict[str, Profile], **config: Any) -> tuple[PersonalizationService, FakeTriton, FakeStore]:
    triton, store = FakeTriton(), FakeStore(profiles)
    cfg = GatewayConfig(max_batch_delay_ms=30, **config)
    service = PersonalizationService(cfg, triton, store, Metrics())  # type: ignore[arg-type]
    return service, triton, store


def call() -> Call:
    return Call("default", deadline=time.monotonic() + 1e6)


def img(k: int) -> ImageRef:
    return ImageRef(id=f"img{k}", data=f"image-{k}".encode())


async def test_concurrent_calls_cost_one_triton_call_and_one_round_trip_each_per_batch() -> None:
    w = np.zeros(D)
    service, triton, store = make({"alice": profile("alice", w), "bob": profile("bob", w)}, max_batch_size=16)
    users = ["alice", "bob", "carol"]
    results = await asyncio.gather(*(service.score(call(), users[k % 3], [img(k)]) for k in range(12)))
    assert len(results) == 12
    assert triton.calls == [12]
    await asyncio.sleep(0.01)  # the feature write behind the answers
    assert store.trips == {"read_batch": 1, "put_features": 1, "get_profiles": 0}
    # The same images again: every feature and profile from the worker's memory, no store trip at all.
    await asyncio.gather(*(service.score(call(), users[k % 3], [img(k)]) for k in range(12)))
    assert triton.calls == [12]
    assert store.trips == {"read_batch": 1, "put_features": 1, "get_profiles": 0}
    assert service.metrics.feature_writes.labels("written")._value.get() == 12
    assert service.metrics.memory_images._value.get() == 12
    await service.close()


async def test_without_feature_memory_a_batch_reads_the_feature_cache() -> None:
    service, triton, store = make({"alice": profile("alice", np.zeros(D))}, feature_memory_size=0)
    for _ in range(2):
        await asyncio.gather(*(service.score(call(), "alice", [img(k)]) for k in range(4)))
    assert triton.calls == [4]
    assert store.trips == {"read_batch": 2, "put_features": 1, "get_profiles": 0}
    assert service.metrics.memory_images._value.get() == 0
    await service.close()


async def test_answers_from_memory_equal_the_batch_path() -> None:
    rng = np.random.default_rng(3)
    profiles = {f"u{i}": profile(f"u{i}", rng.normal(0, 0.1, D)) for i in range(3)}
    profiles["stale"] = profile("stale", np.zeros(D), "fs0/paper20")
    images = [img(k) for k in range(6)]
    memory, _, _ = make(profiles)
    batch, _, batch_store = make(profiles, feature_memory_size=0)
    for user in ("u0", "u1", "nobody", "stale"):
        first = await memory.score(call(), user, images)
        again = await memory.score(call(), user, images)
        reference = await batch.score(call(), user, images)
        for a, b, c in zip(first, again, reference, strict=True):
            assert isinstance(a, Scored) and isinstance(b, Scored) and isinstance(c, Scored)
            assert (b.score, b.personalized, b.reason) == (c.score, c.personalized, c.reason)
            assert (b.analysis.id, b.analysis.digest) == (c.analysis.id, c.analysis.digest)
            assert np.array_equal(b.analysis.head.packed, c.analysis.head.packed)
            assert (a.score, a.reason) == (b.score, b.reason)
    _, users = await memory.score_for_users(call(), images[0], ["u0", "u2", "nobody"])
    _, expected = await batch.score_for_users(call(), images[0], ["u0", "u2", "nobody"])
    assert users == expected and [u.reason for u in users] == [None, None, "no_profile"]
    # The second call of u0, u1 and nobody came from memory. Never from memory: a first call (the profile
    # is not in the LRU yet), a stale profile (the batch path schedules its refit), u2's first call.
    assert memory.metrics.memory_images._value.get() == 6 * 3
    await asyncio.sleep(0.01)
    assert batch_store.refits == ["stale"]
    await memory.close()
    await batch.close()


async def test_profiles_are_reread_ahead_of_expiry_in_one_trip_so_calls_stay_in_memory() -> None:
    w = np.full(D, 0.01)
    service, _, store = make(
        {"alice": profile("alice", w), "bob": profile("bob", w)}, profile_cache_ttl_s=2.0
    )
    await asyncio.gather(*(service.score(call(), u, [img(1)]) for u in ("alice", "bob")))
    assert store.trips["read_batch"] == 1 and service.metrics.memory_images._value.get() == 0
    await asyncio.sleep(1.7)  # within the last 20% of the entries' TTL: answered, and reread behind
    await asyncio.gather(*(service.score(call(), u, [img(1)]) for u in ("alice", "bob")))
    await asyncio.sleep(0.05)
    assert store.trips["get_profiles"] == 1  # both users in one read
    await asyncio.sleep(0.6)  # the first entries would have expired by now; the reread ones have not
    await asyncio.gather(*(service.score(call(), u, [img(1)]) for u in ("alice", "bob")))
    assert store.trips["get_profiles"] == 1 and service.metrics.memory_images._value.get() == 4
    await service.close()


async def test_score_for_users_runs_one_extraction_and_one_profile_read() -> None:
    rng = np.random.default_rng(0)
    profiles = {f"u{i}": profile(f"u{i}", rng.normal(0, 0.1, D)) for i in range(40)}
    service, triton, store = make(profiles)
    generic, scores = await service.score_for_users(call(), img(1), [f"u{i}" for i in range(50)])
    assert triton.calls == [1] and store.trips["read_batch"] == 1
    head = personalizer.head_row(fake_outputs(b"image-1"), 0)
    x = np.concatenate([[1.0], head.attributes, head.content])
    for i, s in enumerate(scores[:40]):
        expected = np.clip(head.generic + x @ profiles[f"u{i}"].weights.astype(np.float64), 0, 1)
        assert s.personalized and s.score == pytest.approx(expected, abs=1e-5)
    assert all(s.reason == "no_profile" and s.score == pytest.approx(generic.score) for s in scores[40:])
    await service.close()


async def test_fallback_reasons_and_stale_refit() -> None:
    service, _, store = make(
        {"cur": profile("cur", np.full(D, 0.01)), "old": profile("old", np.zeros(D), "fs0/paper20")}
    )
    (cur,) = await service.score(call(), "cur", [img(1)])
    (old,) = await service.score(call(), "old", [img(1)])
    (new,) = await service.score(call(), "new", [img(1)])
    (off,) = await service.score(call(), "", [img(1)], generic_only=True)
    assert cur.personalized and cur.reason is None and cur.score != pytest.approx(cur.generic)
    assert (old.personalized, old.reason, old.score) == (False, "stale_profile", old.generic)
    assert (new.reason, off.reason) == ("no_profile", "disabled")
    await asyncio.sleep(0.01)
    assert store.refits == ["old"]
    service.profiles.invalidate(store.tag("default", "x"))
    store.down = True
    (down,) = await service.score(call(), "x", [img(2)])
    assert (down.personalized, down.reason) == (False, "store_unavailable")
    await service.close()


async def test_a_bad_image_fails_its_call_only_and_digests_need_the_cache() -> None:
    service, _, _ = make({})
    good, bad = await asyncio.gather(
        service.score(call(), "u", [img(1)]),
        service.score(call(), "u", [ImageRef(id="b", data=b"bad bytes")]),
        return_exceptions=True,
    )
    assert isinstance(bad, ImageRejected) and not isinstance(good, BaseException)
    digest = good[0].analysis.digest
    (again,) = await service.score(call(), "u", [ImageRef(digest=digest)])
    assert again.generic == pytest.approx(good[0].generic)
    with pytest.raises(NotFound):
        await service.score(call(), "u", [ImageRef(digest="ab" * 32)])
    await service.close()


async def test_allow_partial_returns_each_failed_image_in_its_place() -> None:
    service, triton, _ = make({"u": profile("u", np.full(D, 0.01))})
    images = [
        img(1),
        ImageRef(id="corrupt", data=b"bad bytes"),
        ImageRef(id="gone", digest="ab" * 32),
        ImageRef(id="malformed", digest="xyz"),
        ImageRef(id="empty"),
        img(2),
    ]
    results = await service.score(call(), "u", images, allow_partial=True)
    assert [r.id if isinstance(r, Failed) else r.analysis.id for r in results] == [i.id for i in images]
    failed = {r.id: r for r in results if isinstance(r, Failed)}
    assert {k: f.status for k, f in failed.items()} == {
        "corrupt": "INVALID_ARGUMENT",
        "gone": "NOT_FOUND",
        "malformed": "INVALID_ARGUMENT",
        "empty": "INVALID_ARGUMENT",
    }
    assert "corrupt" in failed["corrupt"].message and "not an image" in failed["corrupt"].message
    assert failed["corrupt"].digest == hashlib.sha256(b"bad bytes").hexdigest()
    assert failed["malformed"].digest == ""
    assert all(r.personalized for r in results if isinstance(r, Scored))
    assert triton.calls == [3]  # the two good images and the corrupt one, in one batch

    # Without allow_partial the first bad image fails the call, naming it.
    with pytest.raises(ImageRejected, match="corrupt"):
        await service.score(call(), "u", images[:2])
    with pytest.raises(NotFound, match="gone"):
        await service.score(call(), "u", [img(1), images[2]])
    with pytest.raises(InvalidArgument, match="digest is not a hex"):
        await service.score(call(), "u", [img(1), images[3]])
    await service.close()


async def test_ranking_with_allow_partial_lists_the_failed_after_the_ranked() -> None:
    w = np.zeros(D)
    service, _, _ = make({"u": profile("u", w)})
    images = [
        ImageRef(id="bad", data=b"bad one"),
        *(img(k) for k in range(5)),
        ImageRef(id="worse", data=b"bad 2"),
    ]
    ranked = await service.rank_album(call(), "u", images, top_k=3, allow_partial=True)
    assert [type(r).__name__ for r in ranked] == ["Scored"] * 3 + ["Failed"] * 2
    assert [r.id for r in ranked[3:]] == ["bad", "worse"]  # request order
    scores = [r.score for r in ranked[:3]]
    everything = await service.score(call(), "u", images[1:6])
    assert scores == sorted((s.score for s in everything), reverse=True)[:3]
    # Every image failed: still an answer, with nothing ranked.
    only_bad = await service.rank_album(call(), "u", [images[0]], top_k=0, allow_partial=True)
    assert [(r.id, r.status) for r in only_bad] == [("bad", "INVALID_ARGUMENT")]
    with pytest.raises(ImageRejected):
        await service.rank_album(call(), "u", images, top_k=3)
    await service.close()


async def test_ratings_are_validated_before_any_work() -> None:
    service, triton, _ = make({})
    with pytest.raises(Exception, match=r"ratings\[1\]"):
        await service.add_ratings(
            call(),
            "u",
            [RatingIn(img(1), 4, "RATING_SCALE_STARS_1_5"), RatingIn(img(2), 9, "RATING_SCALE_STARS_1_5")],
        )
    assert triton.calls == []
    await service.close()
