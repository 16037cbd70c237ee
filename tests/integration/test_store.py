"""The Redis profile store against a real redis-server and a real Redis Cluster (each test that takes
`store` or `redis_target` runs in both modes): format, atomicity, batch reads, deletion, cache."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from piaa_personalization.model.residual import (
    FeatureLayout,
    HeadOutputs,
    Prior,
    RatingScale,
    SufficientStats,
    fit,
)
from piaa_personalization.store import format as fmt
from piaa_personalization.store.redis_server import RedisServer, free_port
from piaa_personalization.store.redis_store import (
    RatingRecord,
    RedisProfileStore,
    StoreConfig,
    StoreError,
    StoreUnavailable,
)

LAYOUT = FeatureLayout()
PRIOR = Prior.zero(LAYOUT.dim)
TENANT = "acme"


def make_records(seed: int, n: int, fs_version: str = "fs1") -> list[RatingRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        packed = np.r_[
            rng.uniform(0.2, 0.8), rng.uniform(-1, 1, 10), rng.dirichlet(np.ones(10)), rng.normal(size=64)
        ]
        digest = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        out.append(RatingRecord(digest, float(rng.integers(1, 6)), RatingScale.STARS_1_5, packed, fs_version))
    return out


def stats_of(
    records: list[RatingRecord], layout: FeatureLayout = LAYOUT, *, stored: bool = False
) -> SufficientStats:
    """The statistics of the ratings as the store keeps them (format 2: quantized head outputs); `stored`:
    records read back from the store, already quantized."""
    packed = np.stack([r.outputs if stored else fmt.quantized(r.outputs) for r in records])
    x = layout.features(HeadOutputs.from_packed(packed))
    return SufficientStats.from_data(x, [r.unit - float(p[0]) for r, p in zip(records, packed, strict=True)])


F32 = {"rtol": 1e-6, "atol": 1e-5}
"""Tolerance of statistics read back: format 2 stores them as float32."""


def sync_client(config: StoreConfig) -> redis.Redis | redis.RedisCluster:
    """A plain redis-py client for looking at what the store wrote, in the store's mode."""
    if config.mode == "cluster":
        return redis.RedisCluster.from_url(config.url)
    return redis.Redis.from_url(config.url)


async def user_keys(store: RedisProfileStore, tenant: str, user: str) -> list[bytes]:
    tag = fmt.Keys.tag(tenant, user)
    return [k for batch in [b async for b in store.conn.scan(f"*{{{tag}}}*", 1000)] for k in batch]


