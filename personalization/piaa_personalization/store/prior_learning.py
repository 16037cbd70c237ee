"""Priors that learn themselves: a tenant's population prior, relearned as its enrolled users grow.

Each gateway counts, per tenant, the users an AddRatings takes past `min_ratings` (enrolment, one HINCRBY).
When the count reaches `min_users`, and again each time it has grown `growth`-fold since the last learning,
the gateway that saw it relearns the prior in a background task: under a Redis lock (SET NX PX, renewed by
its holder every third of its TTL while it works, released only by its holder), so one gateway learns a
tenant at a time; it re-checks under the lock, so a second gateway that saw the same threshold finds the
work done. Cost is bounded: at most `max_users` enrolled profiles are read in full (the store's SCAN over
every primary stops there; each other profile of the tenant costs one short HMGET) and fitted, off the
event loop; then at most `max_users` of the users seen are refitted under the new prior (weights fitted
under the old one would otherwise keep it until their next rating), their folds and fits off the event
loop too. The prior and the state are written by one script that first checks that the lock still holds
this learner's token (a learner that lost its lock writes nothing) and that publishes the change on the
store's change channel: every gateway drops its cached prior (store/prior_cache.py) and fits the next
ratings under the new one; the refitted profiles reach them through the commits' own messages. Keys
(format.md): the state hash `<p>:{t:<tenant>}:prior-state:<layout>` (`enrolled`, `learned_at`, `users`,
`updated_at`) and the lock `<p>:{t:<tenant>}:prior-lock:<layout>`, both in the tenant's hash slot, beside
its prior.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from piaa_personalization.model.residual import PRIOR_FIT, FeatureLayout, Prior, SufficientStats, fit
from piaa_personalization.store import format as fmt
from piaa_personalization.store.format import StoreError, validate_tenant
from piaa_personalization.store.redis_store import RedisProfileStore

log = logging.getLogger(__name__)

# Deletes the lock only when it still holds our token (it may have expired and been taken by another).
# GETEX without options is GET; it is among the store's ACL commands (redis_store.ACL_COMMANDS).
_RELEASE = """
if redis.call('GETEX', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extends the lock to ARGV[2] ms while it still holds our token (SET of the same token: no command
# beyond the store's ACL); 0 when it does not (lost).
_RENEW = """
if redis.call('GETEX', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# The learning's outcome, fenced by the lock: nothing unless the lock still holds our token. Writes the
# prior's fields (ARGV[4] pairs; none when too few users taught one) and the state's, and publishes the
# prior's change message on the change channel when a prior was written.
# KEYS: lock, prior, state. ARGV: token, channel, message, number of prior pairs, prior pairs, state pairs.
_STORE = """
if redis.call('GETEX', KEYS[1]) ~= ARGV[1] then return 0 end
local np = tonumber(ARGV[4])
local prior, state = {}, {}
for i = 5, 4 + 2 * np do prior[#prior + 1] = ARGV[i] end
for i = 5 + 2 * np, #ARGV do state[#state + 1] = ARGV[i] end
if np > 0 then
  redis.call('HSET', KEYS[2], unpack(prior))
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
redis.call('HSET', KEYS[3], unpack(state))
return 1
"""


@dataclass(frozen=True)
class RelearnPolicy:
    """When and how much a tenant's prior is relearned."""

    min_users: int = 20
    """Enrolled users a tenant needs before its first prior is learned (0 disables relearning)."""
    growth: float = 2.0
    """Relearn when the enrolled users reach this multiple of those at the last learning."""
    min_ratings: int = 10
    """Ratings that make a user enrolled, and that a user needs to teach the prior."""
    max_users: int = 2000
    """Most profiles one learning reads and fits: the cost bound (docs/quality.md measures a fit)."""
    lock_ttl_s: float = 300.0
    """How long the relearn lock lives if its holder dies before releasing it (its holder renews it every
    third of this while it works)."""

    def __post_init__(self) -> None:
        if self.min_users < 0 or self.growth <= 1.0 or self.min_ratings < 1 or self.max_users < 2:
            raise ValueError(f"invalid relearn policy {self}")

    def due(self, enrolled: int, learned_at: int) -> bool:
        """Whether `enrolled` users call for a (re)learning after the last one at `learned_at` users."""
        if self.min_users == 0 or enrolled < max(self.min_users, 2):
            return False
        return learned_at == 0 or enrolled >= self.growth * learned_at


def learn_from(stats: list[SufficientStats], dim: int) -> Prior:
    """Prior.from_users over each user's fit under the zero prior (the residual model alone, PRIOR_FIT)."""
    zero = Prior.zero(dim)
    posts = [fit(s, zero, PRIOR_FIT) for s in stats]
    if len(posts) < 2:
        return zero
    return Prior.from_users(np.stack([p.mean for p in posts]), np.stack([p.cov for p in posts]))


class PriorLearner:
    """Counts enrolments and relearns a tenant's prior in `layout` when the policy says so."""

    def __init__(self, store: RedisProfileStore, layout: FeatureLayout, policy: RelearnPolicy) -> None:
        self.store = store
        self.layout = layout
        self.policy = policy
        self._release = store.client.register_script(_RELEASE)
        self._renew = store.client.register_script(_RENEW)
        self._store = store.client.register_script(_STORE)
        self._tasks: set[asyncio.Task[Prior | None]] = set()

    def state_key(self, tenant: str) -> str:
        """The tenant's relearn state hash (in the tenant's hash slot)."""
        return f"{self.store.keys.prefix}:{{t:{validate_tenant(tenant)}}}:prior-state:{self.layout.key}"

    def lock_key(self, tenant: str) -> str:
        """The tenant's relearn lock (in the tenant's hash slot)."""
        return f"{self.store.keys.prefix}:{{t:{validate_tenant(tenant)}}}:prior-lock:{self.layout.key}"

    async def state(self, tenant: str) -> tuple[int, int]:
        """(enrolled users, enrolled users at the last learning) of the tenant."""
        async with self.store.conn.guard():
            enrolled, learned = await self.store.client.hmget(
                self.state_key(tenant), ["enrolled", "learned_at"]
            )
        return int(enrolled or 0), int(learned or 0)

    async def note_ratings(self, tenant: str, num_ratings: int, added: int) -> bool:
        """Counts the user as enrolled when these `added` ratings took them to `num_ratings` across
        policy.min_ratings. Returns whether a relearning is due (start it with `start`)."""
        if self.policy.min_users == 0 or not num_ratings - added < self.policy.min_ratings <= num_ratings:
            return False
        async with self.store.conn.guard():
            enrolled = int(await self.store.client.hincrby(self.state_key(tenant), "enrolled", 1))
            (learned,) = await self.store.client.hmget(self.state_key(tenant), ["learned_at"])
        return self.policy.due(enrolled, int(learned or 0))

    def start(self, tenant: str) -> asyncio.Task[Prior | None]:
        """Relearns the tenant's prior in a background task (kept referenced until it ends); errors are
        logged, never raised into the request that triggered it."""
        task = asyncio.get_running_loop().create_task(self._relearn_logged(tenant))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _relearn_logged(self, tenant: str) -> Prior | None:
        try:
            return await self.relearn(tenant)
        except Exception:  # a failed relearning leaves the old prior in place; the next enrolment retries
            log.exception("relearning the prior of tenant %s failed", tenant)
            return None

    async def relearn(self, tenant: str) -> Prior | None:
        """Under the tenant's lock, when still due: learns the prior from at most policy.max_users
        enrolled profiles, stores and announces it and records the learning, then refits the users seen
        under it. Returns the prior, or None when another gateway holds the lock, the learning was no
        longer due, or the lock was lost before the prior was written. Raises the store's errors."""
        token = uuid.uuid4().hex
        ttl_ms = int(self.policy.lock_ttl_s * 1000)
        async with self.store.conn.guard():
            got = await self.store.client.set(self.lock_key(tenant), token, nx=True, px=ttl_ms)
        if not got:
            return None
        try:
            async with self._held(tenant, token, ttl_ms):
                enrolled, learned = await self.state(tenant)
                if not self.policy.due(enrolled, learned):
                    return None
                stats: list[SufficientStats] = []
                users: list[str] = []  # whose weights were fitted under the old prior, in this layout
                async for user, prof in self.store.enrolled_profiles(
                    tenant, self.layout, self.policy.min_ratings, self.policy.max_users
                ):
                    if len(users) < self.policy.max_users:
                        users.append(user)
                    if prof is not None and prof.stats is not None and prof.n >= self.policy.min_ratings:
                        stats.append(prof.stats)
                learned_prior = await asyncio.to_thread(learn_from, stats, self.layout.dim)
                prior = await self._write(tenant, token, learned_prior, enrolled)
                if prior is None:
                    log.warning("tenant %s: the relearn lock was lost before the prior was stored", tenant)
                    return None
            if prior.n_users >= 2:
                await self._refit(tenant, users, prior)
            log.info(
                "tenant %s: prior relearned from %d users (%d enrolled)", tenant, prior.n_users, enrolled
            )
            return prior
        finally:
            async with self.store.conn.guard():
                await self._release(keys=[self.lock_key(tenant)], args=[token])

    @contextlib.asynccontextmanager
    async def _held(self, tenant: str, token: str, ttl_ms: int) -> AsyncIterator[None]:
        """Renews the lock every third of its TTL while the body runs (a learning of many users on a
        loaded machine can outlast the TTL, and the lock must not expire under it)."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl_ms / 3000)
                try:
                    async with self.store.conn.guard():
                        kept = await self._renew(keys=[self.lock_key(tenant)], args=[token, ttl_ms])
                except StoreError as err:  # the fenced write refuses if the lock expires meanwhile
                    log.warning("tenant %s: renewing the relearn lock failed: %s", tenant, err)
                    continue
                if not kept:
                    return

        task = asyncio.get_running_loop().create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _write(self, tenant: str, token: str, prior: Prior, enrolled: int) -> Prior | None:
        """Stores the prior, stamped with the time (when at least two users taught it), and the state,
        and announces the prior, in one script fenced by the lock's token. Returns the prior as stored;
        None, having written nothing, when the lock is no longer ours."""
        pairs: list[bytes | str] = []
        message = ""
        if prior.n_users >= 2:
            prior = dataclasses.replace(prior, learned_at=time.time())
            pairs = [x for kv in fmt.encode_prior(prior).items() for x in kv]
            message = fmt.prior_change(tenant, self.layout.key, prior.learned_at)
        state: dict[str, bytes | str | int] = {
            "learned_at": enrolled,
            "users": prior.n_users,
            "updated_at": repr(time.time()),
        }
        keys = [self.lock_key(tenant), self.store.keys.prior(tenant, self.layout), self.state_key(tenant)]
        args: list[bytes | str | int] = [token, self.store.keys.changes, message, len(pairs) // 2, *pairs]
        args += [x for kv in state.items() for x in kv]
        async with self.store.conn.guard():
            done = await self._store(keys=keys, args=args)
        if not done:
            return None
        if pairs:
            self.store.priors.drop(tenant)
        return prior

    async def _refit(self, tenant: str, users: list[str], prior: Prior) -> None:
        """Refits the users' stored weights under the new prior, one at a time, each fold and fit in a
        worker thread (the store's commit keeps a fit of as many ratings under a newer prior, and its
        publish drops the gateways' cached profiles)."""
        for user in users:
            try:
                await self.store.refit(tenant, user, layout=self.layout, prior=prior, off_loop=True)
            except StoreError as err:  # the user keeps the old fit until their next rating
                log.warning("tenant %s: refit of a user under the new prior failed: %s", tenant, err)

    async def drain(self) -> None:
        """Waits for the relearnings in flight (for shutdown and tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
