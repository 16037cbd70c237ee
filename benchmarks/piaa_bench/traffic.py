"""What a photo platform's users send, for the Locust load test (benchmarks/locustfile.py).

Users are drawn by a Zipf law (a few heavy users, a long tail); each image of a call is, with probability
`repeat_share`, one of a fixed set of popular photos drawn by a Zipf law too (sent again byte for byte, so
the gateway's feature cache can answer it), else a fresh upload (a pool photo with a unique trailer after the
JPEG's end, which decoders ignore: a feature-cache miss that runs through Triton). Photos come from a folder,
re-encoded at sizes drawn like phone uploads scaled for scoring, or are generated with Pillow when there is
no folder. Pure Python (Pillow only to make or resize photos) and no Locust: unit-tested on its own.
"""

from __future__ import annotations

import bisect
import io
import itertools
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)
"""Width / height of the generated and resized photos: phone and camera frames, squares, portraits."""


class ZipfSampler:
    """Ranks 0..n-1 drawn with P(rank k) ∝ 1 / (k + 1)^s: rank 0 the most popular. Raises ValueError for
    n < 1 or s < 0."""

    def __init__(self, n: int, s: float) -> None:
        if n < 1 or s < 0:
            raise ValueError(f"a Zipf law needs n >= 1 and s >= 0, got n={n}, s={s}")
        weights = [(k + 1) ** -s for k in range(n)]
        self._cdf = list(itertools.accumulate(weights))
        self._total = self._cdf[-1]
        self.n = n

    def probability(self, rank: int) -> float:
        """P(rank)."""
        low = self._cdf[rank - 1] if rank else 0.0
        return (self._cdf[rank] - low) / self._total

    def draw(self, rng: random.Random) -> int:
        """One rank."""
        return min(bisect.bisect_right(self._cdf, rng.random() * self._total), self.n - 1)


@dataclass(frozen=True)
class UploadSizes:
    """Long sides of uploaded photos (pixels): log-normal around `median_px`, clipped to [min_px, max_px].
    Apps scale a phone's 12 MP frame down before they upload it for scoring; the spread covers the scaled
    frames, screenshots and crops."""

    median_px: int = 1024
    sigma: float = 0.35
    min_px: int = 320
    max_px: int = 2048

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """(width, height) of one photo: a long side and an aspect from ASPECTS."""
        long_side = min(
            self.max_px, max(self.min_px, round(rng.lognormvariate(math.log(self.median_px), self.sigma)))
        )
        aspect = rng.choice(ASPECTS)
        if aspect >= 1:
            return long_side, max(1, round(long_side / aspect))
        return max(1, round(long_side * aspect)), long_side


def synthetic_photo(size: tuple[int, int], rng: random.Random, quality: int = 85) -> bytes:
    """A JPEG of `size` that compresses like a photo (smooth colour fields, edges, some grain), not like
    noise. Drawn at a quarter of the size and scaled up (~50 ms for 1024 x 768). Needs Pillow."""
    from PIL import Image, ImageDraw, ImageFilter

    width, height = size
    small_size = (max(1, width // 4), max(1, height // 4))
    seed = Image.new("RGB", (8, 6))
    seed.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(8 * 6)])
    small = seed.resize(small_size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(small)
    w, h = small_size
    for _ in range(rng.randrange(3, 9)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(w // 8 + 1, w // 2 + 2), y0 + rng.randrange(h // 8 + 1, h // 2 + 2)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    small = small.filter(ImageFilter.GaussianBlur(radius=1.0))
    image = small.resize(size, Image.Resampling.BICUBIC)
    grain = Image.effect_noise((max(1, width // 2), max(1, height // 2)), 24).convert("RGB")
    image = Image.blend(image, grain.resize(size, Image.Resampling.NEAREST), 0.08)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def resized_photo(data: bytes, size: tuple[int, int], quality: int = 85) -> bytes:
    """`data` (any format Pillow reads) re-encoded as a JPEG covering `size` (scaled and centre-cropped)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        fitted = ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    fitted.save(out, "JPEG", quality=quality)
    return out.getvalue()


def photo_files(folder: Path) -> list[Path]:
    """The JPEG, PNG and WebP files of `folder`, sorted; raises FileNotFoundError when there are none."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no photos in {folder}")
    return files


def photo_pool(
    folder: Path | None,
    count: int,
    sizes: UploadSizes | None,
    rng: random.Random,
) -> tuple[list[bytes], str]:
    """`count` encoded photos and where they came from: `count` files of `folder` spread over it (re-encoded
    at drawn upload sizes unless `sizes` is None: then as they are), or, with no folder, generated at drawn
    sizes (UploadSizes() when `sizes` is None). Raises FileNotFoundError for a folder without photos."""
    if count < 1:
        raise ValueError("the pool needs at least one photo")
    if folder is None:
        drawn = sizes or UploadSizes()
        made = [synthetic_photo(drawn.draw(rng), rng) for _ in range(count)]
        return made, f"{count} synthetic JPEGs"
    files = photo_files(folder)
    step = max(1, len(files) // count)
    picked = files[::step][:count]
    raw = [p.read_bytes() for p in picked]
    if sizes is None:
        return raw, f"{len(raw)} photos of {folder} as they are"
    resized = [resized_photo(d, sizes.draw(rng)) for d in raw]
    return resized, f"{len(raw)} photos of {folder} at upload sizes"


class Traffic:
    """Draws users and images for one Locust process (each user keeps its own `random.Random`)."""

    def __init__(
        self,
        photos: Sequence[bytes],
        *,
        users: int = 10_000,
        user_zipf_s: float = 1.1,
        repeat_share: float = 0.3,
        popular: int | None = None,
        image_zipf_s: float = 1.0,
        user_prefix: str = "locust-u",
        run_id: str | None = None,
    ) -> None:
        """`popular` photos of the pool (default: all of it) are the ones that come back; a fresh upload is
        a pool photo made unique by a trailer naming `run_id` (default: random) and a counter."""
        if not photos:
            raise ValueError("no photos")
        if not 0.0 <= repeat_share <= 1.0:
            raise ValueError(f"repeat_share must be within [0, 1], got {repeat_share}")
        self.photos = list(photos)
        self.users = ZipfSampler(users, user_zipf_s)
        self.popular = ZipfSampler(min(popular or len(self.photos), len(self.photos)), image_zipf_s)
        self.repeat_share = repeat_share
        self.user_prefix = user_prefix
        self.run_id = run_id or os.urandom(6).hex()
        self._fresh = itertools.count()

    def user(self, rng: random.Random) -> str:
        """A user id, Zipf-popular: `<prefix><rank>`."""
        return f"{self.user_prefix}{self.users.draw(rng)}"

    def image(self, rng: random.Random) -> bytes:
        """One image: a popular photo again (repeat_share of the time), else a fresh upload."""
        if rng.random() < self.repeat_share:
            return self.photos[self.popular.draw(rng)]
        photo = self.photos[rng.randrange(len(self.photos))]
        return photo + b"piaa-locust:%s:%d:%d" % (self.run_id.encode(), os.getpid(), next(self._fresh))

    def images(self, rng: random.Random, count: int) -> list[bytes]:
        """`count` images, each drawn as image() draws."""
        return [self.image(rng) for _ in range(count)]
