"""`python -m piaa_export.cli {build,export,quantize,verify,...}`: thin flags over one function per step."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from piaa_export.exceptions import ExportError


def _build(args: argparse.Namespace) -> int:
    from piaa_export.build import build

    result = build(args.out, photos=args.photos, force=args.force)
    if result.up_to_date:
        print(f"{args.out}: up to date")
        return 0
    parity = result.manifest["parity"]
    print(f"wrote {args.out}/backbone.onnx, heads.onnx, manifest.json")
    print(f"parity on {parity['checked_on']} (tolerance {parity['tolerance']:g}):")
    for model in ("backbone", "heads"):
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in parity[f"{model}_max_abs_diff"].items())
        print(f"  {model}: max |onnx - torch| {diffs}")
    return 0


def _export(args: argparse.Namespace) -> int:
    args.force = True
    return _build(args)


def _quantize(args: argparse.Namespace) -> int:
    from piaa_export.quantize import quantize_backbone

    result = quantize_backbone(args.onnx, photos=args.photos, force=args.force, progress=True)
    if result.up_to_date:
        print(f"{args.onnx}: INT8 backbones up to date")
        return 0
    print(f"wrote {', '.join(result.manifest['outputs'])} into {args.onnx}")
    for check in result.manifest["checks"]:
        top1 = (
            ""
            if check["top1_int8"] is None
            else f"top-1 {check['top1_int8']:.4f} (FP32 {check['top1_fp32']:.4f}), "
        )
        print(
            f"  {check['file']}: {top1}generic Spearman {check['generic_spearman']:.4f}, "
            f"worst attribute {check['attribute_spearman_min']:.4f}, "
            f"feature cosine {check['feature_cosine_median']:.4f}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from piaa_export.build import BACKBONE_ONNX, DEFAULT_OUT, build
    from piaa_export.verify import report_folder

    build(DEFAULT_OUT if args.onnx is None else args.onnx)
    onnx_dir = DEFAULT_OUT if args.onnx is None else args.onnx
    report = report_folder(onnx_dir / BACKBONE_ONNX, args.photos, torch_limit=args.torch_limit, progress=True)
    print(json.dumps(report, indent=2))
    return 0 if report["parity_ok"] else 1


def _train(args: argparse.Namespace) -> int:
    from piaa_export.fitting import TrainConfig
    from piaa_export.train import train_and_save

    config = TrainConfig(seed=args.seed, limit=args.limit, aadb=args.aadb, flickr_aes=args.flickr_aes)
    metrics = train_and_save(args.photos, config, out=args.out, progress=True)
    print(json.dumps(metrics, indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from piaa_export import reports
    from piaa_export.build import BACKBONE_ONNX, DEFAULT_OUT, build
    from piaa_export.extract import extract, list_photos
    from piaa_export.fitting import TrainConfig
    from piaa_export.heads import HeadWeights
    from piaa_export.taxonomy import purity_report
    from piaa_export.verify import read_labelled_folder

    build(DEFAULT_OUT)
    by_name = {p.path.name: p.imagenet_index for p in read_labelled_folder(args.photos)}
    files = list_photos(args.photos)
    config = TrainConfig()
    # The training run's cached features (same seed and plan) when present; computed otherwise.
    data = extract(
        files,
        DEFAULT_OUT / BACKBONE_ONNX,
        config.seed,
        config.degradations_per_photo,
        cache_dir=Path("build/cache"),
        progress=True,
    )
    features = data.features
    weights = HeadWeights.load()
    index = np.array([by_name[f.name] for f in files])
    assigned = reports.nearest_members(features, weights, len(features))
    labels = np.empty(len(features), dtype=int)
    for k, members in enumerate(assigned):
        labels[members] = k
    purity = purity_report(labels, index)
    captions = [f"{c['majority_group']} {c['majority_share']:.0%}" for c in purity["clusters"]]
    reports.contact_sheet(files, features, weights, args.sheet, captions=captions)
    study = reports.embedding_study(features, index, weights, users=args.users)
    print(json.dumps({"sheet": str(args.sheet), "purity": purity, "embedding_study": study}, indent=2))
    return 0


def _engines(args: argparse.Namespace) -> int:
    from piaa_export.onnx2trt import EngineConfig, build_engine

    config = EngineConfig.from_model_config(args.model_dir / "config.pbtxt", workspace_gib=args.workspace_gib)
    photos = sorted(p for p in args.parity_photos.iterdir() if p.is_file()) if args.parity_photos else []
    result = build_engine(args.onnx, args.model_dir, config, int8_onnx=args.int8_onnx, parity_photos=photos)
    print(json.dumps(result, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    """The CLI's flags; every subcommand maps to one function of the package."""
    p = argparse.ArgumentParser(prog="python -m piaa_export.cli", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="export + parity check unless build/onnx is current (make setup)")
    b.add_argument("--out", type=Path, default=Path("build/onnx"))
    b.add_argument("--photos", type=Path, default=None, help="parity on these photos, not generated")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.set_defaults(func=_build)

    e = sub.add_parser("export", help="always re-export both ONNX models and check them against torch")
    e.add_argument("--out", type=Path, default=Path("build/onnx"))
    e.add_argument("--photos", type=Path, default=None)
    e.set_defaults(func=_export)

    q = sub.add_parser("quantize", help="INT8 Q/DQ backbones calibrated on real photos, checked (make setup)")
    q.add_argument(
        "--onnx", type=Path, default=Path("build/onnx"), help="folder with backbone.onnx, heads.onnx"
    )
    q.add_argument("--photos", type=Path, default=None, help="calibrate and check on these (default: shared)")
    q.add_argument("--force", action="store_true", help="recalibrate even when up to date")
    q.set_defaults(func=_quantize)

    v = sub.add_parser("verify", help="parity on real photos + ImageNet top-1 (folder with labels.csv)")
    v.add_argument("photos", type=Path)
    v.add_argument("--onnx", type=Path, default=None, help="folder with backbone.onnx (default build/onnx)")
    v.add_argument("--torch-limit", type=int, default=None, help="torch top-1 on the first N photos only")
    v.set_defaults(func=_verify)

    t = sub.add_parser("train", help="fit the default heads on a photo folder (AADB / FLICKR-AES if given)")
    t.add_argument("photos", type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    t.add_argument("--aadb", type=Path, default=None, help="AADB folder (images + attribute label files)")
    t.add_argument("--flickr-aes", type=Path, default=None, help="FLICKR-AES folder (images + worker csv)")
    t.add_argument("--out", type=Path, default=None, help="weights folder (default: the package's weights/)")
    t.set_defaults(func=_train)

    r = sub.add_parser("report", help="content contact sheet + embedding-width study on a labelled folder")
    r.add_argument("photos", type=Path)
    r.add_argument("--sheet", type=Path, default=Path("docs/img/content_clusters.png"))
    r.add_argument("--users", type=int, default=100, help="simulated users per setting")
    r.set_defaults(func=_report)

    g = sub.add_parser(
        "engines",
        help="TensorRT engine for a Triton model folder; batch, shapes, precision: its config.pbtxt (GPU)",
    )
    g.add_argument("onnx", type=Path, help="the FP32 ONNX model (the FP16 source and the parity reference)")
    g.add_argument(
        "model_dir", type=Path, help="Triton model folder with config.pbtxt; the plan goes into 1/"
    )
    g.add_argument("--int8-onnx", type=Path, default=None, help="precision int8: the Q/DQ ONNX model")
    g.add_argument("--parity-photos", type=Path, default=None, help="photos for the engine's parity check")
    g.add_argument("--workspace-gib", type=float, default=2.0)
    g.set_defaults(func=_engines)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; an ExportError becomes a one-line message and exit status 2."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
