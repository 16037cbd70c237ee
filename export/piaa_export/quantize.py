"""INT8 backbone: ONNX Runtime static Q/DQ quantization calibrated once on real photos, checked against FP32.

One calibration (activation ranges from real photos, kept as CALIBRATION_FILE) gives two encodings of the
same ranges next to backbone.onnx: BACKBONE_INT8_CPU_ONNX (unsigned activations with zero points, signed
per-channel weights: the form ONNX Runtime fuses into QLinearConv on x86) for the cpu profile, and
BACKBONE_INT8_ONNX (signed symmetric activations and weights) for TensorRT, which takes no other. ONNX
Runtime on x86 leaves the symmetric file's ReLU6 clips and depthwise convolutions in float, so it runs no
faster than FP32 there (docs/models.md). Both files are compared with the FP32 backbone on real photos under
the tolerances below; a file that misses them fails the build.
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from piaa_client.features import BACKBONE_FEATURE, BACKBONE_INPUT, BACKBONE_LOGITS, HEAD_OUTPUTS
from piaa_export.exceptions import DatasetError, ParityError
from piaa_export.sources import PACKAGE_DIR, file_sha256, files_sha256
from piaa_triton.paths import BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX, REPO_ROOT

FLOAT_CONVS_AFTER_STEM = 2
"""The first block's depthwise and projection convolutions stay in float: with 7-bit pointwise weights,
quantizing them cost 1.25 points of top-1 on the shared photos (0.876 vs 0.889 FP32; the projection alone
in float, 1.1 points); with both in float, 0.25 points."""
CALIBRATION_FILE = "backbone.int8.calibration.json"
"""ONNX Runtime's activation ranges (TensorsData JSON): the one calibration both INT8 files are made from."""
INT8_MANIFEST = "int8.json"
"""What the INT8 files were made from and how they compared with FP32: the up-to-date check reads it."""

CALIBRATION_PHOTOS = 96
"""Photos the ranges are collected on, spread evenly over the folder (MinMax: more photos, wider ranges)."""
CALIBRATION_BATCH = 8

SHARED_PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"
"""The labelled photos of the shared data folder (with labels.csv), used when present."""
SAMPLE_PHOTO_FILES = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "grass.png",
    "gravel.png", "brick.png",
)  # fmt: skip
"""scikit-image's bundled photographs (its synthetic test patterns and scans of text are left out): the demo
album's sources (piaa_personalization.demo.album) and the calibration set of a clone without the shared
photos."""
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Bar:
    """The accuracy an INT8 file must keep against the FP32 backbone on the same inputs."""

    top1_max_drop: float
    """ImageNet top-1 (labelled photos only) may fall by at most this much (0.01: one point)."""
    generic_min_spearman: float
    """Rank correlation of the generic score across the inputs."""
    attribute_min_spearman: float
    """Rank correlation of each of the 10 attributes across the inputs (the worst one counts)."""
    content_max_mean_abs_diff: float
    """Mean over inputs of the largest absolute difference among the 10 content probabilities."""
    feature_min_median_cosine: float
    """Median over inputs of the cosine between INT8 and FP32 pooled features."""


PHOTO_BAR = Bar(0.01, 0.98, 0.95, 0.03, 0.98)
"""On labelled real photos (the shared 800: measured 0.25 points, 0.995, 0.996, 0.014, 0.995)."""
SAMPLE_BAR = Bar(0.01, 0.95, 0.85, 0.10, 0.97)
"""On the bundled samples and their variants: microscopy, astronomy, darkened, greyed and blurred copies
whose head outputs spread less than real photos', so ranks swap more. The file calibrated on the shared
photos, which meets PHOTO_BAR there, measures 0.974, 0.895, 0.079, 0.988 on this set (docs/models.md)."""

_CODE_FILES = ("quantize.py",)


