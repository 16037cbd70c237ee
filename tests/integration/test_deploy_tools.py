"""Deployment checks that run real programs: hadolint on the Dockerfiles, the gateway's health probe against
a real gRPC server, the launcher's tritonserver command on the real tritonserver, and the gateway image's
dependency list against what the gateway really imports."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from piaa_common.process import ManagedProcess, free_port, http_probe
from piaa_triton.backend import find_wheel
from tests.deploy_scripts import load_launch

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HADOLINT = Path(sys.executable).parent / "hadolint"
# What the gateway must never pull in: each is large, and none is on the gateway's path.
# grpc imports grpc_tools when it happens to be installed (a backwards-compatibility shim) and goes on
# without it; the gateway image does not install it.
# Imported only because they happen to be installed: redis-py 8 probes for these (metrics, TLS helpers)
# and uses them when present; the gateway works without them.
OPTIONAL_IMPORTS = {"grpcio-tools", "cryptography", "psutil"}
HEAVY = {"torch", "onnxruntime", "pillow", "scipy", "scikit-learn", "onnx", "matplotlib", "nvidia-pytriton"}


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], check=False, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("dockerfile", ["gateway.Dockerfile", "triton.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = hadolint(DEPLOY / dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the linter runs and fails on an unpinned base and unpinned apt packages."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3008" in result.stdout


# --- the gateway's HEALTHCHECK script -------------------------------------------------------------------
@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer, grpc.Server]]:
    """A real gRPC server with the standard health service on a free loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer, server
    server.stop(grace=None)


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), "--timeout", "2", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_healthcheck_exits_zero_only_while_serving(
    health_server: tuple[int, health.HealthServicer, grpc.Server],
) -> None:
    port, servicer, server = health_server
    address = f"127.0.0.1:{port}"
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ok = probe("--address", address)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    # Without --address it finds the port the way the gateway does: PIAA_PORT through GatewayConfig.
    assert probe(env={"PIAA_PORT": str(port)}).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # draining
    draining = probe("--address", address)
    assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout
    server.stop(grace=None)
    gone = probe("--address", address)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


