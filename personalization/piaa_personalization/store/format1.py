"""Readers of format 1 (rating records, profile hashes) for data written before format 2; nothing writes it.

Pure: no I/O, and nothing from format.py (which dispatches here on the leading format byte), so the two
cannot import each other. Every reader raises ValueError or struct.error on a malformed value; format.py
turns those into StoreDataError.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
from numpy.typing import NDArray

from piaa_personalization.model.residual import PACKED_DIM, SufficientStats

FORMAT1 = b"1"

RATING_HEAD = struct.Struct("<cBdd32sB")  # format, scale, value, time, raw digest, len(fs)
"""A format-1 rating: this head, the feature-space version (ASCII), then PACKED_DIM float32 head outputs."""

FIT_FIELDS = (
    "weights", "gram", "moment", "yy", "n", "alpha", "lam", "updated_at", "feature_space_version", "dim",
)  # fmt: skip
"""Profile-hash fields of format 1 that format 2 no longer has (its commit deletes them)."""


def unpack_rating(raw: bytes) -> tuple[str, float, int, NDArray[np.float32], str, float]:
    """A format-1 rating record -> (digest hex, value, scale number, packed outputs [85], fs version, time).

    Raises ValueError when it is not a format-1 record of the right size."""
    fmt_, scale, value, when, digest, fs_len = RATING_HEAD.unpack_from(raw)
    if fmt_ != FORMAT1:
        raise ValueError(f"rating format {fmt_!r} is not 1")
    at = RATING_HEAD.size
    if len(raw) != at + fs_len + 4 * PACKED_DIM:
        raise ValueError(f"a format-1 rating record of {len(raw)} bytes")
    fs = raw[at : at + fs_len].decode()
    outputs = np.frombuffer(raw, dtype="<f4", offset=at + fs_len).astype(np.float32)
    return digest.hex(), value, scale, outputs, fs, when


def _f64(raw: bytes | None, count: int, what: str) -> NDArray[np.float64]:
    if raw is None or len(raw) != 8 * count:
        raise ValueError(f"{what}: expected {count} float64")
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


def unpack_sym(packed: NDArray[np.float64], dim: int) -> NDArray[np.float64]:
    """The symmetric [dim, dim] matrix whose upper triangle, row by row, is `packed`."""
    out = np.zeros((dim, dim))
    out[np.triu_indices(dim)] = packed
    return out + np.triu(out, 1).T


def unpack_stats(
    dim: int, gram: bytes | None, moment: bytes | None, yy: bytes | None, n: bytes | None
) -> SufficientStats:
    """Format-1 statistics: the gram's upper triangle and the moment as float64, yy and n as decimals."""
    return SufficientStats(
        unpack_sym(_f64(gram, dim * (dim + 1) // 2, "gram"), dim),
        _f64(moment, dim, "moment"),
        float(yy or 0.0),
        int(n or 0),
    )


def profile_kwargs(fields: dict[str, bytes | None], *, full: bool) -> dict[str, Any]:
    """Profile(...) keyword arguments (besides tenant and user_id) of a format-1 profile hash; the
    statistics only when `full`. Raises ValueError, UnicodeDecodeError on malformed fields."""
    layout_raw = fields.get("layout")
    weights_raw = fields.get("weights")
    weights = None
    if weights_raw is not None:
        if len(weights_raw) % 4:
            raise ValueError("weights are not float32")
        weights = np.frombuffer(weights_raw, dtype="<f4").astype(np.float32)
    stats = None
    if full and layout_raw is not None and fields.get("gram") is not None and weights is not None:
        stats = unpack_stats(
            len(weights), fields["gram"], fields.get("moment"), fields.get("yy"), fields["n"]
        )

    def num(name: str, default: float) -> float:
        raw = fields.get(name)
        return float(raw) if raw is not None else default

    return {
        "layout_key": layout_raw.decode() if layout_raw is not None else None,
        "weights": weights,
        "num_ratings": int(num("num_ratings", 0)),
        "n": int(num("n", 0)),
        "covers": int(num("covers", 0)),
        "version": int(num("version", 0)),
        "updated_at": num("updated_at", 0.0),
        "alpha": num("alpha", math.nan),
        "lam": num("lam", math.nan),
        "stats": stats,
    }
