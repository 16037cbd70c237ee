"""Idempotent add_ratings in the store, against a real redis-server and a real Redis Cluster: a request id
records its ratings once, the receipt is written by the append itself, lives 24 h in the user's slot."""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot

from piaa_personalization.model.residual import FeatureLayout, Prior
from piaa_personalization.store import format as fmt
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore
from tests.integration.test_store import make_records as records
from tests.integration.test_store import sync_client

LAYOUT = FeatureLayout()
PRIOR = Prior.zero(LAYOUT.dim)
TENANT = "acme"


def payload(rs: list[RatingRecord]) -> str:
    return fmt.payload_hash((r.digest, r.value, r.scale) for r in rs)


async def test_a_request_id_records_its_ratings_once(store: RedisProfileStore) -> None:
    first = records(1, 3)
    profile, _ = await store.add_ratings(TENANT, "ann", first, layout=LAYOUT, prior=PRIOR, request_id="r-1")
    assert profile.num_ratings == 3
    with pytest.raises(fmt.AlreadyRecorded) as again:
        await store.add_ratings(TENANT, "ann", first, layout=LAYOUT, prior=PRIOR, request_id="r-1")
    assert again.value.receipt == fmt.Receipt(payload(first), 3)
    assert await store.get_receipt(TENANT, "ann", "r-1") == again.value.receipt
    # The same id with other ratings records nothing either; the receipt tells the caller they differ.
    with pytest.raises(fmt.AlreadyRecorded) as other:
        await store.add_ratings(TENANT, "ann", records(2, 2), layout=LAYOUT, prior=PRIOR, request_id="r-1")
    assert other.value.receipt.payload_hash != payload(records(2, 2))
    assert len(await store.get_ratings(TENANT, "ann")) == 3
    # Ids are per user, and calls without one record every time.
    profile, _ = await store.add_ratings(TENANT, "bob", first, layout=LAYOUT, prior=PRIOR, request_id="r-1")
    assert profile.num_ratings == 3
    for _ in range(2):
        profile, _ = await store.add_ratings(TENANT, "ann", first, layout=LAYOUT, prior=PRIOR)
    assert profile.num_ratings == 9
    assert await store.get_receipt(TENANT, "ann", "never-sent") is None


async def test_the_receipt_lives_24_hours_in_the_users_slot(store: RedisProfileStore) -> None:
    await store.add_ratings(TENANT, "cy:{x}", records(3, 2), layout=LAYOUT, prior=PRIOR, request_id="abc")
    key = store.keys.request(TENANT, "cy:{x}", "abc")
    assert key_slot(key.encode()) == key_slot(store.keys.profile(TENANT, "cy:{x}").encode())
    client = sync_client(store.config)
    try:
        ttl = client.ttl(key)
        assert fmt.RECEIPT_TTL_S - 60 < ttl <= fmt.RECEIPT_TTL_S
        assert client.get(key) == f"1:{payload(records(3, 2))}:2".encode()
    finally:
        client.close()


async def test_concurrent_repeats_record_once(store: RedisProfileStore) -> None:
    rs = records(4, 4)
    results = await asyncio.gather(
        *(
            store.add_ratings(TENANT, "dee", rs, layout=LAYOUT, prior=PRIOR, request_id="same")
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, fmt.AlreadyRecorded) for r in results) == 7
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert len(await store.get_ratings(TENANT, "dee")) == 4


async def test_a_repeat_after_a_delete_resurrects_nothing(store: RedisProfileStore) -> None:
    rs = records(5, 2)
    await store.add_ratings(TENANT, "eve", rs, layout=LAYOUT, prior=PRIOR, request_id="r-9")
    assert await store.delete_user(TENANT, "eve") == 2  # profile and ratings; the receipt expires alone
    with pytest.raises(fmt.AlreadyRecorded):
        await store.add_ratings(TENANT, "eve", rs, layout=LAYOUT, prior=PRIOR, request_id="r-9")
    assert await store.get_profile(TENANT, "eve") is None


@pytest.mark.parametrize("bad", ["", "x" * 65, "a:b", "{tag}", "a b", "*"])
def test_malformed_request_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="request id"):
        fmt.Keys().request(TENANT, "u", bad)


def test_a_receipt_that_is_not_format_1_is_refused() -> None:
    for raw in (b"2:" + b"a" * 64 + b":3", b"1:short:3", b"1:" + b"a" * 64 + b":x", b""):
        with pytest.raises(fmt.StoreDataError):
            fmt.decode_receipt(raw)
