"""The service's view of the personalization core: head rows, profiles, the store interface, the math.

service.py talks only to this module, so the pure model (model/residual.py) and the Redis store
(store/redis_store.py) can change shape without touching the request pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from piaa_client.features import ATTRIBUTES, FEATURE_SPACE_VERSION, HEAD_OUTPUTS, NUM_CONTENT_CLUSTERS
from piaa_personalization.config import GatewayConfig
from piaa_personalization.errors import (
    DeletedMeanwhile,
    InvalidArgument,
    RequestIdReused,
    ServiceError,
    StoreDown,
)
from piaa_personalization.model import residual
from piaa_personalization.model.active import suggest as _suggest
from piaa_personalization.store import format as store_format
from piaa_personalization.store import redis_store
from piaa_personalization.store.backbone import BackboneStore
from piaa_personalization.store.connection import Script
from piaa_personalization.store.prior_learning import PriorLearner, RelearnPolicy

log = logging.getLogger(__name__)
_A = 1 + len(ATTRIBUTES)
_C = _A + NUM_CONTENT_CLUSTERS


@dataclass(frozen=True)
class Head:
    """The head outputs of one image, packed as the store keeps them: float32 [85] =
    generic, attributes, content, embedding."""

    packed: NDArray[np.float32]

    @property
    def generic(self) -> float:
        return float(self.packed[0])

    @property
    def attributes(self) -> NDArray[np.float32]:
        return self.packed[1:_A]

    @property
    def content(self) -> NDArray[np.float32]:
        return self.packed[_A:_C]


EMPTY_HEAD = Head(np.zeros(residual.PACKED_DIM, np.float32))
"""Placeholder for an image that failed (never returned to callers)."""


def head_row(outputs: dict[str, np.ndarray], i: int) -> Head:
    """Row `i` of Triton's outputs (name → [N, ...]) as a Head."""
    parts = [np.asarray(outputs[o.name][i], np.float32).reshape(-1) for o in HEAD_OUTPUTS]
    return Head(np.concatenate(parts))


def head_outputs(heads: Sequence[Head]) -> residual.HeadOutputs:
    """The model's batch type for `heads`."""
    return residual.HeadOutputs.from_packed(np.stack([h.packed for h in heads]))


def layout(with_embedding: bool, space: str = FEATURE_SPACE_VERSION) -> residual.FeatureLayout:
    """The feature layout the gateway personalizes in, in feature space `space`."""
    return residual.FeatureLayout(with_embedding, space)


Profile = redis_store.Profile
"""A stored profile (lean from get_profiles: weights; full from get_profile: statistics too)."""


def usable(profile: Profile, with_embedding: bool) -> bool:
    """Whether the profile's weights were fitted in the gateway's feature space and layout."""
    return bool(profile.is_current(layout(with_embedding)))


def check_tenant(tenant: str) -> str:
    """`tenant` when it is a valid tenant name for the store; raises InvalidArgument otherwise."""
    try:
        return str(store_format.validate_tenant(tenant))
    except ValueError as err:
        raise InvalidArgument(f"tenant: {err}") from err


def check_request_id(request_id: str) -> str:
    """`request_id` when the store can key a receipt by it; raises InvalidArgument otherwise."""
    try:
        return str(store_format.check_request_id(request_id))
    except ValueError as err:
        raise InvalidArgument(f"request_id: {err}") from err


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """The store's exceptions as the service's: unreachable → StoreDown, bad input → InvalidArgument."""
    try:
        yield
    except redis_store.StoreUnavailable as err:
        raise StoreDown(str(err)) from err
    except residual.InvalidRating as err:
        raise InvalidArgument(str(err)) from err
    except redis_store.StoreError as err:
        raise ServiceError(f"profile store: {err}") from err


class RefitDeclined(Exception):
    """A background refit left the profile as it is: the deployment's refit layout is another one."""


# The deployment's refit layout (`<p>:layout`, fields `layout` and `since`): the layout name of the most
# recently started gateway. A gateway claims it with its start time; a claim replaces another layout
# only when it is newer. Replies the layout in force. KEYS: <p>:layout. ARGV: layout name, started at.
_CLAIM_LAYOUT = """
local cur = redis.call('HMGET', KEYS[1], 'layout', 'since')
if cur[1] ~= ARGV[1] and (not cur[1] or tonumber(cur[2] or '0') < tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'layout', ARGV[1], 'since', ARGV[2])
  return ARGV[1]
end
return cur[1]
"""
_claim_layout = Script(_CLAIM_LAYOUT)


