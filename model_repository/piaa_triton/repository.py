"""The model repository, from ONE description, for two profiles: `cpu` (here) and `gpu` (NGC container).

`python -m piaa_triton.repository --profile cpu|gpu [--out DIR]` writes build/model_repository/<profile>/.
Both profiles share the tensors, the ensemble graph and the batching policy below; they differ only in how
each model runs (Python backend + ONNX Runtime on KIND_CPU, or TensorRT / DALI on KIND_GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piaa_client import features as fs
from piaa_triton.config import (
    DataType,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    Kind,
    ModelConfig,
    QueuePolicy,
    Tensor,
)
from piaa_triton.cpu_plan import (
    CPU_LAYOUTS,
    CPU_PRECISIONS,
    DEFAULT_CPU_LAYOUT,
    DEFAULT_CPU_PRECISION,
    LAYOUT_ENV,
    PRECISION_ENV,
    CpuPlan,
    backbone_onnx,
    cpu_layout,
    cpu_plan,
    cpu_precision,
)
from piaa_triton.exceptions import RepositoryError
from piaa_triton.paths import (
    MODEL_SOURCES,
    onnx_dir,
    plan_filename,
    repository_dir,
)

PROFILES = ("cpu", "gpu")
ENSEMBLE = "piaa"
"""The ensemble's name: what the gateway calls."""
BACKBONE_ENSEMBLE = f"{ENSEMBLE}_backbone"
"""The ensemble bytes → preprocess → backbone feature: what the gateway keeps for rated images (a heads-only
upgrade re-scores it). Separate from `piaa` because Triton's ensemble scheduler deadlocks on an ensemble
output that also feeds a later step when a request does not ask for it."""
FUSED_HEADS_FILE = "heads.onnx"
"""The heads ONNX the cpu profile's fused_heads backbone runs, in its version folder next to model.onnx."""
FEATURE_SPACE_PARAMETER = "feature_space_version"
"""The config parameter of the heads and the ensemble naming the feature space they serve (read from the
heads ONNX's metadata); the gateway reads it from Triton's model config."""
HEADS_MODEL_PARAMETER = "heads_model"
"""The ensemble's config parameter naming its heads model, which the gateway runs on stored backbone
features (a heads-only upgrade re-scores them); named, because in the fused_heads layout no step of `piaa`
runs that model."""

# --- the tensors, from the feature-space spec (names, dims and element types) -----------------------
_TRITON_TYPES = {"float32": DataType.FP32, "float16": DataType.FP16, "uint8": DataType.UINT8}


def _tensor(output: fs.Output) -> Tensor:
    return Tensor(output.name, _TRITON_TYPES[output.dtype], output.dims)


IMAGE_BYTES = Tensor(fs.ENSEMBLE_INPUT.name, DataType.STRING, fs.ENSEMBLE_INPUT.dims)
IMAGE = _tensor(fs.BACKBONE_INPUT)
FEATURE = _tensor(fs.BACKBONE_FEATURE)
LOGITS = _tensor(fs.BACKBONE_LOGITS)
HEAD_OUTPUTS = tuple(_tensor(o) for o in fs.HEAD_OUTPUTS)


# --- batching: the numbers and why (measured; see docs/triton.md) ------------------------------------
@dataclass(frozen=True)
class BatchingPolicy:
    """One profile's dynamic-batching numbers."""

    max_batch_size: int
    """Largest batch a model runs; the ensemble takes requests of up to this many images."""
    max_queue_delay_us: int
    """How long the batcher holds a request to gather more."""
    max_queue_size: int
    """Queued requests beyond this are rejected at once (shed, not buffered)."""
    queue_timeout_us: int
    """A request that waited this long in a queue is rejected rather than served late."""


# Measured on 2 cores (docs/triton.md): ONNX Runtime's backbone throughput is flat from batch 1 to 32
# (134-161 img/s), and the batcher's delay made no difference under load (0 / 2 / 10 ms: 33.6 / 30.8 /
# 32.5 img/s through the ensemble, within noise), because a loaded queue fills batches by itself. So the
# delay is kept to 1 ms (enough for a burst of concurrent requests to coalesce, <1% of a request's latency)
# and the cap to 16 (2.4 MB of uint8 pixels per backbone batch). A GPU gains from large batches, so it
# waits a little longer for fuller ones.
CPU_BATCHING = BatchingPolicy(max_batch_size=16, max_queue_delay_us=1_000, max_queue_size=64,
                              queue_timeout_us=2_000_000)  # fmt: skip
