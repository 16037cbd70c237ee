"""A heads release: retrained heads exported as `heads_<fs>.onnx` in a new feature space, checked vs torch.

`python -m piaa_export.release PHOTOS --feature-space fs2 --seed 1 --out build/release/fs2` trains the heads
(piaa_export.train; `--limit` / `--degradations` for a smaller run), stamps the new feature space on the
weights' manifest and exports the heads ONNX with that space in its metadata, which the model repository
serves next to the current one (`python -m piaa_triton.repository --extra-heads ...`, docs/operations.md).
The backbone is unchanged: stored backbone features stay valid, so profiles migrate without the images.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from piaa_client.features import BACKBONE_FEATURE_DIM, FEATURE_SPACE_VERSION
from piaa_export.exceptions import ExportError
from piaa_export.fitting import TrainConfig

_SPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def export_release(weights_dir: Path, feature_space: str, out: Path) -> dict[str, Any]:
    """Exports weights_dir/heads.npz as out/heads_<feature_space>.onnx and checks it against torch.

    Returns {"onnx": path, "max_abs_diff": {output: diff}}. Raises ExportError for a bad space name,
    the current space (a release needs a new one), or an ONNX that disagrees with torch.
    """
    if not _SPACE.match(feature_space):
        raise ExportError(f"a feature space is 1-64 of [A-Za-z0-9_.-], got {feature_space!r}")
    if feature_space == FEATURE_SPACE_VERSION:
        raise ExportError(f"{feature_space!r} is the committed heads' space: a release needs a new name")
    from piaa_export import torch2onnx, verify
    from piaa_export.heads import Heads, HeadWeights

    heads = Heads(HeadWeights.load(weights_dir / "heads.npz"))
    path = torch2onnx.export_heads(heads, out / f"heads_{feature_space}.onnx", feature_space)
    # Pooled EfficientNet features are non-negative (ReLU6); scaled draws cover and exceed their range.
    rng = np.random.default_rng(0)
    probe = rng.gamma(0.6, 0.5, size=(64, BACKBONE_FEATURE_DIM)) * rng.uniform(0.5, 2.0, size=(64, 1))
    report = verify.heads_parity(heads, path, probe.astype(np.float32)).raise_for_failure()
    return {"onnx": str(path), "max_abs_diff": report.max_abs_diff}


def train_release(photos: Path, config: TrainConfig, feature_space: str, out: Path) -> dict[str, Any]:
    """Trains heads on `photos` with `config` into `out` (heads.npz, manifest.json with the new space),
    then export_release(). Returns the manifest plus "release" (export_release's result)."""
    from piaa_export.train import train_and_save

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    manifest = train_and_save(photos, config, out=out)
    manifest["feature_space_version"] = feature_space  # the training writes the committed space
    manifest["release"] = export_release(out, feature_space, out)
    manifest["release_seconds"] = round(time.monotonic() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI: train and export one release; prints where the ONNX went and how long it took."""
    p = argparse.ArgumentParser(prog="python -m piaa_export.release", description=__doc__)
    p.add_argument("photos", type=Path)
    p.add_argument("--feature-space", required=True, help="the new space's name, e.g. fs2")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train on the first N photos only")
    p.add_argument("--degradations", type=int, default=3, help="degradation kinds per photo (RankIQA pairs)")
    p.add_argument("--out", type=Path, default=None, help="default build/release/<feature space>")
    args = p.parse_args(argv)
    config = TrainConfig(seed=args.seed, limit=args.limit, degradations_per_photo=args.degradations)
    out = args.out or Path("build/release") / args.feature_space
    try:
        manifest = train_release(args.photos, config, args.feature_space, out)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    release = manifest["release"]
    print(f"{release['onnx']}: feature space {args.feature_space}, {manifest['release_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
