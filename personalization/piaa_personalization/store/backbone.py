"""Backbone features of rated images by digest, 8 bits with a per-vector range, for heads-only upgrades.

A new feature space from retrained heads is the new heads applied to the backbone's pooled feature, so a
store that keeps that feature for every rated image can move every profile into the new space without
the images (migration.py). The value is shared by every user who rated the image and has no TTL: it lives
as long as ratings may refer to it. Layout (format.md, "Backbone features"):

    offset size
    0      1    format, ASCII '1'
    1      4    lo, float32     (the smallest element)
    5      4    step, float32   ((max - lo) / 255; 0 for a constant vector)
    9      1280 q, uint8        element i = lo + q[i] * step

1289 bytes per image, a quarter of float32. The rounding error is at most step / 2 per element.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from piaa_client.features import BACKBONE_FEATURE_DIM
from piaa_personalization.store import format as fmt
from piaa_personalization.store.connection import Connection

FORMAT = b"1"
BACKBONE_ID = "lite0"
"""Which backbone the stored features come from (EfficientNet-Lite0, the served `backbone` model); part of
the key, so features of another backbone are never fed to heads trained on this one. A backbone change
gets a new id and needs the images again (re-enrolment, docs/operations.md)."""
_HEAD = struct.Struct("<cff")
VALUE_BYTES = _HEAD.size + BACKBONE_FEATURE_DIM
"""Bytes of one stored feature (1289)."""


def key(prefix: str, digest: str, backbone: str = BACKBONE_ID) -> str:
    """`<p>:bb:<backbone>:<digest>`: one image's backbone feature (no hash tag: spread over the slots)."""
    return f"{prefix}:bb:{backbone}:{fmt.check_digest(digest)}"


def encode(feature: NDArray[np.floating]) -> bytes:
    """One [1280] feature as format-1 bytes; raises ValueError for another size or a non-finite value."""
    x = np.asarray(feature, dtype=np.float32).reshape(-1)
    if x.shape != (BACKBONE_FEATURE_DIM,) or not np.all(np.isfinite(x)):
        raise ValueError(f"a backbone feature is {BACKBONE_FEATURE_DIM} finite floats, got {x.shape}")
    lo, hi = float(x.min()), float(x.max())
    step = (hi - lo) / 255.0
    q = np.zeros(x.shape, np.uint8) if step == 0 else np.rint((x - lo) / step).clip(0, 255).astype(np.uint8)
    return _HEAD.pack(FORMAT, lo, step) + q.tobytes()


def decode(raw: bytes) -> NDArray[np.float32]:
    """The [1280] float32 feature of encode()'s bytes; raises StoreDataError on any other value."""
    if len(raw) != VALUE_BYTES or raw[:1] != FORMAT:
        raise fmt.StoreDataError(f"a backbone feature is {VALUE_BYTES} bytes of format 1, got {len(raw)}")
    _, lo, step = _HEAD.unpack_from(raw)
    q = np.frombuffer(raw, dtype=np.uint8, offset=_HEAD.size)
    return (np.float32(lo) + q.astype(np.float32) * np.float32(step)).astype(np.float32)


class BackboneStore:
    """Reads and writes backbone features by digest over a store's connection (one pipelined round trip
    per call, one pipeline per node in a cluster). Raises StoreUnavailable, StoreDataError."""

    def __init__(self, conn: Connection, prefix: str, backbone: str = BACKBONE_ID) -> None:
        self.conn = conn
        self.prefix = prefix
        self.backbone = backbone

    def _keys(self, digests: Sequence[str]) -> list[str]:
        return [key(self.prefix, d, self.backbone) for d in digests]

    async def missing(self, digests: Sequence[str]) -> list[str]:
        """The digests (in order, deduplicated) that have no stored feature."""
        unique = list(dict.fromkeys(digests))
        keys = self._keys(unique)

        def fill(pipe: Any) -> None:
            for k in keys:
                pipe.exists(k)

        found = await self.conn.pipeline("backbone_exists", keys, fill)
        return [d for d, n in zip(unique, found, strict=True) if not int(n)]

    async def put(self, digests: Sequence[str], features: NDArray[np.floating]) -> None:
        """Stores feature row i under digests[i] (no TTL)."""
        if len(digests) != len(features):
            raise ValueError(f"{len(digests)} digests for {len(features)} features")
        if not digests:
            return
        keys = self._keys(digests)
        values = [encode(row) for row in features]

        def fill(pipe: Any) -> None:
            for k, v in zip(keys, values, strict=True):
                pipe.set(k, v)

        await self.conn.pipeline("backbone_write", keys, fill)

    async def get(self, digests: Sequence[str]) -> list[NDArray[np.float32] | None]:
        """The stored features of `digests`, None where there is none."""
        if not digests:
            return []
        keys = self._keys(digests)

        def fill(pipe: Any) -> None:
            for k in keys:
                pipe.get(k)

        raw = await self.conn.pipeline("backbone_read", keys, fill)
        return [decode(v) if v is not None else None for v in raw]
