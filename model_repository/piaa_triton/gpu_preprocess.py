"""The gpu profile's `preprocess`: JPEGs decoded, resized and cropped by a DALI pipeline (nvJPEG on a GPU).

Every image first passes `imaging.read_header`, the same checks and messages as the CPU path (format, bytes,
pixels, aspect ratio, the configured limits); images DALI would treat differently (PNG, WebP, EXIF-rotated,
grayscale or CMYK JPEGs) take the CPU path itself. DALI is fed once per request and run at once
(prefetch depth 1, no pipelining), so a request's images cannot be answered for another. A DALI error kills
the pipeline object for good, so it is rebuilt at once and that request's images are decoded by the CPU
path instead: a file Pillow also refuses fails only its own request (INVALID_ARG), any other is served.
DALI is imported only when a pipeline is built; with device_id None the same pipeline runs on the CPU,
which is how the tests run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from piaa_triton.imaging import (
    DEFAULT_LIMITS,
    IMAGE_SIZE,
    RESIZE_SIDE,
    Header,
    ImageError,
    ImageLimits,
    preprocess,
    read_header,
)
from piaa_triton.python_models import (
    as_bytes,
    image_limits,
    item_error,
    parameters,
    preprocess_responses,
)

DALI_MODES = ("RGB",)
"""Stored pixel modes DALI decodes exactly as the CPU path does; anything else (L, CMYK) goes to the CPU."""


def takes_gpu_path(header: Header) -> bool:
    """Whether DALI decodes this image: an upright RGB JPEG. Every other accepted image takes the CPU path."""
    return header.format == "JPEG" and header.orientation == 1 and header.mode in DALI_MODES


def target_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) after the shorter side is resized to RESIZE_SIDE: exactly imaging.to_tensor's."""
    scale = RESIZE_SIDE / min(width, height)
    return max(IMAGE_SIZE, round(width * scale)), max(IMAGE_SIZE, round(height * scale))


