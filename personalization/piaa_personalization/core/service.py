"""The personalization service: the gateway's logic without gRPC (the servicer only translates messages).

Every scoring call goes through one micro-batcher: a batch looks up cached features by digest (one
Redis round trip), runs the misses through Triton in one call, reads the profiles of all its users
(in-process LRU, then one pipelined round trip per tenant), and personalizes every (image, user) pair
in one vectorized numpy step.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from piaa_client.features import BACKBONE_FEATURE
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core import personalizer
from piaa_personalization.core.batcher import Job, MicroBatcher
from piaa_personalization.core.feature_writer import FeatureWriter
from piaa_personalization.core.memory import DigestMemo, Lru
from piaa_personalization.core.metrics import Metrics, Timings, stage
from piaa_personalization.core.profile_cache import ProfileCache
from piaa_personalization.core.spaces import ServedSpace, SpaceFollower, UnservableSpace
from piaa_personalization.core.triton_client import TritonClient
from piaa_personalization.core.types import (
    DISABLED,
    NO_PROFILE,
    STALE_PROFILE,
    STORE_UNAVAILABLE,
    Call,
    Failed,
    ImageAnalysis,
    ImageRef,
    ProfileView,
    RatingIn,
    RatingsReceipt,
    Scored,
    Suggestion,
    UserScore,
)
from piaa_personalization.errors import (
    ImageRejected,
    InvalidArgument,
    NotFound,
    ServiceError,
    StoreDown,
    TritonUnavailable,
)
from piaa_personalization.store import rollout

__all__ = [
    "Call",
    "Failed",
    "ImageRef",
    "PersonalizationService",
    "ProfileView",
    "RatingIn",
    "RatingsReceipt",
    "Scored",
    "Suggestion",
]

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


@dataclass
class _Work:
    """One image of one call waiting in the batcher, and the users to score it for."""

    tenant: str
    image: ImageRef
    users: tuple[str, ...]
    timings: Timings


@dataclass
class _Done:
    analysis: ImageAnalysis
    users: list[UserScore]


@dataclass(frozen=True)
class _Binding:
    """What one batch runs in, taken together at its start so a switch of feature space never mixes
    them: the space's ensemble, its store adapter (profiles, feature cache) and its head-output memory."""

    space: ServedSpace
    store: personalizer.StoreAdapter
    memory: Lru[personalizer.Head]


@dataclass
class _Prefetch:
    """What a micro-batch read from Redis in its one round trip (plus the worker's memories): head rows
    by digest, profiles by (tenant, user) (None = never rated), and what the store could not answer."""

    heads: dict[str, personalizer.Head]
    profiles: dict[tuple[str, str], personalizer.Profile | None]
    store_down: StoreDown | None = None


_MAX_PENDING_FEATURE_WRITES = 64
"""Feature-cache writes (one per micro-batch with Triton misses) queued behind the answers at most."""

_REFRESH_AHEAD = 0.2
"""Fraction of the profile LRU's TTL before expiry at which the hot path rereads a profile."""

_IMAGE_ERRORS: dict[str, type[ServiceError]] = {
    InvalidArgument.status: ImageRejected,
    NotFound.status: NotFound,
}
"""The error an image's Failed status becomes when the call is all-or-nothing."""


def digest_of(data: bytes) -> str:
    """Lower-case hex SHA-256 of `data` (the store's feature-cache key)."""
    return hashlib.sha256(data).hexdigest()


