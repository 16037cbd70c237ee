"""ONNX → TensorRT: a strongly typed engine per Triton model folder, built as that folder's config says.

Importable without TensorRT: `tensorrt` and the CUDA bindings are imported only when an engine is built or
run, and their absence is TensorRTUnavailableError (build inside the NGC Triton image on the target GPU;
docs/deployment.md). Networks are strongly typed, the one kind TensorRT 11 builds and one TensorRT 10 has: the
precision comes from the ONNX file (onnx_precision: FP16 converted with the source's input and output types,
INT8 as explicit Q/DQ quantization), never from builder flags or a calibrator. The batch range, the per-item
shapes and the precision come from the model's generated config.pbtxt, so the engine cannot disagree with what
Triton loads. Every engine is compared with its FP32 ONNX source on the GPU right after it is built; one that
misses the tolerance is deleted and the build fails. Each plan is named for its GPU's compute capability
(model_sm90.plan) next to a JSON of what it was built from and how it compared.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from piaa_export.exceptions import ExportError, ParityError, TensorRTUnavailableError
from piaa_export.onnx_precision import check_qdq, compare, run_onnx, to_fp16
from piaa_export.sources import file_sha256
from piaa_triton.paths import plan_filename

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")

FP16_MIN_COSINE = 0.999
"""FP16 (or FP32 with TF32) engine vs FP32 ONNX: every output row's cosine similarity must reach this."""
INT8_MIN_COSINE = 0.98
"""INT8 engine vs FP32 ONNX: every output row's cosine similarity must reach this."""
PARITY_BATCH = 16
"""How many inputs the post-build parity check runs (at most the engine's max batch)."""
TENSORRT_OBJECTS = (
    "trt", "logger", "builder", "network", "parser", "builder_config", "profile", "tensor",
    "runtime", "engine", "context",
)  # fmt: skip
"""The local names that hold TensorRT objects in this module: the tests check that every attribute used on
them exists in the TensorRT Python bindings of the versions we build with."""