# --- the launcher's tritonserver command, on the real tritonserver ----------------------------------------
def http_status(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def eventual_status(url: str, timeout_s: float = 30.0) -> int:
    """http_status once the port accepts connections: tritonserver opens its metrics port on its own
    schedule, after the HTTP endpoint that the readiness probe watched."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return http_status(url)
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_launcher_command_runs_on_tritonserver_with_the_admin_apis_closed(tmp_path: Path) -> None:
    """The flags launch.py gives tritonserver are accepted by a real one (an empty repository keeps this
    to a second); health and metrics answer, shared memory and model control refuse anyone without the key."""
    launch = load_launch()
    ports = (free_port(), free_port(), free_port())
    command = launch.server_command(tmp_path, "cpu", ports=ports, admin_key="test-key")
    command[0] = str(find_wheel().server_binary)
    http = f"http://127.0.0.1:{ports[0]}"
    live = http_probe(lambda: f"{http}/v2/health/live")
    with ManagedProcess(command, ready=live, log_path=tmp_path / "tritonserver.log", start_timeout_s=60):
        assert http_status(f"{http}/v2/health/ready") == 200
        assert eventual_status(f"http://127.0.0.1:{ports[2]}/metrics") == 200
        assert http_status(f"{http}/v2/repository/index", "POST") == 403
        assert http_status(f"{http}/v2/systemsharedmemory/status") == 403
        key = {launch.ADMIN_HEADER: "test-key"}
        assert http_status(f"{http}/v2/repository/index", "POST", key) == 200
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        assert client.is_server_live()
        with pytest.raises(InferenceServerException):
            client.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException):
            client.get_model_repository_index()
        client.close()


def test_the_launchers_repository_with_a_release_serves_both_spaces_on_tritonserver(tmp_path: Path) -> None:
    """`launch.py prepare --profile cpu` on an ONNX folder that carries heads_fs2.onnx (the built heads
    re-tagged into fs2), served with launch.py's flags by a real tritonserver: piaa and piaa_fs2 both ready,
    each naming its space, piaa_fs2 answering with the same heads' outputs, model control still closed."""
    import numpy as np
    import onnx

    from piaa_client import features as fs
    from piaa_triton.paths import BACKBONE_INT8_CPU_ONNX, backend_dir, onnx_dir
    from tests.conftest import SHARED_PHOTOS

    launch = load_launch()
    built, folder, repository = onnx_dir(), tmp_path / "onnx", tmp_path / "cpu"
    folder.mkdir()
    for name in (BACKBONE_INT8_CPU_ONNX, "heads.onnx"):
        (folder / name).symlink_to(built / name)
    release = onnx.load(str(built / "heads.onnx"))
    onnx.helper.set_model_props(release, {"feature_space_version": "fs2"})
    onnx.save(release, folder / "heads_fs2.onnx")
    prepare = subprocess.run(
        [sys.executable, str(DEPLOY / "triton" / "launch.py"), "prepare", "--profile", "cpu", "--out",
         str(repository), "--cores", "1"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PIAA_ONNX_DIR": str(folder), "PIAA_CPU_PRECISION": "int8"},
    )  # fmt: skip
    assert prepare.returncode == 0, prepare.stderr
    assert f"extra heads: fs2 ({folder / 'heads_fs2.onnx'})" in prepare.stdout
    ports = (free_port(), free_port(), free_port())
    command = launch.server_command(repository, "cpu", ports=ports, admin_key="test-key")
    command[0] = str(find_wheel().server_binary)
    # Where this machine's Python backend lives and a shm prefix of its own (the NGC image has its defaults).
    command += [
        f"--backend-directory={backend_dir()}",
        f"--backend-config=python,shm-region-prefix-name=piaa_launch_{os.getpid()}_",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ready = http_probe(lambda: f"http://127.0.0.1:{ports[0]}/v2/health/ready")
    log = tmp_path / "tritonserver.log"
    with ManagedProcess(command, ready=ready, log_path=log, start_timeout_s=180, env=env):
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        spaces = {}
        for model in ("piaa", "piaa_fs2"):
            assert client.is_model_ready(model), model
            config = client.get_model_config(model).config
            spaces[model] = config.parameters["feature_space_version"].string_value
        assert spaces == {"piaa": fs.FEATURE_SPACE_VERSION, "piaa_fs2": "fs2"}
        photo = sorted(SHARED_PHOTOS.glob("*.JPEG"))[0].read_bytes()
        outputs = {}
        for model in ("piaa", "piaa_fs2"):
            tensor = triton_grpc.InferInput(fs.ENSEMBLE_INPUT.name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[photo]], dtype=object))
            result = client.infer(model, [tensor])
            outputs[model] = {o.name: result.as_numpy(o.name) for o in fs.HEAD_OUTPUTS}
        for output in fs.HEAD_OUTPUTS:  # the same weights under another space name
            np.testing.assert_allclose(
                outputs["piaa_fs2"][output.name], outputs["piaa"][output.name], atol=1e-6
            )
        with pytest.raises(InferenceServerException):
            client.unload_model("piaa_fs2")  # no key: the repository API stays closed
        client.close()


# --- the gateway image installs what the gateway imports, and nothing heavy --------------------------------
def _name(requirement: str) -> str:
    return re.split(r"[\[<>=~;! ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """The distributions `names` install (their requirements, recursively, as installed here)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            extra = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", req)
            if extra and not (name == "tritonclient" and extra.group(1) == "grpc"):
                continue
            if "python_full_version < '3.11.3'" in req or 'python_version < "3.11"' in req:
                continue
            todo.append(_name(req))
    return seen


SERVER_REQUIREMENTS = DEPLOY.parent / "requirements" / "server.txt"


def _is_req(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def test_gateway_requirements_cover_what_the_gateway_imports() -> None:
    listed = {
        _name(line)
        for line in (DEPLOY / "gateway-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    script = (
        "import json, sys, importlib.metadata as md; import piaa_personalization.api.server; "
        "dists = md.packages_distributions(); "
        "print(json.dumps(sorted({d for m in list(sys.modules) for d in dists.get(m.split('.')[0], [])})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    ours = {"piaa", "piaa-client", "setuptools", "pip"}
    # Only what the server's own requirements bring can be a dependency; anything else imported was found
    # installed by chance (a dev or benchmark extra such as Ray's OpenTelemetry) and probed optionally.
    server = _closure({_name(line) for line in SERVER_REQUIREMENTS.read_text().splitlines() if _is_req(line)})
    imported = ({_name(d) for d in json.loads(out.stdout)} & server) - ours - OPTIONAL_IMPORTS
    assert imported, "the import probe found nothing: it is broken"
    installed = _closure(listed)
    assert imported <= installed, f"the gateway imports {sorted(imported - installed)}, not in the image"
    assert not (installed & HEAVY), f"the gateway image would install {sorted(installed & HEAVY)}"
    assert not (imported & HEAVY)
