"""`make upgrade-drill`: a heads upgrade on a live local stack, under load, checked end to end.

First the heads are retrained with another seed into feature space fs2 (piaa_export.release, by default
in the committed heads' config: every photo, three degradation kinds each). Simulated users
(evaluation/simulate.py's rater model on real photos) rate photos around a crowd score that neither
release defines alone: the mean of the fs1 and the fs2 generic scores, computed in process (ONNX Runtime:
the served backbone, then each release's heads). A crowd equal to one release's generic output would make
that release the truth by construction and charge every other head's ranking differences to the
migration (docs/operations.md, "The drill"). Then real processes: redis-server, tritonserver (explicit
model control), the gateway, `piaa-admin migrate`. The users enrol in fs1; Triton loads `heads_fs2` +
`piaa_fs2` next to the running ensemble while a load generator keeps sending Score calls; the migration
job moves every profile into fs2 from the stored backbone features (no image is sent again) and switches
the gateways; then every user is scored again. The last line is (one line, wrapped here)

    upgrade-drill: N users, personalized before B/N, after A/N, failed calls F,
    Spearman before X after Y, migration T s

with Spearman the mean over users of the rank correlation between the gateway's personalized scores of
held-out photos and the user's noise-free score (crowd + offset + strength x taste). Exit 0 when
A = N, F = 0 and |Y - X| <= 0.02.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
from PIL import Image
from scipy import stats

from piaa_bench import loadgen
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.features import BACKBONE_FEATURE, BACKBONE_INPUT, GENERIC
from piaa_personalization.evaluation.features import pixel_stats
from piaa_personalization.evaluation.simulate import (
    POPULATION_GROUP_TASTE,
    POPULATION_PIXEL_TASTE,
    group_matrix,
)
from piaa_personalization.gateway_process import GatewayProcess
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.imaging import preprocess
from piaa_triton.paths import onnx_dir
from piaa_triton.repository import backbone_onnx, cpu_precision, write_repository
from piaa_triton.server import ADMIN_HEADER, ServerOptions, TritonServer

NEW_SPACE = "fs2"
SPEARMAN_TOLERANCE = 0.02


@dataclass(frozen=True)
class DrillConfig:
    """The drill's size (the defaults are `make upgrade-drill`; the test runs a smaller one)."""

    photos: Path
    users: int = 20
    photo_count: int = 120
    ratings_per_user: int = 40
    train_photos: int = 0
    """Photos the fs2 heads are trained on (0: all)."""
    train_degradations: int = 3
    """Degradation kinds per training photo (3: the committed heads' config)."""
    seed: int = 0
    workdir: Path | None = None
    heads_onnx: Path | None = None
    """An already trained release (skips the training step; tests)."""


@dataclass(frozen=True)
class DrillResult:
    users: int
    personalized_before: int
    personalized_after: int
    failed_calls: int
    spearman_before: float
    spearman_after: float
    migration_s: float
    space_after: str
    calls: int
    releases_spearman: float
    """Rank correlation of the fs1 and fs2 generic scores over the drill's photos."""
    generic_before: float
    """Spearman of fs1's generic scores alone (no personalization) with the users' noise-free scores."""
    generic_after: float
    """The same for fs2's generic scores."""
    served_generic_diff: float
    """Largest difference between the gateway's fs1 generic scores and the in-process ones the crowd uses."""

    def line(self) -> str:
        n = self.users
        return (
            f"upgrade-drill: {n} users, personalized before {self.personalized_before}/{n}, "
            f"after {self.personalized_after}/{n}, failed calls {self.failed_calls}, "
            f"Spearman before {self.spearman_before:.3f} after {self.spearman_after:.3f}, "
            f"migration {self.migration_s:.1f} s"
        )

    @property
    def ok(self) -> bool:
        return (
            self.personalized_after == self.users
            and self.failed_calls == 0
            and abs(self.spearman_after - self.spearman_before) <= SPEARMAN_TOLERANCE
        )