async def test_format_round_trip(store: RedisProfileStore) -> None:
    records = make_records(1, 12)
    profile, _ = await store.add_ratings(TENANT, "alice", records[:5], layout=LAYOUT, prior=PRIOR)
    profile, _ = await store.add_ratings(TENANT, "alice", records[5:], layout=LAYOUT, prior=PRIOR)
    assert (profile.num_ratings, profile.n, profile.covers, profile.layout_key) == (12, 12, 12, "fs1/paper20")

    full = await store.get_profile(TENANT, "alice")
    assert full is not None and full.stats is not None
    expect = stats_of(records)
    np.testing.assert_allclose(full.stats.gram, expect.gram, **F32)
    np.testing.assert_allclose(full.stats.moment, expect.moment, **F32)
    assert full.stats.n == 12 and full.stats.yy == pytest.approx(expect.yy)
    refit = fit(expect, PRIOR)
    np.testing.assert_allclose(full.weights, refit.mean.astype(np.float32), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(full.posterior(PRIOR).cov, refit.cov, rtol=1e-4, atol=1e-8)
    assert full.version == 2 and full.feature_space_version == "fs1"

    stored = await store.get_ratings(TENANT, "alice")
    assert [r.digest for r in stored] == [r.digest for r in records]
    assert all(a.value == b.value and a.time == round(b.time) for a, b in zip(stored, records, strict=True))
    np.testing.assert_array_equal(
        np.stack([r.outputs for r in stored]), np.stack([fmt.quantized(r.outputs) for r in records])
    )

    raw = sync_client(store.config)
    pkey, rkey = fmt.Keys().user_keys(TENANT, "alice")
    assert raw.type(pkey) == b"hash" and raw.type(rkey) == b"list"
    assert raw.ttl(pkey) == -1 and raw.ttl(rkey) == -1 and raw.llen(rkey) == 12
    assert sorted(k.decode() for k in raw.hkeys(pkey)) == sorted(fmt.PROFILE_FIELDS)
    assert raw.hget(pkey, "format") == b"2" and raw.hget(pkey, "layout") == b"fs1/paper20"
    assert raw.hget(pkey, "lean") == fmt.encode_lean(
        "fs1/paper20",
        full.weights,
        n=12,
        covers=12,
        updated_at=full.updated_at,
        alpha=full.alpha,
        lam=full.lam,
    )
    raw.close()


class CountingSends:
    """Counts what the client writes to its sockets: one call per round trip (a pipeline is one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = aioredis.connection.AbstractConnection.send_packed_command

        async def counted(conn: object, *args: object, **kwargs: object) -> None:
            self.calls += 1
            await original(conn, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(aioredis.connection.AbstractConnection, "send_packed_command", counted)


def command_calls(config: StoreConfig) -> dict[str, int]:
    """Calls per command, summed over every primary."""
    out: dict[str, int] = {}
    with sync_client(config) as c:
        nodes = [n.redis_connection for n in c.get_primaries()] if isinstance(c, redis.RedisCluster) else [c]
        for node in nodes:
            assert node is not None
            for k, v in node.info("commandstats").items():
                out[k] = out.get(k, 0) + v["calls"]
    return out


async def test_batch_reads_are_one_round_trip(
    store: RedisProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request per node: on one Redis a single send, on the cluster one pipeline per primary that
    holds a key of the batch, each counted by the store's round-trip hook."""
    trips: list[tuple[str, str]] = []
    store.conn.on_round_trip = lambda op, node: trips.append((op, node))
    users = [f"user-{i}" for i in range(40)]
    for i, user in enumerate(users[:30]):
        await store.add_ratings(TENANT, user, make_records(100 + i, 2), layout=LAYOUT, prior=PRIOR)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(64)]
    outputs = HeadOutputs.from_packed(np.random.default_rng(0).normal(size=(64, 85)))
    await store.put_features(digests[:48], outputs.take(slice(0, 48)))
    await store.get_profiles(TENANT, users)  # every node's connection exists before counting
    await store.get_features(digests)
    trips.clear()

    before = command_calls(store.config)
    sends = CountingSends(monkeypatch)
    profiles = await store.get_profiles(TENANT, users)
    features = await store.get_features(digests)
    after = command_calls(store.config)

    nodes = 1 if store.config.mode == "standalone" else 3  # 40 users and 64 digests hit every primary
    assert sends.calls == 2 * nodes  # one for the 40 profiles, one for the 64 digests, per node
    assert sorted(op for op, _ in trips) == ["features"] * nodes + ["profiles"] * nodes
    assert len({node for _, node in trips}) == nodes
    assert after["cmdstat_hmget"] - before.get("cmdstat_hmget", 0) == 40
    assert after["cmdstat_getex"] - before.get("cmdstat_getex", 0) == 64
    assert [p is not None for p in profiles] == [True] * 30 + [False] * 10
    assert all(p.stats is None and p.is_current(LAYOUT) for p in profiles if p is not None)
    assert profiles[3] is not None and profiles[3].user_id == "user-3" and profiles[3].num_ratings == 2
    np.testing.assert_array_equal(np.stack(features[:48]), outputs.packed()[:48])  # type: ignore[arg-type]
    assert features[48:] == [None] * 16

    trips.clear()
    sends.calls = 0
    both, lean = await store.read_batch(digests, [(TENANT, u) for u in users])
    assert sends.calls == nodes and [op for op, _ in trips] == ["batch_read"] * nodes  # one round
    assert [p is not None for p in lean] == [True] * 30 + [False] * 10
    assert [f is not None for f in both] == [True] * 48 + [False] * 16


