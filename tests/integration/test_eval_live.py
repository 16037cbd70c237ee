"""The protocol through the real gateway (AddRatings + Score) equals the in-process protocol on the same
draws: generated FLICKR-AES-format data, the session's gateway, fresh tenants (the zero prior, then one
taught the prior learned from the training workers)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from piaa_client.client import Client
from piaa_personalization.evaluation import protocol as P
from piaa_personalization.evaluation.datasets import FLICKR_AES_CSV, load_flickr_aes
from piaa_personalization.evaluation.features import cached_features, pixel_stats
from piaa_personalization.evaluation.live import run_live, teach_prior
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import repository_dir
from tests.fixtures.gateway import GatewayProcess

N_IMAGES = 36
SERVED = repository_dir("cpu")
"""The ONNX files the session's Triton serves (build/onnx may be newer until the repository is rebuilt)."""


def _generated_flickr_aes(folder: Path) -> tuple[Path, Path]:
    """36 textured 256-px JPEGs and six workers: bright, warm and cold photos' fans, and three like them."""
    rng = np.random.default_rng(11)
    images = folder / "40K"
    images.mkdir()
    stats = []
    for i in range(N_IMAGES):
        base = rng.uniform(20, 235, 3)
        ramp = np.linspace(-40, 40, 256)[None, :, None] * rng.uniform(-1, 1, 3)
        pixels = np.clip(base + ramp + rng.normal(0, 25, (256, 256, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        image.save(images / f"farm{i}_{i:05d}.jpg", "JPEG", quality=90)
        stats.append(pixel_stats(image))
    warmth, brightness = np.array(stats)[:, 0], np.array(stats)[:, 1]
    lines = ["worker, imagePair, score"]
    tastes = {"bright": brightness, "warm": warmth, "cold": -warmth}
    # Three more workers who only teach the prior: the same tastes, seen through some noise.
    tastes |= {f"t-{k}": v + rng.normal(0, 0.5 * v.std(), len(v)) for k, v in tastes.items()}
    for worker, taste in tastes.items():
        stars = 1 + np.searchsorted(np.quantile(taste, [0.2, 0.4, 0.6, 0.8]), taste)
        lines += [f"{worker}, farm{i}_{i:05d}.jpg, {s}" for i, s in enumerate(stars)]
    csv_file = folder / FLICKR_AES_CSV
    csv_file.write_text("\n".join(lines) + "\n")
    return csv_file, images


def test_live_protocol_equals_in_process(gateway: GatewayProcess, tmp_path: Path) -> None:
    ratings = load_flickr_aes(*_generated_flickr_aes(tmp_path))
    split = P.Split((), (0, 1, 2))
    feats = cached_features(list(ratings.images), onnx_dir=SERVED, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("eval-*.npz"))) == 1
    again = cached_features(
        list(ratings.images), onnx_dir=SERVED, cache_dir=tmp_path / "cache"
    )  # read back from the cache
    np.testing.assert_array_equal(again.heads.packed(), feats.heads.packed())
    design = P.Design.build(feats.heads, ratings)
    methods = (P.GENERIC, P.METHODS_BY_NAME["paper_both"])  # the gateway's layout and, fresh tenant, prior
    local = P.run(design, split, ks=(10,), reps=2, methods=methods)

    with Client(gateway.address, tenant=f"eval{uuid.uuid4().hex[:8]}", timeout=120.0) as client:
        live, replies = run_live(client, ratings, split, ks=(10,), reps=2, user_prefix="evt-")
        assert not client.get_profile("evt-bright-k10-r0").exists  # each scored user is deleted
    assert replies == {"personalized": 3 * 2 * (N_IMAGES - 10)}
    assert not np.array_equal(live.rho[1], live.rho[0])  # personalized scores rank differently
    np.testing.assert_allclose(
        live.rho, local.rho, atol=0.02
    )  # Triton's heads vs ONNX Runtime's: float noise
    assert np.isfinite(live.rho).all()
    rows = {s.method: s for s in P.summarize(live)}
    assert rows["live"].raters == 3 and rows["generic"].gain == 0.0


def test_live_protocol_with_a_learned_prior_equals_ours_prior(
    gateway: GatewayProcess, redis_server: RedisServer, tmp_path: Path
) -> None:
    ratings = load_flickr_aes(*_generated_flickr_aes(tmp_path))
    split = P.Split((3, 4, 5), (0, 1, 2))
    feats = cached_features(list(ratings.images), onnx_dir=SERVED, cache_dir=tmp_path / "cache")
    design = P.Design.build(feats.heads, ratings)
    local = P.run(design, split, ks=(10,), reps=2, methods=(P.GENERIC, P.METHODS_BY_NAME["ours_prior"]))
    tenant = f"eval{uuid.uuid4().hex[:8]}"
    assert teach_prior(redis_server.url, tenant, ratings, feats.heads, split.train) == 3
    with Client(gateway.address, tenant=tenant, timeout=120.0) as client:
        live, replies = run_live(client, ratings, split, ks=(10,), reps=2)
    assert replies == {"personalized": 3 * 2 * (N_IMAGES - 10)}
    np.testing.assert_allclose(live.rho, local.rho, atol=0.02)
    zero = P.run(design, split, ks=(10,), reps=2, methods=(P.METHODS_BY_NAME["paper_both"],))
    assert not np.allclose(live.rho[1], zero.rho[0], atol=1e-3)  # the learned prior, not the zero one
