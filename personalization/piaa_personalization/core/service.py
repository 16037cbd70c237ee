"""The personalization service: the gateway's RPCs without gRPC (the servicer only translates messages)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from piaa_client.features import BACKBONE_FEATURE
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core import personalizer
from piaa_personalization.core.batcher import MicroBatcher
from piaa_personalization.core.feature_writer import FeatureWriter
from piaa_personalization.core.memory import DigestMemo, Lru
from piaa_personalization.core.metrics import Metrics, stage
from piaa_personalization.core.profile_cache import ProfileCache
from piaa_personalization.core.requests import RequestChecker
from piaa_personalization.core.scoring import Binding, Done, Scorer, Work
from piaa_personalization.core.spaces import ServedSpace, SpaceFollower, UnservableSpace
from piaa_personalization.core.triton_client import TritonClient
from piaa_personalization.core.types import (
    DISABLED,
    Call,
    Failed,
    ImageRef,
    ProfileView,
    RatingIn,
    RatingsReceipt,
    Scored,
    Suggestion,
    UserScore,
)
from piaa_personalization.errors import InvalidArgument, ServiceError, StoreDown, TritonUnavailable
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
        self.metrics = metrics or Metrics()
        self.checker = RequestChecker(config)
        self.scorer = Scorer(config, triton, store, self.metrics)
        self.follower = SpaceFollower(triton, triton.model, self._read_active, self.use_space)
        self.backbone_model = f"{triton.model}_backbone"
        """The ensemble returning the backbone feature (piaa_triton.repository.BACKBONE_ENSEMBLE)."""
        self._spaces: tuple[str, ...] = ()

    @property
    def space(self) -> ServedSpace:
        """The feature space new batches are computed in."""
        return self.scorer.binding.space

    @property
    def binding(self) -> Binding:
        """The space, store adapter and head-output memory new batches run in."""
        return self.scorer.binding

    @property
    def store(self) -> personalizer.StoreAdapter:
        """The store adapter of the current feature space."""
        return self.scorer.store

    @property
    def profiles(self) -> ProfileCache[personalizer.Profile]:
        """This worker's profile LRU."""
        return self.scorer.profiles

    @property
    def batcher(self) -> MicroBatcher[Work, Done]:
        """The micro-batcher every scoring call goes through."""
        return self.scorer.batcher

    @property
    def features_memory(self) -> Lru[personalizer.Head]:
        """This worker's head outputs by digest, in the current feature space."""
        return self.scorer.features_memory

    @property
    def feature_writer(self) -> FeatureWriter:
        """The writer of new head outputs to the feature cache, behind the answers."""
        return self.scorer.feature_writer

    @property
    def digests(self) -> DigestMemo:
        """SHA-256 digests of image bytes, remembered."""
        return self.checker.digests

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
        store.inner.conn.on_error = service.metrics.redis_error
        try:  # tells the gateways started earlier to leave stale profiles to this one's layout
            await store.claim_layout()
        except ServiceError as err:
            log.warning("refit layout not claimed yet (%s): %s", type(err).__name__, err)
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
        self.scorer.use_space(space, self._spaces)

    async def close(self) -> None:
        """Finishes queued work and refits, then closes the connections."""
        await self.follower.stop()
        await self.scorer.close()
        await self.triton.close()
        await self.store.close()

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
            self.checker.user(user_id)
        users = () if generic_only else (user_id,)
        if allow_partial:
            checked = self.checker.images_partial(images, "images")
            refs = [c for c in checked if isinstance(c, ImageRef)]
            ran = iter(await self.scorer.run_partial(call, refs, users))
            results = [c if isinstance(c, Failed) else next(ran) for c in checked]
        else:
            results = list(await self.scorer.run(call, self.checker.images(images), users))
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
        self.checker.users(user_ids)
        (ref,) = self.checker.images([image], "image")
        (done,) = await self.scorer.run(call, [ref], tuple(user_ids))
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
        self.checker.user(user_id)
        if request_id:
            personalizer.check_request_id(request_id)
        refs = self.checker.images([r.image for r in ratings], "ratings")
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
        done = await self.scorer.run(call, refs, ())
        if any(d.analysis.feature_space != binding.space.feature_space for d in done):
            binding = self.binding  # the gateways switched feature space meanwhile: record in the new one
            done = await self.scorer.run(call, refs, ())
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
            self.scorer.invalidate(call.tenant, user_id, recorded.version)
            view = await self._profile_view(call.tenant, user_id)
        return RatingsReceipt(view, digests)

    async def _keep_backbones(self, call: Call, refs: Sequence[ImageRef], binding: Binding) -> None:
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
            profile = await self.store.refit(call.tenant, user_id, any_layout=True)
            self.scorer.invalidate(call.tenant, user_id, None if profile is None else profile.version)
            view = await self._profile_view(call.tenant, user_id)
        return RatingsReceipt(view, digests, replayed=True)

    async def suggest(
        self, call: Call, user_id: str, candidates: Sequence[ImageRef], k: int
    ) -> list[Suggestion]:
        """The k candidates whose ratings would teach the user's model most (kept diverse), most useful
        first; k=0 orders them all."""
        self.checker.user(user_id)
        refs = self.checker.images(candidates, "candidates")
        done = await self.scorer.run(call, refs, ())
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
        self.checker.user(user_id)
        with stage(self.metrics, "redis", [call.timings]):
            return await self._profile_view(call.tenant, user_id)

    async def delete_profile(self, call: Call, user_id: str) -> int:
        """Removes every key of the user; returns how many there were."""
        self.checker.user(user_id)
        with stage(self.metrics, "redis", [call.timings]):
            removed = await self.store.delete_user(call.tenant, user_id)
        self.scorer.invalidate(call.tenant, user_id)
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
            explained = personalizer.explain(posterior, prior, self.config.with_embedding)
            # the layout names the content columns as clusters; the served space says what they are
            view.likes, view.dislikes, view.weights = (self.space.named(pairs) for pairs in explained)
        else:
            self.scorer.schedule_refit(tenant, user_id)
        return view
