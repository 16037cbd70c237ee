"""Bytes per rating in the history table: writes N realistic rows into a fresh local table in one commit
and divides the parquet bytes by N (docs/history.md quotes it).

    .venv/bin/python -m piaa_personalization.history.sizing --rows 1000 --users 50
    .venv/bin/python -m piaa_personalization.history.sizing --idle-rounds 11   # the writer's idle round

Rows are what the writer writes: head outputs passed through the Redis rating record's quantization
(format.encode_rating / decode_rating) and backbone features through the backbone key's 8-bit one, values
in the real heads' and EfficientNet-Lite0's ranges (simulated, as tests/unit/test_rating_quantization.py
simulates them), each rating a distinct image.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from piaa_personalization.history.table import HistoryTable, Rating
from piaa_personalization.model.residual import RatingScale
from piaa_personalization.store import backbone
from piaa_personalization.store import format as fmt


def realistic_rows(n: int, users: int, with_backbone: bool, seed: int = 0) -> list[Rating]:
    """n ratings by `users` users (seq per user), each of its own image."""
    rng = np.random.default_rng(seed)
    out, seqs = [], [0] * users
    for i in range(n):
        u = i % users
        packed = np.r_[
            rng.uniform(0.2, 0.8),
            rng.normal(0, 0.4, 10),
            rng.dirichlet(np.ones(10) * 0.3),
            rng.normal(size=64),
        ].astype(np.float32)
        digest = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        record = fmt.RatingRecord(digest, float(rng.integers(1, 6)), RatingScale.STARS_1_5, packed)
        stored = fmt.decode_rating(fmt.encode_rating(record))
        feature = None
        if with_backbone:  # pooled ReLU6 activations: non-negative, most small
            raw = np.clip(rng.gamma(0.6, 0.5, 1280), 0, 6).astype(np.float32)
            feature = backbone.decode(backbone.encode(raw)).tolist()
        out.append(
            Rating(
                "acme", f"user-{u:05d}", seqs[u], stored.fs_version, stored.time + i, stored.value,
                int(stored.scale), digest, stored.outputs.tolist(), f"req-{i // 3:06d}", feature,
            )
        )  # fmt: skip
        seqs[u] += 1
    return out


def measure(rows: int, users: int, with_backbone: bool) -> tuple[int, int]:
    """(parquet bytes, files) of `rows` rows written in one commit to a fresh table."""
    with tempfile.TemporaryDirectory() as tmp:
        table = HistoryTable(Path(tmp) / "h")
        table.append(realistic_rows(rows, users, with_backbone))
        files = list((Path(tmp) / "h").rglob("*.parquet"))
        return sum(f.stat().st_size for f in files), len(files)


async def idle_rounds(url: str, rounds: int, table_dir: str) -> list[float]:
    """Seconds of each of `rounds` writer rounds on an empty outbox (after a first, warming one)."""
    from piaa_personalization.history.writer import HistoryWriter
    from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig

    store = RedisProfileStore(StoreConfig(url=url, history_url=table_dir))
    try:
        writer = HistoryWriter(store, HistoryTable(table_dir))
        await writer.drain_once()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await writer.drain_once()
            times.append(time.perf_counter() - t0)
        return times
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--idle-rounds", type=int, default=0, help="time the writer's idle rounds instead")
    args = p.parse_args(argv)
    if args.idle_rounds:
        from piaa_personalization.store.redis_server import RedisServer

        with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
            times = asyncio.run(idle_rounds(server.url, args.idle_rounds, tmp))
        ms = [t * 1000 for t in times]
        print(f"idle round on one Redis: median {statistics.median(ms):.0f} ms, min {min(ms):.0f} ms")
        return 0
    for with_backbone in (True, False):
        size, files = measure(args.rows, args.users, with_backbone)
        label = "with backbone" if with_backbone else "without backbone"
        print(f"{label:17s} {args.rows} rows, {files} files, {size} B: {size / args.rows:.0f} B per rating")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