async def _hammer(url: str, mode: str, user: str, records: list[RatingRecord]) -> int:
    s = RedisProfileStore(StoreConfig(url=url, mode=mode, max_connections=32))
    try:
        results = await asyncio.gather(
            *[s.add_ratings(TENANT, user, [r], layout=LAYOUT, prior=PRIOR) for r in records]
        )
    finally:
        await s.close()
    assert all(p.num_ratings >= 1 and p.covers == p.num_ratings for p, _ in results)
    return len(results)


def _hammer_in_process(url: str, mode: str, user: str, records: list[RatingRecord]) -> int:
    return asyncio.run(_hammer(url, mode, user, records))


async def test_200_concurrent_add_ratings_for_one_user(store: RedisProfileStore) -> None:
    """Two worker processes with 100 concurrent calls each, as the gateway's workers would send them."""
    records = make_records(7, 200)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            asyncio.wrap_future(
                pool.submit(_hammer_in_process, store.config.url, store.config.mode, "bob", part)
            )
            for part in (records[:100], records[100:])
        ]
        assert sum(await asyncio.gather(*futures)) == 200

    stored = await store.get_ratings(TENANT, "bob")
    assert len(stored) == 200
    assert sorted(r.digest for r in stored) == sorted(r.digest for r in records)
    profile = await store.get_profile(TENANT, "bob")
    assert profile is not None and profile.stats is not None
    assert (profile.num_ratings, profile.n, profile.covers) == (200, 200, 200)
    expect = stats_of(stored, stored=True)
    np.testing.assert_allclose(profile.stats.gram, expect.gram, **F32)
    np.testing.assert_allclose(profile.stats.moment, expect.moment, **F32)
    assert profile.stats.yy == pytest.approx(expect.yy, rel=1e-10)
    np.testing.assert_allclose(profile.weights, fit(expect, PRIOR).mean, rtol=1e-4, atol=1e-6)


