"""The scoring pipeline: the micro-batcher, the worker's hot path, and refits of stale profiles."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass

from piaa_personalization.config import GatewayConfig
from piaa_personalization.core import personalizer
from piaa_personalization.core.batcher import Job, MicroBatcher
from piaa_personalization.core.feature_writer import FeatureWriter
from piaa_personalization.core.memory import Lru
from piaa_personalization.core.metrics import Metrics, Timings, stage
from piaa_personalization.core.profile_cache import ProfileCache
from piaa_personalization.core.refits import RefitQueue
from piaa_personalization.core.spaces import ServedSpace
from piaa_personalization.core.triton_client import TritonClient
from piaa_personalization.core.types import (
    NO_PROFILE,
    STALE_PROFILE,
    STORE_UNAVAILABLE,
    Call,
    Failed,
    ImageAnalysis,
    ImageRef,
    UserScore,
)
from piaa_personalization.errors import ImageRejected, InvalidArgument, NotFound, ServiceError, StoreDown

log = logging.getLogger(__name__)


@dataclass
class Work:
    """One image of one call waiting in the batcher, and the users to score it for."""

    tenant: str
    image: ImageRef
    users: tuple[str, ...]
    timings: Timings


@dataclass
class Done:
    """One image scored: its head outputs, and its score for each user of the call (in order)."""

    analysis: ImageAnalysis
    users: list[UserScore]


@dataclass(frozen=True)
class Binding:
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


class Scorer:
    """Scores images for users: every call goes through one micro-batcher, unless the worker's memories
    answer it at once (the hot path).

    A batch looks up cached head outputs by digest and the profiles of all its users (this worker's
    memories, then one Redis round trip), runs the misses through Triton in one call, and personalizes
    every (image, user) pair in one vectorized numpy step. A stale profile scores generic and is refit in
    the background (core/refits.py: deduplicated, bounded). Owns the batcher, the profile LRU, the
    head-output memory, the feature writer, the refit queue and the current Binding.
    """

    def __init__(
        self, config: GatewayConfig, triton: TritonClient, store: personalizer.StoreAdapter, metrics: Metrics
    ) -> None:
        self.config = config
        self.triton = triton
        self.metrics = metrics
        self.profiles: ProfileCache[personalizer.Profile] = ProfileCache(
            config.profile_cache_size, config.profile_cache_ttl_s
        )
        self.batcher: MicroBatcher[Work, Done] = MicroBatcher(
            self._process,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            max_concurrent=config.max_concurrent_batches,
            max_queued=config.max_queued_images,
            on_batch=self.metrics.batch_images.observe,
        )
        self.refits = RefitQueue(
            config.refit_concurrency, config.refit_queue_size, metrics.refits_dropped.inc
        )
        self.feature_writer = FeatureWriter(
            _MAX_PENDING_FEATURE_WRITES, lambda result, n: self.metrics.feature_writes.labels(result).inc(n)
        )
        # Head outputs are a pure function of the image bytes (one model per process): never stale.
        self.features_memory: Lru[personalizer.Head] = Lru(config.feature_memory_size)
        self.binding = Binding(ServedSpace(store.space, triton.model, "heads"), store, self.features_memory)
        self._refresh_due: set[tuple[str, str]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._declined_until = 0.0
        """Until when (monotonic) stale reads skip their refit: the deployment refits to another layout."""

    @property
    def store(self) -> personalizer.StoreAdapter:
        """The store of the current binding (the feature space new batches are computed in)."""
        return self.binding.store

    def use_space(self, space: ServedSpace, spaces: Sequence[str]) -> None:
        """Computes new batches in `space`; `spaces` are all spaces with profiles (a new space's store
        adapter needs them). Batches in flight finish in the space they started in; this worker's
        memories of the old space are dropped."""
        store = self.binding.store
        if space.feature_space != store.space:
            store = store.for_space(space.feature_space, spaces)
            self.features_memory = Lru(self.config.feature_memory_size)
            self.profiles.clear()
        self.binding = Binding(space, store, self.features_memory)

    async def close(self) -> None:
        """Finishes queued batches, feature writes, running refits (queued ones are dropped) and profile
        refreshes; stops the listener."""
        await self.batcher.close()
        await self.feature_writer.close()
        await self.refits.close()
        if self._refresher is not None:
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.profiles.stop_listening()

    # ---- the batch pipeline -----------------------------------------------------------------------

    async def run(self, call: Call, images: list[ImageRef], users: tuple[str, ...]) -> list[Done]:
        """Sends images through the batcher; raises the first image's error (naming which image)."""
        done = []
        for result in await self.run_partial(call, images, users):
            if isinstance(result, Failed):
                raise _IMAGE_ERRORS[result.status](result.message)
            done.append(result)
        return done

    async def run_partial(
        self, call: Call, images: list[ImageRef], users: tuple[str, ...]
    ) -> list[Done | Failed]:
        """Sends images through the batcher; an image's own error (ImageRejected, NotFound) comes back as
        Failed in its place, any other error is raised. Every result is in one feature space: when a
        switch fell between the call's batches, the call runs again (in the new space)."""
        done = await self._run_partial_once(call, images, users)
        if len({d.analysis.feature_space for d in done if isinstance(d, Done)}) > 1:
            done = await self._run_partial_once(call, images, users)
        return done

    async def _run_partial_once(
        self, call: Call, images: list[ImageRef], users: tuple[str, ...]
    ) -> list[Done | Failed]:
        if not images:
            return []

        call.remaining()
        from_memory = self._from_memory(call, images, users)
        if from_memory is not None:
            return list(from_memory)
        works = [Work(call.tenant, image, users, Timings()) for image in images]
        results = await self.batcher.submit_many(works, call.deadline)
        # Several images of one call ran in parallel batches: charge the call the slowest of each stage.
        for stage_name in ("queue", "triton", "redis", "personalize"):
            slowest = max((w.timings.ms.get(stage_name, 0.0) for w in works), default=0.0)
            if slowest:
                call.timings.ms[stage_name] = call.timings.ms.get(stage_name, 0.0) + slowest
        done: list[Done | Failed] = []
        for i, result in enumerate(results):
            if isinstance(result, ImageRejected | NotFound):
                message = f"image {images[i].id or f'#{i}'}: {result}" if len(results) > 1 else str(result)
                done.append(Failed(images[i].id, images[i].digest or "", result.status, message))
            elif isinstance(result, BaseException):
                raise result
            else:
                done.append(result)
        return done

    async def _process(self, jobs: list[Job[Work]]) -> list[object]:
        works = [j.item for j in jobs]
        all_timings = [w.timings for w in works]
        for job in jobs:
            job.item.timings.add("queue", job.queued_s)
        deadline = max((j.deadline for j in jobs if j.deadline is not None), default=None)
        binding = self.binding
        prefetch = await self._read_batch(works, all_timings, binding)
        heads, errors = await self._features(works, all_timings, deadline, binding, prefetch)
        scores = await self._personalize(works, heads, all_timings, binding, prefetch, failed=errors)
        out: list[object] = []
        space = binding.space.feature_space
        for i, w in enumerate(works):
            if i in errors:
                out.append(errors[i])
                continue
            assert w.image.digest is not None
            out.append(Done(ImageAnalysis(w.image.id, w.image.digest, heads[i], space), scores[i]))
        return out

    async def _read_batch(self, works: list[Work], timings: list[Timings], binding: Binding) -> _Prefetch:
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
        since = self.profiles.mark()  # a change heard from here on keeps older reads out of the cache
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
                self.profiles.put(binding.store.tag(*pair), profile, since)
        return _Prefetch(heads, profiles)

    async def _features(
        self,
        works: list[Work],
        timings: list[Timings],
        deadline: float | None,
        binding: Binding,
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
    ) -> list[Done] | None:
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
        start = time.perf_counter()  # stage() inlined: its generator context is ~3 µs, a third of this step
        scores: list[list[UserScore]] = [[] for _ in images]
        for user, profile in zip(users, profiles, strict=True):
            if profile is None:
                self.metrics.fallbacks.labels(NO_PROFILE).inc(len(images))
                for i, head in enumerate(heads):
                    scores[i].append(UserScore(user, head.generic, False, NO_PROFILE))
                continue
            self.metrics.personalized.inc(len(images))
            values = personalizer.personalize_rows(heads, profile, self.config.with_embedding)
            for i, value in enumerate(values.tolist()):
                scores[i].append(UserScore(user, value, True, None))
        elapsed = time.perf_counter() - start
        self.metrics.stage_seconds.labels("personalize").observe(elapsed)
        call.timings.add("personalize", elapsed)
        space = self.binding.space.feature_space
        return [
            Done(ImageAnalysis(image.id, image.digest or "", head, space), user_scores)
            for image, head, user_scores in zip(images, heads, scores, strict=True)
        ]

    async def _personalize(
        self,
        works: list[Work],
        heads: list[personalizer.Head],
        timings: list[Timings],
        binding: Binding,
        prefetch: _Prefetch,
        *,
        failed: Container[int] = (),
    ) -> list[list[UserScore]]:
        """Each work item's scores for its users; items in `failed` (their image's error is the answer)
        get none, and count neither as personalized nor as a fallback."""
        if not any(w.users for w in works):
            return [[] for _ in works]
        profiles = prefetch.profiles
        with stage(self.metrics, "personalize", timings):
            rows: list[tuple[int, int]] = []  # (work index, user index) of personalized pairs
            usable: list[personalizer.Profile] = []
            out: list[list[UserScore]] = []
            for i, w in enumerate(works):
                if i in failed:
                    out.append([])
                    continue
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
                            self.schedule_refit(w.tenant, user, binding.store)
                    else:
                        rows.append((i, k))
                        usable.append(profile)
                    if reason is not None:
                        self.metrics.fallbacks.labels(reason).inc()
                    scores.append(UserScore(user, generic, False, reason))
                out.append(scores)
            if rows:
                self.metrics.personalized.inc(len(rows))
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
                since = self.profiles.mark()
                try:
                    read = await store.get_profiles(tenant, users)
                except ServiceError as err:  # the entries expire; the batch path then reports the outage
                    log.debug("profile refresh of %d users failed: %s", len(users), err)
                    continue
                if store is not self.store:  # another feature space meanwhile: these are not its profiles
                    return
                for user, profile in zip(users, read, strict=True):
                    self.profiles.put(store.tag(tenant, user), profile, since)

    # ---- refits of stale profiles -------------------------------------------------------------------

    def schedule_refit(self, tenant: str, user: str, store: personalizer.StoreAdapter | None = None) -> None:
        """Refits the user's profile from its stored ratings in the background, in `store`'s layout (the
        current one by default): one refit per (tenant, user, feature space) at a time, at most
        config.refit_concurrency at once and config.refit_queue_size waiting (more are dropped, counted in
        piaa_refits_dropped_total: the next stale read asks again). A gateway whose layout is not the
        deployment's refit layout (StoreAdapter.refit) leaves stale profiles as they are, and after hearing
        so skips refits for health_check_interval_s (piaa_refits_skipped_total)."""
        if self._declined_until and time.monotonic() < self._declined_until:
            self.metrics.refits_skipped.inc()  # declined a moment ago: no round trip to hear it again
            return
        store = store or self.store
        self.refits.submit((tenant, user, store.space), lambda: self._refit(tenant, user, store))

    async def _refit(self, tenant: str, user: str, store: personalizer.StoreAdapter) -> None:
        version = None
        try:
            profile = await store.refit(tenant, user)
        except personalizer.RefitDeclined as why:  # another gateway's layout is newer: leave it
            self.metrics.refits_skipped.inc()
            self._declined_until = time.monotonic() + self.config.health_check_interval_s
            log.debug("refit of %s/%s skipped: %s", tenant, user, why)
            return
        except Exception as err:  # a refit is retried at the next stale read
            self.metrics.refits_failed.inc()
            log.warning("refit of %s/%s failed: %s", tenant, user, err)
        else:
            self.metrics.refits.inc()
            version = None if profile is None else profile.version
        self.invalidate(tenant, user, version)

    def invalidate(self, tenant: str, user: str, version: int | None = None) -> None:
        """Forgets the user's profile in this worker's LRU after a change to it, to `version` when known:
        a read that started before the change may then only cache that version or a newer one (unknown or
        a delete: nothing from before)."""
        # The store announces every change to all workers; this one need not wait for the message.
        tag = self.store.tag(tenant, user)
        if version is None:
            self.profiles.invalidate(tag)
        else:
            self.profiles.changed(tag, version)
