"""The store under resends and deletes, against a real redis-server and a real Redis Cluster (each test
runs in both modes), with the order of events forced rather than hoped for.

- A rating without a request id is recorded once although the connection sends its append twice: the
  server is put to sleep (DEBUG SLEEP, on another connection) just before the append goes out, so the
  client times out on a reply that the script, run after the sleep, still produces; the client resends.
- AddRatings racing DeleteProfile ends ABORTED, with nothing kept and no receipt left, so its retry
  records the ratings instead of answering "already recorded"; a receipt of ratings acknowledged before
  a delete still outlives it (a stale retry records nothing, as docs/gateway.md says).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import numpy as np
import pytest
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from piaa_personalization.core.personalizer import Head, StoreAdapter
from piaa_personalization.errors import ServiceError
from piaa_personalization.model.residual import FeatureLayout, Prior, RatingScale, SufficientStats
from piaa_personalization.store.connection import connect
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore, StoreConfig

LAYOUT = FeatureLayout()
PRIOR = Prior.zero(LAYOUT.dim)
TENANT = "acme"
SLEEP_S = 0.5
"""How long the server sleeps: below the test cluster's node timeout (1 s), so no failover starts."""


def make_records(seed: int, n: int) -> list[RatingRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        packed = np.r_[
            rng.uniform(0.2, 0.8), rng.uniform(-1, 1, 10), rng.dirichlet(np.ones(10)), rng.normal(size=64)
        ]
        digest = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        out.append(RatingRecord(digest, float(rng.integers(1, 6)), RatingScale.STARS_1_5, packed))
    return out


class SleepBeforeFirstWrite:
    """An on_round_trip hook: before the first "write" round trip after `arm()`, sends DEBUG SLEEP to the
    node at `address` on a connection of its own and returns without waiting. Its bytes are in the
    server's socket buffer before the store's request is written, so the server runs the sleep no later
    than the request (and a reply due in the same event-loop turn is written only after the sleep)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.armed = False
        self.sent = 0
        self.sock: socket.socket | None = None

    def arm(self) -> None:
        self.armed = True

    def __call__(self, op: str, node: str) -> None:
        if op != "write" or not self.armed:
            return
        self.armed = False
        self.sock = socket.create_connection(self.address)
        arg = f"{SLEEP_S}".encode()
        self.sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$%d\r\n%s\r\n" % (len(arg), arg))
        self.sent += 1

    def finish(self) -> bytes:
        """The DEBUG SLEEP's reply (+OK once the server woke up)."""
        assert self.sock is not None
        self.sock.settimeout(10)
        reply = self.sock.recv(64)
        self.sock.close()
        return reply


@pytest.fixture
async def impatient(redis_target: tuple[str, str]) -> AsyncIterator[RedisProfileStore]:
    """A store whose commands time out after 0.15 s (a tenth of the default) and are sent again up to 8
    times: the reply of a command sent into DEBUG SLEEP is given up on, and the command resent.

    A cluster client resends by itself (RedisCluster's retry loop). The standalone client that connect()
    builds does not: redis-py 8's asyncio pool is handed the synchronous `redis.retry.Retry`, whose
    call_with_retry returns the coroutine without awaiting it, so StoreConfig.retries does nothing there.
    Here it gets redis.asyncio's Retry, as a client that retries the way StoreConfig documents does."""
    url, mode = redis_target
    config = StoreConfig(url=url, mode=mode, socket_timeout_s=0.15, retries=8)
    client = connect(config.connection_settings())
    if mode == "standalone":
        pool = client.connection_pool  # type: ignore[union-attr]
        pool.connection_kwargs["retry"] = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.02), 8)
    store = RedisProfileStore(config, client=client)
    yield store
    await store.close()


async def node_address(store: RedisProfileStore, key: str) -> tuple[str, int]:
    """Host and port of the node that holds `key` (the server itself when standalone)."""
    node = await store.conn.node_of(key)
    if node is None:
        parsed = urlparse(store.config.url)
        return parsed.hostname or "127.0.0.1", int(parsed.port or 6379)
    return node.host, int(node.port)


