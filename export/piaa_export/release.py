"""A heads release: retrained heads exported as `heads_<fs>.onnx` in a new feature space, checked vs torch.

`python -m piaa_export.release PHOTOS --feature-space fs2 --seed 1 --out build/release/fs2` trains the heads
(piaa_export.train; `--limit` / `--degradations` for a smaller run), stamps the new feature space on the
weights' manifest and exports the heads ONNX with that space and its content names in its metadata, which
the model repository serves next to the current one (`python -m piaa_triton.repository --extra-heads ...`,
docs/operations.md). `--content groups` makes the content output the named ImageNet groups (groups.py)
instead of the k-means clusters. The backbone is unchanged: stored backbone features stay valid, so
profiles migrate without the images.
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

CONTENT_KINDS = ("clusters", "groups")
"""What a release's content output is: the trained k-means clusters, or the named ImageNet groups."""

CONTENT_NAMES_PROP = "content_names"
"""Heads ONNX metadata: the content columns' names in output order, as a JSON list."""

PHOTO_CHECKS = 32
"""How many of the release's photos the named-group content is checked on against the backbone's logits."""


def content_names_of(heads_onnx: Path) -> tuple[str, ...] | None:
    """The content names a heads ONNX file carries in its metadata, or None when it names none."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(heads_onnx), load_external_data=False).metadata_props}
    return tuple(json.loads(props[CONTENT_NAMES_PROP])) if CONTENT_NAMES_PROP in props else None


def _stamp_content_names(path: Path, names: tuple[str, ...]) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, CONTENT_NAMES_PROP: json.dumps(list(names))})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def export_release(
    weights_dir: Path,
    feature_space: str,
    out: Path,
    content: str = "clusters",
    photos: list[Path] | None = None,
) -> dict[str, Any]:
    """Exports weights_dir/heads.npz as out/heads_<feature_space>.onnx and checks it against torch.

    content: "clusters" (the trained k-means content; its names from weights_dir/manifest.json when there)
    or "groups" (groups.GroupHeads: the named ImageNet groups from the backbone's classifier, also checked
    against the groups of the ONNX backbone's logits on the first PHOTO_CHECKS of `photos` when given).
    Returns {"onnx": path, "content": kind, "content_names": [...] or None, "max_abs_diff": {output: diff}}
    (plus "photo_parity" for groups with photos). Raises ExportError for a bad space name, the current
    space (a release needs a new one), an unknown content kind, or an ONNX that disagrees with torch.
    """
    if not _SPACE.match(feature_space):
        raise ExportError(f"a feature space is 1-64 of [A-Za-z0-9_.-], got {feature_space!r}")
    if feature_space == FEATURE_SPACE_VERSION:
        raise ExportError(f"{feature_space!r} is the committed heads' space: a release needs a new name")
    if content not in CONTENT_KINDS:
        raise ExportError(f"content is one of {CONTENT_KINDS}, got {content!r}")
    from piaa_export import groups, taxonomy, torch2onnx, verify
    from piaa_export.heads import Heads, HeadWeights

    weights = HeadWeights.load(weights_dir / "heads.npz")
    names: tuple[str, ...] | None
    if content == "groups":
        heads: Heads = groups.GroupHeads(weights, groups.load_classifier())
        names = taxonomy.GROUP_NAMES
    else:
        heads = Heads(weights)
        manifest = weights_dir / "manifest.json"
        names = tuple(json.loads(manifest.read_text()).get("content_names", ())) if manifest.exists() else ()
        names = names or None
    path = torch2onnx.export_heads(heads, out / f"heads_{feature_space}.onnx", feature_space)
    if names:
        _stamp_content_names(path, names)
    # Pooled EfficientNet features are non-negative (ReLU6); scaled draws cover and exceed their range.
    rng = np.random.default_rng(0)
    probe = rng.gamma(0.6, 0.5, size=(64, BACKBONE_FEATURE_DIM)) * rng.uniform(0.5, 2.0, size=(64, 1))
    report = verify.heads_parity(heads, path, probe.astype(np.float32)).raise_for_failure()
    result: dict[str, Any] = {
        "onnx": str(path),
        "content": content,
        "content_names": list(names) if names else None,
        "max_abs_diff": report.max_abs_diff,
    }
    if content == "groups" and photos:
        from piaa_export.build import BACKBONE_ONNX, DEFAULT_OUT

        images = verify.photo_tensors(photos[:PHOTO_CHECKS])
        on_photos = groups.groups_parity(path, DEFAULT_OUT / BACKBONE_ONNX, images).raise_for_failure()
        result["photo_parity"] = {"photos": on_photos.samples, "max_abs_diff": on_photos.max_abs_diff}
    return result


def train_release(
    photos: Path, config: TrainConfig, feature_space: str, out: Path, content: str = "clusters"
) -> dict[str, Any]:
    """Trains heads on `photos` with `config` into `out` (heads.npz, manifest.json with the new space and
    its content names), then export_release() with `content`. Returns the manifest plus "release"
    (export_release's result)."""
    from piaa_export.extract import list_photos
    from piaa_export.train import train_and_save

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    manifest = train_and_save(photos, config, out=out)
    manifest["feature_space_version"] = feature_space  # the training writes the committed space
    release = export_release(out, feature_space, out, content, list_photos(photos, config.limit))
    manifest["content"] = content
    manifest["content_names"] = release["content_names"]
    manifest["release"] = release
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
    p.add_argument(
        "--content",
        choices=CONTENT_KINDS,
        default="clusters",
        help="the content output: the trained k-means clusters, or the named ImageNet groups",
    )
    args = p.parse_args(argv)
    config = TrainConfig(seed=args.seed, limit=args.limit, degradations_per_photo=args.degradations)
    out = args.out or Path("build/release") / args.feature_space
    try:
        manifest = train_release(args.photos, config, args.feature_space, out, args.content)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    release = manifest["release"]
    print(
        f"{release['onnx']}: feature space {args.feature_space}, content {args.content}, "
        f"{manifest['release_seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
