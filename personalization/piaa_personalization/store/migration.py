"""Moving every profile into a new feature space without the images: the engine of `piaa-admin migrate`.

For each user with a profile in the source space, in batches (SCAN of every primary, a cursor per node kept
in Redis so an interrupted run resumes): read the ratings list, get each rated image's head outputs in the
target space (a rating made in it carries them; else the feature cache `<p>:feat:<target>:<digest>`; else
the stored backbone feature through the target heads, cached for the next user), refit the statistics
from every rating and write the target space's profile with a compare-and-set on the list's length (a
rating recorded meanwhile makes that user go round again). Idempotent: a user whose target profile
already covers their whole list is skipped, and a rebuild of the same ratings writes the same fit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from piaa_personalization.model.residual import (
    PRIOR_FIT,
    FeatureLayout,
    HeadOutputs,
    Prior,
    SufficientStats,
    fit,
)
from piaa_personalization.store import format as fmt
from piaa_personalization.store.backbone import BackboneStore
from piaa_personalization.store.connection import Script
from piaa_personalization.store.redis_store import RedisProfileStore

HeadsFn = Callable[[NDArray[np.float32]], Awaitable[NDArray[np.float32]]]
"""Backbone features [N, 1280] -> packed head outputs [N, 85] in the target space (its heads model)."""

# Writes a rebuilt profile unless the ratings list changed length since it was read (then nothing: the
# caller reads again) or is empty (the user was deleted: nothing is resurrected). `rebuilt` records which
# length a rebuild covered, so ratings that have no features in the target space are not retried forever.
# KEYS: target profile, ratings. ARGV: expected length, layout key, new epoch, channel, message prefix,
# field/value pairs.
_REBUILD = """
local len = redis.call('LLEN', KEYS[2])
if len == 0 or len ~= tonumber(ARGV[1]) then return {-1, len} end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3])
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'num_ratings', len, 'layout', ARGV[2], 'covers', len, 'rebuilt', len,
  unpack(fields))
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. v)
return {1, v}
"""


class Interrupted(Exception):
    """The run was asked to stop; the cursors are saved and a rerun resumes."""


@dataclass
class Counts:
    """What a run did (and, in a dry run, would do)."""

    users: int = 0
    """Users looked at."""
    migrated: int = 0
    """Target profiles written."""
    current: int = 0
    """Users whose target profile already covered every rating (skipped)."""
    ratings: int = 0
    """Ratings folded into written profiles."""
    without_features: int = 0
    """Ratings with neither a cached target feature nor a stored backbone feature (need the image)."""
    heads_computed: int = 0
    """Images run through the target heads from their stored backbone feature."""
    retried: int = 0
    """Users whose list grew while they were rebuilt (rebuilt again)."""
    digests_without_backbone: set[str] = field(default_factory=set)

    def add(self, other: Counts) -> None:
        for name in (
            "users",
            "migrated",
            "current",
            "ratings",
            "without_features",
            "heads_computed",
            "retried",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.digests_without_backbone |= other.digests_without_backbone


@dataclass(frozen=True)
class Plan:
    """One migration: from one feature space to another, at a bounded pace."""

    source: str
    target: str
    with_embedding: bool = False
    """The gateways' layout (personalize on the embedding too)."""
    batch: int = 200
    """Users per batch: each batch is a handful of pipelined round trips plus one script per user."""
    rate: float = 0.0
    """At most this many users per second (0: no limit), to bound the load on Redis."""