async def test_a_slow_writer_never_overwrites_a_newer_fit(
    store: RedisProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A appends first but commits last: its fit covers fewer ratings than B's, so it is not written."""
    fold, release, calls = store._fold, asyncio.Event(), []

    async def slow_first(*args: object) -> SufficientStats:
        calls.append(1)
        if len(calls) == 1:
            await release.wait()
        return await fold(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_fold", slow_first)
    first, second = make_records(12, 1), make_records(13, 1)
    slow = asyncio.create_task(store.add_ratings(TENANT, "ivy", first, layout=LAYOUT, prior=PRIOR))
    while not calls:
        await asyncio.sleep(0.001)
    fast, _ = await store.add_ratings(TENANT, "ivy", second, layout=LAYOUT, prior=PRIOR)
    release.set()
    late, _ = await slow
    assert (fast.covers, late.covers) == (2, 1)  # each reports a fit that includes its own rating
    stored = await store.get_profile(TENANT, "ivy")
    assert stored is not None and stored.stats is not None
    assert (stored.covers, stored.n, stored.version) == (2, 2, 1)
    np.testing.assert_allclose(stored.stats.gram, stats_of(first + second).gram, **F32)


async def test_delete_user_leaves_no_key(store: RedisProfileStore) -> None:
    await store.add_ratings(TENANT, "carol:{x}", make_records(3, 4), layout=LAYOUT, prior=PRIOR)
    await store.add_ratings(TENANT, "dave", make_records(4, 3), layout=LAYOUT, prior=PRIOR)
    await store.add_ratings("other", "carol:{x}", make_records(5, 2), layout=LAYOUT, prior=PRIOR)
    assert len(await user_keys(store, TENANT, "carol:{x}")) == 2

    assert await store.delete_user(TENANT, "carol:{x}") == 2
    assert await user_keys(store, TENANT, "carol:{x}") == []
    assert await store.get_profile(TENANT, "carol:{x}") is None
    assert await store.get_ratings(TENANT, "carol:{x}") == []
    assert len(await user_keys(store, TENANT, "dave")) == 2  # nobody else's keys
    assert len(await user_keys(store, "other", "carol:{x}")) == 2
    assert await store.delete_user(TENANT, "carol:{x}") == 0


async def test_a_fit_in_flight_does_not_resurrect_a_deleted_user(
    store: RedisProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.add_ratings(TENANT, "erin", make_records(6, 3), layout=LAYOUT, prior=PRIOR)
    fold = store._fold

    async def fold_then_delete(*args: object) -> SufficientStats:
        stats = await fold(*args)  # type: ignore[arg-type]
        await store.delete_user(TENANT, "erin")  # lands between the append and the commit
        return stats

    monkeypatch.setattr(store, "_fold", fold_then_delete)
    with pytest.raises(StoreError, match="deleted"):
        await store.add_ratings(TENANT, "erin", make_records(7, 1), layout=LAYOUT, prior=PRIOR)
    assert await user_keys(store, TENANT, "erin") == []


async def test_feature_cache_ttl(redis_target: tuple[str, str]) -> None:
    url, mode = redis_target
    store = RedisProfileStore(StoreConfig(url=url, mode=mode, feature_ttl_s=60))
    try:
        digests = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
        outputs = HeadOutputs.from_packed(np.ones((2, 85)))
        await store.put_features(digests, outputs)
        key = store.keys.features("fs1", digests[0])
        assert 55_000 < await store.client.pttl(key) <= 60_000
        await store.client.pexpire(key, 5_000)
        await store.get_features(digests[:1])  # a hit refreshes the TTL
        assert await store.client.pttl(key) > 55_000
        assert await store.get_features(digests[:1], fs_version="fs2") == [None]  # another space: a miss
        await store.client.pexpire(key, 30)
        await asyncio.sleep(0.1)
        found = await store.get_features(digests)
        assert found[0] is None and found[1] is not None
        with pytest.raises(ValueError):
            await store.get_features(["not-a-digest"])
    finally:
        await store.close()


async def test_stale_feature_space_is_detected_and_refit(store: RedisProfileStore) -> None:
    records = make_records(8, 10)
    await store.add_ratings(TENANT, "frank", records, layout=LAYOUT, prior=PRIOR)
    (profile,) = await store.get_profiles(TENANT, ["frank"])
    new_space, with_emb = FeatureLayout(fs_version="fs2"), FeatureLayout(with_embedding=True)
    assert profile is not None and profile.is_current(LAYOUT)
    assert not profile.is_current(new_space) and not profile.is_current(with_emb)

    # A layout change within the feature space: the stored features suffice.
    refit = await store.refit(TENANT, "frank", layout=with_emb, prior=Prior.zero(85))
    assert refit is not None
    assert (refit[0].layout_key, refit[0].n, len(refit[0].weights)) == ("fs1/paper20+emb64", 10, 85)  # type: ignore[arg-type]
    np.testing.assert_allclose(refit[0].stats.gram, stats_of(records, with_emb).gram, **F32)  # type: ignore[union-attr]

    # A new feature space: re-extracted features come from the cache by digest; the rest wait.
    rng = np.random.default_rng(9)
    fresh = HeadOutputs.from_packed(rng.uniform(0, 1, (6, 85)))
    await store.put_features([r.digest for r in records[:6]], fresh, fs_version="fs2")
    refit = await store.refit(TENANT, "frank", layout=new_space, prior=PRIOR)
    assert refit is not None
    p = refit[0]
    assert (p.layout_key, p.num_ratings, p.covers, p.n) == ("fs2/paper20", 10, 10, 6)
    expect = SufficientStats.from_data(
        new_space.features(fresh),
        [r.unit - float(g) for r, g in zip(records[:6], fresh.generic, strict=True)],
    )
    np.testing.assert_allclose(p.stats.gram, expect.gram, rtol=1e-6)  # type: ignore[union-attr]
    (lean,) = await store.get_profiles(TENANT, ["frank"])
    assert lean is not None and lean.is_current(new_space) and lean.version == 3
    assert await store.refit(TENANT, "nobody", layout=LAYOUT, prior=PRIOR) is None
    with pytest.raises(ValueError):
        await store.add_ratings(TENANT, "frank", [], layout=LAYOUT, prior=PRIOR)


async def test_changes_are_published(store: RedisProfileStore) -> None:
    pubsub = store.conn.subscriber().pubsub()  # in a cluster: one node; PUBLISH reaches every node
    await pubsub.subscribe(store.keys.changes)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    await store.add_ratings(TENANT, "gina h", make_records(10, 1), layout=LAYOUT, prior=PRIOR)
    await store.delete_user(TENANT, "gina h")
    # The channel is shared: in a cluster, other tests' changes reach this node late over the cluster bus.
    seen = []
    deadline = asyncio.get_running_loop().time() + 10.0
    while len(seen) < 2 and asyncio.get_running_loop().time() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
        if msg is not None and (change := fmt.parse_change(msg["data"]))[1] == "gina h":
            seen.append(change)
    assert seen == [(TENANT, "gina h", 1), (TENANT, "gina h", -1)]
    await pubsub.aclose()


async def test_population_prior_is_learned_and_stored(store: RedisProfileStore) -> None:
    for i in range(6):
        await store.add_ratings(TENANT, f"p{i}", make_records(200 + i, 12), layout=LAYOUT, prior=PRIOR)
    await store.add_ratings(TENANT, "few", make_records(300, 3), layout=LAYOUT, prior=PRIOR)
    assert await store.get_prior(TENANT, LAYOUT) is None
    prior = await store.learn_prior(TENANT, LAYOUT, min_ratings=10)
    assert prior.n_users == 6 and prior.dim == 21
    stored = await store.get_prior(TENANT, LAYOUT)
    assert stored is not None
    np.testing.assert_array_equal(stored.precision, prior.precision)
    assert await store.get_prior("other", LAYOUT) is None


async def test_store_errors_are_store_unavailable() -> None:
    dead = RedisProfileStore(
        StoreConfig(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5, retries=0)
    )
    try:
        with pytest.raises(StoreUnavailable):
            await dead.get_profiles(TENANT, ["a"])
        with pytest.raises(StoreUnavailable):
            await dead.add_ratings(TENANT, "a", make_records(1, 1), layout=LAYOUT, prior=PRIOR)
        with pytest.raises(StoreUnavailable):
            await dead.ping()
        assert StoreUnavailable.retryable and not StoreError.retryable
    finally:
        await dead.close()


async def test_password_in_url_and_a_server_that_goes_away() -> None:
    with RedisServer(password="s3cret:/@") as server:
        assert "s3cret" in server.url
        store = RedisProfileStore(StoreConfig(url=server.url, connect_timeout_s=0.5, retries=0))
        wrong = RedisProfileStore(StoreConfig(url=server.url.replace("s3cret", "nope"), retries=0))
        try:
            await store.add_ratings(TENANT, "h", make_records(11, 2), layout=LAYOUT, prior=PRIOR)
            with pytest.raises(StoreUnavailable):
                await wrong.ping()
            server.stop()
            with pytest.raises(StoreUnavailable):
                await store.get_profiles(TENANT, ["h"])
        finally:
            await store.close()
            await wrong.close()


async def test_an_acl_user_limited_to_the_prefix_can_run_the_store(redis_url: str) -> None:
    """Issue 8 readiness: a URL with an ACL user whose keys are limited to `piaa:*` runs every operation."""
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command("ACL", "SETUSER", "piaa", "on", ">pw", "~piaa:*", "&*", "+@all", "-@admin")
    try:
        url = redis_url.replace("redis://", "redis://piaa:pw@")
        store = RedisProfileStore(StoreConfig(url=url))
        try:
            await store.add_ratings(TENANT, "jo", make_records(14, 3), layout=LAYOUT, prior=PRIOR)
            (profile,) = await store.get_profiles(TENANT, ["jo"])
            assert profile is not None and profile.num_ratings == 3
            assert await store.delete_user(TENANT, "jo") == 2
            with pytest.raises(redis.exceptions.NoPermissionError):
                await store.client.set("elsewhere", "x")  # outside the prefix: refused by Redis
        finally:
            await store.close()
    finally:
        await admin.execute_command("ACL", "DELUSER", "piaa")
        await admin.aclose()
