"""ONNX → TensorRT: FP16 / INT8 engines with a dynamic-batch profile, written into a Triton model folder.

Importable without TensorRT: `tensorrt` and the CUDA bindings are imported only when an engine is
built or run, and their absence is reported as TensorRTUnavailableError with what to do instead
(build inside the NGC Triton container on the target GPU; docs/models.md). Engines are tied to the
TensorRT version and the GPU's compute capability, so each plan is named for its compute capability
(model_sm90.plan) next to a JSON of what it was built for, and cc_model_filenames() maps them for
Triton's config, letting one repository carry engines for several GPU kinds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from piaa_export.exceptions import ExportError, TensorRTUnavailableError
from piaa_export.sources import file_sha256
from piaa_triton.paths import plan_filename  # the naming lives with the repository layout

Precision = Literal["fp32", "fp16", "int8"]

FP16_MIN_COSINE = 0.999
"""FP16 engine vs fp32 ONNX: every output row's cosine similarity must reach this."""
INT8_MIN_COSINE = 0.98
"""INT8 engine vs fp32 ONNX: every output row's cosine similarity must reach this."""
_PLAN = re.compile(r"^model_sm(\d+)\.plan$")


@dataclass(frozen=True)
class EngineConfig:
    """How an engine is built."""

    precision: Precision = "fp16"
    """fp32, fp16, or int8 (INT8 with FP16 fallback, calibrated on real photos)."""
    max_batch_size: int = 32
    """The optimization profile spans batch 1..max_batch_size (Triton's max_batch_size)."""
    opt_batch_size: int | None = None
    """The batch TensorRT tunes kernels for; default max_batch_size // 2 (dynamic batching's sweet spot)."""
    workspace_gib: float = 2.0
    """Builder workspace memory pool limit."""
    calibration_batch_size: int = 16
    calibration_max_photos: int = 512
    """INT8: how many photos the entropy calibrator sees (in batches of calibration_batch_size)."""


def require_tensorrt() -> Any:
    """The tensorrt module; raises TensorRTUnavailableError when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailableError(
            "TensorRT is not installed here. Engines are specific to the TensorRT version and the GPU, "
            "so build them inside the NGC Triton container on the target GPU "
            "(see docs/models.md, 'TensorRT engines'); the CPU profile serves the ONNX models instead."
        ) from None
    return tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.8 layout
        except ImportError:
            raise TensorRTUnavailableError(
                "the CUDA Python bindings (cuda-python) are not installed"
            ) from None
    return runtime


def _check(result: Any) -> Any:
    """Unwraps a cuda-python (err, value...) tuple; raises TensorRTUnavailableError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TensorRTUnavailableError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


def compute_capability(device: int = 0) -> str:
    """The GPU's compute capability as "major.minor"; raises TensorRTUnavailableError without a CUDA GPU."""
    rt = _cudart()
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise TensorRTUnavailableError(
            "no CUDA GPU is visible (cudaGetDeviceCount: "
            f"{err if int(err) else 'zero devices'}); TensorRT engines can only be built on the target GPU"
        )
    major = _check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device))
    minor = _check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device))
    return f"{major}.{minor}"


def cc_model_filenames(model_dir: Path, version: str = "1") -> dict[str, str]:
    """Compute capability → plan file, for every engine in model_dir/<version>/ that has its build JSON.

    This is what Triton's `cc_model_filenames` takes (model config), so one repository can carry
    engines for several GPU kinds; a plan without its JSON (unknown provenance) is left out.
    """
    out: dict[str, str] = {}
    folder = model_dir / version
    if not folder.is_dir():
        return out
    for plan in sorted(folder.iterdir()):
        match = _PLAN.match(plan.name)
        if not match or not plan.with_suffix(".json").exists():
            continue
        info = json.loads(plan.with_suffix(".json").read_text())
        out[str(info["compute_capability"])] = plan.name
    return out