GPU_BATCHING = BatchingPolicy(max_batch_size=64, max_queue_delay_us=5_000, max_queue_size=512,
                              queue_timeout_us=1_000_000)  # fmt: skip


def dynamic_batching(policy: BatchingPolicy) -> DynamicBatching:
    """The batcher block every batched model of a profile gets."""
    return DynamicBatching(
        max_queue_delay_us=policy.max_queue_delay_us,
        queue=QueuePolicy(max_queue_size=policy.max_queue_size, timeout_us=policy.queue_timeout_us),
    )


# --- the description ---------------------------------------------------------------------------------
def feature_steps(fused: bool = False) -> tuple[EnsembleStep, ...]:
    """The ensemble steps from image bytes to the feature: preprocess → backbone, or the fused backbone."""
    if fused:
        return (EnsembleStep("backbone", {IMAGE_BYTES.name: IMAGE_BYTES.name}, {FEATURE.name: FEATURE.name}),)
    return (
        EnsembleStep("preprocess", {IMAGE_BYTES.name: IMAGE_BYTES.name}, {IMAGE.name: "preprocessed"}),
        EnsembleStep("backbone", {IMAGE.name: "preprocessed"}, {FEATURE.name: FEATURE.name}),
    )


def heads_step(heads: str = "heads") -> EnsembleStep:
    """The ensemble step feature → the head outputs, on model `heads`."""
    return EnsembleStep(heads, {FEATURE.name: FEATURE.name}, {t.name: t.name for t in HEAD_OUTPUTS})


def ensemble(
    policy: BatchingPolicy,
    feature_space: str = fs.FEATURE_SPACE_VERSION,
    *,
    fused: bool = False,
    heads_in_backbone: bool = False,
) -> ModelConfig:
    """The `piaa` ensemble: bytes → preprocess → backbone → heads (`fused`: bytes → backbone → heads;
    `heads_in_backbone`: one step, the fused backbone returning the head outputs itself); the same inputs
    and outputs in both profiles and every layout."""
    heads_outputs = {t.name: t.name for t in HEAD_OUTPUTS}
    steps = (
        (EnsembleStep("backbone", {IMAGE_BYTES.name: IMAGE_BYTES.name}, heads_outputs),)
        if heads_in_backbone
        else (*feature_steps(fused), heads_step())
    )
    return ModelConfig(
        name=ENSEMBLE,
        platform="ensemble",
        max_batch_size=policy.max_batch_size,
        inputs=(IMAGE_BYTES,),
        outputs=HEAD_OUTPUTS,
        parameters={FEATURE_SPACE_PARAMETER: feature_space, HEADS_MODEL_PARAMETER: "heads"},
        ensemble_steps=steps,
    )


def backbone_ensemble(policy: BatchingPolicy, *, fused: bool = False) -> ModelConfig:
    """The `piaa_backbone` ensemble: bytes → preprocess → backbone (or the fused backbone), returning the
    pooled feature."""
    return ModelConfig(
        name=BACKBONE_ENSEMBLE,
        platform="ensemble",
        max_batch_size=policy.max_batch_size,
        inputs=(IMAGE_BYTES,),
        outputs=(FEATURE,),
        ensemble_steps=feature_steps(fused),
    )


