"""The client installs on its own: its wheel has generated stubs and needs only grpcio, protobuf, numpy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO_ROOT


def build_wheel(source: Path, out: Path, name: str) -> Path:
    """The wheel pip builds from `source` into `out` (no dependencies, no isolated build environment)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob(f"{name}-*.whl")
    return wheel


def test_client_wheel_is_light_and_self_contained(tmp_path: Path) -> None:
    source = tmp_path / "client"
    shutil.copytree(
        REPO_ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("*_pb2*.py", "*_pb2*.pyi", "__pycache__", "*.egg-info"),
    )
    wheel = build_wheel(source, tmp_path, "piaa_client")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
        archive.extractall(tmp_path / "site")
    assert {"piaa_client/api/v1/piaa_pb2.py", "piaa_client/api/v1/piaa_pb2_grpc.py"} <= names
    requires = sorted(
        line.split()[1].split("<")[0].split(">")[0]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist")
    )
    assert requires == ["grpcio", "numpy", "protobuf"]

    # Import every module of the wheel with torch, Pillow and our server packages made unimportable.
    check = (
        "import sys\n"
        "banned = ('torch', 'PIL', 'onnxruntime', 'piaa_export', 'piaa_triton', 'piaa_personalization')\n"
        "for name in banned:\n"
        "    sys.modules[name] = None\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "import piaa_client, piaa_client.client, piaa_client.cli, piaa_client.report, piaa_client.features\n"
        "assert piaa_client.__file__.startswith(sys.path[0]), piaa_client.__file__\n"
    )
    subprocess.run([sys.executable, "-I", "-c", check], check=True, capture_output=True)


SERVER_PACKAGE_DIRS = {
    "piaa_common": "common/piaa_common",
    "piaa_export": "export/piaa_export",
    "piaa_triton": "model_repository/piaa_triton",
    "piaa_personalization": "personalization/piaa_personalization",
    "piaa_bench": "benchmarks/piaa_bench",
}


def test_server_wheel_carries_every_module_of_the_source_tree(tmp_path: Path) -> None:
    """The gateway image installs the `piaa` wheel: a subpackage left out of it is an import error there."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    for folder in SERVER_PACKAGE_DIRS.values():
        shutil.copytree(
            REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    wheel = build_wheel(source, tmp_path, "piaa")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {
        f"{package}/{path.relative_to(REPO_ROOT / folder).as_posix()}"
        for package, folder in SERVER_PACKAGE_DIRS.items()
        for path in (REPO_ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected - names == set(), f"modules missing from the piaa wheel: {sorted(expected - names)}"
    assert "piaa_personalization/store/format.md" in names