class Migration:
    """Runs a Plan against the store; `heads` computes head outputs in the target space."""

    def __init__(self, store: RedisProfileStore, plan: Plan, heads: HeadsFn) -> None:
        if plan.source == plan.target:
            raise ValueError("source and target feature spaces are the same")
        self.plan = plan
        self.src = store.in_space(plan.source)
        self.dst = store.in_space(plan.target)
        self.layout = FeatureLayout(plan.with_embedding, plan.target)
        self.heads = heads
        self.backbones = BackboneStore(store.conn, store.config.key_prefix)
        self.state_key = f"{store.config.key_prefix}:migration:{plan.source}:{plan.target}"
        self._rebuild = Script(_REBUILD)
        self._priors: dict[str, Prior] = {}
        self.stop_requested = False

    # -- state ----------------------------------------------------------------------------------------

    async def _state(self) -> dict[str, str]:
        async with self.src.conn.guard():
            raw = await self.src.client.hgetall(self.state_key)
        return {_s(k): _s(v) for k, v in raw.items()}

    async def _save(self, **fields: str | int | float) -> None:
        async with self.src.conn.guard():
            await self.src.client.hset(self.state_key, mapping={k: str(v) for k, v in fields.items()})

    async def reset(self) -> None:
        """Forgets saved cursors: the next pass starts from the beginning."""
        async with self.src.conn.guard():
            await self.src.client.delete(self.state_key)

    # -- scanning ---------------------------------------------------------------------------------------

    async def _owners(self, resume: bool, save: bool = False) -> Any:
        """Batches of (tenant, user) with a source profile, from every primary; `resume` starts from the
        saved cursors, `save` saves them after each batch (a pass does, a count does not)."""
        conn = self.src.conn
        state = await self._state() if resume else {}
        pattern = self.src.keys.all_profiles_pattern()
        for node in await conn.primaries():
            name = "standalone" if node is None else str(node.name)
            saved = state.get(f"cursor:{name}")
            if saved == "done":
                continue
            cursor = int(saved or 0)
            target: dict[str, Any] = {"target_nodes": node} if node is not None else {}
            while True:
                async with conn.guard():
                    reply = await conn.client.execute_command(
                        "SCAN", cursor, "MATCH", pattern, "COUNT", self.plan.batch, **target
                    )
                cursor, keys = reply
                if isinstance(cursor, dict):
                    (cursor,) = cursor.values()
                cursor = int(cursor)
                owners = [self.src.keys.owner_of(_s(k)) for k in keys]
                if owners:
                    yield owners
                if save:
                    await self._save(**{f"cursor:{name}": "done" if cursor == 0 else cursor})
                if self.stop_requested:
                    raise Interrupted(f"stopped at cursor {cursor} of {name}")
                if cursor == 0:
                    break

    async def count(self) -> tuple[int, int]:
        """(users, ratings) with a profile in the source space: what a migration moves (a dry run)."""
        users = ratings = 0
        async for owners in self._owners(resume=False):
            lengths = await self._lengths(owners)
            users += len(owners)
            ratings += sum(lengths)
        return users, ratings

    async def _lengths(self, owners: Sequence[tuple[str, str]]) -> list[int]:
        keys = [self.src.keys.ratings(t, u) for t, u in owners]

        def fill(pipe: Any) -> None:
            for key in keys:
                pipe.llen(key)

        return [int(n) for n in await self.src.conn.pipeline("migrate_llen", keys, fill)]

    # -- one pass ---------------------------------------------------------------------------------------

    async def run_pass(
        self, *, force: bool = False, resume: bool = True, on_batch: Callable[[Counts], None] | None = None
    ) -> Counts:
        """Migrates every user of the source space (force: even those already current). Saves a cursor
        after each batch; raises Interrupted when stop_requested is set (a rerun with resume continues).
        Returns the counts; on completion the saved cursors are cleared for the next pass."""
        total = Counts()
        started = time.monotonic()
        async for owners in self._owners(resume, save=True):
            counts = await self.migrate_users(owners, force=force)
            total.add(counts)
            if on_batch is not None:
                on_batch(counts)
            if self.plan.rate > 0:  # pace: never ahead of `rate` users per second
                ahead = total.users / self.plan.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await self.reset()
        return total

    async def migrate_users(self, owners: Sequence[tuple[str, str]], *, force: bool = False) -> Counts:
        """Rebuilds the target profiles of `owners` that do not cover their whole list (all with force)."""
        counts = Counts(users=len(owners))
        todo = list(owners)
        for attempt in range(3):
            lengths = await self._lengths(todo)
            marks = await self._marks(todo)
            work = [
                (o, n)
                for o, n, m in zip(todo, lengths, marks, strict=True)
                if n > 0 and ((force and attempt == 0) or not _covered(m, n, self.layout.key))
            ]
            if attempt == 0:
                counts.current += len(todo) - len(work)
            if not work:
                break
            changed = await self._rebuild_all(work, counts)
            if not changed:
                break
            counts.retried += len(changed)
            todo = changed
        return counts

    async def _marks(self, owners: Sequence[tuple[str, str]]) -> list[list[Any]]:
        keys = [self.dst.keys.profile(t, u) for t, u in owners]

        def fill(pipe: Any) -> None:
            for key in keys:
                pipe.hmget(key, "layout", "covers", "n", "rebuilt")

        return list(await self.dst.conn.pipeline("migrate_marks", keys, fill))

    async def _rebuild_all(
        self, work: list[tuple[tuple[str, str], int]], counts: Counts
    ) -> list[tuple[str, str]]:
        """Reads the lists, gets target features, writes each profile; returns the users whose list
        changed under the write."""
        keys = [self.src.keys.ratings(t, u) for (t, u), _ in work]

        def fill(pipe: Any) -> None:
            for key in keys:
                pipe.lrange(key, 0, -1)

        lists = await self.src.conn.pipeline("migrate_ratings", keys, fill)
        records = [[fmt.decode_rating(_b(r)) for r in raw] for raw in lists]
        features = await self._target_features(
            {r.digest for rs in records for r in rs if r.fs_version != self.plan.target}, counts
        )
        changed = []
        for ((tenant, user), _), rs in zip(work, records, strict=True):
            rows, targets = [], []
            for r in rs:
                packed = r.outputs if r.fs_version == self.plan.target else features.get(r.digest)
                if packed is None:
                    counts.without_features += 1
                    continue
                rows.append(packed)
                targets.append(r.unit - float(packed[0]))
            stats = SufficientStats.empty(self.layout.dim)
            if rows:
                x = self.layout.features(HeadOutputs.from_packed(np.stack(rows)))
                stats = stats.add(x, np.asarray(targets))
            post = fit(stats, await self._prior(tenant))
            fields = fmt.encode_fit(self.layout, stats, post, time.time(), len(rs))
            status, _ = await self.dst.conn.eval_durable(
                self._rebuild,
                [self.dst.keys.profile(tenant, user), self.dst.keys.ratings(tenant, user)],
                [len(rs), self.layout.key, uuid.uuid4().hex, self.dst.keys.changes,
                 self.dst.keys.tag(tenant, user), *fields],
                acks=self.dst.config.replica_acks,
                timeout_ms=self.dst.config.replica_ack_timeout_ms,
            )  # fmt: skip
            if int(status) == 1:
                counts.migrated += 1
                counts.ratings += len(rows)
            elif int(_) > 0:  # the list grew meanwhile (an empty one: the user was deleted)
                changed.append((tenant, user))
        return changed

    async def _target_features(self, digests: set[str], counts: Counts) -> dict[str, NDArray[np.float32]]:
        """Packed head outputs in the target space by digest: the feature cache, else the target heads on
        the stored backbone feature (then cached); digests with neither are left out."""
        if not digests:
            return {}
        names = sorted(digests)
        cached = await self.dst.get_features(names, self.plan.target)
        found = {d: f for d, f in zip(names, cached, strict=True) if f is not None}
        rest = [d for d in names if d not in found]
        if rest:
            stored = await self.backbones.get(rest)
            have = [(d, f) for d, f in zip(rest, stored, strict=True) if f is not None]
            counts.digests_without_backbone |= {d for d, f in zip(rest, stored, strict=True) if f is None}
            if have:
                packed = await self.heads(np.stack([f for _, f in have]).astype(np.float32))
                counts.heads_computed += len(have)
                outputs = HeadOutputs.from_packed(packed)
                await self.dst.put_features([d for d, _ in have], outputs, self.plan.target)
                found.update({d: row for (d, _), row in zip(have, packed, strict=True)})
        return found

    async def _prior(self, tenant: str) -> Prior:
        if tenant not in self._priors:
            prior = await self.dst.get_prior(tenant, self.layout)
            self._priors[tenant] = prior if prior is not None else Prior.zero(self.layout.dim)
        return self._priors[tenant]

    async def learn_priors(self, tenants: Sequence[str]) -> list[str]:
        """Learns each tenant's prior in the target layout from its migrated profiles when the tenant has
        one in the source layout; returns the tenants that got one (rerun a forced pass to apply it)."""
        learned = []
        source_layout = FeatureLayout(self.plan.with_embedding, self.plan.source)
        for tenant in tenants:
            if await self.src.get_prior(tenant, source_layout) is None:
                continue
            prior = await self.dst.learn_prior(tenant, self.layout, hyper=PRIOR_FIT)
            if prior.n_users:
                self._priors[tenant] = prior
                learned.append(tenant)
        return learned

    async def tenants(self) -> list[str]:
        """Every tenant with a profile in the source space."""
        seen: dict[str, None] = {}
        async for owners in self._owners(resume=False):
            seen.update((t, None) for t, _ in owners)
        return list(seen)


def _covered(mark: Sequence[Any], length: int, layout_key: str) -> bool:
    """Whether a target profile (HMGET layout covers n rebuilt) already covers a list of `length`."""
    layout, covers, n, rebuilt = (_s(v) if v is not None else None for v in mark)
    if layout != layout_key or covers is None or int(covers) != length:
        return False
    return (n is not None and int(n) == length) or (rebuilt is not None and int(rebuilt) == length)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