class StoreAdapter:
    """The service's profile store: RedisProfileStore in the gateway's layout, head rows in and out,
    each tenant's population prior cached in-process for `prior_ttl_s`. The feature space is the inner
    store's (`inner.keys.space`): its profiles, feature cache and layout. Raises StoreDown when Redis
    cannot be reached.

    `started_at` (Unix seconds, the gateway's start) orders this gateway's claim of the deployment's
    refit layout against other gateways' (claim_layout)."""

    def __init__(
        self,
        inner: redis_store.RedisProfileStore,
        with_embedding: bool,
        prior_ttl_s: float = 60.0,
        relearn: RelearnPolicy | None = None,
        started_at: float | None = None,
    ) -> None:
        self.inner = inner
        self.started_at = time.time() if started_at is None else started_at
        self.layout = layout(with_embedding, inner.keys.space)
        self.prior_ttl_s = prior_ttl_s
        self._relearn = relearn
        self.learner = PriorLearner(inner, self.layout, relearn) if relearn and relearn.min_users else None
        self.backbones = BackboneStore(inner.conn, inner.config.key_prefix)

    @property
    def space(self) -> str:
        """The feature space this adapter reads and writes."""
        return self.layout.fs_version

    def for_space(self, space: str, other_spaces: Sequence[str] = ()) -> StoreAdapter:
        """An adapter of feature space `space` on the same connection; a delete also removes the user's
        profiles in `other_spaces`."""
        inner = self.inner.in_space(space)
        inner.other_spaces = tuple(s for s in other_spaces if s != space)
        return StoreAdapter(
            inner, self.layout.with_embedding, self.prior_ttl_s, self._relearn, self.started_at
        )

    def usable(self, profile: Profile) -> bool:
        """Whether the profile's weights were fitted in this adapter's feature space and layout."""
        return bool(profile.is_current(self.layout))

    async def missing_backbones(self, digests: Sequence[str]) -> list[str]:
        """The digests without a stored backbone feature (one round trip)."""
        with _mapped():
            return await self.backbones.missing(digests)

    async def put_backbones(self, digests: Sequence[str], features: NDArray[np.floating]) -> None:
        """Keeps the backbone features of rated images (what a heads-only upgrade re-scores)."""
        with _mapped():
            await self.backbones.put(digests, features)

    @property
    def channel(self) -> str:
        """Pub/sub channel on which the store announces every profile change ("<tag> <version>")."""
        return str(self.inner.keys.changes)

    def tag(self, tenant: str, user: str) -> str:
        """The store's name of one user (the message payload's first word, the LRU key)."""
        return str(self.inner.keys.tag(tenant, user))

    def pubsub_client(self) -> Any:
        """What to subscribe with (its `pubsub()` is redis.asyncio's; in a cluster, a node at a time)."""
        return self.inner.conn.subscriber()

    async def get_features(self, digests: Sequence[str]) -> dict[str, Head]:
        """Cached head rows by digest (misses left out); one round trip."""
        if not digests:
            return {}
        with _mapped():
            rows = await self.inner.get_features(digests, self.space)
        return {
            d: Head(np.asarray(r, np.float32)) for d, r in zip(digests, rows, strict=True) if r is not None
        }

    async def put_features(self, heads: dict[str, Head]) -> None:
        """Caches head rows by digest; one round trip."""
        if not heads:
            return
        with _mapped():
            await self.inner.put_features(list(heads), head_outputs(list(heads.values())), self.space)

    async def get_profiles(self, tenant: str, users: Sequence[str]) -> list[Profile | None]:
        """Lean profiles of many users in one pipelined round trip (None = never rated)."""
        with _mapped():
            return await self.inner.get_profiles(tenant, users)

    async def read_batch(
        self, digests: Sequence[str], users: Sequence[tuple[str, str]]
    ) -> tuple[dict[str, Head], list[Profile | None]]:
        """What a scoring micro-batch needs in ONE round trip (one pipeline per node in a cluster): cached
        head rows by digest (misses left out) and the lean profiles of (tenant, user) pairs, in order."""
        if not digests and not users:
            return {}, []
        with _mapped():
            rows, profiles = await self.inner.read_batch(digests, users, self.space)
        heads = {
            d: Head(np.asarray(r, np.float32)) for d, r in zip(digests, rows, strict=True) if r is not None
        }
        return heads, profiles

    async def get_profile(self, tenant: str, user: str) -> Profile | None:
        """One user's full profile (statistics included)."""
        with _mapped():
            return await self.inner.get_profile(tenant, user)

    async def prior(self, tenant: str) -> residual.Prior:
        """The tenant's population prior in the gateway's layout (zero when none was learned)."""

        async def read() -> residual.Prior:
            with _mapped():
                prior = await self.inner.get_prior(tenant, self.layout)
            if prior is not None and prior.dim == self.layout.dim:
                return prior
            return residual.Prior.zero(self.layout.dim)

        # Cached for prior_ttl_s, and dropped at once when a gateway stores a new prior (its change
        # message; store/prior_cache.py).
        return await self.inner.priors.get(tenant, self.layout.key, self.prior_ttl_s, read)

    async def posterior(
        self, tenant: str, profile: Profile | None
    ) -> tuple[residual.Posterior, residual.Prior]:
        """The user's posterior (the prior's own when the profile is missing, stale or lean) and prior."""
        prior = await self.prior(tenant)
        if profile is None or profile.stats is None or not self.usable(profile):
            return residual.fit(residual.SufficientStats.empty(self.layout.dim), prior), prior
        return profile.posterior(prior), prior

    async def add_ratings(
        self,
        tenant: str,
        user: str,
        *,
        digests: Sequence[str],
        heads: Sequence[Head],
        values: Sequence[float],
        scales: Sequence[residual.RatingScale],
        request_id: str = "",
    ) -> Profile | None:
        """Appends the ratings (with their head outputs) and refits, atomically per user. With a
        request_id: None, recording nothing, when an earlier call with that id recorded these ratings;
        raises RequestIdReused when it recorded other ones."""
        now = time.time()
        records = [
            redis_store.RatingRecord(
                digest=d,
                value=float(v),
                scale=s,
                fs_version=self.space,
                outputs=h.packed,
                time=now,
            )
            for d, h, v, s in zip(digests, heads, values, scales, strict=True)
        ]
        prior = await self.prior(tenant)
        try:
            with _mapped():
                try:
                    profile, _ = await self.inner.add_ratings(
                        tenant, user, records, layout=self.layout, prior=prior, request_id=request_id or None
                    )
                except store_format.ProfileDeleted as err:
                    raise DeletedMeanwhile(f"{err}; send them again to record them in a new profile") from err
        except store_format.AlreadyRecorded as seen:
            _check_receipt(seen.receipt, request_id, digests, values, scales)
            return None
        if profile is not None:
            await self._note_enrolment(tenant, profile.num_ratings, len(records))
        return profile

    async def _note_enrolment(self, tenant: str, num_ratings: int, added: int) -> None:
        """Counts a user these ratings enrolled; when the tenant's prior is due, relearns it in the
        background (storing it drops every worker's cached copy: store/prior_cache.py).
        The ratings are recorded already: a failure here is logged, never returned to the caller."""
        if self.learner is None:
            return
        try:
            due = await self.learner.note_ratings(tenant, num_ratings, added)
        except redis_store.StoreError as err:
            log.warning("tenant %s: enrolment not counted: %s", tenant, err)
            return
        if due:
            self.learner.start(tenant)

    async def already_recorded(
        self,
        tenant: str,
        user: str,
        request_id: str,
        *,
        digests: Sequence[str],
        values: Sequence[float],
        scales: Sequence[residual.RatingScale],
    ) -> bool:
        """Whether an earlier call with `request_id` recorded these ratings (one read; add_ratings decides
        atomically). Raises RequestIdReused when it recorded other ones."""
        with _mapped():
            receipt = await self.inner.get_receipt(tenant, user, request_id)
        if receipt is None:
            return False
        _check_receipt(receipt, request_id, digests, values, scales)
        return True

    async def claim_layout(self) -> str:
        """The deployment's refit layout (a layout name, 'paper20' or 'paper20+emb64'), after claiming it
        for this gateway's layout when no gateway started later claimed another one (one round trip)."""
        key = f"{self.inner.keys.prefix}:layout"
        with _mapped():
            reply = await self.inner.conn.eval_durable(
                _claim_layout, [key], [self.layout.name, repr(self.started_at)], acks=0, timeout_ms=1
            )
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def refit(self, tenant: str, user: str, *, any_layout: bool = False) -> Profile | None:
        """Refits a stale profile in the gateway's layout from the stored ratings (None: no ratings).

        Unless `any_layout`, only when this gateway's layout is the deployment's refit layout
        (claim_layout): otherwise raises RefitDeclined, so that during a change of `with_embedding` the
        gateways still on the old layout never refit a profile away from the new one."""
        if not any_layout:
            wanted = await self.claim_layout()
            if wanted != self.layout.name:
                raise RefitDeclined(
                    f"the deployment refits to {wanted}, this gateway uses {self.layout.name}"
                )
        prior = await self.prior(tenant)
        with _mapped():
            result = await self.inner.refit(tenant, user, layout=self.layout, prior=prior)
        return None if result is None else result[0]

    async def delete_user(self, tenant: str, user: str) -> int:
        """Removes every key of the user; returns how many."""
        with _mapped():
            return await self.inner.delete_user(tenant, user)

    async def close(self) -> None:
        """Waits for a prior relearning in flight, then closes the connections."""
        if self.learner is not None:
            await self.learner.drain()
        await self.inner.close()