@dataclass(frozen=True)
class EngineConfig:
    """How an engine is built; from_model_config reads it from the model's config.pbtxt."""

    precision: Precision
    """fp32, fp16 (FP16 ONNX, the FP32 file's input and output types) or int8 (a Q/DQ ONNX)."""
    max_batch_size: int
    """The optimization profile spans batch 1..max_batch_size (Triton's max_batch_size)."""
    input_dims: dict[str, tuple[int, ...]]
    """Per-item dims of each input (without the batch dimension), as Triton feeds them."""
    opt_batch_size: int = 0
    """The batch TensorRT tunes kernels for; 0: max_batch_size // 2 (dynamic batching's sweet spot)."""
    workspace_gib: float = 2.0
    """Builder workspace memory pool limit."""

    @property
    def opt(self) -> int:
        return self.opt_batch_size or max(1, self.max_batch_size // 2)

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name → (min, opt, max) shapes of the optimization profile."""
        return {
            name: ((1, *dims), (self.opt, *dims), (self.max_batch_size, *dims))
            for name, dims in self.input_dims.items()
        }

    @classmethod
    def from_model_config(cls, config_pbtxt: Path, workspace_gib: float = 2.0) -> EngineConfig:
        """The build settings of a tensorrt_plan model: its max_batch_size, input dims and the `precision`
        parameter of its generated config.pbtxt. Raises ExportError for a missing or unsuitable config."""
        from piaa_triton.config import parse

        if not config_pbtxt.is_file():
            raise ExportError(
                f"{config_pbtxt} is missing: write the gpu repository first (launch.py prepare)"
            )
        model = parse(config_pbtxt.read_text())
        if model.platform != "tensorrt_plan":
            raise ExportError(f"{config_pbtxt}: model {model.name!r} is not a tensorrt_plan model")
        precision = model.parameters["precision"].string_value if "precision" in model.parameters else ""
        if precision not in PRECISIONS:
            raise ExportError(
                f"{config_pbtxt}: parameter precision is {precision!r}, not one of {PRECISIONS}"
            )
        config = cls(
            precision=precision,  # checked against PRECISIONS above
            max_batch_size=int(model.max_batch_size),
            input_dims={t.name: tuple(int(d) for d in t.dims) for t in model.input},
            workspace_gib=workspace_gib,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ExportError for settings no engine can be built with."""
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be ≥ 1, got {self.max_batch_size}")
        if not 1 <= self.opt <= self.max_batch_size:
            raise ExportError(f"opt_batch_size must lie in 1..{self.max_batch_size}, got {self.opt}")
        if not self.input_dims:
            raise ExportError("the model config names no input")


def require_tensorrt() -> Any:
    """The tensorrt module; raises TensorRTUnavailableError when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailableError(
            "TensorRT is not installed here. Engines are specific to the TensorRT version and the GPU, "
            "so build them inside the NGC Triton image on the target GPU "
            "(see docs/deployment.md, 'The GPU path'); the CPU profile serves the ONNX models instead."
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


def parity_inputs(
    onnx_path: Path, config: EngineConfig, photos: Sequence[Path] = (), seed: int = 0
) -> dict[str, np.ndarray]:
    """The inputs the built engine is compared on: up to PARITY_BATCH items, never more than its max batch.

    For the backbone (uint8 image input): the photos through the serving preprocess, or, without photos, a
    fixed random batch of pixels around mid-grey. For the heads (feature input): the backbone.onnx beside
    `onnx_path` run on those images, or random features of the same scale when it is absent.
    """
    from piaa_client.features import BACKBONE_FEATURE, BACKBONE_INPUT
    from piaa_triton.imaging import preprocess

    count = min(PARITY_BATCH, config.max_batch_size)
    rng = np.random.default_rng(seed)
    image_dims = tuple(BACKBONE_INPUT.dims)
    if photos:
        images = np.stack([preprocess(p.read_bytes()) for p in photos[:count]])
    else:
        pixels = rng.standard_normal((count, *image_dims)) * 64 + 127
        images = np.clip(np.rint(pixels), 0, 255).astype(BACKBONE_INPUT.dtype)
    out: dict[str, np.ndarray] = {}
    for name, dims in config.input_dims.items():
        if name == BACKBONE_INPUT.name:
            out[name] = images
        elif name == BACKBONE_FEATURE.name and (onnx_path.parent / "backbone.onnx").is_file():
            backbone = run_onnx(onnx_path.parent / "backbone.onnx", {BACKBONE_INPUT.name: images})
            out[name] = backbone[BACKBONE_FEATURE.name]
        else:
            out[name] = np.abs(rng.standard_normal((len(images), *dims))).astype(np.float32)
    return out


def network_source(
    onnx_path: Path,
    config: EngineConfig,
    workdir: Path,
    inputs: dict[str, np.ndarray],
    int8_onnx: Path | None,
) -> tuple[Path, dict[str, Any]]:
    """The ONNX file TensorRT parses for this precision, and what was checked about it (no GPU needed).

    fp32: the source itself. fp16: the source converted to FP16 in `workdir` and compared with it on
    `inputs` (CPU). int8: `int8_onnx`, checked to be symmetric signed INT8 Q/DQ. Raises ExportError.
    """
    if config.precision == "fp16":
        target = workdir / f"{onnx_path.stem}.fp16.onnx"
        return target, {"fp16_onnx_vs_fp32": to_fp16(onnx_path, target, inputs)}
    if config.precision == "int8":
        if int8_onnx is None:
            raise ExportError("precision int8 needs --int8-onnx: the Q/DQ model the INT8 calibration wrote")
        return int8_onnx, {"qdq_nodes": check_qdq(int8_onnx), "int8_onnx_sha256": file_sha256(int8_onnx)}
    return onnx_path, {}


def _serialize(trt: Any, source: Path, config: EngineConfig) -> bytes:
    """Parses `source` into a strongly typed network and builds it with the config's optimization profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(source.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {source}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    shapes = config.profile_shapes()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            raise ExportError(
                f"{source.name} has input {tensor.name!r}, which the model config does not name"
            )
        profile.set_shape(tensor.name, *shapes[tensor.name])
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {source} (see the log above)")
    return bytes(serialized)