async def test_an_append_resent_after_a_lost_reply_records_once(impatient: RedisProfileStore) -> None:
    store, user = impatient, "resent"
    first = make_records(1, 1)
    await store.add_ratings(TENANT, user, first, layout=LAYOUT, prior=PRIOR)  # scripts cached on the node
    hook = SleepBeforeFirstWrite(await node_address(store, store.keys.ratings(TENANT, user)))
    store.conn.on_round_trip = hook
    hook.arm()
    second = make_records(2, 1)
    profile, _ = await store.add_ratings(TENANT, user, second, layout=LAYOUT, prior=PRIOR)
    assert hook.finish() == b"+OK\r\n" and hook.sent == 1
    stored = await store.get_ratings(TENANT, user)
    # Before the fix the list held the second rating two or more times (once per send of the append).
    assert [r.digest for r in stored] == [first[0].digest, second[0].digest]
    assert (profile.num_ratings, profile.covers, profile.n) == (2, 2, 2)
    full = await store.get_profile(TENANT, user)
    assert full is not None and (full.num_ratings, full.covers, full.n) == (2, 2, 2)
    # the call key went with the commit: nothing of the call is left but the ratings and the profile
    pattern = f"*{{{store.keys.tag(TENANT, user)}}}:call:*"
    assert [k async for batch in store.conn.scan(pattern, 100) for k in batch] == []


async def test_a_resent_append_with_a_request_id_is_not_taken_for_a_repeat(
    impatient: RedisProfileStore,
) -> None:
    """The resend finds its own call key before the receipt: the call goes on to its fit (it was the
    first call with that id) instead of reporting AlreadyRecorded."""
    store, user = impatient, "resent-with-id"
    await store.add_ratings(TENANT, user, make_records(3, 1), layout=LAYOUT, prior=PRIOR)
    hook = SleepBeforeFirstWrite(await node_address(store, store.keys.ratings(TENANT, user)))
    store.conn.on_round_trip = hook
    hook.arm()
    profile, _ = await store.add_ratings(
        TENANT, user, make_records(4, 2), layout=LAYOUT, prior=PRIOR, request_id="once-only"
    )
    assert hook.finish() == b"+OK\r\n"
    assert profile.num_ratings == 3 and len(await store.get_ratings(TENANT, user)) == 3
    receipt = await store.get_receipt(TENANT, user, "once-only")
    assert receipt is not None and receipt.num_ratings == 3


async def test_add_ratings_racing_a_delete_is_aborted_and_its_retry_records(
    store: RedisProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = StoreAdapter(store, with_embedding=False)
    user, records = "racer", make_records(5, 3)
    kwargs = {
        "digests": [r.digest for r in records],
        "heads": [Head(r.outputs) for r in records],
        "values": [r.value for r in records],
        "scales": [r.scale for r in records],
    }
    fold, deletes = store._fold, []

    async def fold_then_delete(*args: object) -> SufficientStats:
        stats = await fold(*args)  # type: ignore[arg-type]
        if not deletes:  # the DeleteProfile lands between the append and the commit, once
            deletes.append(await adapter.delete_user(TENANT, user))
        return stats

    monkeypatch.setattr(store, "_fold", fold_then_delete)
    with pytest.raises(ServiceError) as raised:
        await adapter.add_ratings(TENANT, user, request_id="rate-1", **kwargs)
    assert deletes == [2]  # the profile and the ratings the append had just written
    # Before the fix: INTERNAL ("profile store: ... deleted ..."), and the receipt stayed behind.
    assert raised.value.status == "ABORTED" and "none was kept" in str(raised.value)
    assert await store.get_profile(TENANT, user) is None and await store.get_ratings(TENANT, user) == []
    assert await store.get_receipt(TENANT, user, "rate-1") is None
    # The gateway reads the receipt before anything else: without one, the retry is not a replay...
    assert not await adapter.already_recorded(
        TENANT, user, "rate-1", digests=kwargs["digests"], values=kwargs["values"], scales=kwargs["scales"]
    )
    # ...and records the ratings, in a new profile.
    profile = await adapter.add_ratings(TENANT, user, request_id="rate-1", **kwargs)
    assert profile is not None and profile.num_ratings == 3
    assert len(await store.get_ratings(TENANT, user)) == 3

    # Kept on purpose: ratings acknowledged before a DeleteProfile leave a receipt that outlives it, so a
    # stale retry of that call records nothing (it is answered as a replay of what the delete removed).
    assert await adapter.delete_user(TENANT, user) == 2
    assert await adapter.already_recorded(
        TENANT, user, "rate-1", digests=kwargs["digests"], values=kwargs["values"], scales=kwargs["scales"]
    )
    assert await adapter.add_ratings(TENANT, user, request_id="rate-1", **kwargs) is None
    assert await store.get_ratings(TENANT, user) == []
