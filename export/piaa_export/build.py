"""The build step `make setup` runs: export both ONNX models, check them against torch, write a manifest.

Idempotent: when build/onnx/manifest.json names the same sources (backbone weights, committed heads, the
exporter's code, the library versions) and the outputs are newer than those sources, nothing is redone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from piaa_client.features import BACKBONE_FEATURE, BACKBONE_INPUT, FEATURE_SPACE_VERSION
from piaa_export.exceptions import WeightsError
from piaa_export.sources import (
    HEADS_FILE,
    MANIFEST_FILE,
    PACKAGE_DIR,
    backbone_weights_path,
    file_sha256,
    files_sha256,
)

DEFAULT_OUT = Path("build/onnx")
BACKBONE_ONNX = "backbone.onnx"
HEADS_ONNX = "heads.onnx"
BUILD_MANIFEST = "manifest.json"

# The exporter's own code: a change here changes what is written, so it invalidates the build.
_CODE_FILES = ("backbone.py", "heads.py", "torch2onnx.py", "build.py", "verify.py", "runtime.py")


@dataclass(frozen=True)
class BuildResult:
    """What build() did: the output folder, whether it was already current, and the parity found."""

    out: Path
    up_to_date: bool
    manifest: dict[str, Any]


def code_fingerprint() -> str:
    """sha256 over the exporter's source files that shape the ONNX outputs."""
    return files_sha256([PACKAGE_DIR / name for name in _CODE_FILES])


def source_fingerprints(heads_file: Path = HEADS_FILE) -> dict[str, str]:
    """Fingerprints of everything the ONNX files are made from."""
    return {
        "backbone_weights_sha256": file_sha256(backbone_weights_path()),
        "heads_sha256": file_sha256(heads_file),
        "code_sha256": code_fingerprint(),
        "feature_space_version": FEATURE_SPACE_VERSION,
        "torch": version("torch"),
        "onnx": version("onnx"),
    }


def _source_paths(heads_file: Path) -> list[Path]:
    return [heads_file, *(PACKAGE_DIR / name for name in _CODE_FILES)]


def is_up_to_date(out: Path, heads_file: Path = HEADS_FILE) -> bool:
    """True when out/ holds both models and a manifest naming the current sources, newer than them."""
    outputs = [out / BACKBONE_ONNX, out / HEADS_ONNX, out / BUILD_MANIFEST]
    if not all(p.exists() for p in outputs):
        return False
    try:
        manifest = json.loads((out / BUILD_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("sources") != source_fingerprints(heads_file):
        return False
    oldest_output = min(p.stat().st_mtime for p in outputs)
    return oldest_output >= max(p.stat().st_mtime for p in _source_paths(heads_file))


def check_heads_manifest(manifest_file: Path = MANIFEST_FILE) -> dict[str, Any]:
    """The committed heads' manifest; raises WeightsError when it was trained for another feature space."""
    if not manifest_file.exists():
        raise WeightsError(f"{manifest_file} is missing: the committed heads need their manifest")
    manifest: dict[str, Any] = json.loads(manifest_file.read_text())
    if manifest.get("feature_space_version") != FEATURE_SPACE_VERSION:
        raise WeightsError(
            f"committed heads are for feature space {manifest.get('feature_space_version')!r}, "
            f"piaa_client.features says {FEATURE_SPACE_VERSION!r}: retrain (`piaa_export.cli train`)"
        )
    return manifest


def build(
    out: Path = DEFAULT_OUT,
    photos: Path | None = None,
    force: bool = False,
    heads_file: Path = HEADS_FILE,
    manifest_file: Path = MANIFEST_FILE,
) -> BuildResult:
    """Exports backbone.onnx and heads.onnx into `out`, checks each against torch, writes manifest.json.

    photos: a folder of photos to check parity on (labels.csv optional); without it, generated images.
    Raises WeightsError (missing/mismatched weights) or ParityError (ONNX disagrees with torch).
    """
    if not force and is_up_to_date(out, heads_file):
        return BuildResult(out, True, json.loads((out / BUILD_MANIFEST).read_text()))
    heads_manifest = check_heads_manifest(manifest_file)
    # Imported here, not at the top: the up-to-date check above must not pay for importing torch.
    import numpy as np

    from piaa_export import torch2onnx, verify
    from piaa_export.backbone import load_backbone
    from piaa_export.heads import Heads, HeadWeights
    from piaa_export.runtime import session

    backbone = load_backbone()
    heads = Heads(HeadWeights.load(heads_file))
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MANIFEST).unlink(missing_ok=True)  # no stale manifest may vouch for half-written models
    torch2onnx.export_backbone(backbone, out / BACKBONE_ONNX)
    torch2onnx.export_heads(heads, out / HEADS_ONNX)

    if photos is not None:
        files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        images = verify.photo_tensors(files[: verify.PARITY_PHOTOS])
        checked_on = f"{len(images)} photos from {photos}"
    else:
        images = verify.generated_images(verify.PARITY_PHOTOS // 2)
        checked_on = f"{len(images)} generated images"
    backbone_report = verify.backbone_parity(backbone, out / BACKBONE_ONNX, images).raise_for_failure()
    (features,) = session(out / BACKBONE_ONNX).run([BACKBONE_FEATURE.name], {BACKBONE_INPUT.name: images})
    # Real features plus scaled ones: the heads must hold their tolerance beyond the photos' range too.
    rng = np.random.default_rng(0)
    probe = np.concatenate([features, features * rng.uniform(0.5, 2.0, size=(len(features), 1))])
    heads_report = verify.heads_parity(heads, out / HEADS_ONNX, probe.astype(np.float32)).raise_for_failure()

    manifest = {
        "feature_space_version": FEATURE_SPACE_VERSION,
        "opset": torch2onnx.OPSET,
        "sources": source_fingerprints(heads_file),
        "heads": {k: heads_manifest.get(k) for k in ("provisional", "trained_on", "seed", "code_version")},
        "outputs": {
            name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
            for name in (BACKBONE_ONNX, HEADS_ONNX)
        },
        "parity": {
            "checked_on": checked_on,
            "tolerance": verify.FP32_ATOL,
            "onnxruntime": version("onnxruntime"),
            "backbone_max_abs_diff": backbone_report.max_abs_diff,
            "heads_max_abs_diff": heads_report.max_abs_diff,
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / BUILD_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return BuildResult(out, False, manifest)
