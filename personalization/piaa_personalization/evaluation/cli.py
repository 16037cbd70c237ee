"""`python -m piaa_personalization.evaluation`: the simulated-rater report, and the protocol on FLICKR-AES
or REAL-CUR (in process, or through a live gateway with --live ADDRESS).

    python -m piaa_personalization.evaluation report --photos ../shared/data/photos
    python -m piaa_personalization.evaluation flickr-aes --csv FLICKR-AES_image_labeled_by_each_worker.csv \\
        --images 40K/ [--test-workers test_workers.txt] [--live 127.0.0.1:50051]
    python -m piaa_personalization.evaluation real-cur --root REAL-CUR/
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from piaa_personalization.evaluation import curves as cv
from piaa_personalization.evaluation import datasets, features, priors, protocol, report, simulate
from piaa_personalization.model.residual import HeadOutputs


def _progress(label: str) -> Any:
    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def _live(
    args: argparse.Namespace, ratings: datasets.Ratings, split: protocol.Split, heads: HeadOutputs, reps: int
) -> str:
    """The protocol through the gateway at --live; with --redis-url, first teaches a fresh tenant the prior
    learned from the split's training raters (so the gateway serves what `ours_prior` measures)."""
    from piaa_client.client import Client
    from piaa_personalization.evaluation.live import run_live, teach_prior

    tenant, note = args.tenant, "the tenant's prior as it is"
    if args.redis_url and split.train:
        tenant = args.tenant or f"eval{uuid.uuid4().hex[:8]}"
        users = teach_prior(args.redis_url, tenant, ratings, heads, split.train)
        note = f"tenant {tenant}, prior learned in the store from {users} training raters"
    with Client(args.live, tenant=tenant, timeout=120.0) as client:
        result, reasons = run_live(client, ratings, split, ks=args.ks, reps=reps, seed=args.seed)
    head = f"Live gateway at {args.live} ({note}; replies: {reasons}):"
    return head + "\n\n" + report.main_table(protocol.summarize(result))


def cmd_report(args: argparse.Namespace) -> str:
    """The simulated-rater report: comparison table, per-kind breakdown, active-learning curves (PNG)."""
    started = time.time()
    with (args.photos / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))[: args.limit or None]
    paths = [args.photos / r["file"] for r in rows]
    feats = features.cached_features(paths, args.onnx_dir, args.cache_dir, _progress("photos"))
    config = simulate.SimConfig(n_test=args.n_test, n_train=args.n_train, seed=args.seed)
    labels = [int(r["imagenet_index"]) for r in rows]
    ratings, raters = simulate.simulate(feats, labels, paths, config)
    design = protocol.Design.build(feats.heads, ratings)
    by_id = {r.id: r for r in raters}
    design.groups = feats.groups
    design.oracle = np.stack([np.asarray(by_id[rid].ideal) for rid in ratings.raters])
    split = protocol.Split(
        tuple(i for i, r in enumerate(raters) if not r.test), tuple(i for i, r in enumerate(raters) if r.test)
    )
    methods = protocol.METHODS + protocol.EXTRA_METHODS
    result = protocol.run(design, split, ks=args.ks, reps=args.reps, seed=args.seed, methods=methods)
    kinds = np.array([r.kind for r in raters if r.test])
    groups = {kind: kinds == kind for kind in simulate.KINDS}
    args.img_dir.mkdir(parents=True, exist_ok=True)
    curve_parts = []
    for name in args.curve_method:
        curve = cv.run_curves(
            design,
            split,
            ks=args.curve_ks,
            reps=args.curve_reps,
            method=protocol.METHODS_BY_NAME[name],
            seed=args.seed,
        )
        png = args.img_dir / f"quality_active_learning_{name}.png"
        label = protocol.METHODS_BY_NAME[name].label
        title = f"{len(split.test)} simulated raters, {args.curve_reps} reps, {label}"
        cv.plot_curves(curve, str(png), title)
        link = os.path.relpath(png, args.out.parent if args.out else Path.cwd())
        curve_parts += [
            f"## Active learning vs random choice: {label}",
            report.curves_table(curve),
            f"![active learning vs random, {name}]({link})",
        ]
    counts = ", ".join(f"{k}: {int(m.sum())}" for k, m in groups.items())
    parts = [
        f"Simulated raters: {len(split.test)} tested ({counts}), {len(split.train)} teach the prior; "
        f"{len(paths)} photos each; {args.reps} repetitions; seed {args.seed}.",
        "## Comparison (all tested raters)",
        report.main_table(protocol.summarize(result)),
        "## Gain over generic by kind of rater",
        report.breakdown_table(result, groups),
        f"Active learning: half of each rater's photos held out, {args.curve_reps} repetitions.",
        *curve_parts,
        "## Which prior a tenant starts from",
        f"`ours_prior` on the same tested raters and draws ({args.reps} repetitions) under each prior:",
        priors.prior_study(
            feats,
            labels,
            paths,
            config,
            ks=args.ks,
            reps=args.reps,
            sizes=(*(n for n in priors.DEFAULT_SIZES if n < args.n_train), args.n_train),
        ),
    ]
    if args.live:
        live_split = protocol.Split(split.train, split.test[: args.live_raters])
        parts += ["## Live gateway (subset)", _live(args, ratings, live_split, feats.heads, 1)]
        sub = protocol.run(design, live_split, ks=args.ks, reps=1, seed=args.seed)
        parts.append("In process, same raters and draws:\n\n" + report.main_table(protocol.summarize(sub)))
    parts.append(f"_{time.time() - started:.0f} s on this machine._")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": report.as_json(protocol.summarize(result))}, indent=1))
    return "\n\n".join(parts)