def _check_receipt(
    receipt: store_format.Receipt,
    request_id: str,
    digests: Sequence[str],
    values: Sequence[float],
    scales: Sequence[residual.RatingScale],
) -> None:
    """Raises RequestIdReused unless `receipt` is of the same ratings (a retry, not a reused id)."""
    if receipt.payload_hash != store_format.payload_hash(zip(digests, values, scales, strict=True)):
        raise RequestIdReused(
            f"request_id {request_id!r} was used for other ratings of this user within "
            f"{store_format.RECEIPT_TTL_S // 3600} h: use a fresh id for each call"
        )


async def connect_store(config: GatewayConfig) -> StoreAdapter:
    """The store at config.redis_url. Does not fail when Redis is down (reads then fall back)."""
    inner = redis_store.RedisProfileStore(
        redis_store.StoreConfig(
            url=config.redis_url,
            key_prefix=config.redis_key_prefix,
            feature_ttl_s=config.feature_cache_ttl_s,
            socket_timeout_s=config.redis_socket_timeout_s,
            connect_timeout_s=config.redis_connect_timeout_s,
            max_connections=config.redis_max_connections,
            pool_timeout_s=config.redis_pool_timeout_s,
            retries=config.redis_retries,
            mode=config.redis_mode,
            min_replica_acks=None if config.redis_min_replica_acks < 0 else config.redis_min_replica_acks,
            replica_ack_timeout_ms=config.redis_replica_ack_timeout_ms,
            history_url=config.history_url or None,
            history_max_backlog=config.history_max_backlog,
        )
    )
    relearn = RelearnPolicy(
        min_users=config.prior_relearn_min_users,
        growth=config.prior_relearn_growth,
        max_users=config.prior_relearn_max_users,
    )
    return StoreAdapter(inner, config.with_embedding, prior_ttl_s=config.prior_cache_ttl_s, relearn=relearn)