def feature_space_of(heads_onnx: Path) -> str:
    """The feature space a heads ONNX file was exported for (its `feature_space_version` metadata).

    Raises RepositoryError when the file has none or an unusable one.
    """
    import onnx  # only the repository writer needs it, not the Triton image's models

    model = onnx.load(str(heads_onnx), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    space = props.get(FEATURE_SPACE_PARAMETER, "")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", space):
        raise RepositoryError(f"{heads_onnx} names no usable feature space in its metadata ({space!r})")
    return space


CONTENT_NAMES_PARAMETER = "content_names"
"""Heads metadata and model-config parameter: the content columns' names, a JSON list (the gateway's
core/spaces.py explains profiles with them; absent: the layout's k-means cluster names)."""


def with_content_names(
    models: Sequence[ModelConfig], heads_onnx: Path, heads: str, pipeline: str
) -> tuple[ModelConfig, ...]:
    """`models` with the `heads` model's and `pipeline` ensemble's configs naming the content columns as
    heads_onnx's metadata does (unchanged when it names none)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(heads_onnx), load_external_data=False).metadata_props}
    if CONTENT_NAMES_PARAMETER not in props:
        return tuple(models)
    named = {CONTENT_NAMES_PARAMETER: props[CONTENT_NAMES_PARAMETER]}
    return tuple(
        dataclasses.replace(m, parameters={**m.parameters, **named}) if m.name in (heads, pipeline) else m
        for m in models
    )


def side_by_side(models: Sequence[ModelConfig], feature_space: str) -> tuple[ModelConfig, ModelConfig]:
    """A second heads model and ensemble for `feature_space`, next to the ones in `models` (same backend,
    batching and preprocess/backbone): `heads_<fs>` and `piaa_<fs>`, for a rollout (docs/operations.md).
    `piaa_<fs>` takes `piaa_backbone`'s steps to the feature, then `heads_<fs>`."""
    by_name = {m.name: m for m in models}
    heads_name, ensemble_name = f"heads_{feature_space}", f"{ENSEMBLE}_{feature_space}"
    base = by_name["heads"]
    heads = dataclasses.replace(
        base, name=heads_name, parameters={**base.parameters, FEATURE_SPACE_PARAMETER: feature_space}
    )
    served = by_name[ENSEMBLE]
    pipeline = dataclasses.replace(
        served,
        name=ensemble_name,
        parameters={
            **served.parameters,
            FEATURE_SPACE_PARAMETER: feature_space,
            HEADS_MODEL_PARAMETER: heads_name,
        },
        ensemble_steps=(*by_name[BACKBONE_ENSEMBLE].ensemble_steps, heads_step(heads_name)),
    )
    return heads, pipeline


def cpu_models(
    plan: CpuPlan,
    policy: BatchingPolicy = CPU_BATCHING,
    feature_space: str = fs.FEATURE_SPACE_VERSION,
    *,
    precision: str = DEFAULT_CPU_PRECISION,
    layout: str = DEFAULT_CPU_LAYOUT,
) -> tuple[ModelConfig, ...]:
    """The cpu profile: Python backend models on KIND_CPU, ONNX Runtime inside; the backbone's config
    names its `precision` (the file behind it is chosen by write_repository). `layout` fused: the backbone
    takes the image bytes and decodes them itself; fused_heads: and runs the heads too; split: a preprocess
    model decodes (CPU_LAYOUTS)."""
    batching = dynamic_batching(policy)

    def onnx(name: str, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...], count: int, threads: int):
        return ModelConfig(
            name=name,
            backend="python",
            max_batch_size=policy.max_batch_size,
            inputs=inputs,
            outputs=outputs,
            instance_groups=(InstanceGroup(count, Kind.CPU),),
            dynamic_batching=batching,
            parameters={"onnx_file": "model.onnx", "intra_op_threads": str(threads), "inter_op_threads": "1"},
        )

    heads = onnx("heads", (FEATURE,), HEAD_OUTPUTS, 1, plan.heads_intra_op_threads)
    backbone = onnx(
        "backbone", (IMAGE,), (FEATURE, LOGITS), plan.backbone_instances, plan.backbone_intra_op_threads
    )
    backbone = dataclasses.replace(backbone, parameters={**backbone.parameters, "precision": precision})
    space = {FEATURE_SPACE_PARAMETER: feature_space}
    heads = dataclasses.replace(heads, parameters={**heads.parameters, **space})
    if layout in ("fused", "fused_heads"):
        with_heads = layout == "fused_heads"
        outputs = (FEATURE, LOGITS, *HEAD_OUTPUTS) if with_heads else (FEATURE, LOGITS)
        fused = onnx("backbone", (IMAGE_BYTES,), outputs, plan.fused_instances, plan.fused_intra_op_threads)
        decoding = {"precision": precision, "decode_threads": str(plan.fused_decode_threads)}
        if with_heads:
            # The same file as heads/1/model.onnx (write_repository copies it); `heads` stays a model of
            # its own for the side-by-side spaces and for re-scoring stored features.
            decoding |= {
                "heads_onnx_file": FUSED_HEADS_FILE,
                "heads_intra_op_threads": str(plan.heads_intra_op_threads),
            }
        fused = dataclasses.replace(fused, parameters={**fused.parameters, **decoding})
        return (
            fused,
            heads,
            ensemble(policy, feature_space, fused=True, heads_in_backbone=with_heads),
            backbone_ensemble(policy, fused=True),
        )
    return (
        ModelConfig(
            name="preprocess",
            backend="python",
            max_batch_size=policy.max_batch_size,
            inputs=(IMAGE_BYTES,),
            outputs=(IMAGE,),
            instance_groups=(InstanceGroup(plan.preprocess_instances, Kind.CPU),),
            dynamic_batching=batching,
            parameters={"decode_threads": str(plan.decode_threads)},
        ),
        backbone,
        heads,
        ensemble(policy, feature_space),
        backbone_ensemble(policy),
    )


