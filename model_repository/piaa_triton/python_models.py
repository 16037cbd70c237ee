"""The code behind the CPU profile's Python-backend models: batch what Triton hands over, run, split back.

Triton's Python backend gives `execute` a list of requests (the dynamic batcher's batch) and wants exactly
one response per request, in order. A request that fails (a corrupt image) gets an error response of its
own; the others in the same batch still get their outputs. The Triton module `triton_python_backend_utils`
exists only inside the stub, so it is passed in by the thin model.py files and nothing here imports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from piaa_triton.imaging import DEFAULT_LIMITS, ImageError, ImageLimits, preprocess

PREPROCESS_INPUT = "image_bytes"
PREPROCESS_OUTPUT = "image"


def concat(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Stacks per-request batches along axis 0. Returns (batch, the row count of each request)."""
    counts = [len(a) for a in arrays]
    batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return batch, counts


def split(batch: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Inverse of concat: the rows of each request, in order."""
    bounds = np.cumsum(counts)[:-1]
    return list(np.split(batch, bounds, axis=0))


def as_bytes(item: Any) -> bytes:
    """One element of a BYTES tensor (numpy object array element) as bytes."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, np.bytes_):
        return item.tobytes()
    raise ImageError(f"image_bytes must hold encoded bytes, got {type(item).__name__}")


def preprocess_request(
    items: np.ndarray, limits: ImageLimits, pool: ThreadPoolExecutor | None = None
) -> np.ndarray:
    """The images of one request (BYTES array [n, 1]) → uint8 RGB [n, 3, 224, 224].

    Raises ImageError naming the failing item when any image is refused; the caller fails only this request.
    """
    flat = list(items.reshape(-1))
    if not flat:
        raise ImageError("request holds no image")

    def one(index: int) -> np.ndarray:
        try:
            return preprocess(as_bytes(flat[index]), limits)
        except ImageError as err:
            raise item_error(err, index, len(flat)) from None

    if pool is None or len(flat) == 1:
        return np.stack([one(i) for i in range(len(flat))])
    return np.stack(list(pool.map(one, range(len(flat)))))


def item_error(err: ImageError, index: int, count: int) -> ImageError:
    """The refusal of one image of a request, naming it when the request holds several."""
    return ImageError(f"image {index}: {err}" if count > 1 else str(err))


def parameters(args: dict[str, str]) -> dict[str, str]:
    """The string parameters of a model's config.pbtxt, from the args Triton hands to initialize()."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def image_limits(params: dict[str, str]) -> ImageLimits:
    """The image limits a preprocess model was configured with (defaults where a parameter is absent)."""
    return ImageLimits(
        max_bytes=int(params.get("max_image_bytes", DEFAULT_LIMITS.max_bytes)),
        max_pixels=int(params.get("max_image_pixels", DEFAULT_LIMITS.max_pixels)),
        max_aspect_ratio=float(params.get("max_image_aspect_ratio", DEFAULT_LIMITS.max_aspect_ratio)),
    )


class PreprocessModel:
    """Model `preprocess`: encoded image bytes → the backbone's input tensor, one request at a time.

    Decoding releases the GIL inside Pillow, so a small thread pool uses the cores the instance was given.
    """

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.limits = DEFAULT_LIMITS
        self.pool: ThreadPoolExecutor | None = None

    def initialize(self, args: dict[str, str]) -> None:
        params = parameters(args)
        self.limits = image_limits(params)
        threads = int(params.get("decode_threads", "1"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def execute(self, requests: list[Any]) -> list[Any]:
        return preprocess_responses(
            self.pb, requests, lambda items: preprocess_request(items, self.limits, self.pool)
        )

    def finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class OnnxModel:
    """Models `backbone` and `heads` on CPU: one ONNX Runtime session over the concatenated requests.

    Parameters from config.pbtxt: onnx_file (relative to the version folder), intra_op_threads,
    inter_op_threads. Input and output names come from the config itself.
    """

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.session: Any = None
        self.input_name = ""
        self.output_names: list[str] = []

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.session = onnx_session(args)
        (self.input_name,) = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        batch, counts = concat([pb.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests])
        wanted = [self._requested(r) for r in requests]
        names = [n for n in self.output_names if any(n in w for w in wanted)]
        try:
            outputs = self.session.run(names, {self.input_name: batch})
        except Exception as err:  # ORT raises its own types; every request of the batch gets the message
            error = pb.TritonError(f"onnxruntime failed on a batch of {len(batch)}: {err}")
            return [pb.InferenceResponse(error=error) for _ in requests]
        per_output = dict(zip(names, (split(out, counts) for out in outputs), strict=True))
        return [
            pb.InferenceResponse(
                output_tensors=[
                    pb.Tensor(n, np.ascontiguousarray(per_output[n][i])) for n in names if n in wanted[i]
                ]
            )
            for i in range(len(requests))
        ]

    def _requested(self, request: Any) -> set[str]:
        return requested_outputs(request, self.output_names)


class DecodeBackboneModel:
    """Model `backbone` of the cpu profile's fused layout: encoded image bytes → the backbone's outputs, the
    decoding (piaa_triton.imaging) and ONNX Runtime in one stub, so no pixels cross between processes.

    Each request's images are decoded as the preprocess model decodes them (a refused image fails only its
    own request: INVALID_ARG with the same message); the decoded requests run as one ONNX Runtime batch.
    Parameters: the preprocess model's (image limits, decode_threads) and the ONNX models' (onnx_file,
    thread counts). Decoding one batch while ONNX Runtime runs the previous one takes a second instance.
    With parameter heads_onnx_file (and heads_intra_op_threads) it also serves the heads' outputs: the
    heads session runs on the batch's features, only when a request of the batch asked for a head output.
    """

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.limits = DEFAULT_LIMITS
        self.pool: ThreadPoolExecutor | None = None
        self.session: Any = None
        self.heads: Any = None
        """The heads' ONNX Runtime session (None: this backbone serves no head output)."""
        self.input_name = ""
        self.output_names: list[str] = []
        self.head_names: set[str] = set()
        self.heads_input = ""
        """The heads session's input: the backbone output it runs on."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = parameters(args)
        self.limits = image_limits(params)
        threads = int(params.get("decode_threads", "1"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        self.session = onnx_session(args)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [t["name"] for t in config["output"]]
        if "heads_onnx_file" in params:
            heads_threads = params.get("heads_intra_op_threads", "1")
            self.heads = onnx_session(args, params["heads_onnx_file"], heads_threads)
            self.head_names = {o.name for o in self.heads.get_outputs()} & set(self.output_names)
            self.heads_input = self.heads.get_inputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            items = pb.get_input_tensor_by_name(request, PREPROCESS_INPUT).as_numpy()
            try:
                good.append((i, preprocess_request(items, self.limits, self.pool)))
            except ImageError as err:
                responses[i] = pb.InferenceResponse(error=invalid_argument(pb, str(err)))
        if good:
            self._infer(requests, good, responses)
        return responses

    def finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _infer(self, requests: list[Any], good: list[tuple[int, np.ndarray]], responses: list[Any]) -> None:
        """Fills responses[i] for every decoded request (i, pixels) of `good` from one ORT batch."""
        pb = self.pb
        wanted = {i: requested_outputs(requests[i], self.output_names) for i, _ in good}
        names = [n for n in self.output_names if any(n in w for w in wanted.values())]
        batch, counts = concat([pixels for _, pixels in good])
        try:
            per_output = dict(
                zip(names, (split(out, counts) for out in self._run(names, batch)), strict=True)
            )
        except Exception as err:  # ORT raises its own types; every decoded request of the batch gets it
            error = pb.TritonError(f"onnxruntime failed on a batch of {len(batch)}: {err}")
            for i, _ in good:
                responses[i] = pb.InferenceResponse(error=error)
            return
        for row, (i, _) in enumerate(good):
            rows = [(n, np.ascontiguousarray(per_output[n][row])) for n in names if n in wanted[i]]
            responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor(n, x) for n, x in rows])

    def _run(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        """The outputs `names` of one decoded batch, in that order: the backbone's from its session, the
        heads' from the heads session on the backbone's feature (run only when a head output is named)."""
        heads = [n for n in names if n in self.head_names]
        if not heads:
            return list(self.session.run(names, {self.input_name: batch}))
        feature_name = self.heads_input
        own = [n for n in names if n not in self.head_names]
        own_run = own if feature_name in own else [*own, feature_name]
        got = dict(zip(own_run, self.session.run(own_run, {self.input_name: batch}), strict=True))
        got.update(zip(heads, self.heads.run(heads, {feature_name: got[feature_name]}), strict=True))
        return [got[n] for n in names]


def requested_outputs(request: Any, outputs: Sequence[str]) -> set[str]:
    """The outputs a request asked for (the ensemble asks the backbone for `feature` only), else all."""
    asked = set(request.requested_output_names()) if hasattr(request, "requested_output_names") else set()
    return asked & set(outputs) or set(outputs)


def onnx_session(
    args: dict[str, str], onnx_file: str | None = None, intra_op_threads: str | None = None
) -> Any:
    """The ONNX Runtime CPU session a Python model's config names: parameters onnx_file (relative to the
    version folder, default model.onnx), intra_op_threads and inter_op_threads (default 1 each); the
    arguments, when given, stand for the first two (a second session of the same model)."""
    import onnxruntime as ort

    params = parameters(args)
    onnx_file = onnx_file or params.get("onnx_file", "model.onnx")
    path = Path(args["model_repository"]) / args["model_version"] / onnx_file
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads or params.get("intra_op_threads", "1"))
    options.inter_op_num_threads = int(params.get("inter_op_threads", "1"))
    # Idle ORT threads spin by default; with several stubs on few cores the spinning steals the cores
    # the busy stub needs, so waiting threads sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def preprocess_responses(
    pb: Any, requests: list[Any], preprocess: Callable[[np.ndarray], np.ndarray]
) -> list[Any]:
    """One response per request: its images preprocessed into PREPROCESS_OUTPUT, or INVALID_ARG with the
    ImageError that refused it (a bad upload fails its own request, never the batch). Shared by the CPU
    and the DALI preprocess, which differ only in `preprocess`."""
    responses = []
    for request in requests:
        items = pb.get_input_tensor_by_name(request, PREPROCESS_INPUT).as_numpy()
        try:
            images = preprocess(items)
        except ImageError as err:
            responses.append(pb.InferenceResponse(error=invalid_argument(pb, str(err))))
            continue
        responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(PREPROCESS_OUTPUT, images)]))
    return responses


def invalid_argument(pb: Any, message: str) -> Any:
    """A TritonError with code INVALID_ARG where this Triton has codes (2.51 does), plain otherwise."""
    code = getattr(pb.TritonError, "INVALID_ARG", None)
    return pb.TritonError(message) if code is None else pb.TritonError(message, code)
