"""Triton Python model `preprocess` (gpu profile): JPEGs decoded by nvJPEG through DALI, on the GPU.

Runs only in the NGC Triton container with nvidia-dali installed; not exercised on the CPU machines (the
generated gpu repository is checked structurally there). Non-JPEG inputs (PNG, WebP) and JPEGs that need
EXIF rotation or CMYK handling take the CPU path of piaa_triton.imaging, so every image is accepted or
refused by the same rules as on CPU. DALI's resize is not bit-identical to Pillow's: compare outputs with
the cpu profile on the shared photos before serving (see docs/triton.md).
"""

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from piaa_triton.imaging import (
    DEFAULT_LIMITS,
    IMAGE_SIZE,
    LITE_MEAN,
    LITE_STD,
    RESIZE_SIDE,
    ImageError,
    preprocess,
    sniff_format,
)
from piaa_triton.python_models import PREPROCESS_INPUT, PREPROCESS_OUTPUT, as_bytes

EXIF_ORIENTATION = 0x0112


def _needs_cpu(data: bytes) -> bool:
    """PNG/WebP, oversized files, and JPEGs that are rotated, CMYK or over the pixel limit go to the CPU
    path, which applies the rules (or refuses with its message). Reads the header only, decodes nothing."""
    if sniff_format(data) != "JPEG" or len(data) > DEFAULT_LIMITS.max_bytes:
        return True
    try:
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
    except (OSError, SyntaxError, ValueError):
        return True
    width, height = image.size
    rotated = image.getexif().get(EXIF_ORIENTATION, 1) != 1
    return rotated or image.mode != "RGB" or width * height > DEFAULT_LIMITS.max_pixels


class TritonPythonModel:
    """One DALI pipeline per instance, fed one request's images at a time."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_batch = int(config["max_batch_size"])
        device = int(args["model_instance_device_id"])

        @pipeline_def(batch_size=self.max_batch, num_threads=4, device_id=device)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=RESIZE_SIDE, interp_type=types.INTERP_LINEAR)
            return fn.crop_mirror_normalize(
                images,
                crop=(IMAGE_SIZE, IMAGE_SIZE),
                mean=[LITE_MEAN] * 3,
                std=[LITE_STD] * 3,
                dtype=types.FLOAT,
                output_layout="CHW",
            )

        self.pipe = pipeline()
        self.pipe.build()

    def _gpu_batch(self, blobs):
        self.pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        (out,) = self.pipe.run()
        # One device-to-host copy: the Python backend hands CPU tensors to the next step; DLPack on the GPU
        # would avoid it and is the next step once this runs in the container.
        return out.as_cpu().as_array()

    def execute(self, requests):
        responses = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, PREPROCESS_INPUT).as_numpy().reshape(-1)
            try:
                blobs = [as_bytes(item) for item in items]
                if any(_needs_cpu(b) for b in blobs):
                    images = np.stack([preprocess(b) for b in blobs])
                else:
                    images = self._gpu_batch(blobs)
            except ImageError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
                continue
            except RuntimeError as err:  # nvJPEG refused a file Pillow's header check let through
                message = f"cannot decode image: {err}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(PREPROCESS_OUTPUT, images)]))
        return responses