def calibration_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Contiguous float32 batches of exactly batch_size (the last, partial one is dropped: TensorRT
    calibrates with a fixed shape)."""
    for start in range(0, len(images) - batch_size + 1, batch_size):
        yield np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)


def _make_calibrator(trt: Any, images: np.ndarray, batch_size: int, cache_file: Path) -> Any:
    """An IInt8EntropyCalibrator2 fed with preprocessed photos; reads and writes its cache file."""
    rt = _cudart()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = calibration_batches(images, batch_size)
            self.device = _check(rt.cudaMalloc(batch_size * int(np.prod(images.shape[1:])) * 4))

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            _check(rt.cudaMemcpy(self.device, batch.ctypes.data, batch.nbytes, kind))
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.exists() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(
    onnx_path: Path,
    model_dir: Path,
    config: EngineConfig | None = None,
    calibration_photos: Path | None = None,
    version: str = "1",
) -> dict[str, Any]:
    """Builds a TensorRT engine from an ONNX model into model_dir/<version>/model_sm<cc>.plan (+ .json).

    INT8 needs calibration_photos (a folder of real photos; only the backbone, whose input is an image,
    can be calibrated this way); the calibration cache lands next to the plan. Returns the build JSON.
    Raises TensorRTUnavailableError (no TensorRT / no CUDA GPU) or ExportError (parse or build failed).
    """
    config = config or EngineConfig()
    if config.precision == "int8" and calibration_photos is None:
        raise ExportError("INT8 needs --calibration-photos: a folder of real photos for the calibrator")
    if config.max_batch_size < 1:
        raise ExportError(f"max_batch_size must be ≥ 1, got {config.max_batch_size}")
    trt = require_tensorrt()
    cc = compute_capability()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    opt = config.opt_batch_size or max(1, config.max_batch_size // 2)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        per_item = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *per_item), (opt, *per_item), (config.max_batch_size, *per_item))
    builder_config.add_optimization_profile(profile)

    out_dir = model_dir / version
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / plan_filename(cc)
    if config.precision in ("fp16", "int8"):
        builder_config.set_flag(trt.BuilderFlag.FP16)
    if config.precision == "int8" and calibration_photos is not None:
        from piaa_export.extract import list_photos
        from piaa_export.verify import photo_tensors

        files = list_photos(calibration_photos, config.calibration_max_photos)
        images = photo_tensors(files)
        builder_config.set_flag(trt.BuilderFlag.INT8)
        builder_config.int8_calibrator = _make_calibrator(
            trt, images, config.calibration_batch_size, plan.with_suffix(".calib")
        )
        calib_profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = (config.calibration_batch_size, *tuple(tensor.shape)[1:])
            calib_profile.set_shape(tensor.name, shape, shape, shape)
        builder_config.set_calibration_profile(calib_profile)

    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan.write_bytes(bytes(serialized))
    info = {
        "tensorrt": trt.__version__,
        "compute_capability": cc,
        "plan": plan.name,
        "onnx": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "config": asdict(config),
    }
    plan.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_engine(plan: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a serialized engine once on host arrays (same batch for every input); returns every output."""
    trt = require_tensorrt()
    rt = _cudart()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    buffers: list[Any] = []
    outputs: dict[str, np.ndarray] = {}
    h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    try:
        for name, array in inputs.items():
            host = np.ascontiguousarray(array, dtype=np.float32)
            context.set_input_shape(name, host.shape)
            device = _check(rt.cudaMalloc(host.nbytes))
            buffers.append(device)
            _check(rt.cudaMemcpy(device, host.ctypes.data, host.nbytes, h2d))
            context.set_tensor_address(name, int(device))
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            host = np.empty(tuple(context.get_tensor_shape(name)), dtype=np.float32)
            device = _check(rt.cudaMalloc(host.nbytes))
            buffers.append(device)
            context.set_tensor_address(name, int(device))
            outputs[name] = host
        stream = _check(rt.cudaStreamCreate())
        if not context.execute_async_v3(stream):
            raise ExportError(f"TensorRT failed to run {plan}")
        _check(rt.cudaStreamSynchronize(stream))
        for i, host in enumerate(outputs.values()):
            device = buffers[len(inputs) + i]
            _check(rt.cudaMemcpy(host.ctypes.data, device, host.nbytes, d2h))
    finally:
        for device in buffers:
            rt.cudaFree(device)
    return outputs


def min_row_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows (flattened per batch item)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def engine_parity(
    plan: Path, onnx_path: Path, inputs: dict[str, np.ndarray], precision: Precision
) -> dict[str, Any]:
    """Compares an engine with its fp32 ONNX source (ONNX Runtime) on the same inputs.

    Returns per-output max abs difference and min row cosine; raises ParityError below the precision's
    cosine floor (fp32 engines are held to FP16_MIN_COSINE too: TF32 may be on).
    """
    from piaa_export.exceptions import ParityError
    from piaa_export.runtime import session

    floor = INT8_MIN_COSINE if precision == "int8" else FP16_MIN_COSINE
    reference = dict(
        zip(
            [o.name for o in session(onnx_path).get_outputs()],
            session(onnx_path).run(None, inputs),
            strict=True,
        )
    )
    got = run_engine(plan, inputs)
    report = {
        name: {
            "max_abs_diff": float(np.max(np.abs(reference[name] - got[name]))),
            "min_cosine": min_row_cosine(reference[name], got[name]),
        }
        for name in reference
    }
    bad = {k: v for k, v in report.items() if v["min_cosine"] < floor}
    if bad:
        raise ParityError(f"{plan.name} vs {onnx_path.name}: cosine below {floor} for {bad}")
    return {"precision": precision, "cosine_floor": floor, "outputs": report}


def engine_parity_on_photos(
    plan: Path, onnx_path: Path, photos: Sequence[Path], precision: Precision
) -> dict[str, Any]:
    """engine_parity on real photos for an image-input model (the backbone)."""
    from piaa_client.features import BACKBONE_INPUT
    from piaa_export.verify import photo_tensors

    return engine_parity(plan, onnx_path, {BACKBONE_INPUT.name: photo_tensors(photos)}, precision)
