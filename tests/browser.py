"""Renders HTML in Debian's headless Chromium and measures what the screenshot shows."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
BAR_COLOURS = {"rating": (46, 125, 50), "generic": (158, 158, 158), "personalized": (21, 101, 192)}


def screenshot(html_file: Path, out_png: Path, width: int = 1280, height: int = 2400) -> Path:
    """Renders the page to a PNG with headless Chromium; raises if Chromium is missing or fails."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("Debian's chromium is not installed: run `make test-deps` (as root)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out_png}",
                html_file.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return out_png


@dataclass(frozen=True)
class PageContent:
    bar_pixels: dict[str, int]
    photo_pixels: int
    """Pixels whose colour is none of the page's flat colours: photographs."""


def measure(png: Path) -> PageContent:
    """Counts pixels of each bar colour, and pixels that belong to photos (not flat page colours)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
    bars = {
        name: int((np.abs(rgb - np.array(colour)).sum(axis=2) <= 6).sum())
        for name, colour in BAR_COLOURS.items()
    }
    # Photos have texture: count pixels that differ noticeably from their right-hand neighbour and are
    # not grey text (channels differ), a property flat UI and black text do not have.
    texture = np.abs(np.diff(rgb, axis=1)).sum(axis=2) > 30
    chroma = (rgb.max(axis=2) - rgb.min(axis=2))[:, 1:] > 25
    return PageContent(bars, int((texture & chroma).sum()))
