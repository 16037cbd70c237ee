"""Computational-aesthetics measures from pixels: the training targets of the attribute head.

One function per AADB attribute where a published pixel measure exists; docs/models.md has the table
(what each computes, where it comes from, what it misses). Every measure takes an 8-bit RGB array at
serving scale (shorter side 256) and returns one float where larger means "more of the attribute".
Content has no pixel measure at all: its target is the backbone's ImageNet confidence (a proxy).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from piaa_client.features import ATTRIBUTES

SALIENCY_SIDE = 64
"""Spectral-residual saliency is computed at this width (Hou & Zhang use 64 px)."""


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in [0, 1]."""
    f = rgb.astype(np.float64) / 255.0
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def spectral_residual_saliency(rgb: np.ndarray) -> np.ndarray:
    """Hou & Zhang (CVPR 2007) saliency at SALIENCY_SIDE width, normalized to sum to 1."""
    gray = luminance(rgb)
    small = ndimage.zoom(gray, SALIENCY_SIDE / gray.shape[1], order=1)
    spectrum = np.fft.fft2(small)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - ndimage.uniform_filter(log_amp, size=3, mode="nearest")
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = ndimage.gaussian_filter(sal, sigma=2.5)
    return sal / (sal.sum() + 1e-12)


def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Normalized pixel-centre coordinates in [0, 1] (x, y)."""
    h, w = shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    return (x + 0.5) / w, (y + 0.5) / h


def colorfulness(rgb: np.ndarray) -> float:
    """VividColor: Hasler & Süsstrunk (2003) colourfulness M = σ_rgyb + 0.3 μ_rgyb."""
    f = rgb.astype(np.float64)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def light(rgb: np.ndarray) -> float:
    """Light: exposure near mid-grey, little clipping, some tonal range (Datta et al. 2006 exposure)."""
    y = luminance(rgb)
    clipped = float(np.mean((y < 0.02) | (y > 0.98)))
    return float(-2.0 * abs(y.mean() - 0.5) - 2.0 * clipped + y.std())


def depth_of_field(rgb: np.ndarray) -> float:
    """DoF: centre-versus-surround sharpness, log ratio of Laplacian energy (Datta et al. 2006 low-DoF)."""
    y = luminance(rgb)
    energy = np.abs(ndimage.laplace(y))
    h, w = y.shape
    centre = energy[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()
    return float(np.log((centre + 1e-6) / (energy.mean() + 1e-6)))


def symmetry(rgb: np.ndarray) -> float:
    """Symmetry: mirror similarity, correlation of the edge map with its left-right mirror image."""
    y = ndimage.zoom(luminance(rgb), 96 / rgb.shape[1], order=1)
    edges = np.hypot(ndimage.sobel(y, axis=0), ndimage.sobel(y, axis=1))
    a = edges - edges.mean()
    b = a[:, ::-1]
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))


def rule_of_thirds(rgb: np.ndarray) -> float:
    """RuleOfThirds: saliency mass near the third lines (Liu et al. 2010, Datta et al. 2006)."""
    sal = spectral_residual_saliency(rgb)
    x, y = _grid(sal.shape)
    sigma = 0.07
    near_x = np.maximum(
        np.exp(-((x - 1 / 3) ** 2) / (2 * sigma**2)), np.exp(-((x - 2 / 3) ** 2) / (2 * sigma**2))
    )
    near_y = np.maximum(
        np.exp(-((y - 1 / 3) ** 2) / (2 * sigma**2)), np.exp(-((y - 2 / 3) ** 2) / (2 * sigma**2))
    )
    return float((sal * np.maximum(near_x, near_y)).sum())


def balancing_elements(rgb: np.ndarray) -> float:
    """BalancingElements: the saliency centre of mass near the frame centre (visual balance, Liu 2010)."""
    sal = spectral_residual_saliency(rgb)
    x, y = _grid(sal.shape)
    return float(-np.hypot((sal * x).sum() - 0.5, (sal * y).sum() - 0.5))


def object_emphasis(rgb: np.ndarray) -> float:
    """Object: saliency concentration, the share of saliency in the most salient 10% of the frame."""
    sal = np.sort(spectral_residual_saliency(rgb).ravel())[::-1]
    return float(sal[: max(1, sal.size // 10)].sum())


def repetition(rgb: np.ndarray) -> float:
    """Repetition: strongest off-centre peak of the edge map's normalized autocorrelation."""
    y = ndimage.zoom(luminance(rgb), 128 / rgb.shape[1], order=1)
    edges = np.hypot(ndimage.sobel(y, axis=0), ndimage.sobel(y, axis=1))
    e = edges - edges.mean()
    power = np.abs(np.fft.fft2(e)) ** 2
    auto = np.fft.fftshift(np.real(np.fft.ifft2(power)))
    auto /= auto.max() + 1e-12
    cy, cx = np.array(auto.shape) // 2
    yy, xx = np.mgrid[0 : auto.shape[0], 0 : auto.shape[1]]
    far = np.hypot(yy - cy, xx - cx) > 0.08 * auto.shape[1]  # beyond the trivial central lobe
    return float(auto[far].max())