def _say(message: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _photos(folder: Path, count: int) -> tuple[list[bytes], list[int], np.ndarray]:
    """The first `count` photos listed in labels.csv: bytes, ImageNet index, pixel statistics."""
    with (folder / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    data = [(folder / r["file"]).read_bytes() for r in rows]
    pixels = np.stack([pixel_stats(Image.open(folder / r["file"])) for r in rows])
    return data, [int(r["imagenet_index"]) for r in rows], pixels


def generic_scores(photos: list[bytes], heads: list[Path], onnx: Path | None = None) -> np.ndarray:
    """Generic scores [len(heads), len(photos)] of each heads ONNX file on the photos' backbone features,
    in process: the serving preprocess, then the backbone the cpu repository serves (from `onnx`, default
    build/onnx, at cpu_precision()). Raises ImageError for a photo that does not decode."""
    from piaa_export.runtime import session

    backbone = session(backbone_onnx(onnx or onnx_dir(), cpu_precision()))
    tensors = np.stack([preprocess(data) for data in photos])
    features = np.concatenate(
        [
            backbone.run([BACKBONE_FEATURE.name], {BACKBONE_INPUT.name: tensors[i : i + 16]})[0]
            for i in range(0, len(tensors), 16)
        ]
    )
    out = [session(path).run([GENERIC.name], {BACKBONE_FEATURE.name: features})[0] for path in heads]
    return np.stack([g.reshape(len(photos)) for g in out]).astype(np.float64)


def _tastes(crowd: np.ndarray, index: list[int], pixels: np.ndarray, users: int, seed: int) -> np.ndarray:
    """Each user's noise-free score of every photo: simulate.py's rater model (content or pixel taste
    around the population's, standardized, times a strength) around the crowd score."""
    rng = np.random.default_rng(seed)
    groups = group_matrix(index)
    px = (pixels - pixels.mean(0)) / np.maximum(pixels.std(0), 1e-9)
    out = []
    for _ in range(users):
        taste = groups @ rng.normal(POPULATION_GROUP_TASTE, 1.0) + px @ rng.normal(
            POPULATION_PIXEL_TASTE, 1.0
        )
        taste = taste / max(float(taste.std()), 1e-9)
        out.append(crowd + rng.uniform(-0.1, 0.1) + rng.uniform(0.08, 0.15) * taste)
    return np.stack(out)


async def _score_all(
    stub: pb_grpc.PersonalizationStub, users: list[str], photos: list[bytes], idx: np.ndarray
) -> tuple[np.ndarray, int, set[str]]:
    """Scores of photos[idx] per user, how many users got every score personalized, the spaces named."""
    scores, personalized, spaces = [], 0, set[str]()
    for user in users:
        replies = await _scores(stub, user, photos, idx, spaces=spaces)
        scores.append([s.score for s in replies])
        personalized += all(s.personalized for s in replies)
    return np.array(scores), personalized, spaces


async def _scores(
    stub: pb_grpc.PersonalizationStub,
    user: str,
    photos: list[bytes],
    idx: np.ndarray,
    *,
    generic: bool = False,
    spaces: set[str] | None = None,
) -> list[pb.ImageScore]:
    """Score of photos[idx] for `user`, in requests of at most _PER_REQUEST images."""
    out: list[pb.ImageScore] = []
    for start in range(0, len(idx), _PER_REQUEST):
        images = [pb.Image(data=photos[i]) for i in idx[start : start + _PER_REQUEST]]
        reply = await stub.Score(
            pb.ScoreRequest(user_id=user, images=images, generic_only=generic), timeout=300
        )
        out.extend(reply.scores)
        if spaces is not None:
            spaces.add(reply.feature_space_version)
    return out


_PER_REQUEST = 32


def _spearman(scores: np.ndarray, ideal: np.ndarray) -> float:
    return float(np.mean([stats.spearmanr(s, t).statistic for s, t in zip(scores, ideal, strict=True)]))


class _Load:
    """A load generator (loadgen.Workload's requests) sending Score calls until stopped."""

    def __init__(self, address: str, workload: loadgen.Workload, concurrency: int = 2) -> None:
        self.address, self.workload, self.concurrency = address, workload, concurrency
        self.calls = self.failed = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with loadgen.channel(self.address) as ch:
            stub = pb_grpc.PersonalizationStub(ch)

            async def caller() -> None:
                while not self._stop.is_set():
                    self.calls += 1
                    try:
                        await stub.Score(self.workload.request(), timeout=60)
                    except grpc.aio.AioRpcError as err:
                        self.failed += 1
                        self.failures.append(f"{err.code().name}: {err.details()}")

            await asyncio.gather(*(caller() for _ in range(self.concurrency)))

    def stop(self) -> None:
        self._stop.set()


def _train_release(config: DrillConfig, out: Path) -> Path:
    if config.heads_onnx is not None:
        return config.heads_onnx
    cmd = [
        sys.executable, "-m", "piaa_export.release", str(config.photos), "--feature-space", NEW_SPACE,
        "--seed", "1", "--degradations", str(config.train_degradations), "--out", str(out),
        *(["--limit", str(config.train_photos)] if config.train_photos else []),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out / f"heads_{NEW_SPACE}.onnx"


async def run_drill(config: DrillConfig) -> DrillResult:
    """Runs the drill on fresh processes in a temporary folder; returns what it measured."""
    work = Path(tempfile.mkdtemp(prefix="piaa-drill-", dir=config.workdir))
    try:
        return await _drill(config, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _drill(config: DrillConfig, work: Path) -> DrillResult:
    photos, index, pixels = _photos(config.photos, config.photo_count)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(photos))
    rated, held = order[: config.ratings_per_user], order[config.ratings_per_user :]
    users = [f"drill-{i:03d}" for i in range(config.users)]
    started = time.monotonic()
    heads_onnx = await asyncio.to_thread(_train_release, config, work / "release")
    _say(f"heads retrained into {NEW_SPACE} in {time.monotonic() - started:.0f} s: {heads_onnx}")
    fs1_generic, fs2_generic = generic_scores(photos, [onnx_dir() / "heads.onnx", heads_onnx])
    crowd = (fs1_generic + fs2_generic) / 2  # symmetric: neither release is the truth
    releases_spearman = float(stats.spearmanr(fs1_generic, fs2_generic).statistic)
    _say(f"generic scores of the {len(photos)} photos, fs1 vs fs2: Spearman {releases_spearman:.3f}")
    ideal = _tastes(crowd, index, pixels, config.users, config.seed + 1)
    generic_before, generic_after = (
        _spearman(np.tile(g[held], (len(users), 1)), ideal[:, held]) for g in (fs1_generic, fs2_generic)
    )
    repo = work / "repository"
    write_repository("cpu", repo)
    _say(f"{len(photos)} photos, {config.users} users, {config.ratings_per_user} ratings each")
    with (
        RedisServer(workdir=work / "redis") as redis,
        TritonServer(ServerOptions(repository=repo, model_control="explicit")) as triton,
        GatewayProcess(
            ["--redis-url", redis.url, "--triton-url", triton.grpc_url, "--port", "0",
             "--health-check-interval-s", "0.5"],
            log_path=work / "gateway.log",
        ) as gateway,
    ):  # fmt: skip
        async with loadgen.channel(gateway.address) as ch:
            stub = pb_grpc.PersonalizationStub(ch)
            served = np.array(
                [s.score for s in (await _scores(stub, "", photos, np.arange(len(photos)), generic=True))]
            )
            served_diff = float(np.abs(served - fs1_generic).max())
            _say(f"served fs1 generic vs in process: max difference {served_diff:.4f}")
            noisy = ideal + rng.normal(0.0, 0.1, ideal.shape)
            stars = np.clip(np.rint(1 + 4 * noisy), 1, 5)
            for u, user in enumerate(users):
                await stub.AddRatings(
                    pb.AddRatingsRequest(
                        user_id=user,
                        ratings=[
                            pb.Rating(image=pb.Image(data=photos[i]), value=float(stars[u, i]),
                                      scale=pb.RATING_SCALE_STARS_1_5)
                            for i in rated
                        ],
                    ),
                    timeout=300,
                )  # fmt: skip
            await asyncio.sleep(1.0)  # the prior the 20th enrolment relearns
            before, personalized_before, _ = await _score_all(stub, users, photos, held)
            spearman_before = _spearman(before, ideal[:, held])
            _say(
                f"before: {personalized_before}/{len(users)} personalized, Spearman {spearman_before:.3f} "
                f"(generic scores alone {generic_before:.3f})"
            )

            load = _Load(gateway.address, loadgen.Workload(photos, 4, users, unique=False))
            load_task = asyncio.create_task(load.run())
            await asyncio.sleep(2.0)  # calls in flight in fs1 before Triton loads the new ensemble
            write_repository("cpu", repo, extra_heads=[heads_onnx])
            client = triton_grpc.InferenceServerClient(triton.grpc_url)
            client.load_model(
                f"piaa_{NEW_SPACE}", headers={f"triton-grpc-protocol-{ADMIN_HEADER}": triton.admin_key}
            )
            _say(f"triton serves piaa and piaa_{NEW_SPACE} side by side")
            admin = [
                sys.executable, "-m", "piaa_personalization.admin", "--redis-url", redis.url,
                "--triton-url", triton.grpc_url, "migrate", "--to", NEW_SPACE,
            ]  # fmt: skip
            subprocess.run([*admin, "--dry-run"], check=True)
            migration_started = time.monotonic()
            subprocess.run([*admin, "--switch", "--settle-s", "2"], check=True)
            migration_s = time.monotonic() - migration_started
            for _ in range(60):  # the gateway follows the switch within its poll interval
                probe = await stub.Score(pb.ScoreRequest(user_id=users[0], images=[pb.Image(data=photos[0])]))
                if probe.feature_space_version == NEW_SPACE:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            load.stop()
            await load_task
            for failure in sorted(set(load.failures))[:5]:
                _say(f"failed call: {failure}")
            after, personalized_after, spaces = await _score_all(stub, users, photos, held)
            spearman_after = _spearman(after, ideal[:, held])
            _say(
                f"after: {personalized_after}/{len(users)} personalized in {spaces}, "
                f"Spearman {spearman_after:.3f} (generic scores alone {generic_after:.3f})"
            )
            _say(f"load: {load.calls} Score calls during the rollout, {load.failed} failed")
            if spaces != {NEW_SPACE}:
                personalized_after = 0
    return DrillResult(
        config.users, personalized_before, personalized_after, load.failed, spearman_before, spearman_after,
        migration_s, ",".join(sorted(spaces)), load.calls, releases_spearman, generic_before, generic_after,
        served_diff,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI: runs the drill; prints the closing line last; exit 0 when it passed."""
    p = argparse.ArgumentParser(prog="python -m piaa_bench.upgrade_drill", description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=Path, default=Path("../shared/data/photos"))
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--photo-count", type=int, default=120)
    p.add_argument("--ratings-per-user", type=int, default=40)
    p.add_argument("--train-photos", type=int, default=0, help="photos the fs2 heads are trained on (0: all)")
    p.add_argument("--train-degradations", type=int, default=3, help="degradation kinds per photo")
    p.add_argument("--heads-onnx", type=Path, default=None, help="a trained release's heads (skips training)")
    p.add_argument("--seed", type=int, default=0, help="draws the users' tastes, ratings and held-out photos")
    args = p.parse_args(argv)
    config = DrillConfig(
        args.photos, args.users, args.photo_count, args.ratings_per_user, args.train_photos,
        train_degradations=args.train_degradations, seed=args.seed, heads_onnx=args.heads_onnx,
    )  # fmt: skip
    result = asyncio.run(run_drill(config))
    print(result.line(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