GPU_PRECISION = {"backbone": "fp16", "heads": "fp16"}
"""Each engine's precision, written into its config (parameter `precision`) for the engine build to read:
fp16 = the ONNX converted to FP16 with FP32 inputs and outputs; int8 = the Q/DQ backbone
(paths.BACKBONE_INT8_ONNX)."""
GPU_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "9.0")
"""GPU kinds the gpu profile names a plan for: T4, A100, A10/A40, L4/L40S, H100/H200."""
DEFAULT_PLAN = "model.plan"
"""The plan Triton loads on a GPU kind not listed (deploy/triton/launch.py links it to the one built)."""


def gpu_models(
    policy: BatchingPolicy = GPU_BATCHING, feature_space: str = fs.FEATURE_SPACE_VERSION
) -> tuple[ModelConfig, ...]:
    """The gpu profile: preprocess with DALI's nvJPEG decoder and TensorRT engines, all on KIND_GPU.

    The engines are built inside the NGC container on the GPU that serves them, one plan per compute
    capability (model_sm<cc>.plan); cc_model_filenames lets one repository carry plans for several GPU
    kinds, and model.plan is the fallback for any other. Each engine folder gets a BUILD.md saying how.
    """
    batching = dynamic_batching(policy)
    gpu = (InstanceGroup(1, Kind.GPU),)
    engine_files: dict[str, Any] = {
        "default_model_filename": DEFAULT_PLAN,
        "cc_model_filenames": {cc: plan_filename(cc) for cc in GPU_COMPUTE_CAPABILITIES},
    }
    return (
        # The DALI backend takes only UINT8 [-1] inputs, not the BYTES [1] the ensemble's contract fixes, so
        # the preprocess is a Python model on the GPU that runs a DALI pipeline (nvJPEG) in-process.
        ModelConfig(
            name="preprocess",
            backend="python",
            max_batch_size=policy.max_batch_size,
            inputs=(IMAGE_BYTES,),
            outputs=(IMAGE,),
            instance_groups=gpu,
            dynamic_batching=batching,
            parameters={"decoder": "dali_nvjpeg", "decode_threads": "4"},
        ),
        ModelConfig(
            name="backbone",
            platform="tensorrt_plan",
            max_batch_size=policy.max_batch_size,
            inputs=(IMAGE,),
            outputs=(FEATURE, LOGITS),
            instance_groups=gpu,
            dynamic_batching=batching,
            parameters={"precision": GPU_PRECISION["backbone"]},
            **engine_files,
        ),
        ModelConfig(
            name="heads",
            platform="tensorrt_plan",
            max_batch_size=policy.max_batch_size,
            inputs=(FEATURE,),
            outputs=HEAD_OUTPUTS,
            instance_groups=gpu,
            dynamic_batching=batching,
            parameters={"precision": GPU_PRECISION["heads"], FEATURE_SPACE_PARAMETER: feature_space},
            **engine_files,
        ),
        ensemble(policy, feature_space),
        backbone_ensemble(policy),
    )


def default_policy(profile: str) -> BatchingPolicy:
    return GPU_BATCHING if profile == "gpu" else CPU_BATCHING