def rating_scale(value: float, scale: str) -> residual.RatingScale:
    """The model's scale for a piaa.v1.RatingScale name, after checking `value` on it.

    Raises InvalidArgument for an unknown or unspecified scale and a value outside it (or not finite).
    """
    try:
        member = residual.RatingScale[scale.removeprefix("RATING_SCALE_")]
        residual.rating_to_unit(value, member)
    except KeyError:
        raise InvalidArgument(f"unknown rating scale {scale!r}") from None
    except residual.InvalidRating as err:
        raise InvalidArgument(str(err)) from err
    return member


def personalize(
    heads: Sequence[Head], profiles: Sequence[Profile], with_embedding: bool
) -> NDArray[np.float32]:
    """Personalized scores of (image, user) pairs in one vectorized step: clip(generic + x·w, 0, 1)."""
    outputs = head_outputs(heads)
    features = residual.feature_matrix(outputs, with_embedding)
    weights = np.stack([np.asarray(p.weights, np.float64) for p in profiles])
    return residual.personalize(outputs.generic, features, weights)


def personalize_rows(heads: Sequence[Head], profile: Profile, with_embedding: bool) -> NDArray[np.float32]:
    """One user's scores of `heads`: what personalize() gives for the same pairs, with fewer numpy steps
    (the packed rows already hold the features after the generic score, which becomes the intercept's 1)."""
    dim = layout(with_embedding).dim
    if len(heads) == 1:  # the common one-image call: no stacking
        x = heads[0].packed[None, :dim].astype(np.float64)
    else:
        x = np.stack([h.packed[:dim] for h in heads]).astype(np.float64)
    scores = x[:, 0].copy()
    x[:, 0] = 1.0
    weights = np.empty_like(x)
    weights[:] = profile.weights  # contiguous rows, as personalize() has them: the same sums, bit for bit
    scores += np.einsum("nd,nd->n", x, weights)
    return np.minimum(np.maximum(scores, 0.0, out=scores), 1.0, out=scores).astype(np.float32)


def suggest(
    posterior: residual.Posterior, heads: Sequence[Head], k: int, with_embedding: bool
) -> tuple[list[int], list[float]]:
    """Indices of the k most informative candidates (kept diverse), and their predictive standard
    deviations under `posterior` (a new user's is the prior's)."""
    features = residual.feature_matrix(head_outputs(heads), with_embedding)
    picks, stds = _suggest(posterior, features, min(k, len(heads)))
    return [int(i) for i in picks], [float(s) for s in stds]


def explain(
    posterior: residual.Posterior, prior: residual.Prior, with_embedding: bool
) -> tuple[list[tuple[str, float]], list[tuple[str, float]], list[tuple[str, float]]]:
    """(likes, dislikes, every weight) of a user, by feature name, relative to the population."""
    names = layout(with_embedding).names
    likes, dislikes = residual.explain(posterior, prior, names)
    return likes, dislikes, [(n, float(w)) for n, w in zip(names, posterior.mean, strict=True)]
