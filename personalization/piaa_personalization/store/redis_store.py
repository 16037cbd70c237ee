"""The profile store: per-user profiles, every rating, the feature cache and the population prior.

`ProfileStore` is the interface the gateway talks to; `RedisProfileStore` implements it on redis.asyncio,
one code path for a single Redis and a Redis Cluster (connection.py), with the key and value layout of
format.md (next to this file). Every store failure surfaces as a `StoreError`; `StoreUnavailable`
(retryable) means Redis could not be reached, or a write could not be made durable, in time.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from piaa_client.features import FEATURE_SPACE_VERSION
from piaa_personalization.history import outbox
from piaa_personalization.model.residual import (
    FeatureLayout,
    HeadOutputs,
    Hyper,
    Posterior,
    Prior,
    SufficientStats,
    fit,
    rating_to_unit,
)
from piaa_personalization.store import format as fmt
from piaa_personalization.store.connection import (
    MODES,
    Client,
    Connection,
    ConnectionSettings,
    Script,
    connect,
)
from piaa_personalization.store.format import (
    F32,
    Profile,
    RatingRecord,
    StoreDataError,
    StoreError,
    StoreUnavailable,
    decode_profile,
    validate_tenant,
)
from piaa_personalization.store.prior_cache import PriorCache

__all__ = [
    "Profile",
    "RatingRecord",
    "RedisProfileStore",
    "StoreConfig",
    "StoreDataError",
    "StoreError",
    "StoreUnavailable",
]


@dataclass(frozen=True)
class StoreConfig:
    """How to reach Redis and how long to keep cached features."""

    url: str = "redis://127.0.0.1:6379/0"
    """redis://[[user]:password@]host:port/db (rediss:// for TLS); credentials may be an ACL user."""
    key_prefix: str = "piaa"
    """First segment of every key; lets several deployments share one Redis."""
    feature_ttl_s: int = 7 * 24 * 3600
    """How long cached head outputs live after their last use (a hit refreshes the TTL)."""
    socket_timeout_s: float = 2.0
    """Per-command timeout; a command that takes longer raises StoreUnavailable."""
    connect_timeout_s: float = 2.0
    """Timeout of opening a connection."""
    max_connections: int = 64
    """Connection pool size per process."""
    pool_timeout_s: float = 10.0
    """How long a call waits for a free pooled connection (a busy event loop, not Redis, is the usual
    reason to wait) before raising StoreUnavailable."""
    retries: int = 2
    """Retries (exponential backoff) of a command that hit a connection error or timeout. The scripts
    (eval_durable) are sent again this many times by the store itself, with the same call key, so a
    timed-out append records its ratings once (format.md, "Resends")."""
    mode: str = "standalone"
    """`standalone` (one Redis) or `cluster` (Redis Cluster; `url` names any one node)."""
    min_replica_acks: int | None = None
    """Replicas that must have a rating (WAIT) before add_ratings returns; None: 1 in cluster mode, 0
    standalone. Fewer within `replica_ack_timeout_ms` fails the call with StoreUnavailable."""
    replica_ack_timeout_ms: int = 1000
    """How long a write waits for its replica acknowledgements."""
    history_url: str | None = None
    """The rating history table (history/table.py, docs/history.md). Set, add_ratings also XADDs each
    new rating to its slot's outbox stream in the append script, for the history writer to drain.
    None: no outbox; the scripts and keys are those of a store without history."""
    history_max_backlog: int = outbox.DEFAULT_MAX_BACKLOG_PER_SLOT
    """Entries a slot's outbox may hold (history set): beyond, add_ratings for that slot's users is refused
    with StoreUnavailable, nothing written, until the writer catches up."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"redis mode is one of {MODES}, got {self.mode!r}")
        if (self.min_replica_acks or 0) < 0 or self.replica_ack_timeout_ms < 1:
            raise ValueError("min_replica_acks must be >= 0 and replica_ack_timeout_ms >= 1")
        if self.history_max_backlog < 1:
            raise ValueError("history_max_backlog must be >= 1")

    @property
    def replica_acks(self) -> int:
        """The replica acknowledgements a write needs (min_replica_acks, or the mode's default)."""
        if self.min_replica_acks is not None:
            return self.min_replica_acks
        return 1 if self.mode == "cluster" else 0

    def connection_settings(self) -> ConnectionSettings:
        return ConnectionSettings(
            self.url, self.mode, self.socket_timeout_s, self.connect_timeout_s, self.max_connections,
            self.pool_timeout_s, self.retries,
        )  # fmt: skip


# Appends ratings and returns, in the same atomic step, what the caller must fold into the statistics
# (format 2's `stats`, or format 1's gram/moment/yy/n when the hash was written before).
# The call key (one per add_ratings call, made before the first send; the commit deletes it) makes the
# append idempotent although the connection may send it more than once (eval_durable resends after a
# timeout on the reply): the first run appends and SETs the call key to the profile's epoch; a resend
# finds it and appends nothing, replying as a refit would (its ratings are in the list already), or {0}
# when the user was deleted since (the epoch changed; the receipt, whose ratings are gone unacknowledged,
# is deleted too).
# With a receipt key (the caller's request id): records nothing and returns {-1, receipt} when the key
# exists, else writes the receipt (prefix .. list length, with its TTL) in the same step as the append.
# KEYS: profile, ratings[, call[, receipt]]. ARGV: now, layout key, new epoch, receipt prefix, receipt
# TTL, call TTL, ratings...
_APPEND = """
local resumed = false
if KEYS[3] then
  local call = redis.call('GET', KEYS[3])
  if call then
    if redis.call('HMGET', KEYS[1], 'epoch')[1] ~= call then
      if KEYS[4] then redis.call('DEL', KEYS[4]) end
      return {0}
    end
    resumed = true
  elseif KEYS[4] then
    local seen = redis.call('GET', KEYS[4])
    if seen then return {-1, seen} end
  end
end
if not resumed then
  for i = 7, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
end
local len = redis.call('LLEN', KEYS[2])
if len == 0 then return {0} end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3])
redis.call('HSETNX', KEYS[1], 'format', '2')
redis.call('HSET', KEYS[1], 'num_ratings', len)
local p = redis.call('HMGET', KEYS[1], 'epoch', 'layout', 'covers', 'stats', 'gram', 'moment', 'yy', 'n')
if KEYS[3] and not resumed then
  redis.call('SET', KEYS[3], p[1], 'EX', ARGV[6])
  if KEYS[4] then redis.call('SET', KEYS[4], ARGV[4] .. len, 'EX', ARGV[5]) end
end
local start = 0
if p[2] == ARGV[2] and p[3] then start = tonumber(p[3]) else p[4] = false; p[5] = false end
return {len, p[1], start, p[4], p[5], p[6], p[7], p[8], redis.call('LRANGE', KEYS[2], start, len - 1)}
"""

# Writes fitted statistics unless a newer fit is already there (covering more ratings of this epoch, or
# as many under a prior learned no earlier), or the user was deleted meanwhile (the epoch changed), or
# the list no longer holds the ratings the fit covers (a failover lost an unacknowledged append: -2, the
# caller fails). It always writes something (the unchanged `covers` when a newer fit is there), so a WAIT
# after it covers the ratings it saw. An add_ratings' commit deletes its call key (the append is no longer
# resent) and, when the user was deleted, its receipt: those ratings are gone without having been
# acknowledged, so a retry with the same request id must record them again.
# A fit it writes replaces a format-1 hash's fields with format 2's (HDEL of those format 2 has not).
# KEYS: profile, ratings[, call[, receipt]]. ARGV: epoch, layout key, covers, channel, message prefix, the
# prior's learned_at, field/value pairs.
_COMMIT = """
if KEYS[3] then redis.call('DEL', KEYS[3]) end
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'layout', 'covers', 'version', 'prior_at')
if cur[1] ~= ARGV[1] then
  if KEYS[4] then redis.call('DEL', KEYS[4]) end
  return {-1, 0}
end
if redis.call('LLEN', KEYS[2]) < tonumber(ARGV[3]) then return {-2, 0} end
if cur[2] == ARGV[2] then
  local covers, mine = tonumber(cur[3] or '-1'), tonumber(ARGV[3])
  if covers > mine or (covers == mine and tonumber(cur[5] or '0') >= tonumber(ARGV[6])) then
    redis.call('HSET', KEYS[1], 'covers', cur[3])
    return {0, tonumber(cur[4] or '0')}
  end
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'layout', ARGV[2], 'covers', ARGV[3], 'prior_at', ARGV[6], unpack(fields))
redis.call('HDEL', KEYS[1], FORMAT1_FIELDS)
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. v)
return {1, v}
""".replace("FORMAT1_FIELDS", ", ".join(f"'{f}'" for f in fmt.format1.FIT_FIELDS))

# Stores a prior (field/value pairs) and announces it on the change channel, in one step.
# KEYS: prior. ARGV: channel, message, field/value pairs.
_PUT_PRIOR = """
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

_DELETE = """
local n = redis.call('DEL', unpack(KEYS))
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' -1')
return n
"""


ACL_COMMANDS = (
    # direct calls and pipelines
    "ping", "hmget", "hgetall", "hset", "lrange", "get", "getex", "set", "scan", "exists",
    # the Lua scripts (registered: EVALSHA, then SCRIPT LOAD on a cold cache) and what they call
    "evalsha", "eval", "script|load", "rpush", "llen", "hsetnx", "hincrby", "hdel", "del", "publish",
    # durable writes: WAIT for replicas on the writer's connection
    "wait",
    # the gateway's change listener
    "subscribe", "unsubscribe",
    # cluster mode: redis-py learns the slots and the commands' key positions, follows ASK redirects
    "cluster|slots", "cluster|nodes", "cluster|info", "command", "asking", "readonly",
)  # fmt: skip
"""Every Redis command this store sends; keep in step with the code (an integration test runs the
gateway as an ACL user limited to these)."""

HISTORY_ACL_COMMANDS = ("xadd", "xlen")
"""What the append script adds when StoreConfig.history_url is set (the outbox)."""


def acl_rules(key_prefix: str = "piaa", history: bool = False) -> list[str]:
    """The least-privilege ACL rules of the store's Redis user (after `ACL SETUSER <name> on >pw`):
    only ACL_COMMANDS (and HISTORY_ACL_COMMANDS when `history`), only keys under `<prefix>:`, only the
    change channel."""
    keys = fmt.Keys(key_prefix)
    commands = ACL_COMMANDS + (HISTORY_ACL_COMMANDS if history else ())
    return [
        "resetkeys", f"~{key_prefix}:*", "resetchannels", f"&{keys.changes}", "-@all",
        *(f"+{c}" for c in commands),
    ]  # fmt: skip


class RedisProfileStore:
    """The profile store on one Redis or a Redis Cluster (one user's keys share a hash slot, so each Lua
    script runs on one node; batch reads are one pipeline per node, sent in parallel).

    `on_round_trip(op, node)` is called for each request sent to a node (metrics, benchmarks).
    """

    def __init__(
        self,
        config: StoreConfig | None = None,
        client: Client | None = None,
        on_round_trip: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config or StoreConfig()
        self.keys = fmt.Keys(self.config.key_prefix)
        self.conn = Connection(
            client or connect(self.config.connection_settings()),
            on_round_trip,
            max_in_flight=self.config.max_connections,
            wait_s=self.config.pool_timeout_s,
            resends=self.config.retries,
        )
        self.client = self.conn.client
        self._append = Script(_APPEND)
        self._append_outbox = Script(outbox.with_outbox(_APPEND)) if self.config.history_url else None
        self._commit = Script(_COMMIT)
        self._delete = Script(_DELETE)
        self._put_prior = Script(_PUT_PRIOR)
        self.priors = PriorCache()
        """Population priors cached in this process (shared by in_space clones); a prior change on the
        change channel drops its tenant's entries (Connection.watch)."""
        self.conn.watch(self.priors.handle, self.priors.clear)
        self.other_spaces: tuple[str, ...] = ()
        """Feature spaces besides keys.space whose profiles delete_user removes too (the rollout's)."""

    def in_space(self, space: str) -> RedisProfileStore:
        """This store (same connection) reading and writing the profiles of feature space `space`; the
        ratings, receipts and feature cache are shared by every space."""
        clone = copy.copy(self)
        clone.keys = fmt.Keys(self.config.key_prefix, space)
        return clone

    # -- profiles --------------------------------------------------------------------------------------

    async def get_profiles(self, tenant: str, user_ids: Sequence[str]) -> list[Profile | None]:
        """The lean profiles (weights, no statistics) of many users in ONE round trip; None = never rated."""
        validate_tenant(tenant)
        keys = [self.keys.profile(tenant, user) for user in user_ids]

        def fill(pipe: Any) -> None:
            for key in keys:
                pipe.hmget(key, *fmt.LEAN_FIELDS)

        rows = await self.conn.pipeline("profiles", keys, fill)
        return [fmt.decode_lean(tenant, user, *row) for user, row in zip(user_ids, rows, strict=True)]

    async def read_batch(
        self,
        digests: Sequence[str],
        users: Sequence[tuple[str, str]],
        fs_version: str = FEATURE_SPACE_VERSION,
    ) -> tuple[list[F32 | None], list[Profile | None]]:
        """What one scoring micro-batch needs, in ONE round trip (one pipeline per node, in parallel, in a
        cluster): the cached features of `digests` (a hit refreshes the TTL) and the lean profiles of the
        (tenant, user) pairs. None = a miss / never rated. Raises StoreUnavailable, StoreDataError."""
        for tenant, _ in users:
            validate_tenant(tenant)
        fkeys = [self.keys.features(fs_version, fmt.check_digest(d)) for d in digests]
        pkeys = [self.keys.profile(t, u) for t, u in users]

        def fill(pipe: Any) -> None:
            for key in fkeys:
                pipe.getex(key, ex=self.config.feature_ttl_s)
            for key in pkeys:
                pipe.hmget(key, *fmt.LEAN_FIELDS)

        raw = await self.conn.pipeline("batch_read", fkeys + pkeys, fill)
        features = [fmt.decode_features(v) if v is not None else None for v in raw[: len(fkeys)]]
        profiles = [fmt.decode_lean(t, u, *row) for (t, u), row in zip(users, raw[len(fkeys) :], strict=True)]
        return features, profiles

    async def get_profile(self, tenant: str, user_id: str) -> Profile | None:
        """One user's full profile, statistics included; None when the user has never rated."""
        validate_tenant(tenant)
        async with self.conn.guard():
            raw = await self.client.hgetall(self.keys.profile(tenant, user_id))
        return decode_profile(tenant, user_id, _fields(raw), full=True)

    async def add_ratings(
        self,
        tenant: str,
        user_id: str,
        ratings: Sequence[RatingRecord],
        *,
        layout: FeatureLayout,
        prior: Prior,
        hyper: Hyper | None = None,
        request_id: str | None = None,
    ) -> tuple[Profile, Posterior]:
        """Appends the ratings (all kept) and updates statistics and weights atomically per user.

        Returns the profile that includes at least these ratings, and its posterior. The append is
        idempotent within the call: the connection may send it again after a timeout on its reply, and
        a resend records nothing (a call key made before the first send; format.md). With a request_id,
        the append also leaves a receipt under it for RECEIPT_TTL_S; when one is there already, nothing is
        recorded and AlreadyRecorded (carrying that receipt) is raised. Raises ProfileDeleted when the
        user was deleted between the append and the commit (nothing kept, the receipt removed: a retry
        records them anew), StoreUnavailable, StoreError.
        """
        validate_tenant(tenant)
        if prior.dim != layout.dim:
            raise ValueError(f"prior has D={prior.dim}, layout {layout.key} has D={layout.dim}")
        if not ratings:
            raise ValueError("add_ratings needs at least one rating (refit rebuilds without new ones)")
        for r in ratings:
            rating_to_unit(r.value, r.scale)  # raises InvalidRating before anything is written
        encoded = [fmt.encode_rating(r) for r in ratings]
        receipt = None
        if request_id is not None:
            digest = fmt.payload_hash((r.digest, r.value, r.scale) for r in ratings)
            receipt = (self.keys.request(tenant, user_id, request_id), fmt.receipt_prefix(digest))
        result = await self._update(
            tenant=tenant,
            user_id=user_id,
            encoded=encoded,
            layout=layout,
            prior=prior,
            hyper=hyper,
            call=self.keys.call(tenant, user_id, uuid.uuid4().hex),
            receipt=receipt,
            request_id=request_id,
        )
        if result is None:
            raise fmt.ProfileDeleted(
                "the profile was deleted while these ratings were being added: none was kept"
            )
        return result

    async def refit(
        self,
        tenant: str,
        user_id: str,
        *,
        layout: FeatureLayout,
        prior: Prior,
        hyper: Hyper | None = None,
        off_loop: bool = False,
    ) -> tuple[Profile, Posterior] | None:
        """Rebuilds a stale profile (another layout or feature space, an older prior) from the stored
        ratings; None when the user has no ratings. `off_loop` folds and fits in a worker thread (batch
        jobs such as the prior's refits, which must not hold the event loop for a whole user's ratings)."""
        validate_tenant(tenant)
        return await self._update(
            tenant=tenant,
            user_id=user_id,
            encoded=[],
            layout=layout,
            prior=prior,
            hyper=hyper,
            off_loop=off_loop,
        )

    async def _update(
        self,
        *,
        tenant: str,
        user_id: str,
        encoded: list[bytes],
        layout: FeatureLayout,
        prior: Prior,
        hyper: Hyper | None,
        call: str | None = None,
        receipt: tuple[str, str] | None = None,
        request_id: str | None = None,
        off_loop: bool = False,
    ) -> tuple[Profile, Posterior] | None:
        """Append (atomic, returns the unfolded ratings) -> fold + fit here -> commit (atomic, monotonic).

        Two round trips and no retries however many writers race: any writer's statistics over the first
        `covers` ratings are the same, so the commit keeps whichever covers more (see format.md).
        `call` (a key unique to this call) makes a resent append record nothing; `receipt` (key, value
        prefix) makes the call idempotent across calls: raises AlreadyRecorded on a repeat. None when
        the user has no ratings, or was deleted before the commit.
        """
        pkey, rkey = self.keys.profile(tenant, user_id), self.keys.ratings(tenant, user_id)
        now = time.time()
        keys = [pkey, rkey]
        if call is not None:
            keys += [call] if receipt is None else [call, receipt[0]]
        prefix = "" if receipt is None else receipt[1]
        args = [repr(now), layout.key, uuid.uuid4().hex, prefix, fmt.RECEIPT_TTL_S, fmt.CALL_TTL_S, *encoded]
        script = self._append
        if self._append_outbox is not None and encoded:
            # The outbox (history set): its stream is the last key, its arguments come before the ratings;
            # the script takes them off before running the append's own code (history/outbox.py).
            script = self._append_outbox
            keys = [*keys, outbox.user_stream(self.config.key_prefix, tenant, user_id)]
            history = [self.config.history_max_backlog, tenant, user_id, request_id or ""]
            args = [*args[:6], *history, *encoded]
        reply = await self.conn.eval_durable(script, keys, args, acks=0, timeout_ms=1)
        if int(reply[0]) == -1:
            raise fmt.AlreadyRecorded(fmt.decode_receipt(reply[1]))
        if int(reply[0]) == -3:
            raise StoreUnavailable("the rating history's outbox is full (its writer is behind): retry later")
        length = int(reply[0])
        if length == 0:
            return None
        epoch = reply[1]
        if reply[3]:
            stats = fmt.decode_stats2(layout.dim, reply[3])
        elif reply[4]:  # a format-1 profile: its statistics are read once, the commit writes format 2
            stats = fmt.decode_stats(layout.dim, reply[4], reply[5], reply[6], reply[7])
        else:
            stats = SufficientStats.empty(layout.dim)
        records = [fmt.decode_rating(b) for b in reply[8]]
        stats = await self._fold(stats, records, layout, off_loop)
        post = await asyncio.to_thread(fit, stats, prior, hyper) if off_loop else fit(stats, prior, hyper)
        fields = fmt.encode_fit(layout, stats, post, now, length)
        # The commit, then WAIT on its connection: replicas that acknowledge it have every rating the list
        # held when it ran (one replication stream per primary), so an acknowledged rating survives the
        # loss of the primary.
        tag, prior_at = self.keys.tag(tenant, user_id), repr(prior.learned_at)
        status, version = await self.conn.eval_durable(
            self._commit,
            keys,
            [epoch, layout.key, length, self.keys.changes, tag, prior_at, *fields],
            acks=self.config.replica_acks,
            timeout_ms=self.config.replica_ack_timeout_ms,
        )
        if int(status) == -2:
            raise StoreUnavailable("ratings were lost in a failover before they were acknowledged; retry")
        if int(status) < 0:
            return None
        # When a concurrent writer committed a fit that covers more, ours is still a correct profile of the
        # first `length` ratings, which include the caller's; report it with the version now stored.
        profile = Profile(
            tenant=tenant,
            user_id=user_id,
            layout_key=layout.key,
            weights=post.mean.astype(np.float32),
            num_ratings=length,
            n=stats.n,
            covers=length,
            version=int(version),
            updated_at=now,
            alpha=post.alpha,
            lam=post.lam,
            stats=stats,
        )
        return profile, post

    async def _fold(
        self,
        stats: SufficientStats,
        records: list[RatingRecord],
        layout: FeatureLayout,
        off_loop: bool = False,
    ) -> SufficientStats:
        """Adds ratings to the statistics (in a worker thread when `off_loop`). A rating stored in another
        feature space uses the cached features of its image in this one (re-extraction by digest); without
        them it is skipped (counted in num_ratings - n) and a later full refit picks it up."""
        if not records:
            return stats
        foreign = sorted({r.digest for r in records if r.fs_version != layout.fs_version})
        cached: dict[str, F32] = {}
        if foreign:
            found = await self.get_features(foreign, layout.fs_version)
            cached = {d: f for d, f in zip(foreign, found, strict=True) if f is not None}
        if off_loop:
            return await asyncio.to_thread(_fold_rows, stats, records, cached, layout)
        return _fold_rows(stats, records, cached, layout)

    async def get_receipt(self, tenant: str, user_id: str, request_id: str) -> fmt.Receipt | None:
        """The receipt an add_ratings with `request_id` left; None when there was none within the TTL."""
        validate_tenant(tenant)
        key = self.keys.request(tenant, user_id, request_id)
        async with self.conn.guard():
            raw = await self.client.get(key)
        return fmt.decode_receipt(_bytes(raw)) if raw is not None else None

    async def get_ratings(
        self, tenant: str, user_id: str, start: int = 0, stop: int = -1
    ) -> list[RatingRecord]:
        """Ratings from index `start` to `stop` (inclusive; negatives count from the end), oldest first."""
        validate_tenant(tenant)
        async with self.conn.guard():
            raw = await self.client.lrange(self.keys.ratings(tenant, user_id), start, stop)
        return [fmt.decode_rating(_bytes(b)) for b in raw]

    async def delete_user(self, tenant: str, user_id: str) -> int:
        """Removes every key of the user; returns the number of keys removed."""
        validate_tenant(tenant)
        n = await self.conn.eval_durable(
            self._delete,
            self.keys.user_keys(tenant, user_id, self.other_spaces),
            [self.keys.changes, self.keys.tag(tenant, user_id)],
            acks=self.config.replica_acks,
            timeout_ms=self.config.replica_ack_timeout_ms,
        )
        return int(n)

    async def iter_profiles(self, tenant: str, batch: int = 200) -> AsyncIterator[Profile]:
        """Every full profile of a tenant (SCAN of every primary, for offline jobs such as the prior)."""
        validate_tenant(tenant)
        async for key_batch in self.conn.scan(self.keys.profile_pattern(tenant), batch):

            def fill(pipe: Any, key_batch: list[bytes] = key_batch) -> None:
                for key in key_batch:
                    pipe.hgetall(key)

            rows = await self.conn.pipeline("scan", [k.decode() for k in key_batch], fill)
            for key, raw in zip(key_batch, rows, strict=True):
                user = self.keys.user_of(key.decode())
                prof = decode_profile(tenant, user, _fields(raw), full=True)
                if prof is not None:
                    yield prof

    async def learn_prior(
        self, tenant: str, layout: FeatureLayout, *, min_ratings: int = 10, hyper: Hyper | None = None
    ) -> Prior:
        """Learns the tenant's population prior from its users with at least `min_ratings` ratings in
        this layout (each refit under the zero prior, then Prior.from_users), stores and returns it."""
        zero = Prior.zero(layout.dim)
        means, covs = [], []
        async for prof in self.iter_profiles(tenant):
            if prof.layout_key == layout.key and prof.stats is not None and prof.n >= min_ratings:
                post = fit(prof.stats, zero, hyper)
                means.append(post.mean)
                covs.append(post.cov)
        if len(means) < 2:
            return zero
        return await self.put_prior(tenant, layout, Prior.from_users(np.stack(means), np.stack(covs)))

    # -- features --------------------------------------------------------------------------------------

    async def get_features(
        self, digests: Sequence[str], fs_version: str = FEATURE_SPACE_VERSION
    ) -> list[F32 | None]:
        """Cached packed head outputs ([85] float32) for many digests in ONE round trip; None = miss."""
        keys = [self.keys.features(fs_version, fmt.check_digest(d)) for d in digests]

        def fill(pipe: Any) -> None:
            for key in keys:
                pipe.getex(key, ex=self.config.feature_ttl_s)

        raw = await self.conn.pipeline("features", keys, fill)
        return [fmt.decode_features(v) if v is not None else None for v in raw]

    async def put_features(
        self, digests: Sequence[str], outputs: HeadOutputs, fs_version: str = FEATURE_SPACE_VERSION
    ) -> None:
        """Caches the head outputs of images by digest (one round trip), with the configured TTL."""
        if len(digests) != len(outputs):
            raise ValueError(f"{len(digests)} digests for {len(outputs)} images")
        packed = outputs.packed()
        keys = [self.keys.features(fs_version, fmt.check_digest(d)) for d in digests]

        def fill(pipe: Any) -> None:
            for key, row in zip(keys, packed, strict=True):
                pipe.set(key, fmt.encode_features(row), ex=self.config.feature_ttl_s)

        await self.conn.pipeline("feature_write", keys, fill)

    # -- population prior ------------------------------------------------------------------------------

    async def get_prior(self, tenant: str, layout: FeatureLayout) -> Prior | None:
        """The tenant's stored population prior for a layout; None when none was learned yet."""
        validate_tenant(tenant)
        async with self.conn.guard():
            raw = await self.client.hgetall(self.keys.prior(tenant, layout))
        return fmt.decode_prior(layout.dim, _fields(raw)) if raw else None

    async def put_prior(self, tenant: str, layout: FeatureLayout, prior: Prior) -> Prior:
        """Stores the tenant's population prior for a layout, stamped with the time (`learned_at`), and
        announces it on the change channel (every gateway drops its cached copy); returns it as stored
        (what fits under it record). One round trip."""
        validate_tenant(tenant)
        if prior.dim != layout.dim:
            raise ValueError(f"prior has D={prior.dim}, layout {layout.key} has D={layout.dim}")
        stamped = dataclasses.replace(prior, learned_at=time.time())
        pairs = [x for kv in fmt.encode_prior(stamped).items() for x in kv]
        message = fmt.prior_change(tenant, layout.key, stamped.learned_at)
        await self.conn.eval_durable(
            self._put_prior,
            [self.keys.prior(tenant, layout)],
            [self.keys.changes, message, *pairs],
            acks=0,
            timeout_ms=1,
        )
        self.priors.drop(tenant)
        return stamped

    async def enrolled_profiles(
        self, tenant: str, layout: FeatureLayout, min_ratings: int, limit: int, batch: int = 200
    ) -> AsyncIterator[tuple[str, Profile | None]]:
        """The tenant's users with a fit in `layout`, for the prior: (user, full profile) for at most
        `limit` users with at least `min_ratings` ratings, (user, None) for those with fewer (not read).

        SCAN of every primary (it walks the whole keyspace, stopping once `limit` profiles were read);
        each key found costs one short HMGET (layout, num_ratings) in the batch's pipeline, and only the
        enrolled profiles are read in full (HGETALL, one pipeline per batch)."""
        validate_tenant(tenant)
        read = 0
        async for key_batch in self.conn.scan(self.keys.profile_pattern(tenant), batch):
            keys = [k.decode() for k in key_batch]

            def heads(pipe: Any, keys: list[str] = keys) -> None:
                for key in keys:
                    pipe.hmget(key, "layout", "num_ratings")

            rows = await self.conn.pipeline("scan", keys, heads)
            ours = layout.key.encode()
            mine = [(k, int(n or 0)) for k, (lay, n) in zip(keys, rows, strict=True) if lay == ours]
            full = [k for k, n in mine if n >= min_ratings][: limit - read]

            def bodies(pipe: Any, full: list[str] = full) -> None:
                for key in full:
                    pipe.hgetall(key)

            found = {}
            if full:
                found = dict(zip(full, await self.conn.pipeline("scan", full, bodies), strict=True))
            read += len(full)
            for key, n in mine:
                user = self.keys.user_of(key)
                if key in found:
                    yield user, decode_profile(tenant, user, _fields(found[key]), full=True)
                elif n < min_ratings:
                    yield user, None
            if read >= limit:
                return

    # -- lifecycle -------------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises StoreUnavailable unless the store answers."""
        async with self.conn.guard():
            await self.client.ping()

    async def close(self) -> None:
        """Releases connections."""
        await self.conn.close()


def _fold_rows(
    stats: SufficientStats, records: list[RatingRecord], cached: dict[str, F32], layout: FeatureLayout
) -> SufficientStats:
    """`stats` plus the ratings whose features are at hand (their own, or `cached` by digest for those
    stored in another space); numpy only, so safe in a worker thread."""
    rows, targets = [], []
    for r in records:
        packed = r.outputs if r.fs_version == layout.fs_version else cached.get(r.digest)
        if packed is None:
            continue
        rows.append(packed)
        targets.append(rating_to_unit(r.value, r.scale) - float(packed[0]))
    if not rows:
        return stats
    x = layout.features(HeadOutputs.from_packed(np.stack(rows)))
    return stats.add(x, np.asarray(targets))


def _bytes(value: bytes | str) -> bytes:
    # The client is built without decode_responses, so replies are bytes; this narrows redis-py's types.
    return value if isinstance(value, bytes) else value.encode()


def _fields(raw: dict[bytes | str, bytes | str]) -> dict[str, bytes | None]:
    return {_bytes(k).decode(): _bytes(v) for k, v in raw.items()}