def describe(
    profile: str,
    cores: int | None = None,
    policy: BatchingPolicy | None = None,
    feature_space: str = fs.FEATURE_SPACE_VERSION,
    *,
    precision: str | None = None,
    layout: str | None = None,
) -> tuple[ModelConfig, ...]:
    """The model configs of a profile (policy: override its batching, for measurements), serving the
    heads' `feature_space`, the cpu backbone at `precision` (cpu_precision's default when None) in
    `layout` (cpu_layout's default when None; the gpu profile has one layout).
    Raises RepositoryError for an unknown profile, precision or layout.
    """
    policy = policy or default_policy(profile)
    if profile == "cpu":
        plan = cpu_plan(cores or os.cpu_count() or 1)
        chosen = cpu_layout(layout)
        return cpu_models(plan, policy, feature_space, precision=cpu_precision(precision), layout=chosen)
    if profile == "gpu":
        return gpu_models(policy, feature_space)
    raise RepositoryError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")


# --- writing the folders -----------------------------------------------------------------------------
def _engine_note(name: str, policy: BatchingPolicy) -> str:
    """BUILD.md for a TensorRT model folder of the gpu profile: the plans are built in the container."""
    plans = ", ".join(f"{cc} → {plan_filename(cc)}" for cc in GPU_COMPUTE_CAPABILITIES)
    return (
        f"# {name}: TensorRT plans go here, one per GPU kind\n\n"
        "Build inside the Triton image (deploy/triton.Dockerfile), on the GPU that serves it (engines are\n"
        "tied to the TensorRT version and the GPU):\n\n"
        "    python3 /opt/piaa/launch.py prepare --profile gpu --out <repository> --engines\n\n"
        "or for this model alone\n\n"
        f"    python3 -m piaa_export.cli engines /opt/piaa/onnx/{name}.onnx <repository>/{name}\n\n"
        f"The batch range (1..{policy.max_batch_size}), the input shapes and the precision "
        f"({GPU_PRECISION[name.partition('_')[0]]}) come from\n"
        "config.pbtxt; the engine is compared with the FP32 ONNX on the GPU before it is kept. It writes\n"
        f"1/model_sm<cc>.plan and its build JSON. config.pbtxt maps compute capabilities to plans\n"
        f"({plans}); any other GPU loads 1/{DEFAULT_PLAN}, which deploy/triton/launch.py links to the plan\n"
        "it built.\n"
    )


def _sync_file(target: Path, text: str | None = None, source: Path | None = None) -> bool:
    """Writes text or copies source to target unless it already holds the same. True when it changed."""
    if text is not None:
        if target.is_file() and target.read_text() == text:
            return False
        target.write_text(text)
        return True
    assert source is not None
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    shutil.copyfile(source, target)
    return True


