"""Async client of the Triton ensemble "piaa": encoded images in, head outputs out, errors per image."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from piaa_client.features import BACKBONE_FEATURE, ENSEMBLE_INPUT, HEAD_OUTPUTS, Output
from piaa_personalization.errors import (
    DeadlineExceeded,
    ImageRejected,
    Overloaded,
    ServiceError,
    TritonUnavailable,
)

log = logging.getLogger(__name__)

# Triton statuses that say nothing about the images: retrying image by image would not help.
_NOT_THE_IMAGES = {
    "StatusCode.UNAVAILABLE": TritonUnavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.RESOURCE_EXHAUSTED": Overloaded,
    "StatusCode.CANCELLED": TritonUnavailable,
    "StatusCode.UNIMPLEMENTED": TritonUnavailable,
}


@dataclass
class InferResult:
    """Head outputs of a batch: arrays with one row per image (zeros where the image failed) and the
    error of each failed image by index."""

    outputs: dict[str, np.ndarray]
    errors: dict[int, ServiceError]


def _translate_not_image(err: InferenceServerException) -> ServiceError:
    """A Triton failure that is not an image's: a retryable status, never the caller's fault.

    INTERNAL, UNKNOWN and any other status Triton gives a failed call (a crashed or restarting Python
    stub, a model that fails to run) is an outage of ours: UNAVAILABLE, which the client's retry policy
    retries and the per-code request metrics count. Triton's own text (model files, ONNX Runtime errors)
    is logged, not returned.
    """
    status = str(err.status() or "")
    kind = _NOT_THE_IMAGES.get(status)
    if kind is not None:
        return kind(f"triton: {err.message()}")
    name = status.removeprefix("StatusCode.") or "no status"
    log.warning("triton failed a call (%s): %s", name, err.message())
    return TritonUnavailable(f"the model server failed ({name}): retry later")


def _translate(err: InferenceServerException) -> ServiceError:
    """The error of a failed inference call: ImageRejected only for INVALID_ARGUMENT, the status the
    decoding stub gives the request whose image it refused (python_models.invalid_argument, the same on
    the cpu and gpu profiles); everything else as _translate_not_image."""
    if str(err.status() or "") == "StatusCode.INVALID_ARGUMENT":
        return ImageRejected(str(err.message() or "the image was refused"))
    return _translate_not_image(err)


class TritonClient:
    """Sends batches of encoded images to the ensemble; one call per batch, split only on failure.

    A batch that fails because of one image is retried image by image (concurrently, so Triton's own
    dynamic batcher regroups them), so a bad image fails only its own request.
    """

    def __init__(self, url: str, model: str = "piaa", max_inflight: int = 2) -> None:
        self.url = url
        self.model = model
        # Calls beyond this wait here, where their deadline is known, rather than in Triton's bounded
        # queue, which sheds what waits longer than its timeout.
        self._slots = asyncio.Semaphore(max_inflight)
        # gRPC's reconnect backoff grows to 120 s by default: after a Triton restart the gateway would
        # keep failing fast for minutes. Capped, it is back within a few seconds.
        self._client = triton.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._max_batch: dict[str, int] = {}

    async def model_config(self, model: str, timeout_s: float = 10.0) -> dict[str, object]:
        """A model's config as Triton serves it (JSON form). Raises TritonUnavailable (or the status's
        error) when Triton cannot say."""
        try:
            reply = await self._client.get_model_config(model, as_json=True, client_timeout=timeout_s)
        except InferenceServerException as err:
            raise _translate_not_image(err) from err
        except Exception as err:
            raise TritonUnavailable(f"triton at {self.url}: {err}") from err
        return dict(reply.get("config", {}))

    async def max_batch_size(self, model: str | None = None) -> int:
        """The model's max_batch_size (read once from Triton); larger batches are sent in parts."""
        name = model or self.model
        if name not in self._max_batch:
            config = await self.model_config(name)
            self._max_batch[name] = max(1, int(str(config.get("max_batch_size", 0) or 1)))
        return self._max_batch[name]

    async def ready(self, timeout_s: float = 5.0) -> bool:
        """Whether Triton answers and the ensemble in use is ready; never raises."""
        try:
            return bool(await self._client.is_model_ready(self.model, client_timeout=timeout_s))
        except Exception:
            return False

    async def _call(
        self, images: list[bytes], deadline: float | None, model: str, outputs: Sequence[Output]
    ) -> dict[str, np.ndarray]:
        data = np.empty((len(images), 1), dtype=np.object_)
        for i, image in enumerate(images):
            data[i, 0] = image
        tensor = triton.InferInput(ENSEMBLE_INPUT.name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        wanted = [triton.InferRequestedOutput(o.name) for o in outputs]
        try:
            async with self._slots:
                timeout_s = None if deadline is None else deadline - time.monotonic()
                if timeout_s is not None and timeout_s <= 0:
                    raise DeadlineExceeded("deadline passed while waiting for triton")
                result = await self._client.infer(model, [tensor], outputs=wanted, client_timeout=timeout_s)
        except (InferenceServerException, DeadlineExceeded):
            raise
        except Exception as err:  # connection-level failures surface as other exception types
            raise TritonUnavailable(f"triton at {self.url}: {err}") from err
        out = {}
        for o in outputs:
            array = result.as_numpy(o.name)
            if array is None:
                raise TritonUnavailable(f"triton returned no {o.name!r}")
            out[o.name] = np.asarray(array, dtype=np.float32).reshape(len(images), *o.dims)
        return out

    async def infer(
        self,
        images: list[bytes],
        deadline: float | None = None,
        *,
        model: str | None = None,
        outputs: Sequence[Output] = HEAD_OUTPUTS,
    ) -> InferResult:
        """Head outputs for `images` (encoded bytes): one Triton call when all are good and they fit the
        ensemble's max_batch_size, else concurrent parts. `deadline` (time.monotonic() seconds) is
        passed on to Triton as the call's client_timeout. `model`: another ensemble than self.model (a
        feature space served side by side, or the backbone ensemble); `outputs`: what to return.

        Raises TritonUnavailable, DeadlineExceeded or Overloaded when the failure is not the images';
        a bad image is reported in InferResult.errors and the others still get outputs.
        """
        model = model or self.model
        wanted = tuple(outputs)
        if not images:
            return InferResult({o.name: np.zeros((0, *o.dims), np.float32) for o in wanted}, {})
        limit = await self.max_batch_size(model)
        if len(images) > limit:
            parts = await asyncio.gather(
                *(
                    self.infer(images[i : i + limit], deadline, model=model, outputs=wanted)
                    for i in range(0, len(images), limit)
                )
            )
            merged = {o.name: np.concatenate([p.outputs[o.name] for p in parts]) for o in wanted}
            errors = {k * limit + i: e for k, p in enumerate(parts) for i, e in p.errors.items()}
            return InferResult(merged, errors)
        try:
            return InferResult(await self._call(images, deadline, model, wanted), {})
        except InferenceServerException as err:
            failure = _translate(err)
            if not isinstance(failure, ImageRejected):
                raise failure from err
            if len(images) == 1:
                return InferResult({o.name: np.zeros((1, *o.dims), np.float32) for o in wanted}, {0: failure})
            log.info("batch of %d failed (%s); retrying image by image", len(images), err.message())
        singles = await asyncio.gather(
            *(self.infer([image], deadline, model=model, outputs=wanted) for image in images)
        )
        merged = {o.name: np.concatenate([s.outputs[o.name] for s in singles]) for o in wanted}
        errors = {i: s.errors[0] for i, s in enumerate(singles) if s.errors}
        return InferResult(merged, errors)

    async def heads(self, model: str, features: np.ndarray, timeout_s: float = 60.0) -> dict[str, np.ndarray]:
        """A heads model's outputs for backbone features [N, 1280] (a migration's re-extraction without
        the images), in parts of the model's max_batch_size. Raises TritonUnavailable and the like."""
        limit = await self.max_batch_size(model)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(features), limit):
            chunk = np.ascontiguousarray(features[start : start + limit], dtype=np.float32)
            tensor = triton.InferInput(BACKBONE_FEATURE.name, list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            wanted = [triton.InferRequestedOutput(o.name) for o in HEAD_OUTPUTS]
            try:
                result = await self._client.infer(model, [tensor], outputs=wanted, client_timeout=timeout_s)
            except InferenceServerException as err:
                raise _translate_not_image(err) from err
            except Exception as err:
                raise TritonUnavailable(f"triton at {self.url}: {err}") from err
            parts.append({o.name: np.asarray(result.as_numpy(o.name), np.float32) for o in HEAD_OUTPUTS})
        if not parts:
            return {o.name: np.zeros((0, *o.dims), np.float32) for o in HEAD_OUTPUTS}
        return {o.name: np.concatenate([p[o.name] for p in parts]) for o in HEAD_OUTPUTS}

    async def close(self) -> None:
        """Closes the channel."""
        await self._client.close()
