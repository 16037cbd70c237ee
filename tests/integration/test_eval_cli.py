"""The evaluation command end to end: the simulated-rater report (small scale, live subset included),
and the protocol on generated FLICKR-AES and REAL-CUR data, in process and through the gateway."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from piaa_personalization.evaluation.cli import main
from piaa_personalization.evaluation.protocol import EXTRA_METHODS, METHODS
from piaa_personalization.store.redis_server import RedisServer
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import SHARED_PHOTOS
from tests.integration.test_eval_live import SERVED, _generated_flickr_aes


def test_small_simulated_report_with_a_live_subset(gateway: GatewayProcess, tmp_path: Path) -> None:
    out, png, js = (
        tmp_path / "eval" / "report.md",  # a folder that does not exist yet, as build/eval/ in a fresh clone
        tmp_path / "img" / "quality_active_learning_ours_prior.png",
        tmp_path / "q.json",
    )
    rc = main([
        "report", "--photos", str(SHARED_PHOTOS), "--limit", "96", "--n-test", "8", "--n-train", "8",
        "--reps", "2", "--ks", "10", "70", "--curve-ks", "5", "10", "20", "--curve-reps", "1",
        "--curve-method", "ours_prior", "--img-dir", str(png.parent),
        "--cache-dir", str(tmp_path / "cache"), "--onnx-dir", str(SERVED),
        "--json", str(js), "--out", str(out),
        "--live", gateway.address, "--live-raters", "2", "--tenant", f"eval{uuid.uuid4().hex[:8]}",
    ])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "8 tested (none: 2, content: 2, pixels: 2, mixed: 2), 8 teach the prior; 96 photos" in text
    assert all(m.label in text for m in METHODS + EXTRA_METHODS)  # the what-if and the ceiling too
    assert "| 10 | gateway: AddRatings + Score | 2 |" in text  # the live rows
    assert "| 70 | gateway: AddRatings + Score | 2 |" in text  # 70 ratings: two AddRatings calls
    assert "{'personalized': 224}" in text  # 2 raters x (86 + 26) held-out photos, all personalized
    assert "| 20 |" in text and png.read_bytes()[:4] == b"\x89PNG"
    rows = json.loads(js.read_text())["summary"]
    assert {(r["method"], r["k"]) for r in rows} == {
        (m.name, k) for m in METHODS + EXTRA_METHODS for k in (10, 70)
    }
    assert "## Which prior a tenant starts from" in text and "the tenant's own first 8 users" in text
    assert all(r["ci"][0] <= r["mean"] <= r["ci"][1] for r in rows)


def test_flickr_aes_and_real_cur_commands(
    gateway: GatewayProcess, redis_server: RedisServer, tmp_path: Path
) -> None:
    csv_file, images = _generated_flickr_aes(tmp_path)
    (tmp_path / "test_workers.txt").write_text("warm\ncold\n")
    out = tmp_path / "flickr.md"
    rc = main([
        "flickr-aes", "--csv", str(csv_file), "--images", str(images), "--test-workers",
        str(tmp_path / "test_workers.txt"), "--ks", "10", "--reps", "2", "--cache-dir", str(tmp_path / "c"),
        "--out", str(out), "--live", gateway.address, "--redis-url", redis_server.url,
    ])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "6 raters, 36 images, 216 ratings; 2 tested, 4 teach the prior; 2 repetitions." in text
    assert "prior learned in the store from 4 training raters; replies: {'personalized': 104}" in text
    assert (
        "| 10 | ours: population prior (paper20) | 2 |" in text
        and "| 10 | gateway: AddRatings + Score | 2 |" in text
    )

    root = tmp_path / "REAL-CUR"
    rng = np.random.default_rng(0)
    for owner in ("ann", "ben", "cy"):
        (root / owner).mkdir(parents=True)
        lines = ["image,score"]
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
                root / owner / f"{i}.jpg"
            )
            lines.append(f"{i}.jpg,{1 + i % 5}")
        (root / owner / "ratings.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "realcur.md"
    args = ["real-cur", "--root", str(root), "--ks", "10", "--reps", "1", "--cache-dir", str(tmp_path / "c")]
    rc = main([*args, "--out", str(out)])
    assert rc == 0
    assert "3 raters, 60 images, 60 ratings; 3 tested, 0 teach the prior (leave one out)" in out.read_text()