class PersonalizationService:
    """Scoring, ranking, ratings and profiles over Triton (features) and the store (profiles).

    Raises ServiceError subclasses only; a store outage degrades reads to generic scores and fails
    writes with StoreDown.
    """

    def __init__(
        self,
        config: GatewayConfig,
        triton: TritonClient,
        store: personalizer.StoreAdapter,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.triton = triton
        self.store = store
        self.metrics = metrics or Metrics()
        self.profiles: ProfileCache[personalizer.Profile] = ProfileCache(
            config.profile_cache_size, config.profile_cache_ttl_s
        )
        self.batcher: MicroBatcher[_Work, _Done] = MicroBatcher(
            self._process,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            max_concurrent=config.max_concurrent_batches,
            max_queued=config.max_queued_images,
            on_batch=self.metrics.batch_images.observe,
        )
        self._refits: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.feature_writer = FeatureWriter(
            _MAX_PENDING_FEATURE_WRITES, lambda result, n: self.metrics.feature_writes.labels(result).inc(n)
        )
        # Head outputs are a pure function of the image bytes (one model per process): never stale.
        self.features_memory: Lru[personalizer.Head] = Lru(config.feature_memory_size)
        self.digests = DigestMemo(config.feature_memory_size)
        self.binding = _Binding(ServedSpace(store.space, triton.model, "heads"), store, self.features_memory)
        self.follower = SpaceFollower(triton, triton.model, self._read_active, self.use_space)
        self.backbone_model = f"{triton.model}_backbone"
        """The ensemble returning the backbone feature (piaa_triton.repository.BACKBONE_ENSEMBLE)."""
        self._spaces: tuple[str, ...] = ()
        self._refresh_due: set[tuple[str, str]] = set()
        self._refresher: asyncio.Task[None] | None = None

    @property
    def space(self) -> ServedSpace:
        """The feature space new batches are computed in."""
        return self.binding.space

    @classmethod
    async def create(cls, config: GatewayConfig) -> PersonalizationService:
        """Connects to config.triton_url and config.redis_url, picks the feature space to serve (the
        rollout state in Redis, else the Triton model's own) and starts the invalidation listener and the
        rollout poll. Raises UnservableSpace when Triton serves a space this gateway cannot use; starts
        on its default space when Triton or Redis cannot be asked yet (the poll resolves it later)."""
        store = await personalizer.connect_store(config)
        service = cls(
            config, TritonClient(config.triton_url, config.triton_model, config.triton_max_inflight), store
        )
        try:
            await service.follower.refresh()
        except UnservableSpace:
            await service.close()
            raise
        except ServiceError as err:
            log.warning("feature space not checked yet (%s): %s", type(err).__name__, err)
        store.inner.conn.on_round_trip = service.metrics.round_trip
        service.profiles.start_listening(store.pubsub_client(), store.channel)
        service.follower.start(config.health_check_interval_s)
        return service

    async def _read_active(self) -> str | None:
        """The space the rollout state names (None: never switched); notes every space with profiles."""
        try:
            state = await rollout.read(self.binding.store.inner)
        except personalizer.redis_store.StoreError as err:
            raise StoreDown(f"rollout state: {err}") from err
        self._spaces = state.spaces
        inner = self.binding.store.inner
        inner.other_spaces = tuple(s for s in state.spaces if s != inner.keys.space)
        return state.active

    def use_space(self, space: ServedSpace) -> None:
        """Computes new batches in `space` (its ensemble, its profiles, its feature cache). Batches in
        flight finish in the space they started in; this worker's memories of the old space are dropped."""
        store = self.binding.store
        if space.feature_space != store.space:
            store = store.for_space(space.feature_space, self._spaces)
            self.features_memory = Lru(self.config.feature_memory_size)
            self.profiles.clear()
        self.binding = _Binding(space, store, self.features_memory)
        self.store = store

    async def close(self) -> None:
        """Finishes queued work and refits, then closes the connections."""
        await self.follower.stop()
        await self.batcher.close()
        await self.feature_writer.close()
        if self._refits:
            await asyncio.gather(*self._refits.values(), return_exceptions=True)
        if self._refresher is not None:
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.profiles.stop_listening()
        await self.triton.close()
        await self.store.close()

    # ---- validation -------------------------------------------------------------------------------

    def _check_user(self, user_id: str) -> None:
        size = len(user_id.encode("utf-8"))
        if size == 0:
            raise InvalidArgument("user_id is empty")
        if size > self.config.max_user_id_bytes:
            raise InvalidArgument(f"user_id is {size} bytes; at most {self.config.max_user_id_bytes}")

    def _check_images(self, images: Sequence[ImageRef], what: str = "images") -> list[ImageRef]:
        out = []
        for checked in self._check_images_partial(images, what):
            if isinstance(checked, Failed):
                raise InvalidArgument(checked.message)
            out.append(checked)
        return out

    def _check_images_partial(self, images: Sequence[ImageRef], what: str) -> list[ImageRef | Failed]:
        """Each image with its digest, or Failed in its place when it is malformed; raises InvalidArgument
        for a count out of bounds."""
        if not images:
            raise InvalidArgument(f"no {what} given")
        if len(images) > self.config.max_images_per_request:
            raise InvalidArgument(
                f"{len(images)} {what}; at most {self.config.max_images_per_request} per request"
            )
        out: list[ImageRef | Failed] = []
        for i, image in enumerate(images):
            if image.data:
                out.append(ImageRef(image.id, image.data, self.digests.sha256_hex(image.data)))
            elif image.digest:
                digest = image.digest.lower()
                if len(digest) != 64 or not set(digest) <= _HEX:
                    message = f"{what}[{i}]: digest is not a hex SHA-256"
                    out.append(Failed(image.id, "", InvalidArgument.status, message))
                else:
                    out.append(ImageRef(image.id, None, digest))
            else:
                message = f"{what}[{i}] has neither data nor digest"
                out.append(Failed(image.id, "", InvalidArgument.status, message))
        return out

    # ---- the batch pipeline -----------------------------------------------------------------------

    async def _run(self, call: Call, images: list[ImageRef], users: tuple[str, ...]) -> list[_Done]:
        """Sends images through the batcher; raises the first image's error (naming which image)."""
        done = []
        for result in await self._run_partial(call, images, users):
            if isinstance(result, Failed):
                raise _IMAGE_ERRORS[result.status](result.message)
            done.append(result)
        return done

    async def _run_partial(
        self, call: Call, images: list[ImageRef], users: tuple[str, ...]
    ) -> list[_Done | Failed]:
        """Sends images through the batcher; an image's own error (ImageRejected, NotFound) comes back as
        Failed in its place, any other error is raised. Every result is in one feature space: when a
        switch fell between the call's batches, the call runs again (in the new space)."""
        done = await self._run_partial_once(call, images, users)
        if len({d.analysis.feature_space for d in done if isinstance(d, _Done)}) > 1:
            done = await self._run_partial_once(call, images, users)
        return done

    async def _run_partial_once(
        self, call: Call, images: list[ImageRef], users: tuple[str, ...]
    ) -> list[_Done | Failed]:
        if not images:
            return []

        call.remaining()
        from_memory = self._from_memory(call, images, users)
        if from_memory is not None:
            return list(from_memory)
        works = [_Work(call.tenant, image, users, Timings()) for image in images]
        results = await self.batcher.submit_many(works, call.deadline)
        # Several images of one call ran in parallel batches: charge the call the slowest of each stage.
        for stage_name in ("queue", "triton", "redis", "personalize"):
            slowest = max((w.timings.ms.get(stage_name, 0.0) for w in works), default=0.0)
            if slowest:
                call.timings.ms[stage_name] = call.timings.ms.get(stage_name, 0.0) + slowest
        done: list[_Done | Failed] = []
        for i, result in enumerate(results):
            if isinstance(result, ImageRejected | NotFound):
                message = f"image {images[i].id or f'#{i}'}: {result}" if len(results) > 1 else str(result)
                done.append(Failed(images[i].id, images[i].digest or "", result.status, message))
            elif isinstance(result, BaseException):
                raise result
            else:
                done.append(result)
        return done

    async def _process(self, jobs: list[Job[_Work]]) -> list[object]:
        works = [j.item for j in jobs]
        all_timings = [w.timings for w in works]
        for job in jobs:
            job.item.timings.add("queue", job.queued_s)
        deadline = max((j.deadline for j in jobs if j.deadline is not None), default=None)
        binding = self.binding
        prefetch = await self._read_batch(works, all_timings, binding)
        heads, errors = await self._features(works, all_timings, deadline, binding, prefetch)
        scores = await self._personalize(works, heads, all_timings, binding, prefetch)
        out: list[object] = []
        space = binding.space.feature_space
        for i, w in enumerate(works):
            if i in errors:
                out.append(errors[i])
                continue
            assert w.image.digest is not None
            out.append(_Done(ImageAnalysis(w.image.id, w.image.digest, heads[i], space), scores[i]))
        return out

    async def _read_batch(self, works: list[_Work], timings: list[Timings], binding: _Binding) -> _Prefetch:
        """The batch's head rows and profiles: the worker's memories first (head rows, profile LRU), then
        everything else in ONE Redis round trip (one pipeline per node, in parallel, in a cluster)."""
        digests = sorted({w.image.digest for w in works if w.image.digest})
        heads: dict[str, personalizer.Head] = {}
        space = binding.store.space
        for digest in digests:
            head = binding.memory.get(digest) or self.feature_writer.get(space, digest)
            if head is not None:
                heads[digest] = head
        unknown = [d for d in digests if d not in heads]
        profiles: dict[tuple[str, str], personalizer.Profile | None] = {}
        missing: list[tuple[str, str]] = []
        for pair in sorted({(w.tenant, u) for w in works for u in w.users}):
            cached = self.profiles.get(binding.store.tag(*pair))
            if cached is ProfileCache.MISS:
                missing.append(pair)
            else:
                profiles[pair] = cached
        self.metrics.profile_cache.labels("hit").inc(len(profiles))
        self.metrics.profile_cache.labels("miss").inc(len(missing))
        if not unknown and not missing:
            return _Prefetch(heads, profiles)
        with stage(self.metrics, "redis", timings):
            try:
                stored, read = await binding.store.read_batch(unknown, missing)
            except StoreDown as err:
                return _Prefetch(heads, profiles, err)
        for digest, head in stored.items():
            binding.memory.put(digest, head)
        heads.update(stored)
        for pair, profile in zip(missing, read, strict=True):
            profiles[pair] = profile
            if binding.store is self.store:  # after a switch the cache holds the new space only
                self.profiles.put(binding.store.tag(*pair), profile)
        return _Prefetch(heads, profiles)

    async def _features(
        self,
        works: list[_Work],
        timings: list[Timings],
        deadline: float | None,
        binding: _Binding,
        prefetch: _Prefetch,
    ) -> tuple[list[personalizer.Head], dict[int, Exception]]:
        """Head outputs per work item in the binding's space: what the batch read found, then one Triton
        call for the misses, whose outputs are written to the feature cache behind the answer."""
        digests = sorted({w.image.digest for w in works if w.image.digest})
        found = dict(prefetch.heads)
        memory = binding.memory
        store_down = prefetch.store_down
        hits = sum(1 for d in digests if d in found)
        self.metrics.feature_cache.labels("hit").inc(hits)
        self.metrics.feature_cache.labels("miss").inc(len(digests) - hits)
        to_run: dict[str, bytes] = {}
        for w in works:
            if w.image.digest not in found and w.image.data is not None:
                to_run.setdefault(w.image.digest or "", w.image.data)
        failed: dict[str, Exception] = {}
        if to_run:
            names = list(to_run)
            self.metrics.triton_batch_images.observe(len(names))
            self.metrics.triton_images.inc(len(names))
            with stage(self.metrics, "triton", timings):
                result = await self.triton.infer(
                    [to_run[n] for n in names], deadline, model=binding.space.ensemble
                )
            fresh = {}
            for i, name in enumerate(names):
                if i in result.errors:
                    failed[name] = result.errors[i]
                else:
                    fresh[name] = personalizer.head_row(result.outputs, i)
            found.update(fresh)
            for digest, head in fresh.items():
                memory.put(digest, head)
            if store_down is None:
                self.feature_writer.submit(binding.store.space, binding.store.put_features, fresh)
        heads: list[personalizer.Head] = []
        errors: dict[int, Exception] = {}
        for i, w in enumerate(works):
            digest = w.image.digest or ""
            if digest in found:
                heads.append(found[digest])
                continue
            heads.append(personalizer.EMPTY_HEAD)
            if digest in failed:
                errors[i] = failed[digest]
            elif store_down is not None:
                errors[i] = StoreDown(f"digest {digest[:12]}…: the feature cache is unreachable")
            else:
                errors[i] = NotFound(f"digest {digest[:12]}… is not cached (any more): send the image bytes")
        return heads, errors

    def _from_memory(
        self, call: Call, images: Sequence[ImageRef], users: tuple[str, ...]
    ) -> list[_Done] | None:
        """The call's results when every image's head outputs and every user's profile are in this
        worker's memory: computed at once, with no Redis round trip, batcher or await. None when anything
        is missing, or a profile is stale (the batch path schedules its refit)."""
        heads: list[personalizer.Head] = []
        for image in images:
            head = self.features_memory.get(image.digest) if image.digest else None
            if head is None:
                return None
            heads.append(head)
        profiles: list[personalizer.Profile | None] = []
        for user in users:
            tag = self.store.tag(call.tenant, user)
            profile = self.profiles.get(tag)
            if profile is ProfileCache.MISS:
                return None
            if self.profiles.expires_within(tag, _REFRESH_AHEAD * self.profiles.ttl_s):
                self._refresh_ahead(call.tenant, user)
            if profile is not None and profile.num_ratings == 0:
                profile = None
            if profile is not None and not self.store.usable(profile):
                return None
            profiles.append(profile)
        self.metrics.memory_images.inc(len(images))
        self.metrics.feature_cache.labels("hit").inc(len({i.digest for i in images}))
        if users:
            self.metrics.profile_cache.labels("hit").inc(len(users))
        with stage(self.metrics, "personalize", [call.timings]):
            scores: list[list[UserScore]] = [[] for _ in images]
            for user, profile in zip(users, profiles, strict=True):
                if profile is None:
                    self.metrics.fallbacks.labels(NO_PROFILE).inc(len(images))
                    for i, head in enumerate(heads):
                        scores[i].append(UserScore(user, head.generic, False, NO_PROFILE))
                    continue
                values = personalizer.personalize_rows(heads, profile, self.config.with_embedding)
                for i, value in enumerate(values.tolist()):
                    scores[i].append(UserScore(user, value, True, None))
        space = self.space.feature_space
        return [
            _Done(ImageAnalysis(image.id, image.digest or "", head, space), user_scores)
            for image, head, user_scores in zip(images, heads, scores, strict=True)
        ]

    async def _personalize(
        self,
        works: list[_Work],
        heads: list[personalizer.Head],
        timings: list[Timings],
        binding: _Binding,
        prefetch: _Prefetch,
    ) -> list[list[UserScore]]:
        if not any(w.users for w in works):
            return [[] for _ in works]
        profiles = prefetch.profiles
        with stage(self.metrics, "personalize", timings):
            rows: list[tuple[int, int]] = []  # (work index, user index) of personalized pairs
            usable: list[personalizer.Profile] = []
            out: list[list[UserScore]] = []
            for i, w in enumerate(works):
                scores = []
                for k, user in enumerate(w.users):
                    generic = heads[i].generic
                    key = (w.tenant, user)
                    profile = profiles.get(key)
                    reason: str | None = None
                    if key not in profiles:  # the batch read could not reach the store
                        reason = STORE_UNAVAILABLE
                    elif profile is None or profile.num_ratings == 0:
                        reason = NO_PROFILE
                    elif not binding.store.usable(profile):
                        reason = STALE_PROFILE
                        if binding.store is self.store:
                            self._schedule_refit(w.tenant, user)
                    else:
                        rows.append((i, k))
                        usable.append(profile)
                    if reason is not None:
                        self.metrics.fallbacks.labels(reason).inc()
                    scores.append(UserScore(user, generic, False, reason))
                out.append(scores)
            if rows:
                personal = personalizer.personalize(
                    [heads[i] for i, _ in rows], usable, self.config.with_embedding
                )
                for (i, k), value in zip(rows, personal, strict=True):
                    out[i][k] = UserScore(out[i][k].user_id, float(value), True, None)
        return out

    def _refresh_ahead(self, tenant: str, user: str) -> None:
        """Rereads the profile in the background before its LRU entry expires, so the user's next calls
        stay on the hot path; the reads of every user due meanwhile share one pipelined round trip."""
        self._refresh_due.add((tenant, user))
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_profiles())

    async def _refresh_profiles(self) -> None:
        while self._refresh_due:
            due, self._refresh_due = self._refresh_due, set()
            store = self.store
            by_tenant: dict[str, list[str]] = {}
            for tenant, user in due:
                by_tenant.setdefault(tenant, []).append(user)
            for tenant, users in by_tenant.items():
                try:
                    read = await store.get_profiles(tenant, users)
                except ServiceError as err:  # the entries expire; the batch path then reports the outage
                    log.debug("profile refresh of %d users failed: %s", len(users), err)
                    continue
                if store is not self.store:  # another feature space meanwhile: these are not its profiles
                    return
                for user, profile in zip(users, read, strict=True):
                    self.profiles.put(store.tag(tenant, user), profile)

    # ---- refits of stale profiles -------------------------------------------------------------------

    def _schedule_refit(self, tenant: str, user: str) -> None:
        key = (tenant, user)
        if key in self._refits:
            return
        task = asyncio.get_running_loop().create_task(self._refit(tenant, user))
        self._refits[key] = task
        task.add_done_callback(lambda _: self._refits.pop(key, None))

    async def _refit(self, tenant: str, user: str) -> None:
        try:
            await self.store.refit(tenant, user)
            self.metrics.refits.inc()
        except Exception as err:  # a refit is retried at the next stale read
            log.warning("refit of %s/%s failed: %s", tenant, user, err)
        finally:
            self._invalidate(tenant, user)

    def _invalidate(self, tenant: str, user: str) -> None:
        # The store announces every change to all workers; this one need not wait for the message.
        self.profiles.invalidate(self.store.tag(tenant, user))

    # ---- the RPCs -----------------------------------------------------------------------------------

    async def score(
        self,
        call: Call,
        user_id: str,
        images: Sequence[ImageRef],
        generic_only: bool = False,
        allow_partial: bool = False,
    ) -> list[Scored | Failed]:
        """Scores `images` for one user (generic_only: for no one); one result per image, in order.
        With allow_partial an image that cannot be scored is a Failed in its place; without, only Scored.

        Raises InvalidArgument (user id, image count; a bad image unless allow_partial), NotFound
        (unknown digest, unless allow_partial), TritonUnavailable, DeadlineExceeded.
        """
        if not generic_only:
            self._check_user(user_id)
        users = () if generic_only else (user_id,)
        if allow_partial:
            checked = self._check_images_partial(images, "images")
            refs = [c for c in checked if isinstance(c, ImageRef)]
            ran = iter(await self._run_partial(call, refs, users))
            results = [c if isinstance(c, Failed) else next(ran) for c in checked]
        else:
            results = list(await self._run(call, self._check_images(images), users))
        out: list[Scored | Failed] = []
        for d in results:
            if isinstance(d, Failed):
                out.append(d)
            elif generic_only:
                self.metrics.fallbacks.labels(DISABLED).inc()
                out.append(Scored(d.analysis, d.analysis.head.generic, False, DISABLED))
            else:
                u = d.users[0]
                out.append(Scored(d.analysis, u.score, u.personalized, u.reason))
        return out

    async def score_for_users(
        self, call: Call, image: ImageRef, user_ids: Sequence[str]
    ) -> tuple[Scored, list[UserScore]]:
        """Scores one image for many users: one feature extraction, all profiles in one round trip."""
        if not user_ids:
            raise InvalidArgument("no user_ids given")
        if len(user_ids) > self.config.max_users_per_request:
            raise InvalidArgument(f"{len(user_ids)} users; at most {self.config.max_users_per_request}")
        for user in user_ids:
            self._check_user(user)
        (ref,) = self._check_images([image], "image")
        (done,) = await self._run(call, [ref], tuple(user_ids))
        return Scored(done.analysis, done.analysis.head.generic, False, None), done.users

    async def rank_album(
        self, call: Call, user_id: str, images: Sequence[ImageRef], top_k: int, allow_partial: bool = False
    ) -> list[Scored | Failed]:
        """The album ordered by the user's score, best first (ties keep request order); top_k=0: all.
        With allow_partial, the images that could not be scored follow the (top_k) ranked ones as Failed,
        in request order. Raises as score()."""
        results = await self.score(call, user_id, images, allow_partial=allow_partial)
        scored = sorted((r for r in results if isinstance(r, Scored)), key=lambda s: -s.score)  # stable
        failed = [r for r in results if isinstance(r, Failed)]
        return [*(scored[:top_k] if top_k else scored), *failed]

    async def add_ratings(
        self, call: Call, user_id: str, ratings: Sequence[RatingIn], request_id: str = ""
    ) -> RatingsReceipt:
        """Validates the ratings, gets their features (cache or Triton) and applies them atomically.

        With a request_id, a repeat of a call (same tenant, user and id within the store's receipt TTL)
        that recorded these ratings records nothing and answers replayed=True, after a refit in case the
        first call stopped between its append and its fit. Raises InvalidArgument (a value outside its
        scale, NaN, no scale, a malformed request_id), RequestIdReused (the id recorded other ratings),
        NotFound, StoreDown.
        """
        self._check_user(user_id)
        if request_id:
            personalizer.check_request_id(request_id)
        refs = self._check_images([r.image for r in ratings], "ratings")
        scales = []
        for i, r in enumerate(ratings):
            try:
                scales.append(personalizer.rating_scale(r.value, r.scale))
            except InvalidArgument as err:
                raise InvalidArgument(f"ratings[{i}]: {err}") from err
        digests = [r.digest or "" for r in refs]
        values = [r.value for r in ratings]
        if request_id:
            # A retry is answered from its receipt without running the images through Triton again.
            with stage(self.metrics, "redis", [call.timings]):
                seen = await self.store.already_recorded(
                    call.tenant, user_id, request_id, digests=digests, values=values, scales=scales
                )
            if seen:
                return await self._replay(call, user_id, digests)
        binding = self.binding
        await self._keep_backbones(call, refs, binding)
        done = await self._run(call, refs, ())
        if any(d.analysis.feature_space != binding.space.feature_space for d in done):
            binding = self.binding  # the gateways switched feature space meanwhile: record in the new one
            done = await self._run(call, refs, ())
            if any(d.analysis.feature_space != binding.space.feature_space for d in done):
                raise TritonUnavailable("the feature space is being switched; retry")
        call.remaining()
        with stage(self.metrics, "redis", [call.timings]):
            recorded = await binding.store.add_ratings(
                call.tenant,
                user_id,
                digests=digests,
                heads=[d.analysis.head for d in done],
                values=values,
                scales=scales,
                request_id=request_id,
            )
            if recorded is None:  # a concurrent repeat of this request_id recorded them first
                return await self._replay(call, user_id, digests)
            self._invalidate(call.tenant, user_id)
            view = await self._profile_view(call.tenant, user_id)
        return RatingsReceipt(view, digests)

    async def _keep_backbones(self, call: Call, refs: Sequence[ImageRef], binding: _Binding) -> None:
        """Stores the backbone feature of each rated image that has none yet (what a heads-only upgrade
        re-scores without the image): images with bytes run through the backbone ensemble, then the
        space's heads on that feature, whose outputs go to the feature cache so the rating skips the
        ensemble. A rating by digest of an image never stored this way stays without one; a Triton
        without the backbone ensemble leaves them all without (both logged; docs/operations.md)."""
        digests = [r.digest or "" for r in refs]
        with stage(self.metrics, "redis", [call.timings]):
            missing = set(await binding.store.missing_backbones(digests))
        to_run = {r.digest: r.data for r in refs if r.digest in missing and r.data is not None}
        if len(to_run) < len(missing):
            log.info("%d rated image(s) by digest have no backbone feature", len(missing) - len(to_run))
        if not to_run:
            return
        names = list(to_run)
        with stage(self.metrics, "triton", [call.timings]):
            try:
                result = await self.triton.infer(
                    [to_run[n] for n in names], call.deadline, model=self.backbone_model,
                    outputs=(BACKBONE_FEATURE,),
                )  # fmt: skip
            except TritonUnavailable as err:  # the ratings still count; only a later upgrade misses them
                log.warning("backbone features of rated images not kept: %s", err)
                return
            good = [i for i in range(len(names)) if i not in result.errors]  # bad images fail in _run
            if not good:
                return
            features = result.outputs[BACKBONE_FEATURE.name][good]
            heads = await self.triton.heads(binding.space.heads, features)
        with stage(self.metrics, "redis", [call.timings]):
            await binding.store.put_backbones([names[i] for i in good], features)
            rows = {names[i]: personalizer.head_row(heads, k) for k, i in enumerate(good)}
            await binding.store.put_features(rows)

    async def _replay(self, call: Call, user_id: str, digests: list[str]) -> RatingsReceipt:
        with stage(self.metrics, "redis", [call.timings]):
            await self.store.refit(call.tenant, user_id)
            self._invalidate(call.tenant, user_id)
            view = await self._profile_view(call.tenant, user_id)
        return RatingsReceipt(view, digests, replayed=True)

    async def suggest(
        self, call: Call, user_id: str, candidates: Sequence[ImageRef], k: int
    ) -> list[Suggestion]:
        """The k candidates whose ratings would teach the user's model most (kept diverse), most useful
        first; k=0 orders them all."""
        self._check_user(user_id)
        refs = self._check_images(candidates, "candidates")
        done = await self._run(call, refs, ())
        with stage(self.metrics, "redis", [call.timings]):
            profile = await self.store.get_profile(call.tenant, user_id)
            posterior, _ = await self.store.posterior(call.tenant, profile)
        with stage(self.metrics, "personalize", [call.timings]):
            picks, stds = personalizer.suggest(
                posterior, [d.analysis.head for d in done], k or len(done), self.config.with_embedding
            )
        return [
            Suggestion(done[i].analysis.id, done[i].analysis.digest, s)
            for i, s in zip(picks, stds, strict=True)
        ]

    async def get_profile(self, call: Call, user_id: str) -> ProfileView:
        """The user's profile and taste in words (exists=False when there is none)."""
        self._check_user(user_id)
        with stage(self.metrics, "redis", [call.timings]):
            return await self._profile_view(call.tenant, user_id)

    async def delete_profile(self, call: Call, user_id: str) -> int:
        """Removes every key of the user; returns how many there were."""
        self._check_user(user_id)
        with stage(self.metrics, "redis", [call.timings]):
            removed = await self.store.delete_user(call.tenant, user_id)
        self._invalidate(call.tenant, user_id)
        return removed

    async def _profile_view(self, tenant: str, user_id: str) -> ProfileView:
        profile = await self.store.get_profile(tenant, user_id)
        if profile is None:
            return ProfileView(user_id, exists=False, feature_space_version=self.store.space)
        view = ProfileView(
            user_id=user_id,
            exists=True,
            num_ratings=profile.num_ratings,
            feature_space_version=profile.feature_space_version,
            updated_at=profile.updated_at,
        )
        if self.store.usable(profile):
            posterior, prior = await self.store.posterior(tenant, profile)
            view.likes, view.dislikes, view.weights = personalizer.explain(
                posterior, prior, self.config.with_embedding
            )
        else:
            self._schedule_refit(tenant, user_id)
        return view