@dataclass(frozen=True)
class Int8Check:
    """How one INT8 file compared with FP32 on `photos` inputs (photos, or photos and their variants when
    the folder has no labels); top-1 fields are None without labels."""

    file: str
    photos: int
    top1_fp32: float | None
    top1_int8: float | None
    top1_heldout_fp32: float | None
    """On the labelled photos that were not among the calibration photos."""
    top1_heldout_int8: float | None
    generic_spearman: float
    attribute_spearman_min: float
    content_mean_max_abs_diff: float
    content_max_abs_diff: float
    feature_cosine_median: float
    feature_cosine_min: float

    def bar(self) -> Bar:
        """PHOTO_BAR when the inputs were labelled photos, else SAMPLE_BAR."""
        return SAMPLE_BAR if self.top1_int8 is None else PHOTO_BAR

    def failures(self) -> list[str]:
        """The tolerances of bar() this check misses, in words (empty: it passes)."""
        bar, bad = self.bar(), []
        drop = None if self.top1_fp32 is None or self.top1_int8 is None else self.top1_fp32 - self.top1_int8
        if drop is not None and drop > bar.top1_max_drop:
            bad.append(f"top-1 {self.top1_int8} vs FP32 {self.top1_fp32}")
        if self.generic_spearman < bar.generic_min_spearman:
            bad.append(f"generic Spearman {self.generic_spearman:.4f} < {bar.generic_min_spearman}")
        if self.attribute_spearman_min < bar.attribute_min_spearman:
            bad.append(f"attribute Spearman {self.attribute_spearman_min:.4f} < {bar.attribute_min_spearman}")
        if self.content_mean_max_abs_diff > bar.content_max_mean_abs_diff:
            bad.append(
                f"content |diff| {self.content_mean_max_abs_diff:.4f} > {bar.content_max_mean_abs_diff}"
            )
        if self.feature_cosine_median < bar.feature_min_median_cosine:
            bad.append(f"feature cosine {self.feature_cosine_median:.4f} < {bar.feature_min_median_cosine}")
        return bad


@dataclass(frozen=True)
class QuantizeResult:
    """What quantize_backbone did: whether it was already current, and the manifest it wrote or found."""

    out: Path
    up_to_date: bool
    manifest: dict[str, Any]


