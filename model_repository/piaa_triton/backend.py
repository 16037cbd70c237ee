"""The Triton Python backend folder: symlinks into the nvidia-pytriton wheel, with the stub for our Python.

`python -m piaa_triton.backend --prepare` builds build/triton/backends/python/ (idempotent).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from piaa_triton.exceptions import BackendNotFoundError
from piaa_triton.paths import backend_dir

STUB_NAME = "triton_python_backend_stub"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonWheel:
    """The files of the nvidia-pytriton wheel that we run."""

    root: Path
    """.../site-packages/pytriton/tritonserver"""

    @property
    def server_binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python_minor: str) -> Path:
        """The Python backend stub built for one Python minor ("3.11"); it must equal the venv's."""
        return self.root / "python_backend_stubs" / python_minor / STUB_NAME


def find_wheel() -> TritonWheel:
    """Locates the tritonserver shipped in the nvidia-pytriton wheel. Raises BackendNotFoundError."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise BackendNotFoundError("nvidia-pytriton is not installed in this environment (make setup)")
    wheel = TritonWheel(Path(spec.origin).parent / "tritonserver")
    if not wheel.server_binary.is_file():
        raise BackendNotFoundError(f"{wheel.server_binary} is missing: reinstall nvidia-pytriton")
    return wheel


def python_minor() -> str:
    """This interpreter's "major.minor": the stub must be built for it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _wanted_links(wheel: TritonWheel) -> dict[str, Path]:
    links = {name: wheel.python_backend / name for name in BACKEND_FILES}
    links[STUB_NAME] = wheel.stub(python_minor())
    for name, target in links.items():
        if not target.is_file():
            raise BackendNotFoundError(f"{target} is missing from the wheel (needed as python/{name})")
    return links


def prepare(target: Path | None = None, wheel: TritonWheel | None = None) -> bool:
    """Creates or refreshes <target>/python/ as symlinks into the wheel.

    Takes the backend folder (default build/triton/backends). Returns True when something changed,
    False when it was already up to date. Raises BackendNotFoundError when the wheel lacks a file.
    """
    target = target or backend_dir()
    wheel = wheel or find_wheel()
    folder = target / "python"
    folder.mkdir(parents=True, exist_ok=True)
    changed = False
    for name, source in _wanted_links(wheel).items():
        link = folder / name
        if link.is_symlink() and Path(link.readlink()) == source:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
        changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    """CLI: --prepare builds the backend folder and says what it did."""
    parser = argparse.ArgumentParser(prog="python -m piaa_triton.backend", description=__doc__)
    parser.add_argument("--prepare", action="store_true", help="build the backend folder (idempotent)")
    parser.add_argument("--dir", type=Path, default=None, help="default build/triton/backends")
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.print_help()
        return 2
    target = args.dir or backend_dir()
    try:
        changed = prepare(target)
    except BackendNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"prepared {target}/python (stub for Python {python_minor()})" if changed else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