def _dataset_report(args: argparse.Namespace, ratings: datasets.Ratings, split: protocol.Split) -> str:
    feats = features.cached_features(list(ratings.images), args.onnx_dir, args.cache_dir, _progress("images"))
    design = protocol.Design.build(feats.heads, ratings)
    result = protocol.run(design, split, ks=args.ks, reps=args.reps, seed=args.seed)
    parts = [
        f"{len(ratings.raters)} raters, {len(ratings.images)} images, {len(ratings)} ratings; "
        f"{len(split.test)} tested, {len(split.train)} teach the prior"
        + (" (leave one out)" if split.leave_one_out else "")
        + f"; {args.reps} repetitions.",
        report.main_table(protocol.summarize(result)),
    ]
    if args.live:
        parts.append(_live(args, ratings, split, feats.heads, args.reps))
    return "\n\n".join(parts)


def cmd_flickr(args: argparse.Namespace) -> str:
    ratings = datasets.load_flickr_aes(args.csv, args.images)
    workers = datasets.read_worker_list(args.test_workers) if args.test_workers else None
    return _dataset_report(args, ratings, protocol.split_raters(ratings, args.n_test, args.seed, workers))


def cmd_realcur(args: argparse.Namespace) -> str:
    ratings = datasets.load_real_cur(args.root)
    everyone = tuple(range(len(ratings.raters)))
    return _dataset_report(args, ratings, protocol.Split((), everyone, leave_one_out=True))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m piaa_personalization.evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--onnx-dir", type=Path, default=features.DEFAULT_ONNX_DIR)
    common.add_argument("--cache-dir", type=Path, default=features.DEFAULT_CACHE_DIR)
    common.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    common.add_argument("--reps", type=int, default=10)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--live", metavar="ADDRESS", help="also run through the gateway at host:port")
    common.add_argument(
        "--redis-url", help="with --live: the gateway's Redis, to teach a fresh tenant the learned prior"
    )
    common.add_argument(
        "--tenant", help="tenant the live run uses (its prior applies; default: the gateway's)"
    )
    common.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    r = sub.add_parser("report", parents=[common], help="simulated raters on the shared photos")
    r.add_argument("--photos", type=Path, required=True, help="folder with the photos and labels.csv")
    r.add_argument("--limit", type=int, help="use only the first N photos (a quick check)")
    r.add_argument("--n-test", type=int, default=60)
    r.add_argument("--n-train", type=int, default=60)
    r.add_argument("--curve-ks", type=int, nargs="+", default=list(cv.DEFAULT_CHECKPOINTS))
    r.add_argument("--curve-reps", type=int, default=5)
    r.add_argument(
        "--curve-method",
        nargs="+",
        choices=[m.name for m in protocol.METHODS if not m.generic],
        default=["ours_prior", "ours_embedding"],
        help="the models the active-learning curves use, one PNG each (suggest works in its layout)",
    )
    r.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    r.add_argument("--json", type=Path, help="also write the comparison as JSON")
    r.add_argument("--live-raters", type=int, default=4, help="tested raters sent through --live")
    f = sub.add_parser("flickr-aes", parents=[common], help="FLICKR-AES per-worker ratings")
    f.add_argument("--csv", type=Path, required=True)
    f.add_argument("--images", type=Path, required=True)
    f.add_argument("--test-workers", type=Path, help="file listing the test workers, one per line")
    f.add_argument("--n-test", type=int, default=37, help="random test workers when no list is given")
    c = sub.add_parser("real-cur", parents=[common], help="REAL-CUR albums (leave-one-owner-out prior)")
    c.add_argument("--root", type=Path, required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; prints (or writes --out) the markdown. Returns the exit code (2 on bad data)."""
    args = parser().parse_args(argv)
    run = {"report": cmd_report, "flickr-aes": cmd_flickr, "real-cur": cmd_realcur}[args.command]
    try:
        text = run(args)
    except (datasets.DatasetError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # build/eval/ of make quality: absent in a clone
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0
