"""Feature spaces: which one a Triton ensemble serves (its model config) and which one the gateways use.

The model repository writes the heads' feature space into the heads' and the ensemble's config
(parameter `feature_space_version`, read from the heads ONNX's metadata). A rollout serves a second
ensemble `<triton_model>_<fs>` next to `<triton_model>`; the space every gateway uses is recorded in Redis
(`<p>:rollout`, store/rollout.py) and switched by the migration job. A gateway checks each space's
outputs against its own layout (piaa_client.features) before it uses it. A space whose content columns
mean something else than the layout's clusters (a named-group release) names them in parameter
`content_names`, and profiles in that space are explained with those names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from piaa_client.features import BACKBONE_FEATURE, CONTENT_CLUSTER_NAMES, CONTENT_NAMES, HEAD_OUTPUTS
from piaa_personalization.errors import ServiceError

log = logging.getLogger(__name__)

PARAMETER = "feature_space_version"
"""The model-config parameter naming a heads model's (and its ensemble's) feature space."""
HEADS_MODEL_PARAMETER = "heads_model"
"""The ensemble's model-config parameter naming the heads model that re-scores stored backbone features
(needed when no step of the ensemble runs it: the heads inside the backbone's stub)."""
CONTENT_NAMES_PARAMETER = "content_names"
"""The model-config parameter naming the content columns (a JSON list), when they are not the layout's
clusters (piaa_client.features.CONTENT_CLUSTER_NAMES)."""


class UnservableSpace(ServiceError):
    """Triton serves a feature space this gateway cannot use (unnamed, or outputs its layout does not
    know), or the space the gateways should use is not served."""

    status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class ServedSpace:
    """A feature space as Triton serves it: its name, the ensemble to call, the heads model inside, and
    what its content columns are called."""

    feature_space: str
    ensemble: str
    heads: str
    content_names: tuple[str, ...] = CONTENT_CLUSTER_NAMES

    def named(self, weights: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """(feature name, value) pairs in the layout's names, with each content feature renamed to this
        space's `content:<name>`."""
        rename = {old: f"content:{new}" for old, new in zip(CONTENT_NAMES, self.content_names, strict=True)}
        return [(rename.get(name, name), value) for name, value in weights]


def _dims(tensor: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.get("dims", ()))


def check_config(model: str, config: Mapping[str, Any]) -> ServedSpace:
    """The ServedSpace of an ensemble's config (Triton's JSON form).

    Raises UnservableSpace when the config names no feature space, lacks a head output this gateway's
    layout needs (or has it with other dims), names no heads model (its parameter, else a step fed by the
    backbone feature), or names
    its content columns other than as a JSON list of 10 distinct names.
    """
    params = config.get("parameters") or {}
    space = str((params.get(PARAMETER) or {}).get("string_value", ""))
    if not space:
        raise UnservableSpace(
            f"Triton model {model!r} names no {PARAMETER} in its config: regenerate the model repository "
            "(python -m piaa_triton.repository) from heads exported with their feature space"
        )
    outputs = {str(o.get("name")): _dims(o) for o in config.get("output", ())}
    for o in HEAD_OUTPUTS:
        if outputs.get(o.name) != o.dims:
            raise UnservableSpace(
                f"Triton model {model!r} serves feature space {space!r} with output {o.name!r} "
                f"{outputs.get(o.name)}; this gateway's layout (piaa_client.features) needs {o.dims}: "
                "deploy a gateway built for that space"
            )
    heads = str((params.get(HEADS_MODEL_PARAMETER) or {}).get("string_value", ""))
    for step in () if heads else (config.get("ensemble_scheduling") or {}).get("step", ()):
        if BACKBONE_FEATURE.name in (step.get("input_map") or {}):
            heads = str(step.get("model_name", ""))
    if not heads:
        raise UnservableSpace(
            f"Triton model {model!r} names no {HEADS_MODEL_PARAMETER} and has no heads step fed by "
            f"{BACKBONE_FEATURE.name!r}: regenerate the model repository (python -m piaa_triton.repository)"
        )
    names = str((params.get(CONTENT_NAMES_PARAMETER) or {}).get("string_value", ""))
    return ServedSpace(space, model, heads, _content_names(model, names) if names else CONTENT_CLUSTER_NAMES)


def _content_names(model: str, text: str) -> tuple[str, ...]:
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if (
        not isinstance(names, list)
        or len(names) != len(CONTENT_CLUSTER_NAMES)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise UnservableSpace(
            f"Triton model {model!r} has {CONTENT_NAMES_PARAMETER} {text!r}: expected a JSON list of "
            f"{len(CONTENT_CLUSTER_NAMES)} distinct names"
        )
    return tuple(names)


def ensemble_for(default_model: str, space: str) -> str:
    """The ensemble name a rollout gives `space` next to `default_model` ('piaa' -> 'piaa_fs2')."""
    return f"{default_model}_{space}"


class SpaceFollower:
    """Finds the space the gateways should serve: the one `<p>:rollout` names (its ensemble
    `<default>_<fs>`, or the default ensemble when that one serves it), else the default ensemble's.

    `triton` is the gateway's TritonClient; `read_active()` returns the recorded space or None;
    `on_switch(space)` is called with each newly resolved space (the service rebinds its pipeline).
    """

    def __init__(
        self,
        triton: Any,
        default_model: str,
        read_active: Callable[[], Awaitable[str | None]],
        on_switch: Callable[[ServedSpace], None],
    ) -> None:
        self.triton = triton
        self.default_model = default_model
        self.read_active = read_active
        self.on_switch = on_switch
        self.current: ServedSpace | None = None
        self._task: asyncio.Task[None] | None = None

    async def _served(self, model: str) -> ServedSpace:
        return check_config(model, await self.triton.model_config(model, timeout_s=5.0))

    async def resolve(self) -> ServedSpace:
        """The space to serve now. Raises UnservableSpace (the recorded space is not served, or a served
        one does not fit this gateway), TritonUnavailable, StoreDown-like errors of read_active."""
        default = await self._served(self.default_model)
        wanted = await self.read_active()
        if wanted is None or wanted == default.feature_space:
            return default
        name = ensemble_for(self.default_model, wanted)
        try:
            served = await self._served(name)
        except UnservableSpace:
            raise
        except ServiceError as err:
            raise UnservableSpace(
                f"the gateways should serve feature space {wanted!r} (Redis rollout state), but Triton "
                f"serves neither {self.default_model!r} in it nor {name!r} ({err}): load that ensemble "
                "or switch back (piaa-admin switch)"
            ) from err
        if served.feature_space != wanted:
            raise UnservableSpace(f"Triton model {name!r} serves {served.feature_space!r}, not {wanted!r}")
        return served

    async def refresh(self) -> ServedSpace | None:
        """Resolves and, when the space changed, calls on_switch. Returns the space in use."""
        space = await self.resolve()
        if space != self.current:
            log.warning(
                "serving feature space %s (ensemble %s, was %s)",
                space.feature_space,
                space.ensemble,
                self.current.feature_space if self.current else "-",
            )
            self.current = space
            self.on_switch(space)
        return self.current

    def start(self, interval_s: float) -> None:
        """Follows the rollout every `interval_s` in the background; failures are logged and retried
        (the gateway keeps the space it has)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.refresh()
                except Exception as err:  # keep serving the current space; the next poll retries
                    log.warning("feature space unchanged (%s): %s", type(err).__name__, err)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        """Stops following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