def write_repository(
    profile: str,
    out: Path | None = None,
    onnx: Path | None = None,
    cores: int | None = None,
    policy: BatchingPolicy | None = None,
    *,
    extra_heads: Sequence[Path] = (),
    precision: str | None = None,
    layout: str | None = None,
) -> list[Path]:
    """Writes (or refreshes) a profile's model repository; returns the files it changed (empty: up to date).

    Takes the profile, the output folder (default build/model_repository/<profile>), the folder holding
    backbone.onnx / heads.onnx (default build/onnx), the core count (default: this machine's), a
    batching policy overriding the profile's (for measurements), and heads ONNX files of further feature
    spaces to serve side by side (`heads_<fs>` + `piaa_<fs>` each; the space from each file's metadata).
    The served feature space is the one heads.onnx names in its metadata. The cpu backbone is served at
    `precision` (cpu_precision: argument, else $PIAA_CPU_PRECISION, else int8) in `layout` (cpu_layout:
    argument, else $PIAA_CPU_LAYOUT, else fused).
    Raises RepositoryError when the cpu profile's ONNX files are missing, or two heads name one space.
    """
    policy = policy or default_policy(profile)
    out = out or repository_dir(profile)
    onnx = onnx or onnx_dir()
    precision = cpu_precision(precision) if profile == "cpu" else None
    layout = cpu_layout(layout) if profile == "cpu" else None
    if precision is not None:
        wanted = [backbone_onnx(onnx, precision), onnx / "heads.onnx"]
        missing = [str(p) for p in wanted if not p.is_file()]
        if missing:
            step = "build` and `quantize" if precision == "int8" else "build"
            raise RepositoryError(
                f"missing {', '.join(missing)}: run `python -m piaa_export.cli {step}` first"
            )
    heads_onnx = onnx / "heads.onnx"
    space = feature_space_of(heads_onnx) if heads_onnx.is_file() else fs.FEATURE_SPACE_VERSION
    models = describe(profile, cores, policy, space, precision=precision, layout=layout)
    extra_files: dict[str, Path] = {}
    for path in extra_heads:
        extra = feature_space_of(path)
        if extra == space or f"heads_{extra}" in extra_files:
            raise RepositoryError(f"{path}: feature space {extra!r} is served already")
        extra_files[f"heads_{extra}"] = path
        models = (*models, *side_by_side(models, extra))
        models = with_content_names(models, path, f"heads_{extra}", f"{ENSEMBLE}_{extra}")
    if heads_onnx.is_file():  # after the side-by-side copies, which must not inherit these names
        models = with_content_names(models, heads_onnx, "heads", ENSEMBLE)
    changed: list[Path] = []
    names = {m.name for m in models}
    if out.is_dir():  # drop folders of models no longer described (only ones this generator wrote)
        for stale in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in names):
            if (stale / "config.pbtxt").is_file() and (stale / "config.pbtxt").read_text().startswith(
                "# Generated"
            ):
                shutil.rmtree(stale)
                changed.append(stale)
    for model in models:
        version = out / model.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        files: dict[str, tuple[str | None, Path | None]] = {"../config.pbtxt": (model.to_pbtxt(), None)}
        if model.backend == "python":
            source = "model_gpu.py" if profile == "gpu" else "model.py"
            if layout in ("fused", "fused_heads") and model.name == "backbone":
                source = "model_fused.py"
            files["model.py"] = (None, MODEL_SOURCES / model.name / source)
        if precision is not None and model.name == "backbone":
            files["model.onnx"] = (None, backbone_onnx(onnx, precision))
            if "heads_onnx_file" in model.parameters:
                files[FUSED_HEADS_FILE] = (None, onnx / "heads.onnx")
            elif (version / FUSED_HEADS_FILE).is_file():  # left by fused_heads; this layout serves none
                (version / FUSED_HEADS_FILE).unlink()
                changed.append(version / FUSED_HEADS_FILE)
        if precision is not None and model.name == "heads":
            files["model.onnx"] = (None, onnx / "heads.onnx")
        if model.name in extra_files:
            if model.backend == "python":
                files["model.py"] = (None, MODEL_SOURCES / "heads" / "model.py")
            if profile == "cpu":
                files["model.onnx"] = (None, extra_files[model.name])
        if model.platform == "tensorrt_plan":
            files["BUILD.md"] = (_engine_note(model.name, policy), None)
        for rel, (text, source_path) in files.items():
            target = (version / rel).resolve()
            if _sync_file(target, text, source_path):
                changed.append(target)
    return changed


def main(argv: list[str] | None = None) -> int:
    """CLI: writes one profile's repository and says what changed."""
    parser = argparse.ArgumentParser(prog="python -m piaa_triton.repository", description=__doc__)
    parser.add_argument("--profile", choices=PROFILES, required=True)
    parser.add_argument("--out", type=Path, default=None, help="default build/model_repository/<profile>")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="default build/onnx")
    parser.add_argument(
        "--cores", type=int, default=None, help="plan for this many cores (default: this machine)"
    )
    parser.add_argument(
        "--extra-heads",
        type=Path,
        action="append",
        default=[],
        help="heads ONNX of another feature space, served side by side (heads_<fs>, piaa_<fs>); repeatable",
    )
    parser.add_argument(
        "--precision",
        choices=CPU_PRECISIONS,
        default=None,
        help=f"cpu profile backbone (default ${PRECISION_ENV}, else {DEFAULT_CPU_PRECISION})",
    )
    parser.add_argument(
        "--layout",
        choices=CPU_LAYOUTS,
        default=None,
        help=f"cpu profile: decode inside the backbone, also with the heads there (fused_heads), or in a "
        f"preprocess model (default ${LAYOUT_ENV}, else {DEFAULT_CPU_LAYOUT})",
    )
    args = parser.parse_args(argv)
    out = args.out or repository_dir(args.profile)
    try:
        changed = write_repository(
            args.profile,
            out,
            args.onnx_dir,
            args.cores,
            extra_heads=args.extra_heads,
            precision=args.precision,
            layout=args.layout,
        )
    except RepositoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(changed)} file(s) under {out}" if changed else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
