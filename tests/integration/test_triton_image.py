"""The Triton image as deploy/triton.Dockerfile writes it, checked without Docker or a GPU.

- Its Python files, rebuilt from the COPY lines and the .dockerignore, import every entry point from that
  set alone, with the image's PYTHONPATH, and nothing outside the packages its requirements install.
- Both images' requirements resolve for the container's Python and platform (pip --dry-run; PyPI).
- Every TensorRT name the engine builder uses exists in the TensorRT Python bindings of the versions the
  image may carry (the wheel's extension, read as strings: it cannot be imported without libnvinfer).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from piaa_export import onnx2trt
from tests.dockerfiles import DEPLOY, REPO_ROOT, arg_defaults, env, image_tree

TRITON_DOCKERFILE = DEPLOY / "triton.Dockerfile"
GATEWAY_DOCKERFILE = DEPLOY / "gateway.Dockerfile"
NGC = arg_defaults(TRITON_DOCKERFILE)
BACKEND_UTILS = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver" / "backends" / "python"
"""The real triton_python_backend_utils.py (the stub puts it on sys.path of every Python model)."""

ENTRY_POINTS = {
    "launch.py (serve, prepare, ready: the health check)": "/opt/piaa/launch.py",
    "preprocess, cpu profile": "/opt/piaa/src/model_repository/models/preprocess/model.py",
    "preprocess, gpu profile": "/opt/piaa/src/model_repository/models/preprocess/model_gpu.py",
    "backbone, cpu profile": "/opt/piaa/src/model_repository/models/backbone/model.py",
    "backbone, cpu profile, fused layout": "/opt/piaa/src/model_repository/models/backbone/model_fused.py",
    "heads, cpu profile": "/opt/piaa/src/model_repository/models/heads/model.py",
}
ENGINE_MODULES = ("piaa_export.cli", "piaa_export.onnx2trt", "piaa_export.onnx_precision")
"""What `launch.py prepare --engines` runs: python -m piaa_export.cli engines (onnx2trt inside)."""
EXTRA_IMAGE_MODULES = {"tensorrt", "cuda", "triton_python_backend_utils"}
"""Installed by install_tensorrt_bindings.sh, by cuda-python (its `cuda` namespace), and by the stub."""


def requirement_closure(requirements: Path) -> set[str]:
    """The distributions `pip install -r requirements` brings, followed through this venv's metadata."""
    wanted = [
        re.split(r"[\s\[=<>;#]", line.strip())[0]
        for line in requirements.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    extras = {"tritonclient": {"grpc"}}
    seen: set[str] = set()
    while wanted:
        name = wanted.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (cuda-python): its modules are in EXTRA_IMAGE_MODULES
        for req in requires:
            target, _, marker = req.partition(";")
            wanted_extras = extras.get(name, set())
            if "extra ==" in marker and not any(f"{q}{e}{q}" in marker for e in wanted_extras for q in "'\""):
                continue
            if "python_version" in marker or "sys_platform" in marker or "platform_system" in marker:
                continue  # markers for other platforms than the container's Linux / Python 3.12
            wanted.append(re.split(r"[\s\[=<>!~(]", target.strip())[0])
    return seen


def allowed_top_level(requirements: Path) -> set[str]:
    """Top-level module names the image can import: the standard library and the requirement closure."""
    dists = requirement_closure(requirements)
    modules = {
        module
        for module, owners in metadata.packages_distributions().items()
        if any(o.lower().replace("_", "-") in dists for o in owners)
    }
    return modules | set(sys.stdlib_module_names) | EXTRA_IMAGE_MODULES


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image")
    placed = image_tree(TRITON_DOCKERFILE, root)
    assert "/opt/piaa/launch.py" in placed
    return root


def image_python(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` with this venv's packages but none of our editable installs, the image's PYTHONPATH
    mapped under `root`, and a finder that refuses any top-level module the image does not install."""
    pythonpath = [str(root) + p for p in env(TRITON_DOCKERFILE)["PYTHONPATH"].split(":")]
    allowed = sorted(allowed_top_level(DEPLOY / "triton" / "requirements.txt"))
    prelude = textwrap.dedent(
        f"""
        import sys
        sys.path[:] = {pythonpath!r} + [{str(BACKEND_UTILS)!r}] + [p for p in sys.path if p]
        ALLOWED = set({allowed!r})
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                top = name.partition(".")[0]
                if top not in ALLOWED and not any((__import__("os").path.exists(p + "/" + top) or
                        __import__("os").path.exists(p + "/" + top + ".py")) for p in {pythonpath!r}):
                    raise ModuleNotFoundError(f"{{name}} is not installed in the Triton image")
                return None
        sys.meta_path.insert(0, Refuse())
        """
    )
    site = sysconfig.get_paths()["purelib"]
    # -S: no site processing, so the editable installs' .pth files of this venv are not read.
    return subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.append({site!r})\n{prelude}\n{code}"],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_imports_from_the_images_files_alone(image: Path, entry: str) -> None:
    path = image / ENTRY_POINTS[entry].lstrip("/")
    assert path.is_file(), f"{ENTRY_POINTS[entry]} is not in the image"
    code = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("entry", {str(path)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["entry"] = module
        spec.loader.exec_module(module)
        """
    )
    result = image_python(image, code)
    assert result.returncode == 0, f"{entry}:\n{result.stderr[-3000:]}"


def test_the_engine_build_imports_from_the_images_files_alone(image: Path) -> None:
    result = image_python(image, "\n".join(f"import {m}" for m in ENGINE_MODULES))
    assert result.returncode == 0, result.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    """Every module an import statement of the file names, including imports inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_engine_builds_lazy_imports_are_all_in_the_image(image: Path) -> None:
    """Imports inside functions run only when an engine is built: follow them through our modules."""
    pythonpath = [image / p.lstrip("/") for p in env(TRITON_DOCKERFILE)["PYTHONPATH"].split(":")]
    allowed = allowed_top_level(DEPLOY / "triton" / "requirements.txt")

    def source(module: str) -> Path | None:
        for root in pythonpath:
            for candidate in (root / f"{module.replace('.', '/')}.py", root / module.replace(".", "/")):
                if candidate.is_file():
                    return candidate
                if (candidate / "__init__.py").is_file():
                    return candidate / "__init__.py"
        return None

    ours = ("piaa_export", "piaa_triton", "piaa_client")
    todo, seen, missing = ["piaa_export.onnx2trt", "piaa_export.onnx_precision"], set(), []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = source(module)
        if path is None:
            missing.append(module)
            continue
        for name in _imports(path):
            if name.startswith(ours):
                todo.append(name)
            elif name.partition(".")[0] not in allowed:
                missing.append(f"{name} (imported by {module})")
    assert not missing, f"the engine build would import what the image lacks: {missing}"


# --- requirements resolve for the containers' Python and platform (network: PyPI) ---------------------
def manylinux_platforms(glibc: str) -> list[str]:
    """Every manylinux tag a glibc of this version runs: pip takes only the tags it is given."""
    major, minor = (int(x) for x in glibc.split("."))
    assert major == 2
    return ["manylinux2014_x86_64"] + [f"manylinux_2_{m}_x86_64" for m in range(17, minor + 1)]


def dry_run(python: str, glibc: str, requirements: Path, tmp_path: Path) -> dict:
    report = tmp_path / "report.json"
    platforms = [arg for tag in manylinux_platforms(glibc) for arg in ("--platform", tag)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--target", str(tmp_path / "never-written"), "--report", str(report),
         "--python-version", python, *platforms, "--only-binary=:all:",
         "-c", str(REPO_ROOT / "requirements" / "constraints.txt"), "-r", str(requirements)],
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(report.read_text())


def test_the_triton_images_requirements_resolve_for_the_containers_python(tmp_path: Path) -> None:
    report = dry_run(NGC["NGC_PYTHON"], NGC["NGC_GLIBC"], DEPLOY / "triton" / "requirements.txt", tmp_path)
    installed = {i["metadata"]["name"].lower() for i in report["install"]}
    cuda_major = NGC["NGC_CUDA"].split(".")[0]
    assert f"nvidia-dali-cuda{cuda_major}0" in installed, "DALI's wheel must match the container's CUDA major"
    assert not installed & {"torch", "tqdm", "scipy"}


def test_the_gateway_images_requirements_resolve_for_its_python(tmp_path: Path) -> None:
    image = arg_defaults(GATEWAY_DOCKERFILE)["PYTHON_IMAGE"]  # python:3.11.13-slim-bookworm
    python = ".".join(image.split(":")[1].split(".")[:2])
    glibc = {"bookworm": "2.36", "trixie": "2.41"}[image.rsplit("-", 1)[1]]
    report = dry_run(python, glibc, DEPLOY / "gateway-requirements.txt", tmp_path)
    assert not {i["metadata"]["name"].lower() for i in report["install"]} & {"torch", "onnxruntime", "pillow"}


# --- TensorRT names against the bindings (network: PyPI, 1.3 MB per version, cached under build/) ------
TENSORRT_BINDINGS = ("10.13.3.9", "11.0.0.114", "11.4.0.106")
"""The last TensorRT 10 of an NGC Triton (25.12) and the first and newest TensorRT 11 on PyPI: the builder
must work on both majors, and the image's NGC_TENSORRT major is one of them."""
REMOVED_IN_11 = ("int8_calibrator", "set_calibration_profile", "IInt8EntropyCalibrator2", "FP16")
"""Names an implicit-quantization builder uses (BuilderFlag.FP16 among them): the control that the check
sees a name TensorRT 11 no longer has."""


def bindings_strings(version: str) -> set[str]:
    """The NUL-terminated strings of tensorrt_bindings/tensorrt.so from tensorrt-cu<major>-bindings.

    The linker stores a string that ends another only once ("Builder" inside "IBuilder"), so a name is
    present when it is a string or the tail of one (missing_names)."""
    cuda_major = NGC["NGC_CUDA"].split(".")[0]
    cache = REPO_ROOT / "build" / "cache" / "tensorrt-bindings"
    cache.mkdir(parents=True, exist_ok=True)
    python = NGC["NGC_PYTHON"].replace(".", "")
    wheels = list(cache.glob(f"tensorrt_cu{cuda_major}_bindings-{version}-cp{python}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", NGC["NGC_PYTHON"], "--platform", "manylinux_2_28_x86_64", "-d", str(cache),
             f"tensorrt-cu{cuda_major}-bindings=={version}"],
            check=True, timeout=300,
        )  # fmt: skip
        wheels = list(cache.glob(f"tensorrt_cu{cuda_major}_bindings-{version}-cp{python}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = wheel.read("tensorrt_bindings/tensorrt.so")
    return {s.decode("ascii", "replace") for s in data.split(b"\0") if s}


def missing_names(names: set[str], strings: set[str]) -> set[str]:
    """The names that are neither a string of the extension nor the tail of one."""
    return {n for n in names if n not in strings and not any(s.endswith(n) for s in strings)}


def tensorrt_names() -> set[str]:
    """Every attribute onnx2trt reads off a TensorRT object (onnx2trt.TENSORRT_OBJECTS), chains included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(onnx2trt.__file__).read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in onnx2trt.TENSORRT_OBJECTS:
            names.update(chain)
    return {n for n in names if not n.startswith("__")}  # __version__ is the Python package's


def test_the_builder_uses_only_names_the_bindings_have() -> None:
    names = tensorrt_names()
    assert {"STRONGLY_TYPED", "build_serialized_network", "execute_async_v3"} <= names
    assert str(NGC["NGC_TENSORRT"]) in {v.split(".")[0] for v in TENSORRT_BINDINGS}
    for version in TENSORRT_BINDINGS:
        strings = bindings_strings(version)
        assert not missing_names(names, strings), f"TensorRT {version} lacks {missing_names(names, strings)}"
        if version.startswith("11."):
            control = set(REMOVED_IN_11)
            assert missing_names(control, strings) == control, f"the control: TensorRT {version} has them"