# Cohen-Or et al. (SIGGRAPH 2006) hue templates after Matsuda: (centre offset°, width°) per sector.
HUE_TEMPLATES: dict[str, tuple[tuple[float, float], ...]] = {
    "i": ((0.0, 18.0),),
    "V": ((0.0, 93.6),),
    "L": ((0.0, 18.0), (90.0, 79.2)),
    "I": ((0.0, 18.0), (180.0, 18.0)),
    "T": ((0.0, 180.0),),
    "Y": ((0.0, 93.6), (180.0, 18.0)),
    "X": ((0.0, 93.6), (180.0, 93.6)),
}
_HUE_BINS = 180


def _template_distances() -> np.ndarray:
    """[templates, rotations, bins]: arc distance (degrees) from each hue bin to the nearest sector."""
    hues = (np.arange(_HUE_BINS) + 0.5) * 360.0 / _HUE_BINS
    rotations = np.arange(_HUE_BINS) * 360.0 / _HUE_BINS
    out = np.empty((len(HUE_TEMPLATES), _HUE_BINS, _HUE_BINS))
    for t, sectors in enumerate(HUE_TEMPLATES.values()):
        best = np.full((_HUE_BINS, _HUE_BINS), np.inf)
        for offset, width in sectors:
            centre = (rotations[:, None] + offset) % 360.0
            arc = np.abs((hues[None, :] - centre + 180.0) % 360.0 - 180.0)
            best = np.minimum(best, np.maximum(0.0, arc - width / 2))
        out[t] = best
    return out


_TEMPLATE_DISTANCES = _template_distances()


def color_harmony(rgb: np.ndarray) -> float:
    """ColorHarmony: best hue-template fit (Cohen-Or et al. 2006), minus the saturation-weighted hue
    distance (degrees) to the best template at its best rotation; 0 = perfectly harmonic."""
    f = rgb.astype(np.float64) / 255.0
    cmax, cmin = f.max(axis=-1), f.min(axis=-1)
    delta = cmax - cmin
    saturation = np.where(cmax > 0, delta / np.maximum(cmax, 1e-12), 0.0)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    safe = np.maximum(delta, 1e-12)
    hue = np.where(
        cmax == r, ((g - b) / safe) % 6.0, np.where(cmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    weight = saturation * cmax  # dark or grey pixels carry no hue worth judging
    hist = np.bincount(
        np.minimum((hue * 60.0 / 360.0 * _HUE_BINS).astype(int), _HUE_BINS - 1).ravel(),
        weights=weight.ravel(),
        minlength=_HUE_BINS,
    )
    total = hist.sum()
    if total <= 1e-9:
        return 0.0  # a grey image fits every template
    cost = _TEMPLATE_DISTANCES @ hist / total  # [templates, rotations]
    return float(-cost.min())


def imagenet_confidence(logits: np.ndarray) -> float:
    """Content proxy (no pixel measure exists): max softmax probability of the backbone's ImageNet logits."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z)
    return float(p.max() / p.sum())


PIXEL_MEASURES: dict[str, Callable[[np.ndarray], float]] = {
    "BalancingElements": balancing_elements,
    "ColorHarmony": color_harmony,
    "DoF": depth_of_field,
    "Light": light,
    "Object": object_emphasis,
    "Repetition": repetition,
    "RuleOfThirds": rule_of_thirds,
    "Symmetry": symmetry,
    "VividColor": colorfulness,
}
"""Attribute → its pixel measure; Content is the one attribute computed from logits instead."""


def attribute_measures(rgb: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """All 10 raw measures in ATTRIBUTES order, for one image (RGB array) and its ImageNet logits."""
    values = []
    for name in ATTRIBUTES:
        values.append(imagenet_confidence(logits) if name == "Content" else PIXEL_MEASURES[name](rgb))
    return np.asarray(values, dtype=np.float64)