def default_photos() -> Path:
    """The shared labelled photos when present, else scikit-image's bundled sample photos' folder.

    Raises DatasetError when neither is there.
    """
    if (SHARED_PHOTOS / "labels.csv").is_file():
        return SHARED_PHOTOS
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("no photos to calibrate on: pass --photos DIR (scikit-image is not installed)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def list_photos(folder: Path) -> tuple[list[Path], dict[str, int]]:
    """A folder's photos and, when it has labels.csv, their ImageNet labels by file name.

    scikit-image's data folder gives its photographs only (SAMPLE_PHOTO_FILES). Raises DatasetError.
    """
    labels = folder / "labels.csv"
    if labels.is_file():
        # Read here rather than through verify.read_labelled_folder: that module imports torch, and the
        # up-to-date check of `make setup` must stay fast.
        with labels.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"file", "imagenet_index"} <= set(rows[0]):
            raise DatasetError(f"{labels} needs the columns file and imagenet_index")
        return [folder / r["file"] for r in rows], {r["file"]: int(r["imagenet_index"]) for r in rows}
    if all((folder / name).is_file() for name in SAMPLE_PHOTO_FILES):
        return [folder / name for name in SAMPLE_PHOTO_FILES], {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise DatasetError(f"no JPEG, PNG or WebP photos in {folder}")
    return files, {}


def calibration_subset(files: Sequence[Path], count: int = CALIBRATION_PHOTOS) -> list[Path]:
    """`count` photos spread evenly over `files` (all of them when there are fewer)."""
    if len(files) <= count:
        return list(files)
    step = len(files) / count
    return [files[int(i * step)] for i in range(count)]


def sources(fp32: Path, calibration: Sequence[Path], checked: Sequence[Path]) -> dict[str, Any]:
    """Fingerprints of everything the INT8 files and their check are made from."""
    return {
        "fp32_sha256": file_sha256(fp32),
        "calibration_photos_sha256": files_sha256(list(calibration)),
        "checked_photos_sha256": files_sha256(list(checked)),
        "code_sha256": files_sha256([PACKAGE_DIR / name for name in _CODE_FILES]),
        "onnxruntime": version("onnxruntime"),
    }


def is_up_to_date(out: Path, expected_sources: dict[str, Any]) -> bool:
    """True when out/ holds both INT8 files and a manifest naming these sources with the files' hashes."""
    manifest_path = out / INT8_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("sources") != expected_sources:
        return False
    outputs = manifest.get("outputs", {})
    for name in (BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX):
        path = out / name
        if not path.is_file() or outputs.get(name, {}).get("bytes") != path.stat().st_size:
            return False
    return True


def photo_inputs(files: Sequence[Path], variants: bool = False) -> np.ndarray:
    """Photos → the backbone's input batch through the serving decoder (piaa_triton.imaging).

    variants: each photo also mirrored, centre-cropped, darkened, desaturated, blurred and made more vivid
    (what the demo album does to the bundled samples), so a dozen photos give calibration ranges and rank
    correlations something to stand on.
    """
    from PIL import ImageEnhance, ImageFilter, ImageOps

    from piaa_triton.imaging import decode, to_tensor

    tensors = []
    for path in files:
        image = decode(path.read_bytes())
        versions = [image]
        if variants:
            width, height = image.size
            side = min(width, height)
            box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
            versions += [
                ImageOps.mirror(image),
                image.crop(box),
                ImageEnhance.Brightness(image).enhance(0.45),
                ImageEnhance.Color(image).enhance(0.0),
                image.filter(ImageFilter.GaussianBlur(radius=max(2, side // 80))),
                ImageEnhance.Color(image).enhance(1.6),
            ]
        tensors += [to_tensor(v if v.mode == "RGB" else v.convert("RGB")) for v in versions]
    return np.stack(tensors)


class _ArrayReader:
    """ONNX Runtime's CalibrationDataReader over a batch of inputs, CALIBRATION_BATCH at a time."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        return {BACKBONE_INPUT.name: batch}


def float_nodes(model_path: Path) -> list[str]:
    """The nodes kept in float: the uint8 input's normalization and the stem convolution that reads it, the
    FLOAT_CONVS_AFTER_STEM convolutions after it, and the ImageNet classifier.

    Quantizing the stem and the classifier cost 0.75-1 point of ImageNet top-1 on the shared photos and
    keeping them in float no measurable speed (docs/models.md); the classifier only feeds the logits, never
    the heads. The normalization (Cast, Sub, Div of the uint8 pixels) is exact in float; quantizing its output
    would only add a rounding.
    """
    import onnx

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)  # topologically sorted
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    stem, early = convs[0], convs[1 : 1 + FLOAT_CONVS_AFTER_STEM]
    return (
        [n.name for n in nodes[: stem + 1]]
        + [nodes[i].name for i in early]
        + [n.name for n in nodes if n.op_type == "Gemm"]
    )


def _depthwise_weights_from(model: Any, eight_bit: Any) -> None:
    """Puts the 8-bit depthwise weights and biases of `eight_bit` into `model` (quantized with 7-bit weights
    from the same calibration, so every other tensor and every name is the same).

    ONNX Runtime's U8S8 pointwise (GEMM) kernels on x86 without VNNI (AVX2 only) add u8·s8 pairs in
    saturating int16: with 8-bit weights large activations overflow, which cost 2.4 points of top-1 and a
    generic Spearman of 0.97 on an AVX2-only EPYC. 7-bit weights cannot overflow, so the cpu file's
    pointwise convolutions take 7 bits; its depthwise kernel accumulates in int32 and keeps 8 bits.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or next((a.i for a in node.attribute if a.name == "group"), 1) == 1:
            continue
        for tensor in node.input[1:3]:  # weight, bias: each the output of its DequantizeLinear
            dequantize = producer.get(tensor)
            if dequantize is not None and dequantize.op_type == "DequantizeLinear":
                names.update(dequantize.input)
    replacements = {init.name: init for init in eight_bit.graph.initializer if init.name in names}
    if not replacements:
        raise ParityError("found no quantized depthwise convolution to keep at 8 bits")
    for init in model.graph.initializer:
        if init.name in replacements:
            init.CopyFrom(replacements[init.name])


def _quantize(
    prepared: Path,
    out: Path,
    calibration: Path,
    reader: _ArrayReader | None,
    keep: list[str],
    *,
    cpu: bool,
    seven_bit_weights: bool = False,
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(out),
        reader,
        nodes_to_exclude=keep,
        quant_format=QuantFormat.QDQ,
        per_channel=True,  # Lite0's depthwise filters differ by orders of magnitude between channels
        activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        reduce_range=seven_bit_weights,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_cache_path=str(calibration),
        # TensorRT takes INT8 Q/DQ only: its file keeps float biases (ONNX Runtime's QLinearConv wants int32).
        extra_options={"ActivationSymmetric": not cpu, "WeightSymmetric": True, "QuantizeBias": cpu},
    )


def _quantize_cpu(
    prepared: Path, out: Path, calibration: Path, reader: _ArrayReader, keep: list[str]
) -> None:
    """The cpu file: 7-bit pointwise and 8-bit depthwise weights (see _depthwise_weights_from)."""
    import onnx

    eight_bit = out.with_suffix(".8bit.onnx")
    _quantize(prepared, eight_bit, calibration, reader, keep, cpu=True)  # calibrates: writes `calibration`
    _quantize(prepared, out, calibration, None, keep, cpu=True, seven_bit_weights=True)
    model = onnx.load(str(out))
    _depthwise_weights_from(model, onnx.load(str(eight_bit)))
    onnx.save(model, str(out))
    eight_bit.unlink()


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=0), axis=0).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each column of a with the same column of b ([N] or [N, K] → [K])."""
    ra, rb = _rank(a.reshape(len(a), -1)), _rank(b.reshape(len(b), -1))
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    return np.asarray((ra * rb).sum(axis=0) / np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0)))


def _outputs(
    backbone: Path, heads: Path, images: np.ndarray, fake_quant: bool = False
) -> dict[str, np.ndarray]:
    """Feature, logits and every head output for `images`, in batches of 16.

    fake_quant runs the backbone with ONNX Runtime's graph optimizations off: every Q/DQ pair runs as
    written around float operators, the arithmetic TensorRT's INT8 kernels compute (int32 sums), rather
    than the x86 kernels that fused Q/DQ would pick (int16 pair sums that saturate without VNNI).
    """
    from piaa_export.runtime import session

    bb, hd = session(backbone, optimize=not fake_quant), session(heads)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), 16):
        feature, logits = bb.run(
            [BACKBONE_FEATURE.name, BACKBONE_LOGITS.name], {BACKBONE_INPUT.name: images[start : start + 16]}
        )
        head = hd.run([o.name for o in HEAD_OUTPUTS], {BACKBONE_FEATURE.name: feature})
        for name, value in zip(
            [BACKBONE_FEATURE.name, BACKBONE_LOGITS.name, *(o.name for o in HEAD_OUTPUTS)],
            [feature, logits, *head],
            strict=True,
        ):
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def compare(
    name: str,
    fp32: dict[str, np.ndarray],
    int8: dict[str, np.ndarray],
    labels: np.ndarray | None,
    heldout: np.ndarray,
) -> Int8Check:
    """The INT8 outputs against the FP32 ones for the same photos (labels: ImageNet indices, or None)."""

    def top1(out: dict[str, np.ndarray], mask: np.ndarray) -> float | None:
        if labels is None or not mask.any():
            return None
        return float(np.mean(out[BACKBONE_LOGITS.name].argmax(axis=1)[mask] == labels[mask]))

    every = np.ones(len(heldout), dtype=bool)
    f, q = fp32[BACKBONE_FEATURE.name], int8[BACKBONE_FEATURE.name]
    cosine = (f * q).sum(axis=1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1) + 1e-12)
    content = np.abs(fp32["content"] - int8["content"]).max(axis=1)
    return Int8Check(
        file=name,
        photos=len(f),
        top1_fp32=top1(fp32, every),
        top1_int8=top1(int8, every),
        top1_heldout_fp32=top1(fp32, heldout),
        top1_heldout_int8=top1(int8, heldout),
        generic_spearman=round(float(spearman(fp32["generic"], int8["generic"])[0]), 4),
        attribute_spearman_min=round(float(spearman(fp32["attributes"], int8["attributes"]).min()), 4),
        content_mean_max_abs_diff=round(float(content.mean()), 4),
        content_max_abs_diff=round(float(content.max()), 4),
        feature_cosine_median=round(float(np.median(cosine)), 4),
        feature_cosine_min=round(float(cosine.min()), 4),
    )


def quantize_backbone(
    onnx_dir: Path, photos: Path | None = None, force: bool = False, progress: bool = False
) -> QuantizeResult:
    """Writes both INT8 backbones next to onnx_dir/backbone.onnx, checks them, writes INT8_MANIFEST.

    Takes the folder holding backbone.onnx and heads.onnx, the photo folder to calibrate and check on
    (default: default_photos()), and force (redo even when current). Returns what was done.
    Raises DatasetError (no photos), ParityError (an INT8 file misses a tolerance; its file is removed).
    """
    fp32 = onnx_dir / "backbone.onnx"
    folder = photos or default_photos()
    files, by_name = list_photos(folder)
    calibration = calibration_subset(files)
    expected = sources(fp32, calibration, files)
    if not force and is_up_to_date(onnx_dir, expected):
        return QuantizeResult(onnx_dir, True, json.loads((onnx_dir / INT8_MANIFEST).read_text()))

    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    variants = not by_name  # an unlabelled folder is the dozen bundled samples, or the user's own few
    (onnx_dir / INT8_MANIFEST).unlink(missing_ok=True)
    cache = onnx_dir / CALIBRATION_FILE
    cache.unlink(missing_ok=True)  # a new calibration whenever anything it came from changed
    with tempfile.TemporaryDirectory(prefix="piaa-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Folds the exporter's shape arithmetic (dynamic 'same' padding) so every Conv gets its Q/DQ pair.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        keep = float_nodes(prepared)
        reader = _ArrayReader(photo_inputs(calibration, variants))
        _quantize_cpu(prepared, onnx_dir / BACKBONE_INT8_CPU_ONNX, cache, reader, keep)
        _quantize(prepared, onnx_dir / BACKBONE_INT8_ONNX, cache, None, keep, cpu=False)
    calibrated_s = time.perf_counter() - started
    if progress:
        print(f"calibrated on {len(calibration)} photos from {folder} in {calibrated_s:.0f} s", flush=True)

    images = photo_inputs(files, variants)
    labels = np.array([by_name[p.name] for p in files]) if by_name else None
    chosen = {p.name for p in calibration}
    heldout = np.repeat([p.name not in chosen for p in files], len(images) // len(files))
    heads = onnx_dir / "heads.onnx"
    reference = _outputs(fp32, heads, images)
    checks = []
    for name in (BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX):
        outputs = _outputs(onnx_dir / name, heads, images, fake_quant=name == BACKBONE_INT8_ONNX)
        check = compare(name, reference, outputs, labels, heldout)
        checks.append(check)
        if check.failures():
            (onnx_dir / name).unlink(missing_ok=True)
            raise ParityError(f"{name} misses the INT8 tolerances on {len(files)} photos: {check.failures()}")
    manifest = {
        "sources": expected,
        "photos": str(folder),
        "calibration_photos": len(calibration),
        "calibration": {"method": "MinMax", "per_channel": True, "format": "QDQ", "float_nodes": keep},
        "weights": {
            BACKBONE_INT8_CPU_ONNX: "7-bit pointwise, 8-bit depthwise",
            BACKBONE_INT8_ONNX: "8-bit, checked unfused (TensorRT's arithmetic)",
        },
        "outputs": {
            name: {"sha256": file_sha256(onnx_dir / name), "bytes": (onnx_dir / name).stat().st_size}
            for name in (BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX)
        },
        "bar": asdict(checks[0].bar()),
        "checks": [asdict(c) for c in checks],
        "seconds": round(time.perf_counter() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (onnx_dir / INT8_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return QuantizeResult(onnx_dir, False, manifest)