def build_engine(
    onnx_path: Path,
    model_dir: Path,
    config: EngineConfig,
    *,
    int8_onnx: Path | None = None,
    parity_photos: Sequence[Path] = (),
    version: str = "1",
) -> dict[str, Any]:
    """Builds, checks and writes model_dir/<version>/model_sm<cc>.plan (+ .json) from an FP32 ONNX model.

    Takes the FP32 ONNX (the parity reference, and the FP16 source), the Triton model folder, the build
    settings (EngineConfig.from_model_config), the Q/DQ ONNX for int8, and photos for the parity check
    (without them it runs on a fixed random batch). Returns the build JSON. Raises TensorRTUnavailableError
    (no TensorRT / no CUDA GPU), ParityError (the engine missed its tolerance: no plan is left behind) or
    ExportError (bad settings, parse or build failure).
    """
    config.validate()
    if config.precision == "int8" and int8_onnx is None:
        raise ExportError("precision int8 needs --int8-onnx: the Q/DQ model the INT8 calibration wrote")
    trt = require_tensorrt()
    cc = compute_capability()
    inputs = parity_inputs(onnx_path, config, parity_photos)
    out_dir = model_dir / version
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / plan_filename(cc)
    with tempfile.TemporaryDirectory(prefix="piaa-engine-") as work:
        source, source_checks = network_source(onnx_path, config, Path(work), inputs, int8_onnx)
        plan.write_bytes(_serialize(trt, source, config))
    floor = INT8_MIN_COSINE if config.precision == "int8" else FP16_MIN_COSINE
    try:
        parity = compare(run_onnx(onnx_path, inputs), run_engine(plan, inputs), floor)
    except ParityError as err:
        plan.unlink()
        plan.with_suffix(".json").unlink(missing_ok=True)
        raise ParityError(f"{plan.name} ({config.precision}) vs {onnx_path.name}: {err}") from None
    info = {
        "tensorrt": trt.__version__,
        "compute_capability": cc,
        "plan": plan.name,
        "onnx": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "config": asdict(config),
        "source_checks": source_checks,
        "parity": {"inputs": "photos" if parity_photos else "random", **parity},
    }
    plan.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_engine(plan: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a serialized engine once on host arrays (same batch for every input); returns its outputs.

    Inputs go in with their own element type (the backbone's uint8 pixels, the heads' float32 features): the
    FP16 and INT8 networks keep the FP32 file's input types. Every output is float32.
    """
    trt = require_tensorrt()
    rt = _cudart()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT cannot load {plan}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    buffers: list[Any] = []
    outputs: dict[str, tuple[np.ndarray, Any]] = {}
    h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    try:
        for name, array in inputs.items():
            host = np.ascontiguousarray(array)
            context.set_input_shape(name, host.shape)
            device = _check(rt.cudaMalloc(host.nbytes))
            buffers.append(device)
            _check(rt.cudaMemcpy(device, host.ctypes.data, host.nbytes, h2d))
            context.set_tensor_address(name, int(device))
        for name in (n for n in names if n not in inputs):
            host = np.empty(tuple(context.get_tensor_shape(name)), dtype=np.float32)
            device = _check(rt.cudaMalloc(max(host.nbytes, 1)))
            buffers.append(device)
            context.set_tensor_address(name, int(device))
            outputs[name] = (host, device)
        stream = _check(rt.cudaStreamCreate())
        if not context.execute_async_v3(stream):
            raise ExportError(f"TensorRT failed to run {plan}")
        _check(rt.cudaStreamSynchronize(stream))
        for host, device in outputs.values():
            _check(rt.cudaMemcpy(host.ctypes.data, device, host.nbytes, d2h))
        _check(rt.cudaStreamDestroy(stream))
    finally:
        for device in buffers:
            rt.cudaFree(device)
    return {name: host for name, (host, _) in outputs.items()}