def crop_position(length: int) -> float:
    """DALI's relative crop anchor for imaging.to_tensor's integer offset (length - IMAGE_SIZE) // 2."""
    spare = length - IMAGE_SIZE
    return 0.5 if spare <= 0 else ((spare // 2) + 0.25) / spare  # +0.25: lands inside the pixel DALI rounds


@dataclass(frozen=True)
class PipelineSettings:
    """How the DALI pipeline is built."""

    max_batch_size: int
    """The model's max_batch_size: the most images one request (one feed) holds."""
    device_id: int | None
    """The GPU of this instance; None builds a CPU-only pipeline (tests, machines without a GPU)."""
    num_threads: int = 4
    """DALI's CPU worker threads (Huffman decoding of nvJPEG's hybrid path, CPU operators)."""


class DaliPipeline:
    """One DALI pipeline fed one request at a time, rebuilt after any error (DALI then refuses every run)."""

    def __init__(self, settings: PipelineSettings) -> None:
        self.settings = settings
        self.pipe: Any = None
        self.builds = 0
        self._build()

    def _build(self) -> None:
        from nvidia import dali  # only here: piaa_triton imports without DALI

        # DALI's operator modules are generated at import; typed as Any so mypy does not guess at them.
        fn: Any = dali.fn
        types: Any = dali.types
        pipeline_def: Any = dali.pipeline_def

        gpu = self.settings.device_id is not None

        # Feed-per-request: DALI by default expects prefetch_queue_depth feeds ahead of each run and pipelines
        # runs; one feed, one synchronous run keeps every request's images in its own run.
        @pipeline_def(
            batch_size=self.settings.max_batch_size,
            num_threads=self.settings.num_threads,
            device_id=self.settings.device_id,
            prefetch_queue_depth=1,
            exec_pipelined=False,
            exec_async=False,
        )
        def pipeline() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            size = fn.external_source(name="size", dtype=types.FLOAT)
            crop_x = fn.external_source(name="crop_x", dtype=types.FLOAT)
            crop_y = fn.external_source(name="crop_y", dtype=types.FLOAT)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            # uint8 out, as imaging.to_tensor: the backbone normalizes (its graph's first operation).
            return fn.crop_mirror_normalize(
                images,
                crop=(IMAGE_SIZE, IMAGE_SIZE),
                crop_pos_x=crop_x,
                crop_pos_y=crop_y,
                dtype=types.UINT8,
                output_layout="CHW",
            )

        self.pipe = pipeline()
        self.pipe.build()
        self.builds += 1

    def run(self, blobs: list[bytes], headers: list[Header]) -> np.ndarray:
        """Decodes one request's JPEGs: uint8 RGB [n, 3, 224, 224]. Raises RuntimeError when DALI fails (the
        pipeline is rebuilt before the error leaves, so the next request runs on a valid one)."""
        sizes = [target_size(h.width, h.height) for h in headers]
        feeds = {
            "encoded": [np.frombuffer(b, dtype=np.uint8) for b in blobs],
            "size": [np.array([height, width], dtype=np.float32) for width, height in sizes],
            "crop_x": [np.array(crop_position(width), dtype=np.float32) for width, _ in sizes],
            "crop_y": [np.array(crop_position(height), dtype=np.float32) for _, height in sizes],
        }
        try:
            for name, data in feeds.items():
                self.pipe.feed_input(name, data)
            (out,) = self.pipe.run()
            if self.settings.device_id is not None:
                # The Python backend hands CPU tensors to the next step: one device-to-host copy per batch.
                out = out.as_cpu()
            return np.ascontiguousarray(out.as_array())
        except RuntimeError:
            self._build()
            raise


class GpuPreprocessModel:
    """Model `preprocess` of the gpu profile: encoded images → the backbone's input, DALI for plain JPEGs."""

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.limits: ImageLimits = DEFAULT_LIMITS
        self.dali: DaliPipeline | None = None
        self.fallbacks = 0
        """Requests whose JPEGs DALI refused and the CPU path decoded instead (for tests and logs)."""

    def initialize(self, args: dict[str, str]) -> None:
        import json

        config = json.loads(args["model_config"])
        params = parameters(args)
        self.limits = image_limits(params)
        on_gpu = args.get("model_instance_kind", "GPU") == "GPU"
        self.dali = DaliPipeline(
            PipelineSettings(
                max_batch_size=int(config["max_batch_size"]),
                device_id=int(args["model_instance_device_id"]) if on_gpu else None,
                num_threads=int(params.get("decode_threads", "4")),
            )
        )

    def preprocess_request(self, items: np.ndarray) -> np.ndarray:
        """The images of one request → uint8 RGB [n, 3, 224, 224]; raises ImageError naming the refused
        one."""
        blobs = [as_bytes(item) for item in items.reshape(-1)]
        if not blobs:
            raise ImageError("request holds no image")
        headers = []
        for index, blob in enumerate(blobs):
            try:
                headers.append(read_header(blob, self.limits)[0])
            except ImageError as err:
                raise item_error(err, index, len(blobs)) from None
        out = np.empty((len(blobs), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        on_gpu = [i for i, h in enumerate(headers) if takes_gpu_path(h)]
        on_cpu = [i for i in range(len(blobs)) if i not in set(on_gpu)]
        if on_gpu:
            assert self.dali is not None, "initialize() builds the pipeline"
            try:
                out[on_gpu] = self.dali.run([blobs[i] for i in on_gpu], [headers[i] for i in on_gpu])
            except RuntimeError:
                self.fallbacks += 1
                on_cpu = list(range(len(blobs)))
        for index in on_cpu:
            try:
                out[index] = preprocess(blobs[index], self.limits)
            except ImageError as err:
                raise item_error(err, index, len(blobs)) from None
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        return preprocess_responses(self.pb, requests, self.preprocess_request)

    def finalize(self) -> None:
        self.dali = None
